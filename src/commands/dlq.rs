//! The `dlq` commands: inspect, replay, export and purge the dead-letter queue.
//!
//! Every command walks the dead-letter queue (`walk`): it handles at most the messages
//! present when it started, in queue order, each once, and never loses one.
//!
//! - `stats`, `peek`, dry runs, `export` and `purge` without `--yes` only look: the messages
//!   go back to the queue, in their order.
//! - `replay`, `purge --yes` and `export --remove` settle each message in walk order
//!   (`mover`): a matching one is replayed to the main queue (confirmed, then acked),
//!   deleted, or exported (acked once its line is synced to disk); one that does not match
//!   moves, unchanged, to the back of the dead-letter queue (confirmed, then acked). A crash
//!   at any moment leaves every message somewhere, at worst twice, never nowhere.
//! - A replayed message keeps its body and properties; its failure headers are removed (a
//!   fresh retry budget) and `x-listrak-replays` counts the replays ([`letter`]).

pub mod filter;
pub mod letter;
mod mover;
pub mod pace;
pub mod record;
pub mod render;
pub mod stats;
pub mod superseded;

use superseded::SupersededCheck;
mod walk;

use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use lapin::message::Delivery;
use lapin::{BasicProperties, Channel, Connection};

use crate::commands::progress::Progress;
use crate::config::AmqpSettings;
use crate::edges::broker::{self, PublishError, Topology};
use crate::stages::model::EventTime;

pub use filter::Filter;
pub use letter::Facts;
use mover::{Moved, Mover};
pub use stats::Stats;
use walk::{Ticket, Walk};

/// Messages read ahead of the one being handled.
const PREFETCH: u16 = 2000;
/// Messages published (or waiting to be settled) and not yet acked, at most.
const CONFIRM_WINDOW: usize = 1000;
/// How long to wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a `dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "queue {queue:?} does not exist on this broker: check amqp.queue and the vhost of \
             amqp.url (the worker declares its queues when it starts)"
    )]
    NoQueue { queue: String },
    #[error("the broker stopped the walk over {queue:?}: {reason}{hint}")]
    Walk {
        queue: String,
        reason: String,
        hint: &'static str,
    },
    #[error("the broker cancelled the walk over {queue:?}; was the queue deleted?")]
    Cancelled { queue: String },
    #[error("could not publish to queue {queue:?}: {source}; the message stays where it was")]
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
            " (RabbitMQ's consumer_timeout: stats, peek, dry runs and export without --remove \
             hold what they read until they end, so they must end within that time; nothing \
             was lost)"
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
    // Each node has its own bound: a cluster's nodes are tried in turn.
    let bound = CONNECT_TIMEOUT * u32::try_from(amqp.urls.len()).unwrap_or(u32::MAX);
    match tokio::time::timeout(bound, broker::connect(amqp, "listrak-worker dlq")).await {
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

/// How often `dlq replay` carries on through another connection after losing one.
const REPLAY_RECONNECTS: u32 = 10;

/// `dlq replay` that outlives a lost broker node: when the broker ends the replay (a lost
/// connection, a node that went down), it connects again (to the next node that answers)
/// and replays what is left, up to the limit. Nothing is lost in between: a dead letter is
/// removed only after its copy is confirmed in the main queue, so those in flight at the
/// loss are replayed again, and only they can reach the main queue twice.
pub async fn replay_across_node_loss(
    amqp: &AmqpSettings,
    topology: &Topology,
    filter: &Filter,
    options: ReplayOptions,
    superseded: Option<&SupersededCheck>,
    stop: impl Future<Output = ()>,
) -> Result<ReplaySummary, DlqError> {
    tokio::pin!(stop);
    let mut done: Option<ReplaySummary> = None;
    let mut reconnects = 0;
    loop {
        let connection = connect(amqp).await?;
        let dead = DeadLetters::new(&connection, topology);
        let dead = match superseded {
            Some(check) => dead.knowing(check),
            None => dead,
        };
        let replayed = done.as_ref().map_or(0, |summary| summary.replayed);
        let left = ReplayOptions {
            limit: options.limit.map(|limit| limit.saturating_sub(replayed)),
            ..options
        };
        let summary = dead.replay(filter, left, &mut stop).await;
        let _ = connection.close(200, "done".into()).await;
        let summary = match (summary, done.take()) {
            (Ok(summary), None) => summary,
            (Ok(summary), Some(before)) => before.then(summary),
            (Err(error), None) => return Err(error),
            (Err(error), Some(mut before)) => {
                before.stopped = Some(error);
                before
            }
        };
        let lost_broker = matches!(
            summary.stopped,
            Some(DlqError::Broker(_) | DlqError::Walk { .. } | DlqError::Publish { .. })
        );
        if !lost_broker || options.dry_run || reconnects >= REPLAY_RECONNECTS {
            return Ok(summary);
        }
        reconnects += 1;
        if let Some(error) = &summary.stopped {
            tracing::warn!(
                %error,
                replayed = summary.replayed,
                "the replay lost its broker connection; carrying on through another"
            );
        }
        done = Some(summary);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl ReplaySummary {
    /// This replay followed by `next`, which carried it on after a lost connection.
    fn then(self, next: ReplaySummary) -> ReplaySummary {
        ReplaySummary {
            walked: Walked {
                present: self.walked.present,
                read: self.walked.read + next.walked.read,
                matched: self.walked.matched + next.walked.matched,
                elapsed: self.walked.elapsed + next.walked.elapsed,
            },
            replayed: self.replayed + next.replayed,
            moved_back: self.moved_back + next.moved_back,
            superseded: match (self.superseded, next.superseded) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            },
            ..next
        }
    }
}

/// Messages ready in a queue, and its consumers; the queue must exist.
async fn queue_depth(channel: &Channel, queue: &str) -> Result<(u32, u32), DlqError> {
    match broker::queue_counts(channel, queue).await {
        Ok(counts) => Ok(counts),
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
    /// Remove, instead of replaying, the dead letters the applied log supersedes (needs
    /// [`DeadLetters::knowing`]).
    pub skip_superseded: bool,
}

#[derive(Debug)]
pub struct ReplaySummary {
    pub walked: Walked,
    /// Published to the main queue, confirmed, and removed from the dead-letter queue.
    pub replayed: u64,
    /// Messages that did not match, moved to the back of the dead-letter queue.
    pub moved_back: u64,
    pub dry_run: bool,
    pub dead: String,
    pub target: String,
    /// Why the replay stopped before it was done; what was replayed until then stays so.
    pub stopped: Option<DlqError>,
    /// Of the matching dead letters, those the applied log supersedes (counted, or removed
    /// with `skip_superseded`); `None` without [`DeadLetters::knowing`].
    pub superseded: Option<u64>,
    /// Whether those were removed instead of replayed.
    pub skipped_superseded: bool,
}

#[derive(Debug)]
pub struct ExportSummary {
    pub walked: Walked,
    pub path: PathBuf,
    pub dead: String,
    pub remove: bool,
    pub removed: u64,
    /// With `remove`: messages that did not match, moved to the back of the queue.
    pub moved_back: u64,
    /// Why removing stopped early; the file is complete and synced.
    pub stopped: Option<DlqError>,
}

#[derive(Debug)]
pub struct PurgeSummary {
    pub walked: Walked,
    pub dead: String,
    pub deleted: u64,
    /// Messages that did not match, moved to the back of the queue.
    pub moved_back: u64,
    /// False: only counted.
    pub confirmed: bool,
    pub stopped: Option<DlqError>,
}

/// The dead-letter queue of a topology, on a connection.
pub struct DeadLetters<'a> {
    connection: &'a Connection,
    topology: &'a Topology,
    /// What the applied log supersedes, when read.
    superseded: Option<&'a SupersededCheck>,
}

impl<'a> DeadLetters<'a> {
    pub fn new(connection: &'a Connection, topology: &'a Topology) -> Self {
        Self {
            connection,
            topology,
            superseded: None,
        }
    }

    /// Judges dead letters against the applied log, read into `check`.
    pub fn knowing(self, check: &'a SupersededCheck) -> Self {
        Self {
            superseded: Some(check),
            ..self
        }
    }

    /// How many of the matching dead letters the applied log supersedes (`None` without
    /// [`DeadLetters::knowing`]).
    pub async fn superseded_count(&self, filter: &Filter) -> Result<Option<u64>, DlqError> {
        let Some(check) = self.superseded else {
            return Ok(None);
        };
        let mut count = 0;
        self.look(filter, PREFETCH, None, |_, delivery| {
            if check.supersedes(&delivery.data, &delivery.properties) {
                count += 1;
            }
        })
        .await?;
        Ok(Some(count))
    }

    /// The dead-letter queue's name.
    pub fn dead_queue(&self) -> &str {
        &self.topology.dead
    }

    async fn start(&self, prefetch: u16) -> Result<(Walk<'a>, Progress), DlqError> {
        let walk = Walk::start(self.connection, &self.topology.dead, prefetch).await?;
        let progress = Progress::new("dead letters", walk.bound());
        Ok((walk, progress))
    }

    /// `prefetch`: the walk's; a quarter of it may wait settled for its ack.
    async fn mover(&self, walk: Walk<'a>, prefetch: u16) -> Result<Mover<'a>, DlqError> {
        Mover::new(
            walk,
            self.connection,
            &self.topology.queue,
            &self.topology.dead,
            u64::from(prefetch / 4),
        )
        .await
    }

    /// Walks the queue without changing it: each message is held, and all are given back at
    /// the end. Every matching one goes to `take`, until `limit` of them have.
    async fn look(
        &self,
        filter: &Filter,
        prefetch: u16,
        limit: Option<u64>,
        mut take: impl FnMut(Facts, Delivery),
    ) -> Result<Walked, DlqError> {
        let (mut walk, progress) = self.start(prefetch).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        while limit.is_none_or(|limit| walked.matched < limit) {
            let Some((ticket, delivery)) = walk.next().await? else {
                break;
            };
            walk.hold(ticket);
            walked.read += 1;
            progress.advance(1);
            let facts = Facts::read(&delivery.properties);
            if filter.matches(&facts, now) {
                walked.matched += 1;
                take(facts, delivery);
            }
        }
        progress.clear();
        walk.finish().await?;
        walked.elapsed = started.elapsed();
        Ok(walked)
    }

    /// Counts the matching messages (at most `limit` of them): what a dry run reports.
    async fn count_matching(
        &self,
        filter: &Filter,
        limit: Option<u64>,
    ) -> Result<Walked, DlqError> {
        self.look(filter, PREFETCH, limit, |_, _| {}).await
    }

    /// Groups the matching messages by cause; changes nothing.
    pub async fn stats(&self, filter: &Filter) -> Result<(Stats, Walked), DlqError> {
        let mut stats = Stats::default();
        let walked = self
            .look(filter, PREFETCH, None, |facts, _| stats.add(&facts))
            .await?;
        Ok((stats, walked))
    }

    /// The first `limit` matching messages; changes nothing.
    pub async fn peek(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<(Vec<Letter>, Walked), DlqError> {
        // Without a filter, read no further ahead than what is shown.
        let prefetch = if filter.is_empty() {
            u16::try_from(limit).unwrap_or(PREFETCH).clamp(1, PREFETCH)
        } else {
            PREFETCH
        };
        let mut letters = Vec::new();
        let walked = self
            .look(filter, prefetch, Some(limit as u64), |facts, delivery| {
                letters.push(Letter {
                    body: delivery.data,
                    properties: delivery.properties,
                    facts,
                })
            })
            .await?;
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
        if options.dry_run {
            return self.replay_dry(filter, options, target).await;
        }
        // Paced, read only a few seconds ahead: messages read ahead wait unacked.
        let prefetch = options.rate.map_or(PREFETCH, |rate| {
            (rate * 5.0).clamp(2.0, f64::from(PREFETCH)) as u16
        });
        let window = usize::from(prefetch / 2).clamp(1, CONFIRM_WINDOW);
        let (walk, progress) = self.start(prefetch).await?;
        let mut walked = Walked::started(walk.bound());
        let mut mover = self.mover(walk, prefetch).await?;
        let now = EventTime::now();
        let started = Instant::now();
        let mut pace = options.rate.map(pace::Pace::new);
        // A matching message waiting for its turn under `--rate`.
        let mut waiting: Option<(Ticket, Delivery, tokio::time::Instant)> = None;
        let mut exhausted = false;
        let mut superseded = 0u64;
        let skip = self.superseded.filter(|_| options.skip_superseded);
        tokio::pin!(stop);

        loop {
            let limit_reached = options.limit.is_some_and(|limit| walked.matched >= limit);
            if mover.stopped() {
                if let Some((ticket, _, _)) = waiting.take() {
                    mover.hold(ticket);
                }
            }
            let reading = !mover.stopped() && !exhausted && !limit_reached && waiting.is_none();
            let room = mover.in_flight() < window;
            if !reading && waiting.is_none() && mover.in_flight() == 0 {
                break;
            }
            let send_at = waiting.as_ref().map(|(_, _, at)| *at);
            tokio::select! {
                biased;
                _ = &mut stop, if !mover.stopped() => mover.stop(DlqError::Interrupted),
                Some(first) = mover.pending.next(), if mover.in_flight() > 0 => {
                    mover.settle(first).await;
                }
                _ = tokio::time::sleep_until(send_at.unwrap_or_else(tokio::time::Instant::now)),
                    if send_at.is_some() && room =>
                {
                    let (ticket, delivery, _) = waiting.take().expect("a message waits");
                    mover.replay(ticket, delivery).await;
                }
                next = mover.walk.next(), if reading && room => match next {
                    Ok(None) => exhausted = true,
                    Err(error) => mover.stop(error),
                    Ok(Some((ticket, delivery))) => {
                        walked.read += 1;
                        progress.advance(1);
                        if !filter.matches(&Facts::read(&delivery.properties), now) {
                            mover.move_back(ticket, delivery).await;
                            continue;
                        }
                        walked.matched += 1;
                        if skip.is_some_and(|check| {
                            check.supersedes(&delivery.data, &delivery.properties)
                        }) {
                            superseded += 1;
                            mover.delete_when(ticket, std::future::ready(Ok(())));
                            continue;
                        }
                        let at = pace.as_mut().map(|pace| pace.slot(Instant::now()));
                        match at {
                            // Its turn is later: wait for it, settling confirms meanwhile.
                            Some(at) if at > Instant::now() => {
                                waiting = Some((ticket, delivery, at.into()));
                            }
                            _ => mover.replay(ticket, delivery).await,
                        }
                    }
                },
                else => break,
            }
        }
        progress.clear();
        walked.elapsed = started.elapsed();
        let moved = mover.finish().await;
        Ok(ReplaySummary {
            walked,
            replayed: moved.replayed,
            moved_back: moved.moved_back,
            dry_run: false,
            dead: self.topology.dead.clone(),
            target,
            stopped: moved.stopped,
            superseded: skip.map(|_| superseded),
            skipped_superseded: skip.is_some(),
        })
    }

    /// Counts what a replay would move; changes nothing.
    async fn replay_dry(
        &self,
        filter: &Filter,
        options: ReplayOptions,
        target: String,
    ) -> Result<ReplaySummary, DlqError> {
        let (walked, superseded) = match self.superseded {
            Some(check) => {
                let mut count = 0;
                let walked = self
                    .look(filter, PREFETCH, options.limit, |_, delivery| {
                        if check.supersedes(&delivery.data, &delivery.properties) {
                            count += 1;
                        }
                    })
                    .await?;
                (walked, Some(count))
            }
            None => (self.count_matching(filter, options.limit).await?, None),
        };
        Ok(ReplaySummary {
            walked,
            replayed: 0,
            moved_back: 0,
            dry_run: true,
            dead: self.topology.dead.clone(),
            target,
            stopped: None,
            superseded,
            skipped_superseded: options.skip_superseded,
        })
    }

    /// Writes matching messages to a new file, one JSON line each; with `remove`, deletes
    /// each from the queue once its line is synced to disk.
    pub async fn export(
        &self,
        filter: &Filter,
        path: &Path,
        remove: bool,
    ) -> Result<ExportSummary, DlqError> {
        let file = match File::options().write(true).create_new(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DlqError::FileExists {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(DlqError::File {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut archive = Archive {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            written: 0,
            synced: tokio::sync::watch::channel(0).0,
            parent_synced: false,
        };
        let result = if remove {
            self.export_removing(filter, &mut archive).await
        } else {
            self.export_keeping(filter, &mut archive).await
        };
        match result {
            Err(error) => {
                // An incomplete archive is worse than none; every message is still queued.
                let _ = std::fs::remove_file(path);
                Err(error)
            }
            Ok(summary) => Ok(summary),
        }
    }

    async fn export_keeping(
        &self,
        filter: &Filter,
        archive: &mut Archive,
    ) -> Result<ExportSummary, DlqError> {
        let (mut walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        let mut failure = None;
        loop {
            let (ticket, delivery) = match walk.next().await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            walk.hold(ticket);
            walked.read += 1;
            progress.advance(1);
            if filter.matches(&Facts::read(&delivery.properties), now) {
                walked.matched += 1;
                if let Err(error) = archive.write(&delivery) {
                    failure = Some(error);
                    break;
                }
            }
        }
        if failure.is_none() {
            failure = archive.sync().err();
        }
        progress.clear();
        let finished = walk.finish().await;
        if let Some(error) = failure {
            return Err(error);
        }
        finished?;
        walked.elapsed = started.elapsed();
        Ok(self.export_summary(walked, archive, false, Moved::default()))
    }

    async fn export_removing(
        &self,
        filter: &Filter,
        archive: &mut Archive,
    ) -> Result<ExportSummary, DlqError> {
        let (walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let mut mover = self.mover(walk, PREFETCH).await?;
        let now = EventTime::now();
        let started = Instant::now();
        let mut failure = None;
        while !mover.stopped() {
            // Deletions wait for their line on disk: sync before waiting for them.
            if mover.in_flight() >= CONFIRM_WINDOW {
                if let Err(error) = archive.sync() {
                    failure = Some(error);
                    break;
                }
            }
            let Some((ticket, delivery)) = mover.next_within(CONFIRM_WINDOW).await else {
                break;
            };
            walked.read += 1;
            progress.advance(1);
            if !filter.matches(&Facts::read(&delivery.properties), now) {
                mover.move_back(ticket, delivery).await;
                continue;
            }
            walked.matched += 1;
            if let Err(error) = archive.write(&delivery) {
                mover.hold(ticket);
                failure = Some(error);
                break;
            }
            mover.delete_when(ticket, archive.on_disk());
            if archive.unsynced() >= SYNC_EVERY {
                if let Err(error) = archive.sync() {
                    failure = Some(error);
                    break;
                }
            }
        }
        if failure.is_none() {
            failure = archive.sync().err();
        }
        archive.close();
        progress.clear();
        let moved = mover.finish().await;
        walked.elapsed = started.elapsed();
        if let Some(error) = failure {
            if moved.deleted == 0 {
                return Err(error);
            }
            // Keep the file: it holds every message removed.
            let mut summary = self.export_summary(walked, archive, true, moved);
            summary.stopped = Some(error);
            return Ok(summary);
        }
        Ok(self.export_summary(walked, archive, true, moved))
    }

    fn export_summary(
        &self,
        walked: Walked,
        archive: &Archive,
        remove: bool,
        moved: Moved,
    ) -> ExportSummary {
        ExportSummary {
            walked,
            path: archive.path.clone(),
            dead: self.topology.dead.clone(),
            remove,
            removed: moved.deleted,
            moved_back: moved.moved_back,
            stopped: moved.stopped,
        }
    }

    /// Deletes matching messages; with `confirmed` false, only counts them.
    pub async fn purge(&self, filter: &Filter, confirmed: bool) -> Result<PurgeSummary, DlqError> {
        if !confirmed {
            let walked = self.count_matching(filter, None).await?;
            return Ok(PurgeSummary {
                walked,
                dead: self.topology.dead.clone(),
                deleted: 0,
                moved_back: 0,
                confirmed,
                stopped: None,
            });
        }
        let (walk, progress) = self.start(PREFETCH).await?;
        let mut walked = Walked::started(walk.bound());
        let now = EventTime::now();
        let started = Instant::now();
        let mut mover = self.mover(walk, PREFETCH).await?;
        while !mover.stopped() {
            let Some((ticket, delivery)) = mover.next_within(CONFIRM_WINDOW).await else {
                break;
            };
            walked.read += 1;
            progress.advance(1);
            if filter.matches(&Facts::read(&delivery.properties), now) {
                walked.matched += 1;
                mover.delete_when(ticket, std::future::ready(Ok(())));
            } else {
                mover.move_back(ticket, delivery).await;
            }
        }
        progress.clear();
        let moved = mover.finish().await;
        walked.elapsed = started.elapsed();
        Ok(PurgeSummary {
            walked,
            dead: self.topology.dead.clone(),
            deleted: moved.deleted,
            moved_back: moved.moved_back,
            confirmed,
            stopped: moved.stopped,
        })
    }
}

/// Lines written to an export between syncs, when the export removes what it wrote.
const SYNC_EVERY: u64 = 512;

/// The export file as it is written: how far it is written, and how far it is on disk.
struct Archive {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
    /// Lines on disk; deletions wait on it.
    synced: tokio::sync::watch::Sender<u64>,
    parent_synced: bool,
}

impl Archive {
    fn error(&self, source: std::io::Error) -> DlqError {
        DlqError::File {
            path: self.path.clone(),
            source,
        }
    }

    fn write(&mut self, delivery: &Delivery) -> Result<(), DlqError> {
        let line = record::to_line(&delivery.data, &delivery.properties);
        writeln!(self.out, "{line}").map_err(|e| self.error(e))?;
        self.written += 1;
        Ok(())
    }

    fn unsynced(&self) -> u64 {
        self.written - *self.synced.borrow()
    }

    /// Flushes and syncs the file (and, the first time, its directory entry).
    fn sync(&mut self) -> Result<(), DlqError> {
        self.out.flush().map_err(|e| self.error(e))?;
        self.out.get_ref().sync_all().map_err(|e| self.error(e))?;
        if !self.parent_synced {
            sync_parent(&self.path).map_err(|e| self.error(e))?;
            self.parent_synced = true;
        }
        self.synced.send_replace(self.written);
        Ok(())
    }

    /// No more syncs: deletions still waiting for a line that is not on disk give up (the
    /// message stays in the queue).
    fn close(&mut self) {
        let on_disk = *self.synced.borrow();
        self.synced = tokio::sync::watch::channel(on_disk).0;
    }

    /// Completes once the line just written is on disk; fails if it never will be.
    fn on_disk(&self) -> impl Future<Output = Result<(), DlqError>> + Send + 'static {
        let line = self.written;
        let mut synced = self.synced.subscribe();
        async move {
            synced
                .wait_for(|on_disk| *on_disk >= line)
                .await
                .map(|_| ())
                .map_err(|_| DlqError::Interrupted)
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
