//! The applied log: a RabbitMQ stream (`<queue>.applied`) of what Listrak accepted, one record
//! per delivered batch, appended with a publisher confirm after the 201s and before the acks.
//! Every worker reads it from its horizon at start and tails it while it runs, so the
//! superseded guard knows what any replica applied, whenever.
//!
//! A record also notes the contacts of the batch whose messages went to a retry queue or the
//! dead-letter queue (or were left for redelivery): an older copy of theirs may come back, so
//! the guard watches those keys for the log's horizon (see `driver::superseded`).
//!
//! A record is compact JSON, compressed with zlib (`content-encoding: deflate`: about a third
//! of its JSON, message ids being random), one object per record:
//! `{"v":1,"list":1001,"at":<µs>,"rid":["…"],"a":[{"e":"a@x.io","f":[[456,"on",<µs before at>]],
//! "m":["msg-1"]}],"p":[{"e":"b@x.io","f":[[456,<µs before at>]]}]}`. Event times are written as
//! how long before `at` they were, which is short for recent events. Uncompressed JSON reads
//! too (a zlib stream never begins with `{`). A record this version cannot read (another
//! version, a hand-published message, a body that inflates past `MAX_RECORD_BYTES`) is
//! skipped and counted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::edges::broker::{as_i64, PublishError, Publisher, Topology};
use crate::edges::telemetry::Metrics;
use crate::stages::batch::Batch;
use crate::stages::model::{AppliedKey, AppliedKnowledge, EventTime, FieldId, ListId, Verdict};

pub const VERSION: u32 = 1;
/// Records in hand at once while reading the log: up to 1,000 contacts each, about 100 KB,
/// so a few MiB; more reads no faster (measured with `listrak-bench --applied-log`).
const READ_PREFETCH: u16 = 64;
/// How long a read up to the marker may go without a record before it is given up.
const SILENCE: Duration = Duration::from_secs(30);
/// The most a record may inflate to: a batch's body is at most `batch.max_bytes` (1 MB by
/// default, at most 10 MB at Listrak), and its record is about as long.
const MAX_RECORD_BYTES: u64 = 64 << 20;
/// Fastest zlib level: level 6 makes a record 8% smaller for two and a half times the CPU.
const COMPRESSION: flate2::Compression = flate2::Compression::fast();
/// How often the guard's gauges are set and expired keys dropped while tailing.
const TICK: Duration = Duration::from_secs(1);

/// One record: what one delivered batch applied, and which of its contacts have copies out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    /// The process that wrote it: a worker tailing the log skips its own records unread (it
    /// knows what they say), by this prefix of their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w: Option<String>,
    /// Set on the marker a worker appends at start to know when it has read everything
    /// before it; such a record carries nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<String>,
    #[serde(default)]
    pub list: u32,
    /// When Listrak accepted the requests, in microseconds since the epoch.
    #[serde(default)]
    pub at: i64,
    /// Listrak's `resourceId` of each accepted request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rid: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub a: Vec<AppliedContact>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub p: Vec<PendingContact>,
}

/// A contact whose values Listrak accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedContact {
    pub e: String,
    /// Field id, value, and how many microseconds before `at` the event happened.
    pub f: Vec<(i64, String, i64)>,
    /// The message ids of the messages whose updates these are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub m: Vec<String>,
}

/// A contact whose messages went to a retry queue or the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingContact {
    pub e: String,
    /// Field id and how many microseconds before `at` the event happened.
    pub f: Vec<(i64, i64)>,
}

/// One applied value, as `history` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedValue {
    pub list: u32,
    pub email: String,
    pub field: i64,
    pub value: String,
    pub event_time: EventTime,
    pub applied_at: EventTime,
    pub message_ids: Vec<String>,
    pub resource_ids: Vec<String>,
}

impl Record {
    /// What a delivered batch applied and left outstanding; `None` when neither (every
    /// contact superseded). `message_id` gives a delivery tag's message id; `writer` is the
    /// worker's (see [`new_writer`]).
    pub fn of_delivery(
        writer: &str,
        batch: &Batch,
        verdicts: &[Verdict],
        resource_ids: Vec<String>,
        now: EventTime,
        message_id: impl Fn(u64) -> Option<String>,
    ) -> Option<Record> {
        let before = |time: EventTime| now.0.saturating_sub(time.0);
        let mut applied = Vec::new();
        let mut pending = Vec::new();
        for (contact, verdict) in batch.contacts.iter().zip(verdicts) {
            match verdict {
                Verdict::Applied => applied.push(AppliedContact {
                    e: contact.email.clone(),
                    f: contact
                        .fields
                        .iter()
                        .map(|f| {
                            (
                                i64::from(f.field.get()),
                                f.value.clone(),
                                before(f.timestamp),
                            )
                        })
                        .collect(),
                    m: contact
                        .messages
                        .iter()
                        .filter_map(|tag| message_id(*tag))
                        .collect(),
                }),
                Verdict::Retry | Verdict::DeadLetter(_) | Verdict::Abandoned => {
                    pending.push(PendingContact {
                        e: contact.email.clone(),
                        f: contact
                            .fields
                            .iter()
                            .map(|f| (i64::from(f.field.get()), before(f.timestamp)))
                            .collect(),
                    })
                }
                Verdict::Superseded => {}
            }
        }
        if applied.is_empty() && pending.is_empty() {
            return None;
        }
        Some(Record {
            v: VERSION,
            w: Some(writer.to_owned()),
            sync: None,
            list: batch.list_id.get(),
            at: now.0,
            rid: resource_ids,
            a: applied,
            p: pending,
        })
    }

    pub fn marker(id: String) -> Record {
        Record {
            v: VERSION,
            w: None,
            sync: Some(id),
            list: 0,
            at: EventTime::now().0,
            rid: Vec::new(),
            a: Vec::new(),
            p: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Whole: the encoder compresses at every write, and JSON is written a token at a time.
        let json = serde_json::to_vec(self).expect("a record encodes");
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::with_capacity(json.len() / 3), COMPRESSION);
        std::io::Write::write_all(&mut encoder, &json).expect("writing to memory does not fail");
        encoder.finish().expect("writing to memory does not fail")
    }

    /// The record in `bytes` (compressed or plain JSON), or why it cannot be read.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let record: Record = if bytes.first() == Some(&b'{') {
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?
        } else {
            serde_json::from_slice(&inflate(bytes, MAX_RECORD_BYTES)?).map_err(|e| e.to_string())?
        };
        if record.v != VERSION {
            return Err(format!(
                "version {} (this worker reads {VERSION})",
                record.v
            ));
        }
        if record.sync.is_none() && ListId::new(i64::from(record.list)).is_none() {
            return Err(format!("list {} is not a list id", record.list));
        }
        Ok(record)
    }

    /// Teaches the guard what the record says: values applied, keys to watch.
    pub fn feed(&self, guard: &(impl AppliedKnowledge + ?Sized)) {
        let Some(list) = ListId::new(i64::from(self.list)) else {
            return;
        };
        let at = EventTime(self.at);
        for contact in &self.a {
            for (field, value, before) in &contact.f {
                if let Some(field) = FieldId::new(*field) {
                    let time = EventTime(self.at.saturating_sub(*before));
                    let key = AppliedKey {
                        list,
                        email: &contact.e,
                        field,
                    };
                    guard.applied(key, value, time, at);
                }
            }
        }
        self.watch(guard);
    }

    /// Teaches the guard only which keys to watch (what was applied it learnt already).
    pub fn watch(&self, guard: &(impl AppliedKnowledge + ?Sized)) {
        let Some(list) = ListId::new(i64::from(self.list)) else {
            return;
        };
        let at = EventTime(self.at);
        for contact in &self.p {
            for (field, _) in &contact.f {
                if let Some(field) = FieldId::new(*field) {
                    guard.outstanding(list, &contact.e, field, at);
                }
            }
        }
    }

    /// The values the record applied for `email` (already lower-cased), on `list` if given.
    pub fn values_for(&self, email: &str, list: Option<u32>) -> Vec<AppliedValue> {
        if list.is_some_and(|list| list != self.list) {
            return Vec::new();
        }
        self.a
            .iter()
            .filter(|contact| contact.e == email)
            .flat_map(|contact| {
                contact.f.iter().map(|(field, value, before)| AppliedValue {
                    list: self.list,
                    email: contact.e.clone(),
                    field: *field,
                    value: value.clone(),
                    event_time: EventTime(self.at.saturating_sub(*before)),
                    applied_at: EventTime(self.at),
                    message_ids: contact.m.clone(),
                    resource_ids: self.rid.clone(),
                })
            })
            .collect()
    }
}

/// The JSON of a compressed record, refused when it is longer than `limit`.
fn inflate(bytes: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut json = Vec::with_capacity(bytes.len() * 3);
    flate2::read::ZlibDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut json)
        .map_err(|e| format!("not a zlib stream: {e}"))?;
    if json.len() as u64 > limit {
        return Err(format!("inflates past {limit} bytes"));
    }
    Ok(json)
}

/// A new writer id: one per worker (and so per guard), random.
pub fn new_writer() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Appends a record (as `Record::encode` made it) and waits for the broker's confirm. The
/// writer goes into `app-id` too, so that a worker tailing the log knows its own records
/// without inflating them.
pub async fn append(
    publisher: &Publisher,
    topology: &Topology,
    record: &[u8],
    writer: Option<&str>,
) -> Result<(), PublishError> {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_content_encoding("deflate".into());
    if let Some(writer) = writer {
        properties = properties.with_app_id(writer.into());
    }
    publisher
        .publish("", &topology.applied, record, properties)
        .await
}

/// Where a read of the log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest record younger than this.
    Age(Duration),
    /// This offset of the stream (the one after the last read).
    Offset(i64),
    /// The oldest record the stream holds.
    First,
}

impl ReadFrom {
    pub fn argument(self) -> AMQPValue {
        match self {
            Self::Age(age) => {
                let since =
                    chrono::Utc::now().timestamp() - i64::try_from(age.as_secs()).unwrap_or(0);
                AMQPValue::Timestamp(u64::try_from(since.max(0)).unwrap_or(0))
            }
            Self::Offset(offset) => AMQPValue::LongLongInt(offset),
            Self::First => AMQPValue::LongString("first".into()),
        }
    }
}

/// Who reads the log, and where what it reads goes.
pub struct Reader {
    pub guard: Arc<dyn AppliedKnowledge>,
    pub metrics: Metrics,
    /// Where a later read resumes: the offset after the last record read.
    pub next_offset: Arc<AtomicI64>,
    /// The reader's own records (see [`new_writer`]) are skipped unread.
    pub writer: String,
}

/// The log being read: done once everything appended before the read started was read.
pub struct Following {
    pub synced: oneshot::Receiver<u64>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Reads the log from `from` into the guard, then tails it; `next_offset` keeps where a
/// later read resumes. `synced` completes (with the number of records read) once the marker
/// this appends is read: everything before it is in the guard.
pub async fn follow(
    connection: &Connection,
    publisher: &Publisher,
    topology: &Topology,
    from: ReadFrom,
    reader: Reader,
) -> Result<Following, PublishError> {
    let Reader {
        guard,
        metrics,
        next_offset,
        writer,
    } = reader;
    let Read {
        channel,
        mut consumer,
        marker: marker_id,
    } = Read::open(connection, publisher, topology, from, "applied").await?;
    let (synced_tx, synced) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut synced_tx = Some(synced_tx);
        let mut read = 0u64;
        let mut unacked = 0u32;
        let mut last_tag = 0u64;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                delivery = consumer.next() => {
                    let Some(Ok(delivery)) = delivery else {
                        tracing::warn!(
                            "the applied log's consumer ended; until the next broker session, \
                             this worker does not learn what other replicas apply"
                        );
                        return;
                    };
                    if let Some(offset) = delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|headers| headers.inner().get("x-stream-offset"))
                        .and_then(as_i64)
                    {
                        next_offset.store(offset + 1, Ordering::Release);
                    }
                    let own = delivery
                        .properties
                        .app_id()
                        .as_ref()
                        .is_some_and(|id| id.as_str() == writer);
                    if own {
                        // Its own record: the guard learnt it when it was written.
                        read += 1;
                    } else {
                        match Record::decode(&delivery.data) {
                            Ok(record) => match &record.sync {
                                Some(id) if *id == marker_id => {
                                    if let Some(tx) = synced_tx.take() {
                                        let _ = tx.send(read);
                                    }
                                }
                                Some(_) => {}
                                None => {
                                    read += 1;
                                    record.feed(&*guard);
                                }
                            },
                            Err(why) => unreadable(&metrics, &why),
                        }
                    }
                    last_tag = delivery.delivery_tag;
                    unacked += 1;
                    if unacked >= u32::from(READ_PREFETCH / 2) {
                        let multiple = BasicAckOptions { multiple: true };
                        if channel.basic_ack(last_tag, multiple).await.is_err() {
                            return;
                        }
                        unacked = 0;
                    }
                }
                _ = tick.tick() => {
                    if unacked > 0 {
                        let multiple = BasicAckOptions { multiple: true };
                        if channel.basic_ack(last_tag, multiple).await.is_err() {
                            return;
                        }
                        unacked = 0;
                    }
                    let (keys, horizon) = guard.tick(EventTime::now());
                    metrics.guard(keys, horizon);
                }
            }
        }
    });
    Ok(Following { synced, task })
}

/// A key of the log: list, email (lower-cased) and field id.
pub type LogKey = (u32, String, i64);

/// The newest value the log holds for each of `wanted`, read from `from` up to its end (a
/// marker appended now): for read-backs of keys whose values the guard forgot.
pub async fn newest_values(
    connection: &Connection,
    topology: &Topology,
    from: ReadFrom,
    wanted: &HashSet<LogKey>,
) -> Result<HashMap<LogKey, (String, EventTime)>, ReadError> {
    let publisher = Publisher::new(connection).await?;
    let read = Read::open(connection, &publisher, topology, from, "read-back").await;
    let _ = publisher.channel().close(200, "done".into()).await;
    let emails: HashSet<&str> = wanted.iter().map(|(_, email, _)| email.as_str()).collect();
    let mut newest: HashMap<LogKey, (String, EventTime)> = HashMap::new();
    read?
        .to_marker(|record| {
            for contact in &record.a {
                if !emails.contains(contact.e.as_str()) {
                    continue;
                }
                for (field, value, before) in &contact.f {
                    let key = (record.list, contact.e.clone(), *field);
                    if !wanted.contains(&key) {
                        continue;
                    }
                    let time = EventTime(record.at.saturating_sub(*before));
                    let entry = newest.entry(key).or_insert_with(|| (value.clone(), time));
                    // The later record wins a tie, as the later delivery does.
                    if time >= entry.1 {
                        *entry = (value.clone(), time);
                    }
                }
            }
        })
        .await?;
    Ok(newest)
}

/// Reads the log from `from` up to its end (a marker appended now) into `guard`, without
/// tailing it: for the commands that judge dead letters against it. Returns the records read.
pub async fn read_into(
    connection: &Connection,
    topology: &Topology,
    guard: &dyn AppliedKnowledge,
    from: ReadFrom,
) -> Result<u64, ReadError> {
    let publisher = Publisher::new(connection).await?;
    let read = Read::open(connection, &publisher, topology, from, "read").await;
    let _ = publisher.channel().close(200, "done".into()).await;
    read?.to_marker(|record| record.feed(guard)).await
}

/// Why a read of the log ended before its marker.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Append(#[from] PublishError),
    #[error("the broker stopped the read of the applied log: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the read of the applied log before its end")]
    Ended,
    #[error("the applied log sent nothing for {}s before its end was reached", .0.as_secs())]
    Silent(Duration),
}

/// A read of the log from some point, with a marker appended at its end: once the marker is
/// read, everything appended before the read began was read.
pub struct Read {
    pub channel: lapin::Channel,
    pub consumer: lapin::Consumer,
    pub marker: String,
}

impl Read {
    /// Starts reading from `from` and appends the marker; `purpose` names the consumer.
    pub async fn open(
        connection: &Connection,
        publisher: &Publisher,
        topology: &Topology,
        from: ReadFrom,
        purpose: &str,
    ) -> Result<Read, PublishError> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(READ_PREFETCH, BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), from.argument());
        let tag = format!("listrak-worker-{purpose}-{}", std::process::id());
        let consumer = channel
            .basic_consume(
                topology.applied.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await?;
        let marker = format!("{:032x}", rand::random::<u128>());
        append(
            publisher,
            topology,
            &Record::marker(marker.clone()).encode(),
            None,
        )
        .await?;
        Ok(Read {
            channel,
            consumer,
            marker,
        })
    }

    /// Hands every readable record before the marker to `each` (unreadable ones are
    /// skipped), then closes the read; returns how many were handed.
    pub async fn to_marker(mut self, mut each: impl FnMut(Record)) -> Result<u64, ReadError> {
        let mut read = 0u64;
        let mut unacked = 0u16;
        loop {
            let delivery = match tokio::time::timeout(SILENCE, self.consumer.next()).await {
                Ok(Some(delivery)) => delivery?,
                Ok(None) => return Err(ReadError::Ended),
                Err(_) => return Err(ReadError::Silent(SILENCE)),
            };
            unacked += 1;
            if unacked >= READ_PREFETCH / 2 {
                let multiple = BasicAckOptions { multiple: true };
                self.channel
                    .basic_ack(delivery.delivery_tag, multiple)
                    .await?;
                unacked = 0;
            }
            let Ok(record) = Record::decode(&delivery.data) else {
                continue;
            };
            match &record.sync {
                Some(id) if *id == self.marker => break,
                Some(_) => {}
                None => {
                    read += 1;
                    each(record);
                }
            }
        }
        let _ = self.channel.close(200, "done".into()).await;
        Ok(read)
    }
}

/// A record that cannot be read: counted, and logged once per process.
fn unreadable(metrics: &Metrics, why: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    metrics.applied_log_unreadable();
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            why,
            "skipping a record of the applied log this worker cannot read (further ones are \
             only counted: listrak_applied_log_unreadable_total)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::batch::{Contact, FieldValue, FlushTrigger};
    use crate::stages::model::{DeadLetterReason, Rejection};
    use std::time::Instant;

    fn batch() -> Batch {
        let contact = |email: &str, tag: u64| Contact {
            email: email.into(),
            fields: vec![
                FieldValue {
                    field: FieldId::new(456).unwrap(),
                    value: "on".into(),
                    timestamp: EventTime(1_700_000_000_000_000),
                },
                FieldValue {
                    field: FieldId::new(789).unwrap(),
                    value: "off".into(),
                    timestamp: EventTime(1_700_000_000_500_000),
                },
            ],
            messages: vec![tag],
            since: Instant::now(),
        };
        Batch {
            list_id: ListId::new(1001).unwrap(),
            contacts: vec![
                contact("a@example.com", 1),
                contact("b@example.com", 2),
                contact("c@example.com", 3),
            ],
            trigger: FlushTrigger::Size,
        }
    }

    /// What a record taught: the values applied (email, field, event time), and how many
    /// keys it said to watch.
    #[derive(Default)]
    struct Learnt {
        applied: std::sync::Mutex<Vec<(String, u32, i64)>>,
        outstanding: std::sync::Mutex<usize>,
    }

    impl AppliedKnowledge for Learnt {
        fn applied(&self, key: AppliedKey<'_>, _: &str, time: EventTime, _: EventTime) {
            let entry = (key.email.to_owned(), key.field.get(), time.0);
            self.applied.lock().unwrap().push(entry);
        }

        fn outstanding(&self, _: ListId, _: &str, _: FieldId, _: EventTime) {
            *self.outstanding.lock().unwrap() += 1;
        }

        fn tick(&self, _: EventTime) -> (usize, Duration) {
            (0, Duration::ZERO)
        }
    }

    #[test]
    fn a_record_reads_back_and_teaches_the_guard_what_was_applied_and_what_is_outstanding() {
        let now = EventTime(1_700_000_001_000_000);
        let verdicts = [
            Verdict::Applied,
            Verdict::Retry,
            Verdict::DeadLetter(Rejection {
                reason: DeadLetterReason::Rejected,
                status: Some(400),
                error: None,
                message: None,
                list_id: None,
            }),
        ];
        let record =
            Record::of_delivery("w", &batch(), &verdicts, vec!["rid-1".into()], now, |tag| {
                Some(format!("msg-{tag}"))
            })
            .unwrap();
        let bytes = record.encode();
        let read = Record::decode(&bytes).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.a.len(), 1);
        assert_eq!(read.p.len(), 2);
        println!(
            "{} bytes for one applied and two pending contacts",
            bytes.len()
        );

        let learnt = Learnt::default();
        read.feed(&learnt);
        let applied = learnt.applied.lock().unwrap().clone();
        assert_eq!(
            applied,
            [
                ("a@example.com".to_owned(), 456, 1_700_000_000_000_000),
                ("a@example.com".to_owned(), 789, 1_700_000_000_500_000)
            ]
        );
        assert_eq!(
            *learnt.outstanding.lock().unwrap(),
            4,
            "two pending contacts, two fields each"
        );

        let values = read.values_for("a@example.com", Some(1001));
        assert_eq!(values.len(), 2);
        assert_eq!(values[0].event_time, EventTime(1_700_000_000_000_000));
        assert_eq!(values[0].message_ids, ["msg-1"]);
        assert_eq!(values[0].resource_ids, ["rid-1"]);
        assert!(read.values_for("a@example.com", Some(7)).is_empty());
    }

    #[test]
    fn a_record_of_another_version_or_shape_is_refused_with_a_reason() {
        for bytes in [
            &b"{\"v\":2,\"list\":1}"[..],
            b"not json",
            b"{\"v\":1,\"list\":0}",
            b"[1,2]",
        ] {
            assert!(
                Record::decode(bytes).is_err(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let marker = Record::marker("m".into()).encode();
        assert_eq!(Record::decode(&marker).unwrap().sync.as_deref(), Some("m"));
    }

    #[test]
    fn a_full_record_compresses_and_plain_json_still_reads() {
        let applied = (0..1000)
            .map(|n| AppliedContact {
                e: format!("person{n}@example.com"),
                f: vec![(4_000_000 + n % 5, "on".into(), 1_500_000 + n)],
                m: vec![format!("{:032x}", rand::random::<u128>())],
            })
            .collect();
        let record = Record {
            v: VERSION,
            w: Some("0123456789abcdef".into()),
            sync: None,
            list: 1001,
            at: 1_700_000_000_000_000,
            rid: vec!["rid-1".into()],
            a: applied,
            p: Vec::new(),
        };
        let json = serde_json::to_vec(&record).unwrap();
        let compressed = record.encode();
        println!(
            "1,000 applied contacts: {} bytes of JSON, {} compressed",
            json.len(),
            compressed.len()
        );
        assert!(compressed.len() * 2 < json.len(), "{}", compressed.len());
        assert_eq!(Record::decode(&compressed).unwrap(), record);
        assert_eq!(Record::decode(&json).unwrap(), record, "records of before");
    }

    #[test]
    fn a_record_that_inflates_past_the_limit_is_refused() {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), COMPRESSION);
        std::io::Write::write_all(&mut encoder, &[b' '; 4096]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(inflate(&bomb, 4096).is_ok());
        let refused = inflate(&bomb, 4095).unwrap_err();
        assert!(refused.contains("inflates past 4095 bytes"), "{refused}");
    }

    #[test]
    fn nothing_applied_nor_outstanding_writes_no_record() {
        let verdicts = [
            Verdict::Superseded,
            Verdict::Superseded,
            Verdict::Superseded,
        ];
        assert!(
            Record::of_delivery("w", &batch(), &verdicts, vec![], EventTime(0), |_| None).is_none()
        );
    }
}
