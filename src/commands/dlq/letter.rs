//! What a dead letter says about itself (reason, list, Listrak's answer, when it failed), and
//! the headers it carries when it is replayed.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use crate::edges::broker::{self, as_i64, as_text, as_time};
use crate::stages::model::{DeadLetterReason, EventTime};

/// RabbitMQ's record of every time the broker itself dead-lettered a message, newest first.
pub const X_DEATH: &str = "x-death";

/// Added by quorum queues to every redelivered message. It counts deliveries from the
/// dead-letter queue (a `peek` returns what it showed), so it is bookkeeping of that queue,
/// not part of the message: exports and replays leave it out.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// The reason of a message that carries neither `x-listrak-reason` nor a broker dead-letter
/// record: published to the dead-letter exchange by something other than the worker.
pub const UNKNOWN_REASON: &str = "unknown";

/// The headers that describe a failure. A replay removes them, so the message starts again
/// with a fresh retry budget and, should it fail again, is described by its new failure only.
const FAILURE_HEADERS: [&str; 9] = [
    broker::REASON,
    broker::STATUS,
    broker::ERROR,
    broker::MESSAGE,
    broker::LIST_ID,
    broker::ATTEMPTS,
    broker::FIRST_FAILED_AT,
    broker::LAST_FAILED_AT,
    DELIVERY_COUNT,
];

/// A dead letter's description, read from its headers and properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// `x-listrak-reason`; else `delivery_limit` when the broker dead-lettered the message at
    /// the main queue's delivery limit (its newest `x-death` record says so); else the
    /// broker's own reason (`expired`, `rejected`, `maxlen`) prefixed `broker_`; else
    /// [`UNKNOWN_REASON`].
    pub reason: String,
    pub list_id: Option<i64>,
    /// The HTTP status Listrak answered.
    pub status: Option<i64>,
    /// Listrak's error code (`ERROR_INVALID_PARAMETER`, ...).
    pub error: Option<String>,
    /// Listrak's message, or the worker's explanation.
    pub message: Option<String>,
    /// When it failed: `x-listrak-last-failed-at`, else the `timestamp` property, else the
    /// time of the newest `x-death` record.
    pub failed_at: Option<EventTime>,
    pub attempts: Option<i64>,
    /// How many times it was replayed before (`x-listrak-replays`).
    pub replays: i64,
}

impl Facts {
    pub fn read(properties: &BasicProperties) -> Self {
        let empty = BTreeMap::new();
        let headers = properties
            .headers()
            .as_ref()
            .map_or(&empty, |table| table.inner());
        let header = |name: &str| headers.get(name);
        let death = newest_death(headers);
        let death_field = |name: &str| death.and_then(|d| d.inner().get(name));

        let reason = match header(broker::REASON).and_then(as_text) {
            Some(reason) if !reason.is_empty() => reason,
            _ => match death_field("reason").and_then(as_text) {
                Some(reason) if reason == DeadLetterReason::DeliveryLimit.as_str() => reason,
                Some(reason) => format!("broker_{reason}"),
                None => UNKNOWN_REASON.to_string(),
            },
        };
        let failed_at = header(broker::LAST_FAILED_AT)
            .and_then(as_time)
            .or_else(|| {
                properties
                    .timestamp()
                    .and_then(|seconds| i64::try_from(seconds).ok())
                    .map(|seconds| EventTime(seconds.saturating_mul(1_000_000)))
            })
            .or_else(|| death_field("time").and_then(as_time));
        Self {
            reason,
            list_id: header(broker::LIST_ID).and_then(as_i64),
            status: header(broker::STATUS).and_then(as_i64),
            error: header(broker::ERROR)
                .and_then(as_text)
                .filter(|e| !e.is_empty()),
            message: header(broker::MESSAGE)
                .and_then(as_text)
                .filter(|m| !m.is_empty()),
            failed_at,
            attempts: header(broker::ATTEMPTS).and_then(as_i64),
            replays: header(broker::REPLAYS).and_then(as_i64).unwrap_or(0),
        }
    }
}

fn newest_death(headers: &BTreeMap<ShortString, AMQPValue>) -> Option<&FieldTable> {
    match headers.get(X_DEATH)? {
        AMQPValue::FieldArray(records) => match records.as_slice().first()? {
            AMQPValue::FieldTable(record) => Some(record),
            _ => None,
        },
        _ => None,
    }
}

/// The reasons a filter may name: the worker's, plus [`UNKNOWN_REASON`].
pub fn known_reasons() -> impl Iterator<Item = &'static str> {
    DeadLetterReason::ALL
        .into_iter()
        .map(DeadLetterReason::as_str)
        .chain([UNKNOWN_REASON])
}

/// The message's headers without the dead-letter queue's own bookkeeping
/// ([`DELIVERY_COUNT`]): what an export or a peek shows.
pub fn message_headers(properties: &BasicProperties) -> BTreeMap<ShortString, AMQPValue> {
    properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(name, _)| name.as_str() != DELIVERY_COUNT)
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The properties a replayed message is published with: the original properties and
/// headers, without the failure headers (a fresh retry budget), with `x-listrak-replays`
/// one higher. The broker's `x-death` history stays, as RabbitMQ keeps it on republish.
pub fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let mut headers = message_headers(properties);
    let replays = headers
        .get(broker::REPLAYS)
        .and_then(as_i64)
        .unwrap_or(0)
        .max(0);
    headers.retain(|name, _| !FAILURE_HEADERS.contains(&name.as_str()));
    headers.insert(
        ShortString::from(broker::REPLAYS),
        broker::int_header(replays.saturating_add(1)),
    );
    // Published by the operator's own user: a producer's user_id would be refused.
    broker::publishable(
        &properties.clone().with_headers(FieldTable::from(headers)),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::broker::{int_header, text_header};
    use lapin::types::FieldArray;

    fn properties(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let table: BTreeMap<ShortString, AMQPValue> = headers
            .iter()
            .map(|(k, v)| (ShortString::from(*k), v.clone()))
            .collect();
        BasicProperties::default().with_headers(FieldTable::from(table))
    }

    fn death(reason: &str, time: u64) -> AMQPValue {
        let mut record = FieldTable::default();
        record.insert("reason".into(), text_header(reason));
        record.insert("queue".into(), text_header("listrak.audience"));
        record.insert("count".into(), AMQPValue::LongLongInt(1));
        record.insert("time".into(), AMQPValue::Timestamp(time));
        AMQPValue::FieldTable(record)
    }

    fn deaths(records: Vec<AMQPValue>) -> AMQPValue {
        AMQPValue::FieldArray(FieldArray::from(records))
    }

    #[test]
    fn the_reason_comes_from_the_worker_then_the_broker_then_is_unknown() {
        let table = [
            (
                properties(&[(broker::REASON, text_header("rejected"))]),
                "rejected",
            ),
            (
                properties(&[
                    (broker::REASON, text_header("list_not_found")),
                    (X_DEATH, deaths(vec![death("delivery_limit", 1)])),
                ]),
                "list_not_found",
            ),
            (
                properties(&[(
                    X_DEATH,
                    deaths(vec![death("delivery_limit", 2), death("expired", 1)]),
                )]),
                "delivery_limit",
            ),
            (
                properties(&[(
                    X_DEATH,
                    deaths(vec![death("expired", 2), death("delivery_limit", 1)]),
                )]),
                "broker_expired",
            ),
            (
                properties(&[(broker::REASON, text_header(""))]),
                UNKNOWN_REASON,
            ),
            (BasicProperties::default(), UNKNOWN_REASON),
        ];
        for (i, (properties, reason)) in table.into_iter().enumerate() {
            assert_eq!(Facts::read(&properties).reason, reason, "case {i}");
        }
    }

    #[test]
    fn the_failure_time_is_the_last_failure_then_the_timestamp_then_the_broker_record() {
        let last = "2026-01-02T03:04:05.000Z";
        let table = [
            (
                properties(&[(broker::LAST_FAILED_AT, text_header(last))]).with_timestamp(100),
                EventTime::parse_rfc3339(last),
            ),
            (
                properties(&[(X_DEATH, deaths(vec![death("delivery_limit", 50)]))])
                    .with_timestamp(100),
                Some(EventTime(100_000_000)),
            ),
            (
                properties(&[(X_DEATH, deaths(vec![death("delivery_limit", 50)]))]),
                Some(EventTime(50_000_000)),
            ),
            (BasicProperties::default(), None),
        ];
        for (i, (properties, time)) in table.into_iter().enumerate() {
            assert_eq!(Facts::read(&properties).failed_at, time, "case {i}");
        }
    }

    #[test]
    fn listrak_answer_is_read_whatever_integer_type_carries_it() {
        let facts = Facts::read(&properties(&[
            (broker::REASON, text_header("rejected")),
            (broker::STATUS, AMQPValue::ShortInt(400)),
            (broker::LIST_ID, text_header("12345")),
            (broker::ERROR, text_header("ERROR_INVALID_PARAMETER")),
            (broker::MESSAGE, text_header("bad email")),
            (broker::ATTEMPTS, int_header(3)),
            (broker::REPLAYS, AMQPValue::LongUInt(2)),
        ]));
        assert_eq!(
            facts,
            Facts {
                reason: "rejected".into(),
                list_id: Some(12345),
                status: Some(400),
                error: Some("ERROR_INVALID_PARAMETER".into()),
                message: Some("bad email".into()),
                failed_at: None,
                attempts: Some(3),
                replays: 2,
            }
        );
    }

    #[test]
    fn a_replay_resets_the_failure_keeps_everything_else_and_counts_itself() {
        let original = properties(&[
            (broker::REASON, text_header("rejected")),
            (broker::STATUS, int_header(400)),
            (broker::ERROR, text_header("ERROR_INVALID_PARAMETER")),
            (broker::MESSAGE, text_header("bad email")),
            (broker::LIST_ID, int_header(12345)),
            (broker::ATTEMPTS, int_header(4)),
            (broker::FIRST_FAILED_AT, text_header("2026-01-01T00:00:00Z")),
            (broker::LAST_FAILED_AT, text_header("2026-01-01T01:00:00Z")),
            (DELIVERY_COUNT, int_header(2)),
            (broker::REPLAYS, int_header(1)),
            (X_DEATH, deaths(vec![death("delivery_limit", 1)])),
            ("x-producer", text_header("shop")),
        ])
        .with_message_id("m-1".into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(1_700_000_000);

        let replayed = replay_properties(&original);

        let headers = replayed.headers().clone().unwrap();
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, [X_DEATH, broker::REPLAYS, "x-producer"]);
        assert_eq!(headers.inner()[broker::REPLAYS], int_header(2));
        assert_eq!(
            replayed.clone().with_headers(FieldTable::default()),
            original.with_headers(FieldTable::default()),
            "every property but the headers is kept"
        );
        let again = replay_properties(&BasicProperties::default());
        assert_eq!(
            again.headers().clone().unwrap().inner()[broker::REPLAYS],
            int_header(1)
        );
    }
}
