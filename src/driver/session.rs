//! One broker session: consume → decode → map → batch → deliver → settle, on one channel,
//! until shutdown or until the connection fails (the worker then starts a new one).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::driver::deliver::Delivered;
use crate::driver::fields::{self, Unresolvable};
use crate::driver::shared::Worker;
use crate::edges::applied_log::{self, ReadFrom, Record};
use crate::edges::broker::{
    self, bounded, poll_queue_depths, text_header, PackedProperties, Publisher, RetryHeaders,
    TopologyMismatch,
};
use crate::edges::listrak::{CatalogueError, ListrakApi};
use crate::edges::telemetry::Task;
use crate::stages::batch::{ArrivalPace, Batch, BatchLimits, Batcher};
use crate::stages::decode::decode;
use crate::stages::disposition::{self, dispose, Disposition, Republish, Rules};
use crate::stages::mapping::{plan, Plan};
use crate::stages::model::{
    capped, AckOutcome, DeadLetterReason, EventTime, ListId, Rejection, Update, Verdict,
    QUOTE_LIMIT,
};
use crate::stages::settle::{Acks, Ledger, Settlement};

/// Acks are sent at every tick: often enough for latency, rarely enough to fold many.
const ACK_TICK: Duration = Duration::from_millis(20);
/// How long a settled message may wait for the ones delivered before it, so one `multiple`
/// ack covers them all (see `settle::Acks`).
const ACK_HOLD: Duration = Duration::from_millis(500);
/// The most messages one `multiple` ack covers (see `settle::Acks` for why there is a most).
const ACK_CHUNK: u64 = 500;
/// Bound on asking the broker whether the queue is empty, before an early flush.
const QUIET_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A retry or dead-letter publish that fails is tried again on a new channel this many
/// times, a little later each time; then the session ends and the broker delivers the
/// message again, so no delivery stays unsettled.
const PUBLISH_ATTEMPTS: u32 = 5;
const PUBLISH_RETRY_FIRST: Duration = Duration::from_millis(200);

/// A message being worked on: what is needed to publish it again, unchanged, elsewhere.
struct Original {
    body: Vec<u8>,
    properties: PackedProperties,
    /// The event time its updates carry, for the copies it may become.
    event_time: EventTime,
    /// For the applied log's record (unpacking the properties for it costs more).
    message_id: Option<Box<str>>,
}

/// What the spawned tasks report back to the session loop.
enum Report {
    /// Listrak answered every contact of a batch (its record is not appended yet).
    Delivered {
        batch: Batch,
        delivered: Delivered,
    },
    /// A batch's record is in the applied log (or it needed none): its verdicts stand.
    Appended {
        batch: Batch,
        verdicts: Vec<Verdict>,
    },
    AppendFailed(Box<Appending>),
    Published {
        tag: u64,
        outcome: AckOutcome,
    },
    PublishFailed(Box<Outgoing>),
    /// The fields of a message held aside (see `Session::hold`) were resolved, or not.
    Resolved {
        tag: u64,
        arrived: Instant,
        resolved: Result<Vec<Update>, Unresolvable>,
    },
}

/// A batch's record on its way to the applied log: its messages settle once it is confirmed.
struct Appending {
    batch: Batch,
    verdicts: Vec<Verdict>,
    record: Vec<u8>,
    generation: u64,
    attempts: u32,
}

/// A copy on its way to a retry queue or the dead-letter queue: everything needed to
/// publish it again if the broker does not confirm it.
struct Outgoing {
    tag: u64,
    copy: Republish,
    body: Vec<u8>,
    properties: BasicProperties,
    /// The publisher channel it failed on (see `Session::publisher_generation`).
    generation: u64,
    attempts: u32,
}

pub(crate) struct Session<'w, A> {
    worker: &'w Worker<A>,
    connection: &'w Connection,
    channel: Channel,
    publisher: Publisher,
    /// Counts publisher channels: a failed publish replaces the channel only if no other
    /// failure replaced it since.
    publisher_generation: u64,
    /// Messages the broker may have delivered and not yet acknowledged (`basic.qos`).
    window: u16,
    batcher: Batcher,
    pace: ArrivalPace,
    /// Thousands are in hand at once: each holds its body and packed properties only.
    ledger: Ledger<Original>,
    acks: Acks,
    reports: mpsc::UnboundedSender<Report>,
    /// Dead-letter and retry publishes under way.
    publishing: usize,
    /// Batches being sent.
    delivering: usize,
    /// Batches sent so far: each batch's id in logs.
    batches_sent: u64,
    /// Every task the session spawned (deliveries, resolutions, publishes, appends): when the
    /// session ends they are finished or cancelled before the next one sends, so a contact is
    /// never in two requests at once across a reconnection.
    tasks: JoinSet<()>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    #[error(
        "could not hand a message to the retry or dead-letter queue after {PUBLISH_ATTEMPTS} \
             attempts; the broker will deliver it again"
    )]
    PublishFailed,
    /// Not a session failure: no later session can succeed either.
    #[error(transparent)]
    Topology(#[from] TopologyMismatch),
}

impl<'w, A: ListrakApi> Session<'w, A> {
    pub(crate) async fn run(
        worker: &'w Worker<A>,
        connection: &'w Connection,
    ) -> Result<(), SessionError> {
        let settings = &worker.settings;
        let window = settings.amqp.window(settings.batch.max_contacts.get());
        let channel = connection.create_channel().await?;
        worker.topology.declare(&channel).await.map_err(|error| {
            match TopologyMismatch::from_declare(&error, &worker.topology) {
                Some(mismatch) => SessionError::Topology(mismatch),
                None => SessionError::Broker(error),
            }
        })?;
        channel
            .basic_qos(window, BasicQosOptions::default())
            .await?;
        worker.metrics.prefetch_window(window);
        let publisher = Publisher::new(connection).await?;
        let poller = tokio::spawn(poll_queue_depths(
            connection.create_channel().await?,
            worker.topology.clone(),
            worker.metrics.clone(),
        ));
        let Some(following) = read_applied_log(worker, connection, &publisher).await? else {
            poller.abort();
            return Ok(());
        };
        let consumer_tag = format!("listrak-worker-{}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                settings.amqp.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        worker.health.set(true);
        worker.metrics.amqp_connected(true);
        tracing::info!(queue = %settings.amqp.queue, prefetch = window, "consuming");

        let (reports, mut inbox) = mpsc::unbounded_channel();
        let mut session = Session {
            worker,
            connection,
            channel,
            publisher,
            publisher_generation: 0,
            window,
            batcher: Batcher::new(BatchLimits {
                max_contacts: settings.batch.max_contacts.get(),
                max_bytes: settings.batch.max_bytes.get(),
                max_wait: settings.batch.max_wait,
            }),
            pace: ArrivalPace::default(),
            ledger: Ledger::default(),
            acks: Acks::new(ACK_HOLD, ACK_CHUNK),
            reports,
            publishing: 0,
            delivering: 0,
            batches_sent: 0,
            tasks: JoinSet::new(),
        };
        let result = session
            .drive(&mut consumer, &consumer_tag, &mut inbox)
            .await;
        poller.abort();
        following.abort();
        session.tasks.shutdown().await;

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
            // Contacts waiting for an answer join the open batches when it comes: the input
            // is not over until they have.
            let quiet = lingering
                .filter(|_| !self.batcher.any_parked())
                .filter(|_| self.delivering == 0 || !self.window_full())
                .and_then(|_| self.pace.quiet_at(self.batcher.limits().max_wait));
            let flush_at = lingering.map(tokio::time::Instant::from_std);
            let quiet_at = quiet.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                Some(report) = inbox.recv() => {
                    let batch_settled = matches!(report, Report::Appended { .. });
                    self.on_report(report, draining_until.is_some()).await?;
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
                    let grace = self.worker.settings.shutdown.grace;
                    draining_until = Some(tokio::time::Instant::now() + grace);
                }
                _ = sleep_until_if_any(draining_until) => {
                    tracing::warn!(
                        unsettled = self.ledger.len(),
                        "grace period over; unsettled messages stay in the queue"
                    );
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
                _ = sleep_until_if_any(flush_at) => {
                    for batch in self.batcher.flush_due(Instant::now()) {
                        self.dispatch(batch);
                    }
                }
                _ = sleep_until_if_any(quiet_at) => {
                    if self.nothing_more_coming().await {
                        for batch in self.batcher.flush_idle() {
                            self.dispatch(batch);
                        }
                    } else {
                        self.pace.not_quiet_yet(Instant::now());
                    }
                }
                _ = ack_tick.tick() => {
                    // Finished tasks are forgotten; their reports are in the inbox.
                    while self.tasks.try_join_next().is_some() {}
                    self.send_acks(false).await?
                }
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
        // What an earlier delivery used, else the producer's AMQP timestamp, else now (this
        // is the first receipt: a copy carries the time on).
        let carried = broker::carried_event_time(&delivery.properties);
        let stamped = broker::stamped_time(&delivery.properties);
        let received = carried.or(stamped).unwrap_or(now);
        let planned = decode(&delivery.data, received)
            .and_then(|inbound| plan(&inbound, &self.worker.settings.mappings, metrics));
        let mut plan = match planned {
            Err(poison) => {
                tracing::info!(
                    delivery_tag = tag,
                    message_id = %message_id(&delivery.properties),
                    reason = %poison.reason,
                    detail = %capped(&poison.detail, QUOTE_LIMIT),
                    "dead-lettering a message that cannot be applied"
                );
                let rejection = Rejection {
                    reason: poison.reason,
                    status: None,
                    error: None,
                    message: Some(poison.detail),
                    list_id: None,
                };
                self.settle(
                    tag,
                    delivery.data,
                    &delivery.properties,
                    Settlement::DeadLetter(rejection),
                    None,
                );
                return;
            }
            Ok(plan) if plan.is_empty() => {
                self.acks.ready(tag, AckOutcome::Ignored, arrived);
                return;
            }
            Ok(plan) => plan,
        };
        let skew = self.worker.settings.batch.clock_skew;
        let updates = plan.updates.iter_mut().chain(
            plan.unresolved
                .iter_mut()
                .map(|pending| &mut pending.update),
        );
        let mut updates: Vec<&mut Update> = updates.collect();
        if let Some(carried) = carried {
            for update in updates.iter_mut() {
                update.timestamp = carried;
            }
        }
        if let Some(claimed) = trust_event_times(updates, now, skew) {
            let message_id = message_id(&delivery.properties);
            metrics.future_timestamp(tag, message_id, &claimed.to_rfc3339());
        }
        let event_time = plan
            .updates
            .first()
            .or(plan.unresolved.first().map(|pending| &pending.update))
            .map_or(received, |update| update.timestamp);

        self.ledger.open(
            tag,
            Original {
                body: delivery.data,
                properties: PackedProperties::pack(&delivery.properties),
                event_time,
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| Box::from(id.as_str())),
            },
        );
        match self.worker.fields.lookup_all(plan) {
            Ok(updates) => self.add_updates(tag, updates, arrived),
            Err(plan) => self.hold(tag, plan, arrived),
        }
    }

    /// Hands a message's updates to the batcher; the message settles when each has a verdict.
    fn add_updates(&mut self, tag: u64, updates: Vec<Update>, arrived: Instant) {
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
            self.settle_original(tag, original, settlement);
        }
    }

    /// Holds a message aside while a task resolves its fields from Listrak (a catalogue read
    /// or a field to create), so the loop goes on. The ledger knows the message as resolving
    /// (it cannot settle, and the shutdown drain waits for it); its updates keep their arrival
    /// time, so their hold budget counts from then.
    fn hold(&mut self, tag: u64, plan: Plan, arrived: Instant) {
        self.ledger.resolving(tag);
        let fields = Arc::clone(&self.worker.fields);
        let reports = self.reports.clone();
        // Past the moment its batch could still start a request, waiting is pointless: the
        // message goes to the retry queues instead.
        let deadline = arrived + self.worker.deliverer.hold_budget;
        self.tasks.spawn(async move {
            let seen = tokio::time::Instant::from_std(arrived);
            let deadline = tokio::time::Instant::from_std(deadline);
            let resolved = fields.resolve_all(plan, seen, deadline).await;
            let _ = reports.send(Report::Resolved {
                tag,
                arrived,
                resolved,
            });
        });
    }

    fn on_resolved(
        &mut self,
        tag: u64,
        arrived: Instant,
        resolved: Result<Vec<Update>, Unresolvable>,
        draining: bool,
    ) {
        match resolved {
            Ok(updates) => {
                self.ledger.resolved(tag);
                self.add_updates(tag, updates, arrived);
                if draining {
                    for batch in self.batcher.flush_all() {
                        self.dispatch(batch);
                    }
                }
            }
            Err(why) => {
                let verdict = unresolved_verdict(&why);
                tracing::info!(
                    delivery_tag = tag,
                    error = %why,
                    "a message's profile field could not be resolved"
                );
                if let Some((original, settlement)) = self.ledger.unresolved(tag, &verdict) {
                    self.settle_original(tag, original, settlement);
                }
            }
        }
    }

    /// Sends a batch now: the batcher never lets one out with a contact that is already in
    /// flight, so batches of one list may go out side by side, up to the concurrency limit.
    fn dispatch(&mut self, batch: Batch) {
        self.worker.metrics.batch_flushed(batch.trigger);
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
        self.tasks.spawn(
            async move {
                let delivered = deliverer.deliver_or_retry(&batch).await;
                let _ = reports.send(Report::Delivered { batch, delivered });
            }
            .instrument(span),
        );
    }

    async fn on_report(&mut self, report: Report, draining: bool) -> Result<(), SessionError> {
        match report {
            Report::Delivered { batch, delivered } => {
                // Listrak answered: the contacts that waited for this request may go now; the
                // messages settle once the record is in the applied log.
                let ceiling = self.worker.deliverer.ceilings.get(batch.list_id);
                let ready =
                    self.batcher
                        .answered(&batch, Instant::now(), ceiling.unwrap_or(usize::MAX));
                for batch in ready {
                    self.dispatch(batch);
                }
                if draining {
                    // Updates that waited for this answer leave at once.
                    for batch in self.batcher.flush_all() {
                        self.dispatch(batch);
                    }
                }
                self.append(batch, delivered);
            }
            Report::AppendFailed(mut failed) => {
                let delay = self
                    .publish_again(&mut failed.attempts, failed.generation)
                    .await?;
                self.spawn_append(failed, delay);
            }
            Report::Appended { batch, verdicts } => {
                self.delivering -= 1;
                for (contact, verdict) in batch.contacts.iter().zip(verdicts) {
                    if let Verdict::DeadLetter(Rejection {
                        status: Some(400),
                        message: Some(message),
                        ..
                    }) = &verdict
                    {
                        let fields = contact.fields.iter().map(|value| value.field);
                        self.worker.fields.refused(batch.list_id, message, fields);
                    }
                    for &tag in &contact.messages {
                        if let Some((original, settlement)) = self.ledger.settle_part(tag, &verdict)
                        {
                            self.settle_original(tag, original, settlement);
                        }
                    }
                }
            }
            Report::Resolved {
                tag,
                arrived,
                resolved,
            } => self.on_resolved(tag, arrived, resolved, draining),
            Report::Published { tag, outcome } => {
                self.publishing -= 1;
                self.acks.ready(tag, outcome, Instant::now());
            }
            Report::PublishFailed(mut failed) => {
                self.publishing -= 1;
                let delay = self
                    .publish_again(&mut failed.attempts, failed.generation)
                    .await?;
                self.publish(failed, delay);
            }
        }
        Ok(())
    }

    /// Appends what a delivered batch applied (and which of its contacts have copies out) to
    /// the applied log; its messages settle once the broker confirms the record.
    fn append(&mut self, batch: Batch, delivered: Delivered) {
        let Delivered {
            verdicts,
            resource_ids,
        } = delivered;
        let ledger = &self.ledger;
        let writer = &self.worker.writer;
        let record = Record::of_delivery(
            writer,
            &batch,
            &verdicts,
            resource_ids,
            EventTime::now(),
            |tag| {
                ledger
                    .get(tag)
                    .and_then(|original| original.message_id.as_deref())
                    .map(str::to_owned)
            },
        );
        let Some(record) = record else {
            let _ = self.reports.send(Report::Appended { batch, verdicts });
            return;
        };
        // The delivery recorded what it applied; the keys to watch are the record's news.
        record.watch(&self.worker.deliverer.guard);
        let applied = record.a.len();
        let bytes = record.encode();
        self.worker
            .metrics
            .applied_log_appended(bytes.len(), applied);
        let appending = Box::new(Appending {
            batch,
            verdicts,
            record: bytes,
            generation: self.publisher_generation,
            attempts: 0,
        });
        self.spawn_append(appending, Duration::ZERO);
    }

    fn spawn_append(&mut self, mut appending: Box<Appending>, delay: Duration) {
        appending.generation = self.publisher_generation;
        let publisher = self.publisher.clone();
        let topology = self.worker.topology.clone();
        let reports = self.reports.clone();
        let metrics = self.worker.metrics.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let appended = applied_log::append(&publisher, &topology, &appending.record);
            let report = match AssertUnwindSafe(appended).catch_unwind().await {
                Ok(Ok(())) => Report::Appended {
                    batch: appending.batch,
                    verdicts: appending.verdicts,
                },
                Ok(Err(error)) => {
                    let attempt = appending.attempts + 1;
                    metrics.publish_failed(&error, "", &topology.applied, attempt);
                    Report::AppendFailed(appending)
                }
                Err(_) => {
                    metrics.task_panicked(Task::Append);
                    Report::AppendFailed(appending)
                }
            };
            let _ = reports.send(report);
        });
    }

    /// After a publish (a copy or a record) failed on the publisher of `generation`: one more
    /// attempt, on a new publisher unless another failure replaced it already; the delay
    /// before it, or the end of the session after the last attempt.
    async fn publish_again(
        &mut self,
        attempts: &mut u32,
        generation: u64,
    ) -> Result<Duration, SessionError> {
        *attempts += 1;
        if *attempts >= PUBLISH_ATTEMPTS {
            return Err(SessionError::PublishFailed);
        }
        if generation == self.publisher_generation {
            self.replace_publisher().await?;
        }
        Ok(PUBLISH_RETRY_FIRST * 2u32.pow(*attempts - 1))
    }

    /// A failed publish usually means the publisher channel is gone (the broker closed it
    /// on a refusal): open another, and declare the topology again, in case what the copy
    /// was sent to was deleted.
    async fn replace_publisher(&mut self) -> Result<(), SessionError> {
        let publisher = tokio::time::timeout(broker::CONFIRM_TIMEOUT, async {
            let publisher = Publisher::new(self.connection).await?;
            self.worker.topology.declare(publisher.channel()).await?;
            Ok::<_, lapin::Error>(publisher)
        })
        .await;
        match publisher {
            Ok(Ok(publisher)) => {
                self.publisher = publisher;
                self.publisher_generation += 1;
                Ok(())
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(SessionError::PublishFailed),
        }
    }

    fn settle_original(&mut self, tag: u64, original: Original, settlement: Settlement) {
        match settlement {
            Settlement::Ack(outcome) => self.acks.ready(tag, outcome, Instant::now()),
            Settlement::Abandon => {}
            settlement => {
                let properties = original.properties.unpack();
                let event_time = Some(original.event_time);
                self.settle(tag, original.body, &properties, settlement, event_time);
            }
        }
    }

    /// Acks, leaves, or publishes a copy to a retry queue or the dead-letter queue, as
    /// `disposition` decides; a copy carries the event time its updates used.
    fn settle(
        &mut self,
        tag: u64,
        body: Vec<u8>,
        properties: &BasicProperties,
        settlement: Settlement,
        event_time: Option<EventTime>,
    ) {
        let settings = &self.worker.settings;
        let rules = Rules {
            schedule: &settings.retry.schedule,
            clock_skew: settings.batch.clock_skew,
            max_age: settings.retry.max_age,
            topology: &self.worker.topology,
        };
        let previous = RetryHeaders::read(properties);
        match dispose(settlement, previous, EventTime::now(), &rules) {
            Disposition::Ack(outcome) => self.acks.ready(tag, outcome, Instant::now()),
            Disposition::Leave => {}
            Disposition::Republish(mut copy) => {
                if let Some(time) = event_time {
                    copy.headers
                        .push((broker::EVENT_TIME, text_header(time.to_rfc3339_micros())));
                }
                let properties = disposition::republished(properties, &copy);
                let publish = Box::new(Outgoing {
                    tag,
                    copy,
                    body,
                    properties,
                    generation: self.publisher_generation,
                    attempts: 0,
                });
                self.publish(publish, Duration::ZERO);
            }
        }
    }

    /// Publishes a copy (after `delay`), waits for its confirm, and reports.
    fn publish(&mut self, mut publish: Box<Outgoing>, delay: Duration) {
        self.publishing += 1;
        publish.generation = self.publisher_generation;
        let publisher = self.publisher.clone();
        let reports = self.reports.clone();
        let metrics = self.worker.metrics.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let copy = &publish.copy;
            let publishing = publisher.publish(
                &copy.exchange,
                &copy.routing_key,
                &publish.body,
                publish.properties.clone(),
            );
            // A panic (a bug) is a failed publish: the copy is published again, or the
            // session ends and the broker delivers the message again.
            let result = AssertUnwindSafe(publishing).catch_unwind().await;
            let report = match result {
                Ok(Ok(())) => {
                    if let Some(reason) = copy.dead_letter {
                        metrics.dead_lettered(reason);
                    }
                    Report::Published {
                        tag: publish.tag,
                        outcome: copy.outcome(),
                    }
                }
                Ok(Err(error)) => {
                    let attempt = publish.attempts + 1;
                    metrics.publish_failed(&error, &copy.exchange, &copy.routing_key, attempt);
                    Report::PublishFailed(publish)
                }
                Err(_) => {
                    metrics.task_panicked(Task::Publish);
                    Report::PublishFailed(publish)
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
        let counted = tokio::time::timeout(
            QUIET_CHECK_TIMEOUT,
            broker::queue_counts(&self.channel, &self.worker.settings.amqp.queue),
        )
        .await;
        match counted {
            Ok(Ok((ready, _))) => ready == 0,
            // Cannot tell: an early partial batch is the lesser harm.
            _ => true,
        }
    }

    /// Every message the prefetch allows is delivered and not yet acked.
    fn window_full(&self) -> bool {
        self.acks.outstanding() + self.acks.pending_acks() >= usize::from(self.window)
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

/// Reads the applied log into the guard before anything is sent (from its horizon the first
/// time, from where the last session stopped after), and tails it from then on. `None` when
/// shutdown came first.
async fn read_applied_log<A: ListrakApi>(
    worker: &Worker<A>,
    connection: &Connection,
    publisher: &Publisher,
) -> Result<Option<tokio::task::AbortHandle>, SessionError> {
    let offset = worker.log_offset.load(std::sync::atomic::Ordering::Acquire);
    let from = if offset >= 0 {
        ReadFrom::Offset(offset)
    } else {
        ReadFrom::Age(worker.settings.applied_log.max_age)
    };
    let started = Instant::now();
    let following = applied_log::follow(
        connection,
        publisher,
        &worker.topology,
        from,
        applied_log::Reader {
            guard: Arc::clone(&worker.deliverer.guard),
            metrics: worker.metrics.clone(),
            next_offset: Arc::clone(&worker.log_offset),
            writer: worker.writer.clone(),
        },
    )
    .await
    .map_err(|error| match error {
        broker::PublishError::Broker(error) => SessionError::Broker(error),
        _ => SessionError::PublishFailed,
    })?;
    let abort = following.task.abort_handle();
    tokio::select! {
        read = following.synced => match read {
            Ok(records) => {
                let guard = &worker.deliverer.guard;
                let now = EventTime::now();
                worker.metrics.guard(guard.len(), guard.horizon(now));
                tracing::info!(
                    records,
                    keys = guard.len(),
                    watched = guard.watched(),
                    elapsed = ?started.elapsed(),
                    "read the applied log"
                );
                Ok(Some(abort))
            }
            Err(_) => {
                abort.abort();
                Err(SessionError::ConsumerEnded)
            }
        },
        _ = worker.stop.cancelled() => {
            abort.abort();
            Ok(None)
        }
    }
}

/// What becomes of a message whose fields could not be resolved: the update path's classes.
fn unresolved_verdict(why: &Unresolvable) -> Verdict {
    let unknown_field = |list: ListId, status, error, message| {
        Verdict::DeadLetter(Rejection {
            reason: DeadLetterReason::UnknownField,
            status,
            error,
            message: Some(message),
            list_id: Some(list),
        })
    };
    match why {
        Unresolvable::UnknownField { list, .. }
        | Unresolvable::BudgetSpent { list, .. }
        | Unresolvable::InvalidName { list, .. } => {
            unknown_field(*list, None, None, why.to_string())
        }
        Unresolvable::Catalogue(error) if error.is_not_found() => Verdict::DeadLetter(Rejection {
            reason: DeadLetterReason::ListNotFound,
            status: Some(404),
            error: None,
            message: Some(error.to_string()),
            list_id: None,
        }),
        Unresolvable::Catalogue(error) if !fields::is_systemic(error) => match error {
            CatalogueError::Refused {
                status,
                error: code,
                ..
            } => Verdict::DeadLetter(Rejection {
                reason: DeadLetterReason::UnknownField,
                status: Some(*status),
                error: Some(code.clone()).filter(|code| !code.is_empty()),
                message: Some(format!(
                    "{error}; the audience's field could not be created, so its events were \
                     dead-lettered; replay them with `dlq replay --reason unknown_field` once \
                     the field exists"
                )),
                list_id: None,
            }),
            _ => Verdict::Retry,
        },
        Unresolvable::Catalogue(_) | Unresolvable::OutOfTime | Unresolvable::Panicked => {
            Verdict::Retry
        }
    }
}

/// Sleeps until `at`; without a time, never wakes (a `select!` branch that stays idle).
async fn sleep_until_if_any(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Replaces event times more than `skew` ahead of `now` by `now`; returns the first such time.
fn trust_event_times<'u>(
    updates: impl IntoIterator<Item = &'u mut Update>,
    now: EventTime,
    skew: Duration,
) -> Option<EventTime> {
    let mut claimed = None;
    for update in updates
        .into_iter()
        .filter(|u| u.timestamp.is_ahead_of(now, skew))
    {
        claimed.get_or_insert(update.timestamp);
        update.timestamp = now;
    }
    claimed
}

fn message_id(properties: &BasicProperties) -> &str {
    properties
        .message_id()
        .as_ref()
        .map_or("-", |id| id.as_str())
}
