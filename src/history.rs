//! The `history` command: what happened to one contact, from the applied log (every value
//! Listrak accepted for it, oldest first) and the dead-letter queue (what still waits for it).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use serde_json::json;

use crate::applied_log::{self, AppliedValue, ReadFrom, Record};
use crate::broker::{queue_counts, Publisher, Topology};
use crate::dlq::{DeadLetters, Filter};
use crate::model::EventTime;
use crate::progress::Progress;

/// Stream deliveries in hand at once.
const PREFETCH: u16 = 1000;
/// Dead letters read at most, looking for the contact's.
const DEAD_LETTERS_READ: usize = 1_000_000;
/// How long the log may stay silent before the read is given up.
const SILENCE: Duration = Duration::from_secs(30);

/// A dead letter that names the contact.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub list_id: Option<i64>,
    pub failed_at: Option<EventTime>,
    pub message_id: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Default)]
pub struct History {
    /// Oldest applied first.
    pub applied: Vec<AppliedValue>,
    pub waiting: Vec<Waiting>,
    /// Records of the log read.
    pub records: u64,
}

/// Reads the applied log (from `since` ago, or all it holds) and the dead-letter queue for
/// `email` (letter case aside), on `list` if given.
pub async fn history(
    connection: &Connection,
    topology: &Topology,
    email: &str,
    list: Option<u32>,
    since: Option<Duration>,
) -> anyhow::Result<History> {
    let email = email.trim().to_lowercase();
    let channel = connection.create_channel().await?;
    let (total, _) = queue_counts(&channel, &topology.applied)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot read the applied log {:?} (has a worker of this configuration run?): \
             {error}",
                topology.applied
            )
        })?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let from = since.map_or(ReadFrom::First, ReadFrom::Age);
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), from.argument());
    let mut consumer = channel
        .basic_consume(
            topology.applied.as_str().into(),
            format!("listrak-worker-history-{}", std::process::id())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await?;
    // A marker at the end: everything before it was appended before this read began.
    let marker = format!("history-{:032x}", rand::random::<u128>());
    let publisher = Publisher::new(connection).await?;
    applied_log::append(
        &publisher,
        topology,
        &Record::marker(marker.clone()).encode(),
    )
    .await?;

    let progress = Progress::new("reading the applied log", u64::from(total));
    let mut found = History::default();
    let mut unacked = 0u16;
    loop {
        let delivery = match tokio::time::timeout(SILENCE, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(None) => anyhow::bail!("the broker ended the read of the applied log"),
            Err(_) => anyhow::bail!(
                "the applied log sent nothing for {}s before its end was reached",
                SILENCE.as_secs()
            ),
        };
        unacked += 1;
        if unacked >= PREFETCH / 2 {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
        progress.advance(1);
        let Ok(record) = Record::decode(&delivery.data) else {
            continue;
        };
        if record.sync.as_deref() == Some(marker.as_str()) {
            break;
        }
        found.records += 1;
        found.applied.extend(record.values_for(&email, list));
    }
    progress.clear();
    let _ = channel.close(200, "done".into()).await;
    found
        .applied
        .sort_by_key(|value| (value.applied_at, value.event_time));

    let filter = Filter {
        list_ids: list.map(i64::from).into_iter().collect(),
        ..Filter::default()
    };
    let (letters, _) = DeadLetters::new(connection, topology)
        .peek(&filter, DEAD_LETTERS_READ)
        .await?;
    for letter in letters {
        let body = String::from_utf8_lossy(&letter.body).to_lowercase();
        if !body.contains(&email) {
            continue;
        }
        found.waiting.push(Waiting {
            reason: letter.facts.reason.clone(),
            list_id: letter.facts.list_id,
            failed_at: letter.facts.failed_at,
            message_id: letter
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            message: letter.facts.message.clone(),
        });
    }
    let _ = publisher.channel().close(200, "done".into()).await;
    Ok(found)
}

/// The history as a table, oldest first.
pub fn table(history: &History, email: &str) -> String {
    let mut out = String::new();
    if history.applied.is_empty() {
        out.push_str(&format!(
            "no value applied to {email} in the {} records of the applied log read\n",
            history.records
        ));
    } else {
        out.push_str(&format!(
            "{:<24}  {:>10}  {:>10}  {:<8}  {:<24}  {:<24}  {}\n",
            "applied at", "list", "field", "value", "event time", "message id", "resource id"
        ));
        for value in &history.applied {
            out.push_str(&format!(
                "{:<24}  {:>10}  {:>10}  {:<8}  {:<24}  {:<24}  {}\n",
                value.applied_at.to_rfc3339(),
                value.list,
                value.field,
                value.value,
                value.event_time.to_rfc3339(),
                value.message_ids.join(","),
                value.resource_ids.join(","),
            ));
        }
    }
    if history.waiting.is_empty() {
        out.push_str("no dead letter waits for it\n");
    } else {
        out.push_str(&format!(
            "\n{} dead letters wait for it:\n",
            history.waiting.len()
        ));
        for letter in &history.waiting {
            out.push_str(&format!(
                "  {:<18} list {:<10} failed {:<24} message id {}{}\n",
                letter.reason,
                letter.list_id.map_or("-".into(), |id| id.to_string()),
                letter.failed_at.map_or("-".into(), |at| at.to_rfc3339()),
                letter.message_id.as_deref().unwrap_or("-"),
                letter
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default(),
            ));
        }
    }
    out
}

/// The history as one JSON object.
pub fn to_json(history: &History, email: &str) -> String {
    let applied: Vec<_> = history
        .applied
        .iter()
        .map(|value| {
            json!({
                "list_id": value.list,
                "field_id": value.field,
                "value": value.value,
                "event_time": value.event_time.to_rfc3339_micros(),
                "applied_at": value.applied_at.to_rfc3339_micros(),
                "message_ids": value.message_ids,
                "resource_ids": value.resource_ids,
            })
        })
        .collect();
    let waiting: Vec<_> = history
        .waiting
        .iter()
        .map(|letter| {
            json!({
                "reason": letter.reason,
                "list_id": letter.list_id,
                "failed_at": letter.failed_at.map(EventTime::to_rfc3339),
                "message_id": letter.message_id,
                "message": letter.message,
            })
        })
        .collect();
    json!({
        "email": email.trim().to_lowercase(),
        "applied": applied,
        "dead_letters": waiting,
        "records_read": history.records,
    })
    .to_string()
}
