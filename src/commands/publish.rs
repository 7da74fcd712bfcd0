//! Publishing events from a JSON-lines file, with publisher confirms and progress.
//!
//! A line written by `dlq export` is published as the message it was: its exact body and
//! properties, and its headers with the failure reset as by `dlq replay` (a fresh retry
//! budget, `x-listrak-replays` one higher). Any other line is an event, published with the
//! properties producers should use.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use lapin::types::ShortString;
use lapin::BasicProperties;

use crate::commands::dlq::letter::replay_properties;
use crate::commands::dlq::record::{parse_line, Line};
use crate::commands::progress::Progress;
use crate::config::AmqpSettings;
use crate::edges::broker::{self, wait_confirm, Publisher, Topology, TopologyMismatch};

/// Confirms awaited at once; enough to keep the broker busy, few enough to bound memory.
const CONFIRM_WINDOW: usize = 1024;

/// What `publish` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub messages: u64,
    /// Lines that were not JSON: published all the same (the worker dead-letters them).
    pub not_json: u64,
    /// Lines written by `dlq export`, published as the messages they were.
    pub restored: u64,
}

/// The properties producers should use: persistent, JSON, with the event's own id.
pub fn event_properties(body: &[u8]) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
    if let Some(id) = message_id(body) {
        properties = properties.with_message_id(ShortString::from(id));
    }
    properties
}

fn message_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ids {
        #[serde(rename = "messageId")]
        segment: Option<String>,
        message_id: Option<String>,
    }
    let ids: Ids = serde_json::from_slice(body).ok()?;
    ids.segment.or(ids.message_id).filter(|id| id.len() <= 255)
}

/// The routing key: the event's `type`, so bindings can tell track, identify and
/// profile_update apart.
fn routing_key(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_slice::<Kind>(body)
        .ok()
        .and_then(|k| k.kind)
        .filter(|k| !k.is_empty() && k.len() < 200)
        .unwrap_or_else(|| "event".into())
}

/// Publishes every non-empty line of `path` to the topology's exchange, each confirmed.
pub async fn publish_file(
    amqp: &AmqpSettings,
    topology: &Topology,
    path: &Path,
) -> anyhow::Result<Published> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let total = std::io::BufReader::new(&file).lines().count() as u64;
    let lines = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    )
    .lines()
    .map(|line| line.map(String::into_bytes));
    publish_lines(amqp, topology, lines, total).await
}

/// Publishes bodies; `total` only sizes the progress bar.
pub async fn publish_lines(
    amqp: &AmqpSettings,
    topology: &Topology,
    bodies: impl IntoIterator<Item = std::io::Result<Vec<u8>>>,
    total: u64,
) -> anyhow::Result<Published> {
    let connection = broker::connect(amqp, "listrak-worker publish")
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to RabbitMQ: {e}"))?;
    let publisher = Publisher::new(&connection).await?;
    topology.declare(&connection).await.map_err(|error| {
        match TopologyMismatch::from_declare(&error, topology) {
            Some(mismatch) => anyhow::Error::from(mismatch),
            None => error.into(),
        }
    })?;
    let progress = Progress::new("published", total);
    let mut published = Published::default();
    let mut window = VecDeque::with_capacity(CONFIRM_WINDOW);
    for (number, line) in bodies.into_iter().enumerate() {
        let line = line.context("cannot read the input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (body, properties) = match parse_line(&line) {
            Line::Record(record) => {
                published.restored += 1;
                (record.body, replay_properties(&record.properties))
            }
            Line::BadRecord(reason) => anyhow::bail!(
                "line {}: an exported message that cannot be read back: {reason}",
                number + 1
            ),
            Line::Other => {
                if serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_err() {
                    published.not_json += 1;
                }
                let properties = event_properties(&line);
                (line, properties)
            }
        };
        let confirm = publisher
            .start(&topology.exchange, &routing_key(&body), &body, properties)
            .await?;
        window.push_back(confirm);
        if window.len() >= CONFIRM_WINDOW {
            let oldest = window.pop_front().expect("window is full");
            wait_confirm(oldest).await?;
        }
        published.messages += 1;
        progress.advance(1);
    }
    for confirm in window {
        wait_confirm(confirm).await?;
    }
    progress.finish();
    let _ = publisher.channel().close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(published)
}
