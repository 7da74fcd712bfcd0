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
use crate::config::{AmqpSettings, Settings};
use crate::edges::broker::{
    self, wait_confirm, PublishError, Publisher, Topology, TopologyMismatch,
};

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

/// Publishes bodies; `total` only sizes the progress bar. A lost connection, a nack or a
/// missing confirm is not the end: the messages not confirmed yet are sent again, in order,
/// through the next node that answers (the same one when there is only one), so every line
/// ends in the queue at least once. Only the messages in flight at such a loss can end there
/// twice, which the worker's updates (each setting a field to a value) make harmless.
pub async fn publish_lines(
    amqp: &AmqpSettings,
    topology: &Topology,
    bodies: impl IntoIterator<Item = std::io::Result<Vec<u8>>>,
    total: u64,
) -> anyhow::Result<Published> {
    let mut link = Link::open(amqp, topology, 0)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to RabbitMQ: {e}"))?;
    let progress = Progress::new("published", total);
    let mut published = Published::default();
    let mut window: VecDeque<Unconfirmed> = VecDeque::with_capacity(CONFIRM_WINDOW);
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
        let mut message = Unconfirmed {
            routing_key: routing_key(&body),
            body,
            properties,
            confirm: None,
        };
        match link.send(topology, &mut message).await {
            Ok(()) => window.push_back(message),
            Err(error) => {
                tracing::warn!(%error, "publishing failed; sending again through the broker");
                window.push_back(message);
                link.recover(amqp, topology, &mut window).await?;
            }
        }
        while window.len() >= CONFIRM_WINDOW {
            confirm_oldest(&mut link, amqp, topology, &mut window).await?;
        }
        published.messages += 1;
        progress.advance(1);
    }
    while !window.is_empty() {
        confirm_oldest(&mut link, amqp, topology, &mut window).await?;
    }
    progress.finish();
    let _ = link.publisher.channel().close(200, "done".into()).await;
    let _ = link.connection.close(200, "done".into()).await;
    Ok(published)
}

/// A message sent (or about to be) whose confirm has not come: what it takes to send it again.
struct Unconfirmed {
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    confirm: Option<lapin::PublisherConfirm>,
}

/// Waits for the oldest message's confirm; on anything but a confirm (or an unroutable
/// message, which sending again cannot mend), sends every unconfirmed message again.
async fn confirm_oldest(
    link: &mut Link,
    amqp: &AmqpSettings,
    topology: &Topology,
    window: &mut VecDeque<Unconfirmed>,
) -> anyhow::Result<()> {
    let oldest = window.front_mut().expect("a message in flight");
    let outcome = match oldest.confirm.take() {
        Some(confirm) => wait_confirm(confirm).await,
        None => Err(PublishError::Nacked),
    };
    match outcome {
        Ok(()) => {
            window.pop_front();
            Ok(())
        }
        Err(PublishError::Unroutable) => Err(PublishError::Unroutable.into()),
        Err(error) => {
            tracing::warn!(
                %error,
                "a message was not confirmed; sending the unconfirmed ones again"
            );
            link.recover(amqp, topology, window).await
        }
    }
}

/// How often `publish` reconnects and sends again before it gives up, a second apart.
const RECOVERY_ATTEMPTS: u32 = 30;
const RECOVERY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection `publish` sends through, and the node it reached.
struct Link {
    connection: lapin::Connection,
    publisher: Publisher,
    node: usize,
}

impl Link {
    /// Connects (the node at `start` first), declares the topology, opens a confirmed channel.
    async fn open(amqp: &AmqpSettings, topology: &Topology, start: usize) -> anyhow::Result<Self> {
        let (connection, node) =
            broker::connect_from(amqp, "listrak-worker publish", start).await?;
        topology.declare(&connection).await.map_err(
            |error| match TopologyMismatch::from_declare(&error, topology) {
                Some(mismatch) => anyhow::Error::from(mismatch),
                None => error.into(),
            },
        )?;
        let publisher = Publisher::new(&connection).await?;
        Ok(Self {
            connection,
            publisher,
            node,
        })
    }

    async fn send(
        &self,
        topology: &Topology,
        message: &mut Unconfirmed,
    ) -> Result<(), PublishError> {
        let confirm = self
            .publisher
            .start(
                &topology.exchange,
                &message.routing_key,
                &message.body,
                message.properties.clone(),
            )
            .await?;
        message.confirm = Some(confirm);
        Ok(())
    }

    /// Reconnects, starting with the node after this one, and sends every message of
    /// `window` again, in order.
    async fn recover(
        &mut self,
        amqp: &AmqpSettings,
        topology: &Topology,
        window: &mut VecDeque<Unconfirmed>,
    ) -> anyhow::Result<()> {
        let mut last_error = None;
        for _ in 0..RECOVERY_ATTEMPTS {
            let _ = self.connection.close(320, "reconnecting".into()).await;
            let start = (self.node + 1) % amqp.urls.len();
            match Link::open(amqp, topology, start).await {
                Ok(link) => {
                    *self = link;
                    let node = amqp.urls.node(self.node);
                    tracing::info!(%node, "publishing through another connection");
                    let mut sent = Ok(());
                    for message in window.iter_mut() {
                        sent = self.send(topology, message).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    match sent {
                        Ok(()) => return Ok(()),
                        Err(error) => last_error = Some(anyhow::Error::from(error)),
                    }
                }
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(RECOVERY_PAUSE).await;
        }
        let error = last_error.expect("at least one attempt");
        Err(error.context(format!(
            "cannot publish after {RECOVERY_ATTEMPTS} attempts to reconnect; the lines before \
             the {} unconfirmed ones are in the queue",
            window.len()
        )))
    }
}

/// `publish FILE`: every line of the file to the exchange, and what was published.
pub async fn run(settings: &Settings, file: &Path) -> anyhow::Result<()> {
    let topology = Topology::of(settings);
    let published = publish_file(&settings.amqp, &topology, file).await?;
    println!(
        "published {} messages to exchange {:?}{}{}",
        published.messages,
        topology.exchange,
        if published.restored > 0 {
            format!(
                " ({} exported dead letters with their properties and headers)",
                published.restored
            )
        } else {
            String::new()
        },
        if published.not_json > 0 {
            format!(
                " ({} lines were not JSON; the worker will dead-letter them)",
                published.not_json
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
