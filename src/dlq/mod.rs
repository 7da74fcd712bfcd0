//! The `dlq` commands: inspect, replay, export and purge the dead-letter queue.
//!
//! Every command walks the dead-letter queue (see [`walk`]): it handles at most the messages
//! present when it started, in queue order, and leaves the others exactly where they were.
//!
//! - `stats` and `peek` change nothing (a message they looked at returns to its place).
//! - `replay` publishes each matching message to the main queue, waits for the broker's
//!   confirm, and only then acks it from the dead-letter queue: a crash at any moment leaves
//!   every message in one queue or the other, at worst in both, never in neither. The
//!   replayed message keeps its body and properties; its failure headers are removed (a
//!   fresh retry budget) and `x-listrak-replays` counts the replays.
//! - `export` writes matching messages as JSON lines ([`record`]); with `--remove` it acks
//!   them only after the file was flushed and synced to disk.
//! - `purge` acks matching messages, which deletes them; without `--yes` it only counts.

pub mod filter;
pub mod letter;
pub mod pace;
pub mod record;
pub mod render;
pub mod stats;
mod walk;

use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::message::Delivery;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::broker::{self, wait_confirm, PublishError, Publisher, Topology};
use crate::config::AmqpSettings;
use crate::model::EventTime;
use crate::progress::Progress;

pub use filter::Filter;
pub use letter::Facts;
pub use stats::Stats;
use walk::{Walk, PASSIVE};

/// Messages read ahead of the one being handled.
const PREFETCH: u16 = 2000;
/// Replays published and not yet confirmed, at most.
const CONFIRM_WINDOW: usize = 1000;
/// How long to wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a `dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("queue {queue:?} does not exist on this broker: check amqp.queue and the vhost of amqp.url (the worker declares its queues when it starts)")]
    NoQueue { queue: String },
    #[error("the broker stopped the walk over {queue:?}: {reason}{hint}")]
    Walk {
        queue: String,
        reason: String,
        hint: &'static str,
    },
    #[error("the broker cancelled the walk over {queue:?}; was the queue deleted?")]
    Cancelled { queue: String },
    #[error("could not publish to queue {queue:?}: {source}; the message stays in the dead-letter queue")]
    Publish { queue: String, source: PublishError },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; export to a new file", path.display())]
    FileExists { path: PathBuf },
    #[error("interrupted")]
    Interrupted,
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
}

impl DlqError {
    /// A mistake on the command line (exit code 2), not a failure while running.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::FileExists { .. })
    }

    fn walk(queue: &str, error: lapin::Error) -> Self {
        let reason = error.to_string();
        let hint = if reason.contains("timed out") {
            " (RabbitMQ's consumer_timeout: a command holds the messages it leaves in place \
             until it ends, so it must end within that time; nothing was lost; act on fewer \
             messages at once with a narrower filter or --limit)"
        } else {
            ""
        };
        Self::Walk {
            queue: queue.to_string(),
            reason,
            hint,
        }
    }
}

/// Connects for a `dlq` command; the error names the broker (password redacted).
pub async fn connect(amqp: &AmqpSettings) -> Result<Connection, DlqError> {
    let url = amqp.redacted_url();
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        broker::connect(amqp.url.expose(), "listrak-worker dlq"),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(DlqError::Connect {
            url,
            reason: error.to_string(),
        }),
        Err(_) => Err(DlqError::Connect {
            url,
            reason: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// Messages ready in a queue, and its consumers; the queue must exist.
async fn queue_depth(channel: &Channel, queue: &str) -> Result<(u32, u32), DlqError> {
    match channel
        .queue_declare(queue.into(), PASSIVE, FieldTable::default())
        .await
    {
        Ok(declared) => Ok((declared.message_count(), declared.consumer_count())),
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404 => Err(DlqError::NoQueue {
                queue: queue.to_string(),
            }),
            _ => Err(error.into()),
        },
    }
}

/// A dead letter as `peek` shows it.
#[derive(Debug, Clone)]
pub struct Letter {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub facts: Facts,
}

/// How a walk went: the messages present at its start, read, and matching the filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    pub present: u64,
    pub read: u64,
    pub matched: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    /// Replay at most this many messages.
    pub limit: Option<u64>,
    /// Messages per second.
    pub rate: Option<f64>,
    /// Count what would be replayed; change nothing.
    pub dry_run: bool,
}

#[derive(Debug)]
pub struct ReplaySummary {
    pub walked: Walked,
    /// Published to the main queue, confirmed, and removed from the dead-letter queue.
    pub replayed: u64,
    pub dry_run: bool,
    pub dead: String,
    pub target: String,
    /// Why the replay stopped before it was done; what was replayed until then stays so.
    pub stopped: Option<DlqError>,
}

#[derive(Debug)]
pub struct ExportSummary {
    pub walked: Walked,
    pub path: PathBuf,
    pub dead: String,
    pub remove: bool,
    pub removed: u64,
    /// Why removing stopped early; the file is complete and synced.
    pub stopped: Option<DlqError>,
}

#[derive(Debug)]
pub struct PurgeSummary {
    pub walked: Walked,
    pub dead: String,
    pub deleted: u64,
    /// False: only counted.
    pub confirmed: bool,
    pub stopped: Option<DlqError>,
}

/// The dead-letter queue of a topology, on a connection.
pub struct DeadLetters<'a> {
    connection: &'a Connection,
    topology: &'a Topology,
}

impl<'a> DeadLetters<'a> {
    pub fn new(connection: &'a Connection, topology: &'a Topology) -> Self {
        Self {
            connection,
            topology,
        }
    }

    /// The dead-letter queue's name.
    pub fn dead_queue(&self) -> &str {
        &self.topology.dead
    }

    async fn start(&self, prefetch: u16) -> Result<(Walk, Progress), DlqError> {
        let walk = Walk::start(self.connection, &self.topology.dead, prefetch).await?;
        let progress = Progress::new("dead letters", walk.bound());
        Ok((walk, progress))
    }

    /// Groups the matching messages by cause; changes nothing.
    pub async fn stats(&self, filter: &Filter) -> Result<(Stats, Walked), DlqError> {
        let (mut walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        let mut stats = Stats::default();
        while let Some(delivery) = walk.next().await? {
            walked.read += 1;
            progress.advance(1);
            let facts = Facts::read(&delivery.properties);
            if filter.matches(&facts, now) {
                walked.matched += 1;
                stats.add(&facts);
            }
            walk.hold(delivery.delivery_tag).await?;
        }
        walk.finish().await?;
        progress.clear();
        walked.elapsed = started.elapsed();
        Ok((stats, walked))
    }

    /// The first `limit` matching messages; changes nothing.
    pub async fn peek(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<(Vec<Letter>, Walked), DlqError> {
        let (mut walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        let mut letters = Vec::new();
        while letters.len() < limit {
            let Some(delivery) = walk.next().await? else {
                break;
            };
            walked.read += 1;
            progress.advance(1);
            walk.hold(delivery.delivery_tag).await?;
            let facts = Facts::read(&delivery.properties);
            if filter.matches(&facts, now) {
                walked.matched += 1;
                letters.push(Letter {
                    body: delivery.data,
                    properties: delivery.properties,
                    facts,
                });
            }
        }
        walk.finish().await?;
        progress.clear();
        walked.elapsed = started.elapsed();
        Ok((letters, walked))
    }

    /// Moves matching messages to the main queue (see the module documentation); stops
    /// taking new ones when `stop` completes.
    pub async fn replay(
        &self,
        filter: &Filter,
        options: ReplayOptions,
        stop: impl Future<Output = ()>,
    ) -> Result<ReplaySummary, DlqError> {
        let target = self.topology.queue.clone();
        {
            let channel = self.connection.create_channel().await?;
            queue_depth(&channel, &target).await?;
            let _ = channel.close(200, "checked".into()).await;
        }
        let rate = options.rate.filter(|_| !options.dry_run);
        // Paced, read only a few seconds ahead: messages read ahead wait unacked.
        let prefetch = rate.map_or(PREFETCH, |rate| {
            (rate * 5.0).clamp(2.0, f64::from(PREFETCH)) as u16
        });
        let window = usize::from(prefetch / 2).clamp(1, CONFIRM_WINDOW);
        let publisher = Publisher::new(self.connection).await?;
        let (walk, progress) = self.start(prefetch).await?;
        let mut replay = Replay {
            summary: ReplaySummary {
                walked: Walked::started(walk.bound()),
                replayed: 0,
                dry_run: options.dry_run,
                dead: self.topology.dead.clone(),
                target,
                stopped: None,
            },
            walk,
            publisher,
            confirms: FuturesOrdered::new(),
        };
        let now = EventTime::now();
        let started = Instant::now();
        let mut pace = rate.map(pace::Pace::new);
        // A matching message waiting for its turn under `--rate`.
        let mut waiting: Option<(Delivery, tokio::time::Instant)> = None;
        let mut exhausted = false;
        tokio::pin!(stop);

        loop {
            let limit_reached = options
                .limit
                .is_some_and(|limit| replay.summary.walked.matched >= limit);
            let going = replay.summary.stopped.is_none();
            if !going {
                if let Some((delivery, _)) = waiting.take() {
                    replay.keep(delivery.delivery_tag).await;
                }
            }
            let reading = going && !exhausted && !limit_reached && waiting.is_none();
            let room = replay.confirms.len() < window;
            if !reading && waiting.is_none() && replay.confirms.is_empty() {
                break;
            }
            let send_at = waiting.as_ref().map(|(_, at)| *at);
            tokio::select! {
                biased;
                _ = &mut stop, if going => {
                    replay.summary.stopped = Some(DlqError::Interrupted);
                }
                Some((tag, confirmed)) = replay.confirms.next(), if !replay.confirms.is_empty() => {
                    replay.settle(tag, confirmed).await;
                }
                _ = tokio::time::sleep_until(send_at.unwrap_or_else(tokio::time::Instant::now)),
                    if send_at.is_some() && room =>
                {
                    let (delivery, _) = waiting.take().expect("a message waits");
                    replay.send(delivery).await;
                }
                next = replay.walk.next(), if reading && room => match next {
                    Ok(None) => exhausted = true,
                    Err(error) => {
                        replay.summary.stopped.get_or_insert(error);
                    }
                    Ok(Some(delivery)) => {
                        replay.summary.walked.read += 1;
                        progress.advance(1);
                        if !filter.matches(&Facts::read(&delivery.properties), now) {
                            replay.keep(delivery.delivery_tag).await;
                            continue;
                        }
                        replay.summary.walked.matched += 1;
                        if options.dry_run {
                            replay.keep(delivery.delivery_tag).await;
                            continue;
                        }
                        let at = pace.as_mut().map(|pace| pace.slot(Instant::now()));
                        match at {
                            // Its turn is later: wait for it, settling confirms meanwhile.
                            Some(at) if at > Instant::now() => waiting = Some((delivery, at.into())),
                            _ => replay.send(delivery).await,
                        }
                    }
                },
                else => break,
            }
        }
        progress.clear();
        let mut summary = replay.summary;
        summary.walked.elapsed = started.elapsed();
        let _ = replay
            .publisher
            .channel()
            .close(200, "replay done".into())
            .await;
        // A replay that stopped early already holds its error; closing can add nothing to it.
        let closed = replay.walk.finish().await;
        if summary.stopped.is_none() {
            closed?;
        }
        Ok(summary)
    }

    /// Writes matching messages to a new file, one JSON line each; with `remove`, deletes
    /// them from the queue once the file is on disk.
    pub async fn export(
        &self,
        filter: &Filter,
        path: &Path,
        remove: bool,
    ) -> Result<ExportSummary, DlqError> {
        let file_error = |source| DlqError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = match File::options().write(true).create_new(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DlqError::FileExists {
                    path: path.to_path_buf(),
                })
            }
            Err(error) => return Err(file_error(error)),
        };
        let result = self.export_to(filter, file, path, remove).await;
        if matches!(result, Err(DlqError::File { .. })) {
            // An incomplete archive is worse than none; the messages are all still queued.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    async fn export_to(
        &self,
        filter: &Filter,
        file: File,
        path: &Path,
        remove: bool,
    ) -> Result<ExportSummary, DlqError> {
        let file_error = |source| DlqError::File {
            path: path.to_path_buf(),
            source,
        };
        let (mut walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        let mut out = BufWriter::new(file);
        let mut exported = Vec::new();
        while let Some(delivery) = walk.next().await? {
            walked.read += 1;
            progress.advance(1);
            if filter.matches(&Facts::read(&delivery.properties), now) {
                walked.matched += 1;
                let line = record::to_line(&delivery.data, &delivery.properties);
                writeln!(out, "{line}").map_err(file_error)?;
                exported.push(delivery.delivery_tag);
            }
            // Exported messages too, until the file is on disk.
            walk.hold(delivery.delivery_tag).await?;
        }
        let file = out.into_inner().map_err(|e| file_error(e.into_error()))?;
        file.sync_all().map_err(file_error)?;
        sync_parent(path).map_err(file_error)?;
        progress.clear();

        let mut summary = ExportSummary {
            walked,
            path: path.to_path_buf(),
            dead: self.topology.dead.clone(),
            remove,
            removed: 0,
            stopped: None,
        };
        if remove {
            let (removed, failure) = walk.ack_held(&exported).await;
            summary.removed = removed;
            summary.stopped = failure;
        }
        let closed = walk.finish().await;
        if summary.stopped.is_none() {
            closed?;
        }
        summary.walked.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Deletes matching messages; with `confirmed` false, only counts them.
    pub async fn purge(&self, filter: &Filter, confirmed: bool) -> Result<PurgeSummary, DlqError> {
        let (mut walk, progress) = self.start(PREFETCH).await?;
        let mut summary = PurgeSummary {
            walked: Walked::started(walk.bound()),
            dead: self.topology.dead.clone(),
            deleted: 0,
            confirmed,
            stopped: None,
        };
        let now = EventTime::now();
        let started = Instant::now();
        loop {
            let delivery = match walk.next().await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => break,
                Err(error) => {
                    summary.stopped = Some(error);
                    break;
                }
            };
            summary.walked.read += 1;
            progress.advance(1);
            let matches = filter.matches(&Facts::read(&delivery.properties), now);
            summary.walked.matched += u64::from(matches);
            let done = if matches && confirmed {
                walk.ack(delivery.delivery_tag).await
            } else {
                walk.hold(delivery.delivery_tag).await
            };
            match done {
                Ok(()) => summary.deleted += u64::from(matches && confirmed),
                Err(error) => {
                    summary.stopped = Some(error);
                    break;
                }
            }
        }
        progress.clear();
        let closed = walk.finish().await;
        if summary.stopped.is_none() {
            closed?;
        }
        summary.walked.elapsed = started.elapsed();
        Ok(summary)
    }
}

/// A replay in progress: the walk, the publishes awaiting their confirm, what was done.
struct Replay {
    walk: Walk,
    publisher: Publisher,
    /// Published messages by delivery tag, in publish order, each with its confirm.
    confirms: FuturesOrdered<BoxFuture<'static, (u64, Result<(), PublishError>)>>,
    summary: ReplaySummary,
}

impl Replay {
    /// Publishes a dead letter to the main queue; it is acked once its confirm arrives.
    async fn send(&mut self, delivery: Delivery) {
        let tag = delivery.delivery_tag;
        let properties = letter::replay_properties(&delivery.properties);
        match self
            .publisher
            .start("", &self.summary.target, &delivery.data, properties)
            .await
        {
            Ok(confirm) => self
                .confirms
                .push_back(Box::pin(async move { (tag, wait_confirm(confirm).await) })),
            Err(source) => self.failed(tag, source).await,
        }
    }

    /// The broker has the replayed message: remove the dead letter.
    async fn settle(&mut self, tag: u64, confirmed: Result<(), PublishError>) {
        match confirmed {
            Ok(()) => match self.walk.ack(tag).await {
                Ok(()) => self.summary.replayed += 1,
                Err(error) => {
                    self.summary.stopped.get_or_insert(error);
                }
            },
            Err(source) => self.failed(tag, source).await,
        }
    }

    /// Not replayed: the dead letter stays, and the replay stops.
    async fn failed(&mut self, tag: u64, source: PublishError) {
        self.summary.stopped.get_or_insert(DlqError::Publish {
            queue: self.summary.target.clone(),
            source,
        });
        self.keep(tag).await;
    }

    async fn keep(&mut self, tag: u64) {
        if let Err(error) = self.walk.hold(tag).await {
            self.summary.stopped.get_or_insert(error);
        }
    }
}

impl Walked {
    fn started(present: u64) -> Self {
        Self {
            present,
            ..Self::default()
        }
    }
}

/// Makes a new file's directory entry durable too.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}
