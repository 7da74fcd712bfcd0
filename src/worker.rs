//! The worker: consume → decode → map → batch → deliver → settle, per broker session, with
//! reconnection and a bounded, clean shutdown.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::batch::{ArrivalPace, Batch, BatchLimits, Batcher};
use crate::broker::{
    self, int_header, text_header, PackedProperties, Publisher, RetryHeaders, Topology,
    TopologyMismatch,
};
use crate::concurrency::AdaptiveConcurrency;
use crate::config::Settings;
use crate::decode::decode;
use crate::deliver::{Deliverer, Rejection, SizeCeilings, Verdict};
use crate::guard::SupersededGuard;
use crate::listrak::ListrakApi;
use crate::mapping::plan;
use crate::model::{DeadLetterReason, EventTime, ListId};
use crate::retry::{plan_retry, RetryPlan};
use crate::settle::{Acks, Ledger, Settlement};
use crate::telemetry::{AckOutcome, Metrics};

/// Readiness for `/readyz`: true only while connected to the broker and consuming.
#[derive(Clone, Default)]
pub struct Health {
    consuming: Arc<AtomicBool>,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn set(&self, metrics: &Metrics, up: bool) {
        self.consuming.store(up, Ordering::Relaxed);
        metrics.amqp_connected(up);
    }
}

/// Acks are sent at every tick: often enough for latency, rarely enough to fold many.
const ACK_TICK: Duration = Duration::from_millis(20);
/// How long a settled message may wait for the ones delivered before it, so one `multiple`
/// ack covers them all (see `settle::Acks`).
const ACK_HOLD: Duration = Duration::from_millis(500);
/// The most messages one `multiple` ack covers (see `settle::Acks` for why there is a most).
const ACK_CHUNK: u64 = 500;
const QUEUE_POLL: Duration = Duration::from_secs(10);
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Bound on one connect, cancel or close, so a broker that stopped answering cannot hold up
/// a reconnection or a shutdown.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on asking the broker whether the queue is empty, before an early flush.
const QUIET_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(call: impl Future<Output = lapin::Result<T>>) {
    match tokio::time::timeout(BROKER_CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::debug!(%error, "broker call failed while closing"),
        Err(_) => {
            tracing::warn!("the broker did not answer within {BROKER_CALL_TIMEOUT:?}; going on")
        }
    }
}

/// Runs the worker until `shutdown` completes; a lost broker connection is re-established
/// as often as needed. Returns after the shutdown drained what it could within the grace.
pub async fn run<A: ListrakApi>(
    settings: Settings,
    api: Arc<A>,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let worker = Worker::new(settings, api, metrics, health, stop.clone());
    let trigger = async {
        shutdown.await;
        tracing::info!("shutdown requested: no new messages; sending what is batched");
        stop.cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        result = worker.run_sessions() => result,
        _ = trigger => unreachable!(),
    }
}

struct Worker<A> {
    settings: Arc<Settings>,
    topology: Topology,
    deliverer: Arc<Deliverer<A>>,
    metrics: Metrics,
    health: Health,
    stop: CancellationToken,
}

impl<A: ListrakApi> Worker<A> {
    fn new(
        settings: Settings,
        api: Arc<A>,
        metrics: Metrics,
        health: Health,
        stop: CancellationToken,
    ) -> Self {
        let topology = Topology::of(&settings);
        let deliverer = Arc::new(Deliverer {
            api,
            concurrency: AdaptiveConcurrency::new(
                settings.listrak.max_concurrency.get(),
                metrics.clone(),
            ),
            guard: Arc::new(SupersededGuard::new(settings.superseded.capacity)),
            ceilings: Arc::new(SizeCeilings::default()),
            metrics: metrics.clone(),
            in_process: settings.retry.in_process,
            shutdown: stop.clone(),
        });
        Self {
            settings: Arc::new(settings),
            topology,
            deliverer,
            metrics,
            health,
            stop,
        }
    }

    async fn run_sessions(&self) -> anyhow::Result<()> {
        let mut delay = RECONNECT_FIRST;
        let mut sessions = 0u64;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let attempt = tokio::time::timeout(
                BROKER_CALL_TIMEOUT,
                broker::connect(&self.settings.amqp, "listrak-worker"),
            );
            let attempt = tokio::select! {
                attempt = attempt => attempt,
                _ = self.stop.cancelled() => return Ok(()),
            };
            let connected = match attempt {
                Ok(Ok(connection)) => connection,
                failed => {
                    let error = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {BROKER_CALL_TIMEOUT:?}"),
                    };
                    tracing::warn!(%error, ?delay, "cannot reach the broker; trying again");
                    self.pause(&mut delay).await;
                    continue;
                }
            };
            sessions += 1;
            if sessions > 1 {
                self.metrics.amqp_reconnected();
            }
            delay = RECONNECT_FIRST;
            let result = Session::run(self, &connected).await;
            self.health.set(&self.metrics, false);
            match result {
                Ok(()) => {
                    bounded(connected.close(200, "shutdown".into())).await;
                    return Ok(());
                }
                Err(SessionError::Topology(mismatch)) => {
                    bounded(connected.close(200, "topology mismatch".into())).await;
                    return Err(mismatch.into());
                }
                Err(error) => {
                    tracing::warn!(error = %error, "broker session ended; reconnecting");
                    bounded(connected.close(320, "reconnecting".into())).await;
                    self.pause(&mut delay).await;
                }
            }
        }
    }

    async fn pause(&self, delay: &mut Duration) {
        tokio::select! {
            _ = tokio::time::sleep(*delay) => {}
            _ = self.stop.cancelled() => {}
        }
        *delay = (*delay * 2).min(RECONNECT_MAX);
    }
}

/// A message being worked on: what is needed to publish it again, unchanged, elsewhere.
struct Original {
    body: Vec<u8>,
    properties: PackedProperties,
}

/// What the spawned tasks report back to the session loop.
enum Report {
    Delivered {
        batch: Batch,
        verdicts: Vec<Verdict>,
    },
    Published {
        tag: u64,
        outcome: AckOutcome,
    },
    PublishFailed {
        tag: u64,
    },
}

/// Per-list sending: one request chain per list at a time keeps a list's updates applied in
/// the order they were batched; lists proceed in parallel.
#[derive(Default)]
struct ListLane {
    busy: bool,
    waiting: VecDeque<Batch>,
}

struct Session<'w, A> {
    worker: &'w Worker<A>,
    channel: Channel,
    publisher: Publisher,
    batcher: Batcher,
    pace: ArrivalPace,
    /// Thousands are in hand at once: each holds its body and packed properties only.
    ledger: Ledger<Original>,
    acks: Acks,
    lanes: HashMap<ListId, ListLane>,
    reports: mpsc::UnboundedSender<Report>,
    /// Dead-letter and retry publishes under way.
    publishing: usize,
    /// Batches being sent.
    delivering: usize,
    /// Batches sent so far: each batch's id in logs.
    batches_sent: u64,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    /// Not a session failure: no later session can succeed either.
    #[error(transparent)]
    Topology(#[from] TopologyMismatch),
}

impl<'w, A: ListrakApi> Session<'w, A> {
    async fn run(worker: &'w Worker<A>, connection: &Connection) -> Result<(), SessionError> {
        let settings = &worker.settings;
        let channel = connection.create_channel().await?;
        worker.topology.declare(&channel).await.map_err(|error| {
            match TopologyMismatch::from_declare(&error, &worker.topology) {
                Some(mismatch) => SessionError::Topology(mismatch),
                None => SessionError::Broker(error),
            }
        })?;
        channel
            .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = Publisher::new(connection).await?;
        let poller = tokio::spawn(poll_queue_depths(
            connection.create_channel().await?,
            worker.topology.clone(),
            worker.metrics.clone(),
        ));
        let consumer_tag = format!("listrak-worker-{}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                settings.amqp.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        worker.health.set(&worker.metrics, true);
        tracing::info!(queue = %settings.amqp.queue, prefetch = settings.amqp.prefetch, "consuming");

        let (reports, mut inbox) = mpsc::unbounded_channel();
        let mut session = Session {
            worker,
            channel,
            publisher,
            batcher: Batcher::new(BatchLimits {
                max_contacts: settings.batch.max_contacts.get(),
                max_bytes: settings.batch.max_bytes.get(),
                max_wait: settings.batch.max_wait,
            }),
            pace: ArrivalPace::default(),
            ledger: Ledger::default(),
            acks: Acks::new(ACK_HOLD, ACK_CHUNK),
            lanes: HashMap::new(),
            reports,
            publishing: 0,
            delivering: 0,
            batches_sent: 0,
        };
        let result = session
            .drive(&mut consumer, &consumer_tag, &mut inbox)
            .await;
        poller.abort();
        if result.is_ok() {
            bounded(session.channel.close(200, "shutdown".into())).await;
            bounded(session.publisher.channel().close(200, "shutdown".into())).await;
        }
        result
    }

    async fn drive(
        &mut self,
        consumer: &mut lapin::Consumer,
        consumer_tag: &str,
        inbox: &mut mpsc::UnboundedReceiver<Report>,
    ) -> Result<(), SessionError> {
        let mut ack_tick = tokio::time::interval(ACK_TICK);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining_until: Option<tokio::time::Instant> = None;
        loop {
            let lingering = self.batcher.next_deadline();
            // With the prefetch window full, a pause says nothing about the input while an
            // answer is still to come: the answer frees part of the window. With room in the
            // window, it does (the queue is asked), whatever is on its way to Listrak.
            let quiet = lingering
                .filter(|_| self.delivering == 0 || !self.window_full())
                .and_then(|_| self.pace.quiet_at(self.batcher.limits().max_wait));
            let flush_at = lingering.map(tokio::time::Instant::from_std);
            let quiet_at = quiet.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                Some(report) = inbox.recv() => {
                    let batch_settled = matches!(report, Report::Delivered { .. });
                    self.on_report(report);
                    // A batch's answer frees a share of the prefetch window: hand it back to
                    // the broker now rather than at the next tick.
                    if batch_settled {
                        self.send_acks(false).await?;
                    }
                }
                _ = self.worker.stop.cancelled(), if draining_until.is_none() => {
                    bounded(
                        self.channel
                            .basic_cancel(consumer_tag.into(), BasicCancelOptions::default()),
                    )
                    .await;
                    for batch in self.batcher.flush_all() {
                        self.dispatch(batch);
                    }
                    draining_until = Some(tokio::time::Instant::now() + self.worker.settings.shutdown.grace);
                }
                _ = async { tokio::time::sleep_until(draining_until.expect("guarded")).await }, if draining_until.is_some() => {
                    tracing::warn!(unsettled = self.ledger.len(), "grace period over; unsettled messages stay in the queue");
                    self.send_acks(true).await?;
                    return Ok(());
                }
                delivery = consumer.next(), if draining_until.is_none() => match delivery {
                    Some(Ok(delivery)) => {
                        self.on_delivery(delivery);
                        // lapin's consumer never makes this loop yield while deliveries are
                        // buffered; without this, a backlog starves the request tasks on the
                        // same thread and every request to Listrak takes longer.
                        tokio::task::consume_budget().await;
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(SessionError::ConsumerEnded),
                },
                _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                    for batch in self.batcher.flush_due(Instant::now()) {
                        self.dispatch(batch);
                    }
                }
                _ = async { tokio::time::sleep_until(quiet_at.expect("guarded")).await }, if quiet_at.is_some() => {
                    if self.nothing_more_coming().await {
                        for batch in self.batcher.flush_idle() {
                            self.dispatch(batch);
                        }
                    } else {
                        self.pace.not_quiet_yet(Instant::now());
                    }
                }
                _ = ack_tick.tick() => self.send_acks(false).await?,
            }
            if draining_until.is_some()
                && self.ledger.is_empty()
                && self.publishing == 0
                && self.delivering == 0
            {
                self.send_acks(true).await?;
                tracing::info!("everything batched was settled; closing");
                return Ok(());
            }
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        let metrics = &self.worker.metrics;
        metrics.message_received();
        let arrived = Instant::now();
        self.pace.arrived(arrived);
        let tag = delivery.delivery_tag;
        self.acks.delivered(tag);
        let now = EventTime::now();
        let planned = decode(&delivery.data, now)
            .and_then(|inbound| plan(&inbound, &self.worker.settings.mappings, metrics));
        let updates = match planned {
            Err(poison) => {
                tracing::info!(
                    delivery_tag = tag,
                    message_id = %message_id(&delivery.properties),
                    reason = %poison.reason,
                    detail = %poison.detail,
                    "dead-lettering a message that cannot be applied"
                );
                let rejection = Rejection {
                    reason: poison.reason,
                    status: None,
                    error: String::new(),
                    message: poison.detail,
                    list_id: None,
                };
                self.dead_letter(tag, delivery.data, &delivery.properties, rejection);
                return;
            }
            Ok(updates) if updates.is_empty() => {
                self.acks.ready(tag, AckOutcome::Ignored, arrived);
                return;
            }
            Ok(updates) => updates,
        };

        self.ledger.open(
            tag,
            Original {
                body: delivery.data,
                properties: PackedProperties::pack(&delivery.properties),
            },
        );
        let deliverer = &self.worker.deliverer;
        // Updates older than what was applied are recognised when their batch is sent (the
        // guard is consulted there anyway, as a newer value may be applied meanwhile).
        for update in updates {
            let ceiling = deliverer.ceilings.get(update.list_id).unwrap_or(usize::MAX);
            let added = self.batcher.add_with_ceiling(tag, update, arrived, ceiling);
            if added.new_part {
                self.ledger.add_part(tag);
            }
            for batch in added.flushed {
                self.dispatch(batch);
            }
        }
        if let Some((original, settlement)) = self.ledger.seal(tag) {
            self.settle(tag, original, settlement);
        }
    }

    fn dispatch(&mut self, batch: Batch) {
        self.worker.metrics.batch_flushed(batch.trigger.as_str());
        let lane = self.lanes.entry(batch.list_id).or_default();
        if lane.busy {
            lane.waiting.push_back(batch);
        } else {
            lane.busy = true;
            self.send(batch);
        }
    }

    fn send(&mut self, batch: Batch) {
        self.delivering += 1;
        self.batches_sent += 1;
        let span = tracing::info_span!(
            "batch",
            batch_id = self.batches_sent,
            list_id = %batch.list_id,
            contacts = batch.contacts.len()
        );
        let deliverer = Arc::clone(&self.worker.deliverer);
        let reports = self.reports.clone();
        tokio::spawn(
            async move {
                let verdicts = deliverer.deliver(&batch).await;
                let _ = reports.send(Report::Delivered { batch, verdicts });
            }
            .instrument(span),
        );
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Delivered { batch, verdicts } => {
                self.delivering -= 1;
                let list_id = batch.list_id;
                for (contact, verdict) in batch.contacts.into_iter().zip(verdicts) {
                    for tag in contact.messages {
                        if let Some((original, settlement)) = self.ledger.settle_part(tag, &verdict)
                        {
                            self.settle(tag, original, settlement);
                        }
                    }
                }
                let lane = self.lanes.entry(list_id).or_default();
                match lane.waiting.pop_front() {
                    Some(next) => self.send(next),
                    None => lane.busy = false,
                }
            }
            Report::Published { tag, outcome } => {
                self.publishing -= 1;
                self.acks.ready(tag, outcome, Instant::now());
            }
            Report::PublishFailed { tag } => {
                // Not acked: the broker delivers it again once the channel is replaced.
                self.publishing -= 1;
                tracing::warn!(delivery_tag = tag, "could not hand a message to the retry or dead-letter queue; it stays in the main queue");
            }
        }
    }

    fn settle(&mut self, tag: u64, original: Original, settlement: Settlement) {
        match settlement {
            Settlement::Ack(outcome) => self.acks.ready(tag, outcome, Instant::now()),
            Settlement::Abandon => {}
            Settlement::DeadLetter(rejection) => {
                let properties = original.properties.unpack();
                self.dead_letter(tag, original.body, &properties, rejection)
            }
            Settlement::Retry => {
                let properties = original.properties.unpack();
                self.retry_later(tag, original.body, &properties)
            }
        }
    }

    fn retry_later(&mut self, tag: u64, body: Vec<u8>, properties: &BasicProperties) {
        let settings = &self.worker.settings;
        let now = EventTime::now();
        let previous = RetryHeaders::read(properties);
        let first_failed_at = previous.first_failed_at.unwrap_or(now);
        match plan_retry(
            previous.attempts,
            first_failed_at,
            now,
            &settings.retry.schedule,
            settings.retry.max_age,
        ) {
            RetryPlan::Exhausted => {
                let rejection = Rejection {
                    reason: DeadLetterReason::RetriesExhausted,
                    status: None,
                    error: String::new(),
                    message: format!(
                        "still failing after {} retries over {}",
                        previous.attempts,
                        humantime::format_duration(settings.retry.max_age)
                    ),
                    list_id: None,
                };
                self.dead_letter(tag, body, properties, rejection);
            }
            RetryPlan::Delay { step } => {
                let queue = self
                    .worker
                    .topology
                    .retry_queue(settings.retry.schedule[step]);
                let properties = broker::with_headers(
                    properties,
                    [
                        (
                            broker::ATTEMPTS,
                            int_header(i64::from(previous.attempts) + 1),
                        ),
                        (
                            broker::FIRST_FAILED_AT,
                            text_header(first_failed_at.to_rfc3339()),
                        ),
                        (broker::LAST_FAILED_AT, text_header(now.to_rfc3339())),
                    ],
                );
                self.publish(
                    tag,
                    String::new(),
                    queue,
                    body,
                    properties,
                    AckOutcome::RetryScheduled,
                    None,
                );
            }
        }
    }

    fn dead_letter(
        &mut self,
        tag: u64,
        body: Vec<u8>,
        properties: &BasicProperties,
        rejection: Rejection,
    ) {
        let now = EventTime::now();
        let previous = RetryHeaders::read(properties);
        let mut headers = vec![
            (broker::REASON, text_header(rejection.reason.as_str())),
            (broker::ATTEMPTS, int_header(i64::from(previous.attempts))),
            (
                broker::FIRST_FAILED_AT,
                text_header(previous.first_failed_at.unwrap_or(now).to_rfc3339()),
            ),
            (broker::LAST_FAILED_AT, text_header(now.to_rfc3339())),
        ];
        if let Some(status) = rejection.status {
            headers.push((broker::STATUS, int_header(i64::from(status))));
        }
        if !rejection.error.is_empty() {
            headers.push((broker::ERROR, text_header(rejection.error)));
        }
        if !rejection.message.is_empty() {
            headers.push((broker::MESSAGE, text_header(rejection.message)));
        }
        if let Some(list) = rejection.list_id {
            headers.push((broker::LIST_ID, int_header(i64::from(list.get()))));
        }
        let properties = broker::with_headers(properties, headers);
        let topology = &self.worker.topology;
        self.publish(
            tag,
            topology.dead.clone(),
            topology.queue.clone(),
            body,
            properties,
            AckOutcome::DeadLettered,
            Some(rejection.reason),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        tag: u64,
        exchange: String,
        routing_key: String,
        body: Vec<u8>,
        properties: BasicProperties,
        outcome: AckOutcome,
        reason: Option<DeadLetterReason>,
    ) {
        self.publishing += 1;
        let publisher = self.publisher.clone();
        let reports = self.reports.clone();
        let metrics = self.worker.metrics.clone();
        tokio::spawn(async move {
            let report = match publisher
                .publish(&exchange, &routing_key, &body, properties)
                .await
            {
                Ok(()) => {
                    if let Some(reason) = reason {
                        metrics.dead_lettered(reason);
                    }
                    Report::Published { tag, outcome }
                }
                Err(error) => {
                    tracing::warn!(%error, exchange, routing_key, "publish failed");
                    Report::PublishFailed { tag }
                }
            };
            let _ = reports.send(report);
        });
    }

    /// Whether the broker has nothing more for this consumer now: the prefetch window is
    /// full of unsettled messages (nothing comes until an ack), or the queue holds no
    /// ready message. A pause in deliveries with messages still queued is the broker being
    /// busy, not the input ending.
    async fn nothing_more_coming(&self) -> bool {
        if self.window_full() {
            return self.delivering == 0;
        }
        // Short: the session loop waits for the answer, with acks and reports queued behind it.
        let declared = tokio::time::timeout(
            QUIET_CHECK_TIMEOUT,
            self.channel.queue_declare(
                self.worker.settings.amqp.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Ok(Ok(queue)) => queue.message_count() == 0,
            // Cannot tell: an early partial batch is the lesser harm.
            _ => true,
        }
    }

    /// Every message the prefetch allows is delivered and not yet acked.
    fn window_full(&self) -> bool {
        let prefetch = usize::from(self.worker.settings.amqp.prefetch);
        self.acks.outstanding() + self.acks.pending_acks() >= prefetch
    }

    /// Sends the acks that are due; `all` sends the held ones too.
    async fn send_acks(&mut self, all: bool) -> Result<(), SessionError> {
        let commands = if all {
            self.acks.take_all()
        } else {
            self.acks.take(Instant::now())
        };
        // An ack's frame is queued when its call is first polled: queue them all, in order,
        // before waiting for any, so they leave in one write.
        let mut sending = Vec::with_capacity(commands.len());
        for command in commands {
            let mut ack = Box::pin(self.channel.basic_ack(
                command.tag,
                BasicAckOptions {
                    multiple: command.multiple,
                },
            ));
            let queued = (&mut ack).now_or_never();
            sending.push((ack, queued, command.outcomes));
        }
        let mut refused = None;
        for (ack, queued, outcomes) in sending {
            let result = match queued {
                Some(result) => result,
                None => ack.await,
            };
            match result {
                Ok(()) => {
                    for (outcome, n) in outcomes {
                        self.worker.metrics.messages_acked(outcome, n);
                    }
                }
                Err(error) => {
                    // The channel is gone; the broker will deliver these again.
                    let count: u64 = outcomes.iter().map(|(_, n)| n).sum();
                    self.worker.metrics.ack_refused(count);
                    refused.get_or_insert(error);
                }
            }
        }
        match refused {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }
}

fn message_id(properties: &BasicProperties) -> &str {
    properties
        .message_id()
        .as_ref()
        .map_or("-", |id| id.as_str())
}

/// Polls the depth of the main, retry and dead-letter queues into `listrak_queue_messages`.
async fn poll_queue_depths(channel: Channel, topology: Topology, metrics: Metrics) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let depth = |name: String| {
        let channel = channel.clone();
        async move {
            channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .map(|q| q.message_count())
        }
    };
    loop {
        if let Ok(main) = depth(topology.queue.clone()).await {
            metrics.queue_depth("main", main);
        }
        if let Ok(dead) = depth(topology.dead.clone()).await {
            metrics.queue_depth("dead", dead);
        }
        let mut retry = 0;
        for (name, _) in &topology.retries {
            retry += depth(name.clone()).await.unwrap_or(0);
        }
        metrics.queue_depth("retry", retry);
        tokio::time::sleep(QUEUE_POLL).await;
    }
}
