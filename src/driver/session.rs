//! One broker session: the driver of the session's core against RabbitMQ and Listrak. It
//! turns lapin's deliveries and the tasks' reports into the core's inputs and carries out the
//! core's commands (send a batch, append its record, publish a copy, resolve fields, ack),
//! until shutdown or until the connection fails (the worker then starts a new one).

use std::collections::VecDeque;
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

use crate::driver::clock;
use crate::driver::fields::Unresolvable;
use crate::driver::readback::{self, Learner};
use crate::driver::retry::{self, PUBLISH_ATTEMPTS};
use crate::driver::session_core::{Arrival, Command, Core, CoreSettings, Ending, ACK_HOLD};
use crate::driver::worker_state::Worker;
use crate::edges::applied_log::{self, ReadFrom, Record};
use crate::edges::broker::{
    self, bounded, poll_queue_depths, text_header, PackedProperties, Publisher, RetryHeaders,
    TopologyMismatch,
};
use crate::edges::listrak::ListrakApi;
use crate::edges::telemetry::Task;
use crate::stages::arrival::{self, Prepared};
use crate::stages::batch::{Batch, BatchLimits};
use crate::stages::classify::unresolved_verdict;
use crate::stages::disposition::{self, dispose, Disposition, Republish, Rules};
use crate::stages::model::{
    capped, AckOutcome, Delivered, EventTime, ListId, Update, Verdict, QUOTE_LIMIT,
};
use crate::stages::settle::{AckCommand, Settlement};

/// Bound on asking the broker whether the queue is empty, before an early flush.
const QUIET_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A message being worked on: what is needed to publish it again, unchanged, elsewhere.
struct Original {
    body: Vec<u8>,
    properties: PackedProperties,
    /// The event time its updates carry, for the copies it may become (none for a message
    /// that could not be decoded).
    event_time: Option<EventTime>,
    /// For the applied log's record (unpacking the properties for it costs more).
    message_id: Option<Box<str>>,
}

/// A delivery as it waits to be decoded: taken off the broker client's buffer as soon as the
/// loop runs. lapin buffers a delivery in a slot of about 450 bytes (its properties unpacked)
/// and its buffer keeps the room it once grew to: a backlog's first burst, read faster than
/// the loop maps it, left up to a window of such slots (28 MiB of 83 at the peak for the
/// default window). Here a delivery waits in a quarter of that, in parts its message keeps.
struct Received {
    tag: u64,
    arrived: Instant,
    body: Vec<u8>,
    properties: PackedProperties,
    /// The event time an earlier delivery used (a copy carries it on).
    carried: Option<EventTime>,
    /// The producer's AMQP timestamp.
    stamped: Option<EventTime>,
    message_id: Option<Box<str>>,
}

impl Received {
    fn take(delivery: Delivery) -> Self {
        let properties = &delivery.properties;
        Self {
            tag: delivery.delivery_tag,
            arrived: clock::now(),
            properties: PackedProperties::pack(properties),
            carried: broker::carried_event_time(properties),
            stamped: broker::stamped_time(properties),
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| Box::from(id.as_str())),
            body: delivery.data,
        }
    }

    fn message_id(&self) -> &str {
        self.message_id.as_deref().unwrap_or("-")
    }

    /// What is kept of it to publish it again: the copy carries `event_time` on.
    fn into_original(self, event_time: Option<EventTime>) -> Original {
        Original {
            properties: self.properties,
            message_id: self.message_id,
            body: self.body,
            event_time,
        }
    }
}

/// What the spawned tasks report back to the session loop.
enum Report {
    /// Listrak answered every contact of a batch (its record is not appended yet).
    Delivered {
        batch: Batch,
        delivered: Delivered,
        /// When the batch left for Listrak.
        sent: Instant,
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
    /// The fields of a message held aside were resolved, or not.
    Resolved {
        tag: u64,
        arrived: Instant,
        resolved: Result<Vec<Update>, Unresolvable>,
    },
    /// Whether the queue has no ready message (`None`: the broker could not tell).
    QueueCounted(Option<bool>),
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
    consumer_tag: String,
    publisher: Publisher,
    /// Counts publisher channels: a failed publish replaces the channel only if no other
    /// failure replaced it since.
    publisher_generation: u64,
    core: Core<Original>,
    /// Deliveries taken off lapin's buffer, in delivery order, not yet handed to the core.
    received: VecDeque<Received>,
    reports: mpsc::UnboundedSender<Report>,
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
        worker.topology.declare(connection).await.map_err(|error| {
            match TopologyMismatch::from_declare(&error, &worker.topology) {
                Some(mismatch) => SessionError::Topology(mismatch),
                None => SessionError::Broker(error),
            }
        })?;
        broker::retire_classic_retry_queues(connection, &worker.topology).await;
        let channel = connection.create_channel().await?;
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

        let ceilings = Arc::clone(&worker.deliverer.ceilings);
        let core = Core::new(CoreSettings {
            window,
            limits: BatchLimits {
                max_contacts: settings.batch.max_contacts.get(),
                max_bytes: settings.batch.max_bytes.get(),
                max_wait: settings.batch.max_wait,
            },
            hold_budget: worker.deliverer.hold_budget,
            grace: settings.shutdown.grace,
            ceiling: Arc::new(move |list: ListId| ceilings.get(list)),
            ack_hold: ACK_HOLD,
        });
        let (reports, mut inbox) = mpsc::unbounded_channel();
        let mut session = Session {
            worker,
            connection,
            channel,
            consumer_tag,
            publisher,
            publisher_generation: 0,
            core,
            // Room for a whole window at once: a queue that doubles holds its old room and
            // the new one while it copies, in the middle of the burst that fills the window.
            // The room is only address space until deliveries land in it.
            received: VecDeque::with_capacity(usize::from(window)),
            reports,
            batches_sent: 0,
            tasks: JoinSet::new(),
        };
        let reading_back = async {
            if let Some(reconciler) = &worker.reconciler {
                let context = readback::ReadBackContext {
                    reconciler: Arc::clone(reconciler),
                    api: Arc::clone(&worker.deliverer.api),
                    concurrency: Arc::clone(&worker.deliverer.concurrency),
                    guard: Arc::clone(&worker.deliverer.guard),
                    topology: worker.topology.clone(),
                    metrics: worker.metrics.clone(),
                };
                tokio::join!(
                    readback::schedule(reconciler, connection, &worker.topology),
                    readback::read_back(context, connection),
                );
            }
            // Read-backs end with the connection; the session goes on until it notices.
            std::future::pending::<()>().await;
        };
        let result = tokio::select! {
            result = session.drive(&mut consumer, &mut inbox) => result,
            () = reading_back => unreachable!("reading back never ends the session"),
        };
        if let (Ok(()), Some(reconciler)) = (&result, &worker.reconciler) {
            readback::flush(reconciler, &session.publisher, &worker.topology).await;
        }
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
        inbox: &mut mpsc::UnboundedReceiver<Report>,
    ) -> Result<(), SessionError> {
        loop {
            self.carry_out().await?;
            match self.core.ended() {
                Some(Ending::Drained) => {
                    tracing::info!("everything batched was settled; closing");
                    return Ok(());
                }
                Some(Ending::GraceOver { unsettled }) => {
                    tracing::warn!(
                        unsettled,
                        "grace period over; unsettled messages stay in the queue"
                    );
                    return Ok(());
                }
                None => {}
            }
            let draining = self.core.draining();
            let wake_at = self.core.wake_at().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                Some(report) = inbox.recv() => self.on_report(report).await?,
                _ = self.worker.stop.cancelled(), if !draining => {
                    self.core.shut_down(clock::now());
                }
                delivery = consumer.next(), if !draining => {
                    self.take_delivery(delivery)?;
                    // Everything else lapin holds, without waiting: the next turn of the
                    // loop polls the consumer again, and that poll is the one it sleeps on.
                    while let Some(delivery) = consumer.next().now_or_never() {
                        self.take_delivery(delivery)?;
                    }
                    tokio::task::consume_budget().await;
                }
                _ = std::future::ready(()), if !draining && !self.received.is_empty() => {
                    if let Some(received) = self.received.pop_front() {
                        self.on_delivery(received);
                    }
                    // Neither lapin's consumer nor deliveries in hand make this loop wait;
                    // without a budget, a backlog starves the request tasks on the same
                    // thread and every request to Listrak takes longer.
                    tokio::task::consume_budget().await;
                }
                _ = sleep_until_if_any(wake_at) => {
                    // Finished tasks are forgotten; their reports are in the inbox.
                    while self.tasks.try_join_next().is_some() {}
                    self.core.tick(clock::now());
                }
            }
        }
    }

    /// Carries out the core's commands, in order.
    async fn carry_out(&mut self) -> Result<(), SessionError> {
        while let Some(command) = self.core.next_command() {
            match command {
                Command::Send(batch) => self.dispatch(batch),
                Command::Append { batch, delivered } => self.append(batch, delivered),
                Command::Copy {
                    tag,
                    original,
                    settlement,
                } => self.copy(tag, original, settlement),
                Command::Resolve {
                    tag,
                    plan,
                    arrived,
                    deadline,
                } => {
                    let fields = Arc::clone(&self.worker.fields);
                    let reports = self.reports.clone();
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
                Command::Ack(acks) => self.send_acks(acks).await?,
                Command::AskQueue => {
                    let channel = self.channel.clone();
                    let queue = self.worker.settings.amqp.queue.clone();
                    let reports = self.reports.clone();
                    self.tasks.spawn(async move {
                        let counted = tokio::time::timeout(
                            QUIET_CHECK_TIMEOUT,
                            broker::queue_counts(&channel, &queue),
                        )
                        .await;
                        let empty = match counted {
                            Ok(Ok((ready, _))) => Some(ready == 0),
                            _ => None,
                        };
                        let _ = reports.send(Report::QueueCounted(empty));
                    });
                }
                Command::StopConsuming => {
                    bounded(self.channel.basic_cancel(
                        self.consumer_tag.as_str().into(),
                        BasicCancelOptions::default(),
                    ))
                    .await;
                }
            }
        }
        Ok(())
    }

    /// Takes what the consumer gave: a delivery waits in `received` to be decoded.
    fn take_delivery(
        &mut self,
        delivery: Option<Result<Delivery, lapin::Error>>,
    ) -> Result<(), SessionError> {
        match delivery {
            Some(Ok(delivery)) => {
                self.received.push_back(Received::take(delivery));
                Ok(())
            }
            Some(Err(error)) => Err(error.into()),
            None => Err(SessionError::ConsumerEnded),
        }
    }

    /// Prepares a delivery (`stages::arrival`), looks its fields up, and hands it to the core.
    fn on_delivery(&mut self, delivery: Received) {
        let metrics = &self.worker.metrics;
        metrics.message_received();
        let arrived = delivery.arrived;
        let tag = delivery.tag;
        let prepared = arrival::prepare(
            arrival::Delivery {
                body: &delivery.body,
                carried: delivery.carried,
                stamped: delivery.stamped,
            },
            EventTime::now(),
            self.worker.settings.batch.clock_skew,
            &self.worker.settings.mappings,
            metrics,
        );
        let arrival = match prepared {
            Prepared::Poison(rejection) => {
                tracing::info!(
                    delivery_tag = tag,
                    message_id = %delivery.message_id(),
                    reason = %rejection.reason,
                    detail = %capped(rejection.message.as_deref().unwrap_or(""), QUOTE_LIMIT),
                    "dead-lettering a message that cannot be applied"
                );
                Arrival::Poison(delivery.into_original(None), rejection)
            }
            Prepared::Ignored => Arrival::Ignored,
            Prepared::Plan {
                plan,
                event_time,
                future,
            } => {
                if let Some(claimed) = future {
                    metrics.future_timestamp(tag, delivery.message_id(), &claimed.to_rfc3339());
                }
                let original = delivery.into_original(Some(event_time));
                match self.worker.fields.lookup_all(plan) {
                    Ok(updates) => Arrival::Updates(original, updates),
                    Err(plan) => Arrival::Unresolved(original, plan),
                }
            }
        };
        self.core.delivered(tag, arrival, arrived);
    }

    /// Sends a batch in a task of its own: batches of one list may go out side by side, up to
    /// the concurrency limit.
    fn dispatch(&mut self, batch: Batch) {
        self.worker.metrics.batch_flushed(batch.trigger);
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
                let sent = clock::now();
                let delivered = deliverer.deliver_or_retry(&batch).await;
                let _ = reports.send(Report::Delivered {
                    batch,
                    delivered,
                    sent,
                });
            }
            .instrument(span),
        );
    }

    async fn on_report(&mut self, report: Report) -> Result<(), SessionError> {
        let now = clock::now();
        match report {
            Report::Delivered {
                batch,
                delivered,
                sent,
            } => {
                self.core.answered(batch, delivered, sent, now);
            }
            Report::AppendFailed(mut failed) => {
                let delay = self
                    .publish_again(&mut failed.attempts, failed.generation)
                    .await?;
                self.spawn_append(failed, delay);
            }
            Report::Appended { batch, verdicts } => {
                self.worker.fields.learn_from(&batch, &verdicts);
                self.core.appended(&batch, &verdicts, now);
            }
            Report::Resolved {
                tag,
                arrived,
                resolved,
            } => {
                let resolved = resolved.map_err(|why| {
                    tracing::info!(
                        delivery_tag = tag,
                        error = %why,
                        "a message's profile field could not be resolved"
                    );
                    unresolved_verdict(&why)
                });
                self.core.resolved(tag, arrived, resolved, now);
            }
            Report::Published { tag, outcome } => self.core.copied(tag, Some(outcome), now),
            Report::PublishFailed(mut failed) => {
                let delay = self
                    .publish_again(&mut failed.attempts, failed.generation)
                    .await?;
                self.publish(failed, delay);
            }
            Report::QueueCounted(empty) => self.core.queue_counted(empty, now),
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
        let core = &self.core;
        let writer = &self.worker.writer;
        let record = Record::of_delivery(
            writer,
            &batch,
            &verdicts,
            resource_ids,
            EventTime::now(),
            |tag| {
                core.original(tag)
                    .and_then(|original| original.message_id.as_deref())
                    .map(str::to_owned)
            },
        );
        let Some(record) = record else {
            let _ = self.reports.send(Report::Appended { batch, verdicts });
            return;
        };
        // The delivery recorded what it applied; the keys to watch are the record's news.
        record.watch(&*self.worker.deliverer.guard);
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
        let writer = self.worker.writer.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let appended =
                applied_log::append(&publisher, &topology, &appending.record, Some(&writer));
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
        let pause = retry::publish_pause(*attempts).ok_or(SessionError::PublishFailed)?;
        if generation == self.publisher_generation {
            self.replace_publisher().await?;
        }
        Ok(pause)
    }

    /// A failed publish usually means the publisher channel is gone (the broker closed it
    /// on a refusal): open another, and declare the topology again, in case what the copy
    /// was sent to was deleted.
    async fn replace_publisher(&mut self) -> Result<(), SessionError> {
        let publisher = tokio::time::timeout(broker::CONFIRM_TIMEOUT, async {
            let publisher = Publisher::new(self.connection).await?;
            self.worker.topology.declare(self.connection).await?;
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

    /// Publishes a copy to a retry queue or the dead-letter queue, as `disposition` decides
    /// (or acks it, or leaves it); a copy carries the event time its updates used.
    fn copy(&mut self, tag: u64, original: Original, settlement: Settlement) {
        let settings = &self.worker.settings;
        let rules = Rules {
            schedule: &settings.retry.schedule,
            clock_skew: settings.batch.clock_skew,
            max_age: settings.retry.max_age,
            topology: &self.worker.topology,
        };
        let properties = original.properties.unpack();
        let previous = RetryHeaders::read(&properties);
        let now = clock::now();
        match dispose(settlement, previous, EventTime::now(), &rules) {
            Disposition::Ack(outcome) => self.core.copied(tag, Some(outcome), now),
            Disposition::Leave => self.core.copied(tag, None, now),
            Disposition::Republish(mut copy) => {
                if let Some(time) = original.event_time {
                    copy.headers
                        .push((broker::EVENT_TIME, text_header(time.to_rfc3339_micros())));
                }
                let properties = disposition::republished(&properties, &copy);
                let publish = Box::new(Outgoing {
                    tag,
                    copy,
                    body: original.body,
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

    /// Sends acks, in order.
    async fn send_acks(&mut self, commands: Vec<AckCommand>) -> Result<(), SessionError> {
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
            sending.push((ack, queued, command.multiple, command.outcomes));
        }
        let mut refused = None;
        for (ack, queued, multiple, outcomes) in sending {
            let result = match queued {
                Some(result) => result,
                None => ack.await,
            };
            match result {
                Ok(()) => {
                    self.worker.metrics.ack_frame_sent(multiple);
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
            guard: Arc::new(Learner {
                guard: Arc::clone(&worker.deliverer.guard),
                reconciler: worker.reconciler.clone(),
            }),
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
                if let ReadFrom::Age(age) = from {
                    // Everything the log still holds was read: nothing older is known.
                    let age = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
                    guard.learnt_from(EventTime(now.0.saturating_sub(age)));
                }
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

/// Sleeps until `at`; without a time, never wakes (a `select!` branch that stays idle).
async fn sleep_until_if_any(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
