//! Telemetry: every metric the worker exposes, and one function per occurrence that counts it
//! (and logs it, where the occurrence is logged), so the two never drift apart.
//!
//! Labels come from small fixed sets (outcome, reason, class, status, trigger, queue role);
//! never an email address or an unbounded id. The one label taken from events, the audience
//! key of unmapped audience events, is bounded: past [`MAX_UNMAPPED_AUDIENCE_KEYS`] keys,
//! further ones count as `other`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::stages::batch::FlushTrigger;
use crate::stages::mapping::UnmappedAudiences;
use crate::stages::model::{DeadLetterReason, FieldId, ListId};

/// How many audience keys `listrak_unmapped_audience_events_total` labels by name: enough for
/// every audience of a workspace, few enough that a producer sending a fresh key per event
/// cannot grow the metric without bound.
pub const MAX_UNMAPPED_AUDIENCE_KEYS: usize = 100;

/// The label value that counts unmapped audience keys past the bound.
pub const OTHER_AUDIENCE_KEYS: &str = "other";

pub use crate::stages::model::AckOutcome;

/// Why a failed request is sent again: the `class` label of `listrak_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Listrak or the network failed (5xx, 429, timeout, connection).
    Systemic,
    /// The token was refused: it is renewed and the request sent again.
    Auth,
    /// A refusal that may concern one contact or the body's size: the request is split.
    Ambiguous,
}

impl RetryClass {
    pub const ALL: [RetryClass; 3] = [Self::Systemic, Self::Auth, Self::Ambiguous];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Systemic => "systemic",
            Self::Auth => "auth",
            Self::Ambiguous => "ambiguous",
        }
    }
}

/// The spawned tasks whose panics are caught, as the `task` label of
/// `listrak_task_panics_total` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sending one batch to Listrak.
    Delivery,
    /// Resolving a message's `audience_field` fields from the list's catalogue.
    Resolve,
    /// Publishing a copy to a retry queue or the dead-letter queue.
    Publish,
    /// Appending to the applied log.
    Append,
}

impl Task {
    pub const ALL: [Task; 4] = [Self::Delivery, Self::Resolve, Self::Publish, Self::Append];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivery => "delivery",
            Self::Resolve => "resolve",
            Self::Publish => "publish",
            Self::Append => "append",
        }
    }
}

/// The worker's queues, as the `queue` label of `listrak_queue_messages` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Main,
    /// Every retry queue together.
    Retry,
    Dead,
}

impl QueueRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Retry => "retry",
            Self::Dead => "dead",
        }
    }
}

/// The worker's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    messages_received: IntCounter,
    messages_acked: IntCounterVec,
    dead_letters: IntCounterVec,
    retries: IntCounterVec,
    requests: IntCounterVec,
    request_duration: Histogram,
    batch_contacts: Histogram,
    batch_flushes: IntCounterVec,
    concurrency_limit: IntGauge,
    requests_in_flight: IntGauge,
    token_refreshes: IntCounterVec,
    event_lag: Histogram,
    last_success: Gauge,
    amqp_connected: IntGauge,
    amqp_reconnects: IntCounter,
    amqp_node: IntGaugeVec,
    queue_messages: IntGaugeVec,
    acks_refused: IntCounter,
    ack_frames: IntCounterVec,
    task_panics: IntCounterVec,
    fields_not_created: IntCounterVec,
    future_timestamps: IntCounter,
    publish_failures: IntCounter,
    prefetch: IntGauge,
    fields_created: IntCounter,
    guard_keys: IntGauge,
    guard_horizon: IntGauge,
    applied_log_records: IntCounter,
    applied_log_bytes: IntCounter,
    applied_log_contacts: IntCounter,
    applied_log_unreadable: IntCounter,
    catalogue_reads: IntCounter,
    reconcile_scheduled: IntCounterVec,
    reconcile_reads: IntCounterVec,
    reconcile_repairs: IntCounter,
    reconcile_postponed: IntCounter,
    reconcile_pending: IntGauge,
    unmapped_audience_events: IntCounterVec,
    /// The audience keys labelled by name so far, at most [`MAX_UNMAPPED_AUDIENCE_KEYS`].
    unmapped_audience_keys: Mutex<HashSet<String>>,
}

fn exponential_buckets(start: f64, end: f64, count: usize) -> Vec<f64> {
    let factor = (end / start).powf(1.0 / (count - 1) as f64);
    prometheus::exponential_buckets(start, factor, count).expect("valid bucket layout")
}

impl Metrics {
    /// Creates the metrics; `max_contacts` shapes the batch-size buckets.
    pub fn new(max_contacts: usize) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };

        let messages_received = counter(
            "listrak_messages_received_total",
            "Messages delivered to the worker by RabbitMQ.",
        );
        let messages_acked = counter_vec(
            "listrak_messages_acked_total",
            "Messages acknowledged, by what became of them.",
            "outcome",
        );
        let dead_letters = counter_vec(
            "listrak_dead_letters_total",
            "Messages published to the dead-letter queue, by reason.",
            "reason",
        );
        let retries = counter_vec(
            "listrak_retries_total",
            "Failed requests that will be sent again, in process or later through the retry \
             queues, by failure class.",
            "class",
        );
        let requests = counter_vec(
            "listrak_requests_total",
            "SegmentationField requests sent to Listrak, by HTTP status (or timeout, \
             connection_error, no_token).",
            "status",
        );
        let request_duration = histogram(
            "listrak_request_duration_seconds",
            "Time from sending a SegmentationField request to its answer.",
            exponential_buckets(0.01, 60.0, 14),
        );
        let batch_top = max_contacts.max(2) as f64;
        let batch_contacts = histogram(
            "listrak_batch_contacts",
            "Contacts per request sent.",
            exponential_buckets(1.0, batch_top, 12.min(max_contacts.max(2))),
        );
        let batch_flushes = counter_vec(
            "listrak_batch_flushes_total",
            "Batches that left the batcher, by what made them leave.",
            "trigger",
        );
        let concurrency_limit = int_gauge(
            "listrak_concurrency_limit",
            "Requests to Listrak allowed in flight at once (adaptive).",
        );
        let requests_in_flight = int_gauge(
            "listrak_requests_in_flight",
            "Requests to Listrak awaiting their answer.",
        );
        let token_refreshes = counter_vec(
            "listrak_token_refreshes_total",
            "OAuth token requests, by result.",
            "result",
        );
        let event_lag = histogram(
            "listrak_event_lag_seconds",
            "Time from an event's timestamp to Listrak accepting its update.",
            exponential_buckets(0.1, 86_400.0, 16),
        );
        let last_success = Gauge::new(
            "listrak_last_success_timestamp_seconds",
            "Unix time of the last request Listrak accepted.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_success.clone()))
            .expect("unique");
        let amqp_connected = int_gauge(
            "listrak_amqp_connected",
            "1 while the broker connection is up and consuming.",
        );
        let amqp_reconnects = counter(
            "listrak_amqp_reconnects_total",
            "Broker connections re-established after a loss.",
        );
        let amqp_node = IntGaugeVec::new(
            Opts::new(
                "listrak_amqp_node",
                "1 for the broker node (host:port of amqp.url) the worker is connected to, 0 for \
                 the other configured nodes.",
            ),
            &["node"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(amqp_node.clone()))
            .expect("unique");
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "listrak_queue_messages",
                "Messages ready in the worker's queues (polled), by queue role.",
            ),
            &["queue"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_messages.clone()))
            .expect("unique");
        let build_info = IntGaugeVec::new(
            Opts::new("listrak_build_info", "Always 1; the version is a label."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let acks_refused = counter(
            "listrak_acks_refused_total",
            "Acknowledgements the broker no longer accepted (the channel was gone); those messages \
             come again.",
        );
        let ack_frames = counter_vec(
            "listrak_ack_frames_total",
            "Acknowledgement frames sent: `multiple` (every settled message up to one) or \
             `single` (one message, settled while one before it is still in hand; each costs a \
             quorum queue about what a multiple one does).",
            "kind",
        );
        let future_timestamps = counter(
            "listrak_future_timestamps_total",
            "Messages with an event time too far ahead of the worker's clock to trust for last \
             write wins (the time of receipt was used).",
        );
        let task_panics = counter_vec(
            "listrak_task_panics_total",
            "Spawned tasks that ended in a bug (a panic), by task (delivery, resolve, publish, \
             append); the messages they held went to the retry queues or are published again.",
            "task",
        );
        let fields_not_created = counter_vec(
            "listrak_fields_not_created_total",
            "Missing audience fields that `create = true` did not create, by reason: budget (the \
             list's `listrak.field_creation_budget` for 24 hours is spent) or invalid_name (the \
             audience key cannot be a field name); their events are dead-lettered as \
             unknown_field.",
            "reason",
        );
        let publish_failures = counter(
            "listrak_publish_failures_total",
            "Publishes to a retry or dead-letter queue that failed and were tried again on a new \
             channel.",
        );
        let prefetch = int_gauge(
            "listrak_prefetch_window",
            "Messages the broker may have delivered and not yet acknowledged (basic.qos).",
        );

        let guard_keys = int_gauge(
            "listrak_guard_keys",
            "Keys (list, contact, field) the superseded guard holds: recent values and keys \
             watched for an outstanding older copy.",
        );
        let guard_horizon = int_gauge(
            "listrak_guard_horizon_seconds",
            "How far back the superseded guard knows every applied value (from the applied log \
             and this process); an update older than what it forgot may overwrite a newer \
             value.",
        );
        let applied_log_records = counter(
            "listrak_applied_log_records_total",
            "Records appended to the applied log (one per delivered batch).",
        );
        let applied_log_bytes = counter(
            "listrak_applied_log_bytes_total",
            "Bytes appended to the applied log.",
        );
        let applied_log_contacts = counter(
            "listrak_applied_log_contacts_total",
            "Applied contacts recorded in the applied log.",
        );
        let applied_log_unreadable = counter(
            "listrak_applied_log_unreadable_total",
            "Records of the applied log this worker could not read (another version, a \
             hand-published message): skipped.",
        );
        let fields_created = counter(
            "listrak_fields_created_total",
            "Check Box profile fields created for an audience by an `audience_field` mapping with \
             `create = true`.",
        );
        let reconcile_scheduled = counter_vec(
            "listrak_reconcile_scheduled_total",
            "Keys at risk (updated twice within reconcile.window, or sent without an answer) \
             whose read-back was scheduled (outcome=scheduled), or could not be (dropped: more \
             than can wait in memory while the broker is unreachable).",
            "outcome",
        );
        let reconcile_reads = counter_vec(
            "listrak_reconcile_reads_total",
            "Keys read back from Listrak, by what Listrak held: in_sync, differs, not_on_list \
             (both repaired), or failed (read again later, or given up on a 4xx).",
            "outcome",
        );
        for outcome in ["in_sync", "differs", "not_on_list", "failed"] {
            reconcile_reads.with_label_values(&[outcome]);
        }
        for outcome in ["scheduled", "dropped"] {
            reconcile_scheduled.with_label_values(&[outcome]);
        }
        let reconcile_repairs = counter(
            "listrak_reconcile_repairs_total",
            "Keys whose newest applied value was sent again because Listrak held another.",
        );
        let reconcile_postponed = counter(
            "listrak_reconcile_postponed_total",
            "Read-backs not read because a newer update of the key was applied since; that \
             update's own read-back checks the key.",
        );
        let reconcile_pending = int_gauge(
            "listrak_reconcile_pending",
            "Read-back messages waiting in the broker (each names up to 100 keys), scheduled or \
             due.",
        );
        let catalogue_reads = counter(
            "listrak_catalogue_reads_total",
            "Reads of a list's profile field groups and fields, to resolve `audience_field` \
             mappings.",
        );

        let unmapped_audience_events = counter_vec(
            "listrak_unmapped_audience_events_total",
            &format!(
                "Audience events no mapping takes (acknowledged as ignored), by audience key; \
                 keys past the first {MAX_UNMAPPED_AUDIENCE_KEYS} count as \
                 \"{OTHER_AUDIENCE_KEYS}\"."
            ),
            "audience_key",
        );

        // Known label values start at zero, so rates and alerts work before the first event.
        for outcome in AckOutcome::ALL {
            messages_acked.with_label_values(&[outcome.as_str()]);
        }
        for kind in ["multiple", "single"] {
            ack_frames.with_label_values(&[kind]);
        }
        for reason in DeadLetterReason::ALL {
            dead_letters.with_label_values(&[reason.as_str()]);
        }
        for class in RetryClass::ALL {
            retries.with_label_values(&[class.as_str()]);
        }
        for task in Task::ALL {
            task_panics.with_label_values(&[task.as_str()]);
        }
        for reason in ["budget", "invalid_name"] {
            fields_not_created.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            token_refreshes.with_label_values(&[result]);
        }
        for trigger in FlushTrigger::ALL {
            batch_flushes.with_label_values(&[trigger.as_str()]);
        }

        Self {
            inner: Arc::new(Inner {
                registry,
                messages_received,
                messages_acked,
                dead_letters,
                retries,
                requests,
                request_duration,
                batch_contacts,
                batch_flushes,
                concurrency_limit,
                requests_in_flight,
                token_refreshes,
                event_lag,
                last_success,
                amqp_connected,
                amqp_reconnects,
                amqp_node,
                queue_messages,
                acks_refused,
                ack_frames,
                task_panics,
                fields_not_created,
                future_timestamps,
                publish_failures,
                prefetch,
                fields_created,
                guard_keys,
                guard_horizon,
                applied_log_records,
                applied_log_bytes,
                applied_log_contacts,
                applied_log_unreadable,
                catalogue_reads,
                reconcile_scheduled,
                reconcile_reads,
                reconcile_repairs,
                reconcile_postponed,
                reconcile_pending,
                unmapped_audience_events,
                unmapped_audience_keys: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    pub fn message_received(&self) {
        self.inner.messages_received.inc();
    }

    pub fn messages_acked(&self, outcome: AckOutcome, count: u64) {
        self.inner
            .messages_acked
            .with_label_values(&[outcome.as_str()])
            .inc_by(count);
    }

    pub fn dead_lettered(&self, reason: DeadLetterReason) {
        self.inner
            .dead_letters
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// A message's event time was more than `batch.clock_skew` ahead of this worker's clock.
    pub fn future_timestamp(&self, delivery_tag: u64, message_id: &str, claimed: &str) {
        self.inner.future_timestamps.inc();
        tracing::warn!(
            delivery_tag,
            message_id,
            claimed,
            "the event time is more than batch.clock_skew ahead of this worker's clock; last \
             write wins uses the time of receipt instead"
        );
    }

    /// Delivering a batch panicked (a bug); its messages go to the retry queues.
    pub fn delivery_panicked(&self, list: ListId, contacts: usize) {
        self.inner
            .task_panics
            .with_label_values(&[Task::Delivery.as_str()])
            .inc();
        tracing::error!(
            list_id = %list,
            contacts,
            "delivering a batch failed unexpectedly; its messages go to the retry queues"
        );
    }

    /// A retry or dead-letter copy was not confirmed by the broker; it is published again.
    pub fn publish_failed(
        &self,
        error: &dyn std::fmt::Display,
        exchange: &str,
        routing_key: &str,
        attempt: u32,
    ) {
        self.inner.publish_failures.inc();
        tracing::warn!(
            %error,
            exchange,
            routing_key,
            attempt,
            "publish failed; trying again on a new channel"
        );
    }

    /// An `audience_field` mapping created a Check Box field.
    pub fn field_created(&self, list: ListId, group: &str, field: &str, field_id: FieldId) {
        self.inner.fields_created.inc();
        tracing::info!(
            list_id = %list,
            group,
            field,
            field_id = %field_id,
            "created a Check Box profile field"
        );
    }

    /// A spawned task other than a delivery panicked (a bug); what it held is retried.
    pub fn task_panicked(&self, task: Task) {
        self.inner
            .task_panics
            .with_label_values(&[task.as_str()])
            .inc();
        tracing::error!(
            task = task.as_str(),
            "a task failed unexpectedly (a bug); the messages it held are retried"
        );
    }

    /// A missing audience field was not created (`reason`: budget or invalid_name).
    pub fn field_not_created(&self, list: ListId, audience_key: &str, reason: &'static str) {
        self.inner
            .fields_not_created
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(
            list_id = %list,
            audience_key = %crate::stages::model::capped(audience_key, 100),
            reason,
            "a missing audience field was not created; its events are dead-lettered as \
             unknown_field"
        );
    }

    /// What the superseded guard holds and how far back it vouches.
    pub fn guard(&self, keys: usize, horizon: Duration) {
        self.inner
            .guard_keys
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.inner
            .guard_horizon
            .set(i64::try_from(horizon.as_secs()).unwrap_or(i64::MAX));
    }

    /// A record of `bytes` for `contacts` applied contacts was appended to the applied log.
    pub fn applied_log_appended(&self, bytes: usize, contacts: usize) {
        self.inner.applied_log_records.inc();
        self.inner.applied_log_bytes.inc_by(bytes as u64);
        self.inner.applied_log_contacts.inc_by(contacts as u64);
    }

    /// Read-backs scheduled for `keys` keys at risk (or `dropped` when none could wait).
    pub fn reconcile_scheduled(&self, keys: usize, dropped: bool) {
        let outcome = if dropped { "dropped" } else { "scheduled" };
        self.inner
            .reconcile_scheduled
            .with_label_values(&[outcome])
            .inc_by(keys as u64);
    }

    /// `keys` keys were read back: `outcome` is a comparison's name, or `failed`.
    pub fn reconcile_read(&self, outcome: &str, keys: usize) {
        self.inner
            .reconcile_reads
            .with_label_values(&[outcome])
            .inc_by(keys as u64);
    }

    pub fn reconcile_repaired(&self, keys: usize) {
        self.inner.reconcile_repairs.inc_by(keys as u64);
    }

    pub fn reconcile_postponed(&self) {
        self.inner.reconcile_postponed.inc();
    }

    /// Read-back messages waiting in the broker.
    pub fn reconcile_pending(&self, messages: u32) {
        self.inner.reconcile_pending.set(i64::from(messages));
    }

    pub fn applied_log_unreadable(&self) {
        self.inner.applied_log_unreadable.inc();
    }

    /// A list's field catalogue was read to resolve an `audience_field` mapping.
    pub fn catalogue_read(&self) {
        self.inner.catalogue_reads.inc();
    }

    pub fn prefetch_window(&self, window: u16) {
        self.inner.prefetch.set(i64::from(window));
    }

    pub fn retried(&self, class: RetryClass) {
        self.inner
            .retries
            .with_label_values(&[class.as_str()])
            .inc();
    }

    pub fn request_answered(&self, status: &str, duration: Duration, contacts: usize) {
        self.inner.requests.with_label_values(&[status]).inc();
        self.inner.request_duration.observe(duration.as_secs_f64());
        self.inner.batch_contacts.observe(contacts as f64);
    }

    pub fn request_accepted(&self, now_unix: f64) {
        self.inner.last_success.set(now_unix);
    }

    pub fn batch_flushed(&self, trigger: FlushTrigger) {
        self.inner
            .batch_flushes
            .with_label_values(&[trigger.as_str()])
            .inc();
    }

    pub fn concurrency_limit(&self, limit: usize) {
        self.inner.concurrency_limit.set(limit as i64);
    }

    pub fn requests_in_flight(&self, delta: i64) {
        self.inner.requests_in_flight.add(delta);
    }

    pub fn token_refreshed(&self, ok: bool) {
        self.inner
            .token_refreshes
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    pub fn event_applied(&self, lag: Duration) {
        self.inner.event_lag.observe(lag.as_secs_f64());
    }

    pub fn amqp_connected(&self, up: bool) {
        self.inner.amqp_connected.set(i64::from(up));
    }

    pub fn amqp_reconnected(&self) {
        self.inner.amqp_reconnects.inc();
    }

    /// The broker node the worker is connected to, of `nodes` (the configured ones, a
    /// bounded set), or `None` between connections.
    pub fn amqp_node(&self, nodes: &[String], connected: Option<&str>) {
        for node in nodes {
            let up = connected == Some(node.as_str());
            self.inner
                .amqp_node
                .with_label_values(&[node.as_str()])
                .set(i64::from(up));
        }
    }

    pub fn queue_depth(&self, role: QueueRole, messages: u32) {
        self.inner
            .queue_messages
            .with_label_values(&[role.as_str()])
            .set(i64::from(messages));
    }

    pub fn ack_refused(&self, count: u64) {
        self.inner.acks_refused.inc_by(count);
    }

    /// An acknowledgement frame went out, `multiple` or for one message alone.
    pub fn ack_frame_sent(&self, multiple: bool) {
        let kind = if multiple { "multiple" } else { "single" };
        self.inner.ack_frames.with_label_values(&[kind]).inc();
    }

    /// An audience event no mapping takes: its audience key names no mapping's
    /// `audience_key`, so it was ignored.
    pub fn unmapped_audience(&self, audience_key: &str) {
        let label = {
            let mut keys = self
                .inner
                .unmapped_audience_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if keys.contains(audience_key)
                || (keys.len() < MAX_UNMAPPED_AUDIENCE_KEYS && keys.insert(audience_key.to_owned()))
            {
                audience_key
            } else {
                OTHER_AUDIENCE_KEYS
            }
        };
        self.inner
            .unmapped_audience_events
            .with_label_values(&[label])
            .inc();
    }

    /// Reads one counter or gauge sample, for summaries and tests: `name` with `labels`.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for family in self.inner.registry.gather() {
            if family.name() != name {
                continue;
            }
            let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
            for metric in family.get_metric() {
                let matches = labels.iter().all(|(key, value)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|l| l.name() == *key && l.value() == *value)
                });
                if matches {
                    total += if counter {
                        metric.get_counter().get_value()
                    } else {
                        metric.get_gauge().get_value()
                    };
                }
            }
        }
        total
    }
}

/// The mapping stage reports unmapped audience events straight to the counter.
impl UnmappedAudiences for Metrics {
    fn unmapped_audience(&self, audience_key: &str) {
        Metrics::unmapped_audience(self, audience_key);
    }
}

/// An email as logs may show it at info level and above: `j***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first = local.chars().next().map(String::from).unwrap_or_default();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_masked_to_their_first_letter_and_domain() {
        assert_eq!(mask_email("jane.doe@example.com"), "j***@example.com");
        assert_eq!(mask_email("@example.com"), "***@example.com");
        assert_eq!(mask_email("no-at-sign"), "***");
    }

    #[test]
    fn every_metric_of_the_contract_is_exposed_with_help() {
        let metrics = Metrics::new(1000);
        metrics.request_answered("201", Duration::from_millis(30), 10);
        metrics.queue_depth(QueueRole::Main, 3);
        metrics.amqp_node(&["rabbit-0:5672".to_owned()], None);
        // Labelled by what events carry, so it shows once one was counted.
        metrics.unmapped_audience("high_spenders");
        let text = metrics.render();
        for name in [
            "listrak_messages_received_total",
            "listrak_messages_acked_total",
            "listrak_ack_frames_total",
            "listrak_dead_letters_total",
            "listrak_retries_total",
            "listrak_requests_total",
            "listrak_request_duration_seconds",
            "listrak_batch_contacts",
            "listrak_batch_flushes_total",
            "listrak_concurrency_limit",
            "listrak_requests_in_flight",
            "listrak_token_refreshes_total",
            "listrak_event_lag_seconds",
            "listrak_last_success_timestamp_seconds",
            "listrak_amqp_connected",
            "listrak_amqp_reconnects_total",
            "listrak_amqp_node",
            "listrak_queue_messages",
            "listrak_build_info",
            "listrak_unmapped_audience_events_total",
            "listrak_fields_created_total",
            "listrak_catalogue_reads_total",
            "listrak_task_panics_total",
            "listrak_fields_not_created_total",
            "listrak_guard_keys",
            "listrak_guard_horizon_seconds",
            "listrak_reconcile_scheduled_total",
            "listrak_reconcile_reads_total",
            "listrak_reconcile_repairs_total",
            "listrak_reconcile_postponed_total",
            "listrak_reconcile_pending",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} missing");
        }
        assert_eq!(
            metrics.sample("listrak_requests_total", &[("status", "201")]),
            1.0
        );
    }

    #[test]
    fn unmapped_audience_keys_are_counted_by_name_up_to_the_bound_then_as_other() {
        let metrics = Metrics::new(1000);
        let count = |key: &str| {
            metrics.sample(
                "listrak_unmapped_audience_events_total",
                &[("audience_key", key)],
            )
        };
        metrics.unmapped_audience("high_spenders");
        metrics.unmapped_audience("high_spenders");
        assert_eq!(count("high_spenders"), 2.0);
        for index in 1..MAX_UNMAPPED_AUDIENCE_KEYS {
            metrics.unmapped_audience(&format!("audience_{index}"));
        }
        metrics.unmapped_audience("one_too_many");
        metrics.unmapped_audience("another_one");
        metrics.unmapped_audience("high_spenders");
        assert_eq!(count("one_too_many"), 0.0);
        assert_eq!(count(OTHER_AUDIENCE_KEYS), 2.0);
        assert_eq!(
            count("high_spenders"),
            3.0,
            "keys seen before the bound keep their label"
        );
        let series = metrics
            .render()
            .lines()
            .filter(|line| line.starts_with("listrak_unmapped_audience_events_total{"))
            .count();
        assert_eq!(series, MAX_UNMAPPED_AUDIENCE_KEYS + 1);
    }
}
