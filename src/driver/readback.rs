//! Read-backs: keys at risk are noticed where Listrak accepts them (and where the applied log
//! says another replica did), wait in RabbitMQ for `reconcile.after`, and are then read back
//! by whichever replica takes them from the due queue, and repaired when Listrak holds
//! anything but the newest applied value. The decisions are in `stages::readback`; this
//! module carries them out.
//!
//! A scheduled read-back lives in the broker (`<queue>.readback.<after>`, a quorum queue
//! whose TTL dead-letters into `<queue>.readback.due`): it survives restarts, redeploys and
//! node loss, and each is taken by one replica. Keys noticed while the broker is out of
//! reach wait in memory, at most [`MAX_WAITING`].
//!
//! A repair is a `profile_update` of the newest value with its own event time, published to
//! the main queue: it is batched, guarded (a newer value applied meanwhile wins) and logged
//! like any update, and, its key being at risk, read back once more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use tokio::sync::Notify;

use crate::config::ReconcileSettings;
use crate::driver::clock;
use crate::driver::concurrency::{AdaptiveConcurrency, Signal};
use crate::driver::superseded::{KeyHasher, SupersededGuard};
use crate::driver::unpoisoned::Mutex;
use crate::edges::applied_log::{self, LogKey, ReadFrom};
use crate::edges::broker::{wait_confirm, PublishError, Publisher, Topology, CONFIRM_TIMEOUT};
use crate::edges::listrak::{CatalogueError, ListrakApi};
use crate::edges::telemetry::{mask_email, Metrics};
use crate::stages::decode::profile_update_body;
use crate::stages::headers::ReadBackQueues;
use crate::stages::model::{AppliedKey, AppliedKnowledge, EventTime, FieldId, ListId};
use crate::stages::pace::Pace;
use crate::stages::readback::{
    compare, expectation, Comparison, Expectation, KeyHash, KeyToRead, Knowledge, ReadBacks,
    RiskFilter,
};

/// Keys at risk held in memory while they cannot be scheduled (the broker out of reach);
/// about 100 bytes each. Beyond it, new ones are dropped and counted.
pub const MAX_WAITING: usize = 100_000;
/// Keys per read-back message: about 100 bytes each.
const KEYS_PER_MESSAGE: usize = 100;
/// Read-back messages a scheduling round publishes before it awaits their confirms.
const MESSAGES_IN_FLIGHT: usize = 32;
/// Read-back messages a replica takes at once from the due queue: up to 10,000 keys, so that
/// where the guard forgot, one read of the applied log serves many (that read, not Listrak,
/// bounds read-backs then: a log of 400,000 applications takes seconds to read).
const DUE_PREFETCH: u16 = 100;
/// How long due messages are gathered before they are read: one pass over the applied log
/// then serves all of them.
const GATHER: Duration = Duration::from_secs(1);
/// Contacts read at once (each still takes a slot of the adaptive concurrency).
const READS_IN_FLIGHT: usize = 16;
/// The pause before a channel that failed is opened again.
const AGAIN_AFTER: Duration = Duration::from_secs(1);
/// The applied log is read from this long before the window of the oldest key, for the
/// clocks of replicas that disagree.
const LOG_MARGIN: Duration = Duration::from_secs(60);

/// What the sessions of one worker share for read-backs.
pub struct Reconciler {
    settings: ReconcileSettings,
    /// `settings.window` in microseconds, as event times count.
    window: i64,
    hashers: KeyHasher,
    risk: Mutex<RiskFilter>,
    waiting: Mutex<VecDeque<KeyToRead>>,
    noticed: Notify,
    pace: Mutex<Pace>,
    metrics: Metrics,
}

impl Reconciler {
    pub fn new(settings: ReconcileSettings, metrics: Metrics) -> Self {
        Self {
            risk: Mutex::new(RiskFilter::new(settings.window)),
            pace: Mutex::new(Pace::new(settings.max_read_rate)),
            window: i64::try_from(settings.window.as_micros()).unwrap_or(i64::MAX),
            settings,
            hashers: KeyHasher::new(),
            waiting: Mutex::new(VecDeque::new()),
            noticed: Notify::new(),
            metrics,
        }
    }

    fn hash(&self, list: ListId, email: &str, field: FieldId) -> KeyHash {
        let (high, low) = self.hashers.hash(list, email, field);
        KeyHash(high, low)
    }

    /// Listrak accepted `value` (of `time`) for a key from this worker, at `now`.
    pub fn applied_here(&self, key: AppliedKey<'_>, value: &str, time: EventTime, now: EventTime) {
        let hash = self.hash(key.list, key.email, key.field);
        if self.risk.lock().applied_here(hash, now) {
            self.schedule(key, value, time, now);
        }
    }

    /// A request with the key got no answer: Listrak may still apply it.
    pub fn uncertain(&self, list: ListId, email: &str, field: FieldId, now: EventTime) {
        let hash = self.hash(list, email, field);
        self.risk.lock().uncertain(hash, now);
    }

    fn applied_elsewhere(&self, key: AppliedKey<'_>, value: &str, time: EventTime, at: EventTime) {
        let now = EventTime::now();
        // A session reads the log from its horizon (days) before it consumes: only what
        // was applied within the window can put a key at risk.
        if now.0.saturating_sub(at.0) > self.window {
            return;
        }
        let hash = self.hash(key.list, key.email, key.field);
        if self.risk.lock().applied_elsewhere(hash, now) {
            self.schedule(key, value, time, at);
        }
    }

    fn schedule(&self, key: AppliedKey<'_>, value: &str, time: EventTime, at: EventTime) {
        {
            let mut waiting = self.waiting.lock();
            if waiting.len() >= MAX_WAITING {
                drop(waiting);
                self.metrics.reconcile_scheduled(1, true);
                return;
            }
            waiting.push_back(KeyToRead {
                l: key.list.get(),
                e: key.email.to_owned(),
                f: key.field.get(),
                v: value.to_owned(),
                t: time.0,
                a: at.0,
            });
        }
        self.noticed.notify_one();
    }

    /// Keys waiting to be scheduled.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().len()
    }
}

/// What the applied log teaches a worker with read-backs: the guard learns the values, and
/// a key this worker applied too is at risk (the two replicas raced).
pub struct Learner {
    pub guard: Arc<SupersededGuard>,
    pub reconciler: Option<Arc<Reconciler>>,
}

impl AppliedKnowledge for Learner {
    fn applied(&self, key: AppliedKey<'_>, value: &str, event_time: EventTime, at: EventTime) {
        self.guard.applied(key, value, event_time, at);
        if let Some(reconciler) = &self.reconciler {
            reconciler.applied_elsewhere(key, value, event_time, at);
        }
    }

    fn outstanding(&self, list: ListId, email: &str, field: FieldId, at: EventTime) {
        self.guard.outstanding(list, email, field, at);
    }

    fn tick(&self, now: EventTime) -> (usize, Duration) {
        self.guard.tick(now)
    }
}

/// Publishes the keys noticed at risk to the read-back queue as they come, on a channel of
/// its own, opened again a moment after a failure (a refused publish closes a channel), for
/// as long as the broker session lasts: what was not confirmed waits for the next one.
pub async fn schedule(reconciler: &Reconciler, connection: &Connection, topology: &Topology) {
    loop {
        let Ok(publisher) = Publisher::new(connection).await else {
            return;
        };
        loop {
            // Registered before looking, so that a key noticed meanwhile wakes it.
            let noticed = reconciler.noticed.notified();
            if let Err(error) = publish_waiting(reconciler, &publisher, topology).await {
                tracing::warn!(%error, keys = reconciler.waiting(), "could not schedule \
                    read-backs; trying again on a new channel");
                break;
            }
            noticed.await;
        }
        let _ = publisher
            .channel()
            .close(200, "publish failed".into())
            .await;
        tokio::time::sleep(AGAIN_AFTER).await;
    }
}

/// Publishes what waits, once, within [`CONFIRM_TIMEOUT`]: at the end of a session that
/// closes cleanly, so that a shutdown loses no scheduled read-back.
pub async fn flush(reconciler: &Reconciler, publisher: &Publisher, topology: &Topology) {
    let published = tokio::time::timeout(
        CONFIRM_TIMEOUT,
        publish_waiting(reconciler, publisher, topology),
    );
    match published.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, keys = reconciler.waiting(), "read-backs not scheduled \
                at shutdown");
        }
        Err(_) => {
            tracing::warn!(
                keys = reconciler.waiting(),
                "read-backs not scheduled at \
                shutdown: the broker did not confirm them in time"
            );
        }
    }
}

/// Publishes every key waiting, in messages of up to [`KEYS_PER_MESSAGE`]. A key leaves the
/// queue in memory once its message is confirmed, so a cancelled publish loses none.
async fn publish_waiting(
    reconciler: &Reconciler,
    publisher: &Publisher,
    topology: &Topology,
) -> Result<(), PublishError> {
    let Some(queues) = &topology.readback else {
        return Ok(());
    };
    loop {
        let keys: Vec<KeyToRead> = {
            let waiting = reconciler.waiting.lock();
            let take = KEYS_PER_MESSAGE * MESSAGES_IN_FLIGHT;
            waiting.iter().take(take).cloned().collect()
        };
        if keys.is_empty() {
            return Ok(());
        }
        publish_keys(publisher, &queues.waiting, &keys).await?;
        reconciler.waiting.lock().drain(..keys.len());
        reconciler.metrics.reconcile_scheduled(keys.len(), false);
    }
}

/// Publishes `keys` to the read-back queue `queue`, in messages of [`KEYS_PER_MESSAGE`], all
/// sent before their confirms are awaited together: a drain notices tens of thousands of keys
/// a second.
async fn publish_keys(
    publisher: &Publisher,
    queue: &str,
    keys: &[KeyToRead],
) -> Result<(), PublishError> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut confirms = Vec::new();
    for chunk in keys.chunks(KEYS_PER_MESSAGE) {
        let body = ReadBacks::encode_keys(chunk);
        confirms.push(
            publisher
                .start("", queue, &body, properties.clone())
                .await?,
        );
    }
    for confirm in confirms {
        wait_confirm(confirm).await?;
    }
    Ok(())
}

/// What reading back needs of the worker.
pub struct ReadBackContext<A> {
    pub reconciler: Arc<Reconciler>,
    pub api: Arc<A>,
    pub concurrency: Arc<AdaptiveConcurrency>,
    pub guard: Arc<SupersededGuard>,
    pub topology: Topology,
    pub metrics: Metrics,
}

/// Takes due read-backs from the due queue, reads their keys from Listrak, repairs what
/// differs, and acks each message once its keys were read (or scheduled again) and its
/// repairs confirmed. Returns when the broker session ends.
pub async fn read_back<A: ListrakApi>(context: ReadBackContext<A>, connection: &Connection) {
    let Some(queues) = context.topology.readback.clone() else {
        return;
    };
    // A pass that fails (a repair the broker refused, the applied log unreadable) gives its
    // messages back; reading goes on a moment later on new channels.
    while read_until_failure(&context, connection, &queues).await {
        tokio::time::sleep(AGAIN_AFTER).await;
    }
}

/// Reads back on channels of its own until a pass fails (true: try again) or the connection
/// is gone (false).
async fn read_until_failure<A: ListrakApi>(
    context: &ReadBackContext<A>,
    connection: &Connection,
    queues: &ReadBackQueues,
) -> bool {
    let opened = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(DUE_PREFETCH, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queues.due.as_str().into(),
                format!("listrak-worker-readback-{}", std::process::id())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publisher = Publisher::new(connection).await?;
        Ok::<_, lapin::Error>((channel, consumer, publisher))
    };
    let (channel, mut consumer, publisher) = match opened.await {
        Ok(opened) => opened,
        Err(error) => {
            tracing::warn!(%error, queue = %queues.due, "cannot consume due read-backs in \
                this session");
            return false;
        }
    };
    loop {
        let Some(Ok(first)) = consumer.next().await else {
            return false;
        };
        let mut deliveries = vec![first];
        let until = tokio::time::Instant::now() + GATHER;
        while deliveries.len() < usize::from(DUE_PREFETCH) {
            match tokio::time::timeout_at(until, consumer.next()).await {
                Ok(Some(Ok(delivery))) => deliveries.push(delivery),
                Ok(_) => return false,
                Err(_) => break,
            }
        }
        let mut keys = Vec::new();
        for delivery in &deliveries {
            match ReadBacks::decode(&delivery.data) {
                Ok(message) => keys.extend(message.k),
                Err(why) => tracing::warn!(%why, "dropped a read-back message this worker \
                    cannot read"),
            }
        }
        let last = deliveries
            .last()
            .map_or(0, |delivery| delivery.delivery_tag);
        let multiple = BasicAckOptions { multiple: true };
        match pass(context, connection, &publisher, &queues.waiting, keys).await {
            Ok(()) => {
                if channel.basic_ack(last, multiple).await.is_err() {
                    return false;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not finish a pass of read-backs; they come back");
                let requeue = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                let _ = channel.basic_nack(last, requeue).await;
                let _ = channel.close(200, "pass failed".into()).await;
                let _ = publisher.channel().close(200, "pass failed".into()).await;
                return true;
            }
        }
    }
}

/// One pass over due keys: what each should hold, what Listrak holds, and the repairs.
async fn pass<A: ListrakApi>(
    context: &ReadBackContext<A>,
    connection: &Connection,
    publisher: &Publisher,
    waiting_queue: &str,
    keys: Vec<KeyToRead>,
) -> Result<(), PassError> {
    let now = EventTime::now();
    let window = context.reconciler.window;
    let mut forgotten = Vec::new();
    let mut known = Vec::new();
    for key in keys {
        let (Some(list), Some(field)) = (
            ListId::new(i64::from(key.l)),
            FieldId::new(i64::from(key.f)),
        ) else {
            continue;
        };
        let since = EventTime(key.a.saturating_sub(window));
        if context.guard.knows_everything_since(since) {
            let newest = context.guard.newest(list, &key.e, field);
            known.push((list, key, Knowledge::Guard { newest }));
        } else {
            forgotten.push((list, key));
        }
    }
    if !forgotten.is_empty() {
        let oldest = forgotten
            .iter()
            .map(|(_, key)| key.a)
            .min()
            .unwrap_or(now.0);
        let age = Duration::from_micros(u64::try_from(now.0 - oldest).unwrap_or(0))
            + context.reconciler.settings.window
            + LOG_MARGIN;
        let wanted: HashSet<LogKey> = forgotten
            .iter()
            .map(|(_, key)| (key.l, key.e.clone(), i64::from(key.f)))
            .collect();
        let newest =
            applied_log::newest_values(connection, &context.topology, ReadFrom::Age(age), &wanted)
                .await
                .map_err(|error| PassError(error.to_string()))?;
        for (list, key) in forgotten {
            let newest = newest
                .get(&(key.l, key.e.clone(), i64::from(key.f)))
                .cloned();
            known.push((list, key, Knowledge::Log { newest }));
        }
    }

    // Per contact, the fields to read and the value each should hold.
    let mut contacts: HashMap<(ListId, String), Vec<Expected>> = HashMap::new();
    for (list, key, knowledge) in known {
        match expectation(&key, knowledge) {
            Expectation::Postponed => context.metrics.reconcile_postponed(),
            Expectation::Holds { value, time } => contacts
                .entry((list, key.e.clone()))
                .or_default()
                .push((key, value, time)),
        }
    }
    let reads = futures_util::stream::iter(contacts)
        .map(|((list, email), fields)| read_contact(context, list, email, fields))
        .buffer_unordered(READS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;

    let mut again = Vec::new();
    let mut repairs = Vec::new();
    for read in reads {
        match read {
            ContactRead::Read {
                list,
                email,
                fields,
            } => {
                for (key, value, time, comparison) in fields {
                    context.metrics.reconcile_read(comparison.as_str(), 1);
                    if comparison.repairs() {
                        repairs.push((list, email.clone(), key.f, value, time));
                    }
                }
            }
            ContactRead::Again(keys) => {
                context.metrics.reconcile_read("failed", keys.len());
                again.extend(keys);
            }
            ContactRead::GivenUp(count) => context.metrics.reconcile_read("failed", count),
        }
    }
    if !repairs.is_empty() {
        tracing::info!(
            keys = repairs.len(),
            "Listrak held an older value than the newest applied; sending the newest again"
        );
        context.metrics.reconcile_repaired(repairs.len());
    }
    // Sent together, their confirms awaited together.
    let mut confirms = Vec::with_capacity(repairs.len());
    for (list, email, field, value, time) in repairs {
        tracing::debug!(
            list_id = %list,
            field_id = field,
            email = %mask_email(&email),
            "repairing a key Listrak holds another value for"
        );
        let repair = Repair {
            list,
            email: &email,
            field,
            value: &value,
            time,
        };
        let confirm = start_repair(publisher, &context.topology.queue, &repair)
            .await
            .map_err(|error| PassError(error.to_string()))?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        wait_confirm(confirm)
            .await
            .map_err(|error| PassError(error.to_string()))?;
    }
    publish_keys(publisher, waiting_queue, &again)
        .await
        .map_err(|error| PassError(error.to_string()))?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PassError(String);

/// A key to read, with the value it should hold and that value's event time.
type Expected = (KeyToRead, String, EventTime);

enum ContactRead {
    Read {
        list: ListId,
        email: String,
        fields: Vec<(KeyToRead, String, EventTime, Comparison)>,
    },
    /// Listrak could not answer now (429, 5xx, no answer, no token): read again later.
    Again(Vec<KeyToRead>),
    /// Listrak refused the read for good (a 4xx other than 404): the keys are given up.
    GivenUp(usize),
}

async fn read_contact<A: ListrakApi>(
    context: &ReadBackContext<A>,
    list: ListId,
    email: String,
    fields: Vec<Expected>,
) -> ContactRead {
    let slot = context.reconciler.pace.lock().slot(clock::now());
    tokio::time::sleep_until(slot.into()).await;
    let ids: Vec<u32> = fields.iter().map(|(key, ..)| key.f).collect();
    let permit = context.concurrency.acquire().await;
    let answer = context.api.contact(list, &email, &ids).await;
    permit.record(signal(&answer));
    match answer {
        Ok(held) => {
            let fields = fields
                .into_iter()
                .map(|(key, value, time)| {
                    let holds = held.as_ref().map(|contact| {
                        contact
                            .values
                            .iter()
                            .find(|(id, _)| *id == key.f)
                            .map(|(_, value)| value.as_str())
                    });
                    let comparison = compare(&value, holds);
                    (key, value, time, comparison)
                })
                .collect();
            ContactRead::Read {
                list,
                email,
                fields,
            }
        }
        Err(error) if retryable(&error) => {
            tracing::debug!(%error, "a read-back failed; reading it again later");
            ContactRead::Again(fields.into_iter().map(|(key, ..)| key).collect())
        }
        Err(error) => {
            tracing::warn!(
                %error,
                list_id = %list,
                email = %mask_email(&email),
                "Listrak refused a read-back; its keys are not read again"
            );
            ContactRead::GivenUp(fields.len())
        }
    }
}

fn retryable(error: &CatalogueError) -> bool {
    match error {
        CatalogueError::NoToken(_) | CatalogueError::Transport { .. } => true,
        CatalogueError::Refused { status, .. } => {
            *status == 429 || *status >= 500 || *status == 401
        }
        CatalogueError::Unexpected { .. } => false,
    }
}

fn signal<T>(answer: &Result<T, CatalogueError>) -> Signal {
    match answer {
        Ok(_) => Signal::Healthy,
        Err(CatalogueError::Refused { status: 429, .. }) => Signal::Throttled,
        Err(CatalogueError::Refused { status, .. }) if *status >= 500 => Signal::Overloaded,
        Err(CatalogueError::Transport { .. }) => Signal::Overloaded,
        Err(_) => Signal::Neutral,
    }
}

/// A key's newest value, to send again.
struct Repair<'a> {
    list: ListId,
    email: &'a str,
    field: u32,
    value: &'a str,
    time: EventTime,
}

/// The newest value, sent again as a `profile_update` with its own event time; its confirm
/// is the caller's to await.
async fn start_repair(
    publisher: &Publisher,
    queue: &str,
    repair: &Repair<'_>,
) -> Result<lapin::PublisherConfirm, PublishError> {
    let id = format!("readback-{:016x}", rand::random::<u64>());
    let body = profile_update_body(
        repair.list,
        repair.email,
        repair.field,
        repair.value,
        &repair.time.to_rfc3339_micros(),
        &id,
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.as_str().into());
    publisher.start("", queue, &body, properties).await
}
