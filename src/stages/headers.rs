//! What the worker writes on a message and how it names its queues: the header names, the
//! headers of a copy, the properties carried over, and the topology's names. Pure (no I/O):
//! `disposition` decides with them, `edges::broker` declares and publishes with them.

use std::cell::Cell;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::stages::model::EventTime;

/// Every exchange and queue the worker uses, named after `amqp.queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    /// `<queue>.dead`: the dead-letter exchange and queue share this name.
    pub dead: String,
    /// One queue per `retry.schedule` step: name and delay.
    pub retries: Vec<(String, Duration)>,
    /// The main queue is declared with `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `<queue>.applied`: the applied log, a stream.
    pub applied: String,
    /// The applied log's `x-max-age` and `x-max-length-bytes`.
    pub applied_max_age: Duration,
    pub applied_max_bytes: u64,
    /// With read-backs on: `<queue>.readback.<after>`, where a key at risk waits `after`
    /// (the queue's TTL), and `<queue>.readback.due`, where it lands to be read.
    pub readback: Option<ReadBackQueues>,
}

/// The two queues of read-backs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBackQueues {
    pub waiting: String,
    pub after: Duration,
    pub due: String,
}

impl Topology {
    pub fn new(exchange: &str, queue: &str, schedule: &[Duration]) -> Self {
        let mut retries: Vec<(String, Duration)> = Vec::new();
        for delay in schedule {
            let name = retry_queue_name(queue, *delay);
            if !retries.iter().any(|(n, _)| *n == name) {
                retries.push((name, *delay));
            }
        }
        Self {
            exchange: exchange.to_string(),
            queue: queue.to_string(),
            dead: format!("{queue}.dead"),
            retries,
            single_active_consumer: false,
            applied: format!("{queue}.applied"),
            applied_max_age: Duration::from_secs(7 * 24 * 3600),
            applied_max_bytes: 4_000_000_000,
            readback: None,
        }
    }

    /// The retry queue for a step of the schedule.
    pub fn retry_queue(&self, delay: Duration) -> String {
        retry_queue_name(&self.queue, delay)
    }
}

impl ReadBackQueues {
    pub fn of(queue: &str, after: Duration) -> Self {
        Self {
            waiting: format!("{queue}.readback.{}", humantime::format_duration(after)),
            after,
            due: format!("{queue}.readback.due"),
        }
    }
}

/// The name of the retry queue for one step: `<queue>.retries.<delay>`, e.g. `….retries.10m`.
/// A quorum queue; an earlier release named its classic retry queues
/// [`classic_retry_queue_name`], and a queue's type cannot change under the same name.
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retries.{}", humantime::format_duration(delay))
}

/// The name an earlier release gave its classic retry queue for one step:
/// `<queue>.retry.<delay>`. What waits there still expires into the main queue; the worker
/// deletes such a queue once it is empty.
pub fn classic_retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", humantime::format_duration(delay))
}

/// The worker's own headers, read from a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryHeaders {
    pub attempts: u32,
    pub first_failed_at: Option<EventTime>,
}

pub const ATTEMPTS: &str = "x-listrak-attempts";
pub const FIRST_FAILED_AT: &str = "x-listrak-first-failed-at";
pub const LAST_FAILED_AT: &str = "x-listrak-last-failed-at";
pub const REASON: &str = "x-listrak-reason";
pub const STATUS: &str = "x-listrak-status";
pub const ERROR: &str = "x-listrak-error";
pub const MESSAGE: &str = "x-listrak-message";
pub const LIST_ID: &str = "x-listrak-list-id";
pub const REPLAYS: &str = "x-listrak-replays";
/// The event time the worker used for the message (RFC 3339, microseconds): every copy
/// carries it, and a later delivery uses it, so a message's event time never changes.
pub const EVENT_TIME: &str = "x-listrak-event-time";
/// The event time an earlier delivery used (`x-listrak-event-time`), if the message is a copy.
pub fn carried_event_time(properties: &BasicProperties) -> Option<EventTime> {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(EVENT_TIME))
        .and_then(as_time)
}

/// The producer's AMQP `timestamp` property (seconds), as an event time.
pub fn stamped_time(properties: &BasicProperties) -> Option<EventTime> {
    properties
        .timestamp()
        .and_then(|seconds| i64::try_from(seconds).ok()?.checked_mul(1_000_000))
        .map(EventTime)
}

/// The prefix of the worker's own headers; a producer's headers with it are not copied.
pub const OWN_PREFIX: &str = "x-listrak-";

impl RetryHeaders {
    pub fn read(properties: &BasicProperties) -> Self {
        let Some(headers) = properties.headers() else {
            return Self::default();
        };
        let headers = headers.inner();
        Self {
            attempts: headers
                .get(ATTEMPTS)
                .and_then(as_i64)
                .map_or(0, |n| n.clamp(0, i64::from(u32::MAX)) as u32),
            first_failed_at: headers.get(FIRST_FAILED_AT).and_then(as_time),
        }
    }
}

/// Reads an integer header whatever integer type the publisher chose.
pub fn as_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

pub fn as_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => as_i64(other).map(|n| n.to_string()),
    }
}

/// Reads a time header: an AMQP timestamp (seconds) or RFC 3339 text.
pub fn as_time(value: &AMQPValue) -> Option<EventTime> {
    match value {
        // From the producer: any 64-bit number.
        AMQPValue::Timestamp(seconds) => i64::try_from(*seconds)
            .ok()
            .and_then(|s| s.checked_mul(1_000_000))
            .map(EventTime),
        other => EventTime::parse_rfc3339(&as_text(other)?),
    }
}

/// The original properties with headers added or replaced; everything else is kept as it
/// was, so a dead letter or a retry is the message the producer sent.
pub fn with_headers(
    properties: &BasicProperties,
    headers: impl IntoIterator<Item = (&'static str, AMQPValue)>,
) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (key, value) in headers {
        table.insert(ShortString::from(key), value);
    }
    properties.clone().with_headers(table)
}

/// Where a republished message keeps the `user_id` it arrived with.
pub const ORIGINAL_USER_ID: &str = "x-listrak-original-user-id";

/// The worker's headers a copy carries over from the message it copies; the others with the
/// worker's prefix are written anew for each copy (attempts, failure times, reason) or are
/// not the worker's at all (a producer's), and are dropped.
const CARRIED_OVER: [&str; 4] = [EVENT_TIME, REPLAYS, ORIGINAL_USER_ID, HEADERS_DROPPED];
/// The most bytes a carried-over header may take: each is a number, a time or a user name.
const CARRIED_OVER_BYTES: usize = 256;

/// The properties without the headers of the worker's prefix that a copy does not carry over,
/// nor those too large to be the worker's: a producer cannot grow a copy's header frame
/// through them.
pub fn without_foreign_own_headers(properties: &BasicProperties) -> BasicProperties {
    let Some(table) = properties.headers() else {
        return properties.clone();
    };
    let mut kept = FieldTable::default();
    for (key, value) in table.inner() {
        let own = key.as_str().starts_with(OWN_PREFIX);
        if !own || (CARRIED_OVER.contains(&key.as_str()) && small(value)) {
            kept.insert(key.clone(), value.clone());
        }
    }
    properties.clone().with_headers(kept)
}

fn small(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::LongString(text) => text.as_bytes().len() <= CARRIED_OVER_BYTES,
        AMQPValue::ShortString(text) => text.as_str().len() <= CARRIED_OVER_BYTES,
        AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) | AMQPValue::ByteArray(_) => false,
        _ => true,
    }
}

/// The properties without what would make the broker refuse or drop a copy published by
/// this process: `user_id` moves to `x-listrak-original-user-id`, and `expiration` stays
/// only if `keep_expiration`.
pub fn publishable(properties: &BasicProperties, keep_expiration: bool) -> BasicProperties {
    let properties = match properties.user_id() {
        Some(user) => with_headers(properties, [(ORIGINAL_USER_ID, text_header(user.as_str()))]),
        None => properties.clone(),
    };
    // The generated properties have setters only: copy all but what must go.
    let mut kept = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = properties.$get() {
                kept = kept.$set(value.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    if keep_expiration {
        if let Some(expiration) = properties.expiration() {
            kept = kept.with_expiration(expiration.clone());
        }
    }
    kept
}

/// The most the properties of a republished copy may take encoded: a content header must fit
/// in one frame (RabbitMQ's `frame_max` is 128 KiB by default, 4 KiB at the least a client
/// may agree to is not used here), and a header frame too large closes the whole connection,
/// and the redelivered message would do it again.
const HEADER_TABLE_LIMIT: usize = 64 * 1024;
/// How many of the producer's own headers a copy had to leave out (see `within_frame`).
pub const HEADERS_DROPPED: &str = "x-listrak-headers-dropped";

/// Keeps only the worker's own headers when the producer's would make the copy's header
/// frame too large, and says how many it left out.
pub fn within_frame(properties: BasicProperties) -> BasicProperties {
    if PackedProperties::pack(&properties).len() <= HEADER_TABLE_LIMIT {
        return properties;
    }
    let mut table = FieldTable::default();
    let mut dropped = 0i64;
    for (key, value) in properties
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default()
    {
        if key.as_str().starts_with(OWN_PREFIX) {
            table.insert(key, value);
        } else {
            dropped += 1;
        }
    }
    table.insert(ShortString::from(HEADERS_DROPPED), int_header(dropped));
    properties.with_headers(table)
}

pub fn text_header(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

pub fn int_header(value: i64) -> AMQPValue {
    AMQPValue::LongLongInt(value)
}

/// A message's properties in their AMQP wire encoding: a few dozen bytes, where the parsed
/// form takes 296 inline, for each of the thousands of messages held until Listrak answers.
pub struct PackedProperties(Box<[u8]>);

impl PackedProperties {
    pub fn pack(properties: &BasicProperties) -> Self {
        thread_local! {
            // The encoder writes a field at a time: into a fresh `Vec` that was a realloc
            // per field, for every message held.
            static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut buffer = scratch.take();
            buffer.clear();
            let buffer = cookie_factory::gen_simple(
                lapin::protocol::basic::gen_properties(properties),
                buffer,
            )
            .expect("properties encode into memory");
            let packed = Self(Box::from(&buffer[..]));
            scratch.set(buffer);
            packed
        })
    }

    /// The encoded size, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn unpack(&self) -> BasicProperties {
        match lapin::protocol::basic::parse_properties(&self.0[..]) {
            Ok((_, properties)) => properties,
            Err(error) => {
                // Cannot happen for bytes `pack` wrote; if it did, the message goes on with
                // default properties rather than not at all.
                tracing::error!(?error, "could not read back a message's packed properties");
                BasicProperties::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queues_are_named_after_their_delay() {
        assert_eq!(
            retry_queue_name("listrak.audience", Duration::from_secs(600)),
            "listrak.audience.retries.10m"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(4 * 3600)),
            "q.retries.4h"
        );
    }

    use crate::stages::disposition::{republished, Republish};
    use crate::stages::model::DeadLetterReason;

    fn copy(dead_letter: Option<DeadLetterReason>) -> Republish {
        Republish {
            exchange: String::new(),
            routing_key: "q".into(),
            headers: vec![(ATTEMPTS, int_header(1))],
            dead_letter,
        }
    }

    fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        properties.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn a_copy_keeps_the_producers_user_id_in_a_header_and_drops_the_property() {
        let original = BasicProperties::default()
            .with_user_id("producer".into())
            .with_message_id("m-1".into())
            .with_expiration("5000".into());
        for dead_letter in [None, Some(DeadLetterReason::InvalidJson)] {
            let republished = republished(&original, &copy(dead_letter));
            assert_eq!(republished.user_id(), &None);
            assert_eq!(
                header(&republished, ORIGINAL_USER_ID),
                Some(&text_header("producer"))
            );
            assert_eq!(header(&republished, ATTEMPTS), Some(&int_header(1)));
            assert_eq!(republished.message_id(), original.message_id());
            assert_eq!(
                republished.expiration().is_some(),
                dead_letter.is_none(),
                "a dead letter must not expire; a retry keeps the producer's expiration"
            );
        }
    }

    #[test]
    fn a_copy_whose_headers_would_not_fit_in_a_frame_keeps_only_the_workers_own() {
        let mut headers = FieldTable::default();
        for i in 0..200 {
            headers.insert(format!("x-big-{i}").into(), text_header("x".repeat(1000)));
        }
        headers.insert("x-small".into(), int_header(1));
        let original = BasicProperties::default().with_headers(headers);
        let republished = republished(&original, &copy(Some(DeadLetterReason::InvalidJson)));
        assert!(PackedProperties::pack(&republished).len() <= HEADER_TABLE_LIMIT);
        assert_eq!(
            header(&republished, HEADERS_DROPPED),
            Some(&int_header(201))
        );
        assert_eq!(header(&republished, ATTEMPTS), Some(&int_header(1)));

        let small = BasicProperties::default().with_headers({
            let mut t = FieldTable::default();
            t.insert("x-small".into(), int_header(1));
            t
        });
        let kept = republished_ok(&small);
        assert_eq!(header(&kept, "x-small"), Some(&int_header(1)));
        assert_eq!(header(&kept, HEADERS_DROPPED), None);
    }

    #[test]
    fn a_copy_drops_the_producers_headers_of_the_workers_prefix_and_keeps_what_it_carries() {
        let mut headers = FieldTable::default();
        headers.insert("x-listrak-forged".into(), text_header("x".repeat(200_000)));
        headers.insert(REASON.into(), text_header("rejected"));
        headers.insert(STATUS.into(), int_header(400));
        headers.insert(
            EVENT_TIME.into(),
            text_header("2024-05-01T12:00:00.000001Z"),
        );
        headers.insert(REPLAYS.into(), int_header(2));
        headers.insert(ORIGINAL_USER_ID.into(), text_header("x".repeat(10_000)));
        headers.insert("x-producer".into(), text_header("kept"));
        let original = BasicProperties::default().with_headers(headers);
        let copied = republished(&original, &copy(None));
        assert!(PackedProperties::pack(&copied).len() < 1024);
        for gone in ["x-listrak-forged", REASON, STATUS, ORIGINAL_USER_ID] {
            assert_eq!(header(&copied, gone), None, "{gone}");
        }
        assert_eq!(
            header(&copied, EVENT_TIME),
            Some(&text_header("2024-05-01T12:00:00.000001Z"))
        );
        assert_eq!(header(&copied, REPLAYS), Some(&int_header(2)));
        assert_eq!(header(&copied, ATTEMPTS), Some(&int_header(1)));
        assert_eq!(header(&copied, "x-producer"), Some(&text_header("kept")));
    }

    fn republished_ok(properties: &BasicProperties) -> BasicProperties {
        republished(properties, &copy(None))
    }

    #[test]
    fn packed_properties_read_back_exactly_as_they_were() {
        let mut headers = FieldTable::default();
        headers.insert("x-listrak-attempts".into(), AMQPValue::LongLongInt(3));
        headers.insert(
            "x-note".into(),
            AMQPValue::LongString(LongString::from("ünïcode")),
        );
        let full = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_content_encoding(ShortString::from("utf-8"))
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id(ShortString::from("corr-1"))
            .with_reply_to(ShortString::from("replies"))
            .with_expiration(ShortString::from("60000"))
            .with_message_id(ShortString::from("msg-1"))
            .with_timestamp(1_700_000_000)
            .with_type(ShortString::from("audience"))
            .with_user_id(ShortString::from("guest"))
            .with_app_id(ShortString::from("engage"))
            .with_cluster_id(ShortString::from("c1"));
        for properties in [full, BasicProperties::default()] {
            let packed = PackedProperties::pack(&properties);
            assert!(packed.0.len() < 200, "{} bytes", packed.0.len());
            assert_eq!(packed.unpack(), properties);
        }
    }
}
