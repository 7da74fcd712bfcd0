//! Every default value, and the limits the values are held to.

use std::time::Duration;

/// The broker a fresh RabbitMQ install answers on; the demo, the benchmark and the tests
/// use it too.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub(super) const DEFAULT_EXCHANGE: &str = "listrak.audience";
pub(super) const DEFAULT_QUEUE: &str = "listrak.audience";
/// What the held messages may take when no `amqp.memory_budget` is set: the worker then
/// peaks at about 83 MiB, inside a 128 MiB container. In a container with a smaller memory
/// limit, the limit less `PROCESS_HEADROOM`.
pub(super) const DEFAULT_MEMORY_BUDGET: u64 = 72 << 20;
/// What the process takes besides its messages in hand (measured at about 11 MiB), with
/// room for the allocator and the broker client's buffers.
const PROCESS_HEADROOM: u64 = 48 << 20;
pub(super) const MIN_MEMORY_BUDGET: i64 = 4 << 20;
pub(super) const MAX_MEMORY_BUDGET: i64 = 1 << 40;
/// What one message in hand costs, measured with Engage events of about 400 bytes (peak RSS
/// over window sizes): its body, its packed properties, its ledger and ack entries, its
/// contact entry in a batch, and the broker client's buffers while a burst is read.
pub const HELD_MESSAGE_BYTES: u64 = 1536;
pub(super) const DEFAULT_API_URL: &str = "https://api.listrak.com/email/v1";
pub(super) const DEFAULT_AUTH_URL: &str = "https://auth.listrak.com/OAuth2/Token";
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_MAX_CONCURRENCY: i64 = 32;
pub(super) const DEFAULT_MAX_CONTACTS: i64 = 1000;
pub(super) const DEFAULT_MAX_BYTES: i64 = 1_000_000;
pub(super) const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_SCHEDULE: [Duration; 5] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
    Duration::from_secs(4 * 3600),
];
pub(super) const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
pub(super) const DEFAULT_IN_PROCESS: Duration = Duration::from_secs(120);
pub(super) const DEFAULT_LISTEN: &str = "0.0.0.0:9464";
pub(super) const DEFAULT_INGEST_LISTEN: &str = "0.0.0.0:9470";
/// Segment's batches stay well under it (about 500 KB at most).
pub(super) const DEFAULT_INGEST_MAX_BODY: usize = 5_000_000;
pub(super) const MIN_INGEST_MAX_BODY: i64 = 1024;
pub(super) const MAX_INGEST_MAX_BODY: i64 = 100_000_000;
pub(super) const DEFAULT_GRACE: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_SUPERSEDED_CAPACITY: i64 = 200_000;
pub(super) const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The longest duration any key takes.
pub(super) const MAX_ANY_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// A retry queue's `x-message-ttl` is a 32-bit count of milliseconds in RabbitMQ.
pub(super) const MAX_RETRY_STEP: Duration = Duration::from_millis(u32::MAX as u64);
pub(super) const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
pub(super) const MAX_GRACE: Duration = Duration::from_secs(3600);
pub(super) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(7 * 24 * 3600);

/// RabbitMQ cancels a consumer that holds a delivery unacknowledged for 30 minutes (its
/// default `consumer_timeout`); a message's whole hold (`batch.max_wait` +
/// `retry.in_process` + `listrak.request_timeout` + a publisher confirm) must end well
/// before that: 5 minutes of margin for a slow broker and the ack's own way.
pub(super) const MAX_IN_PROCESS: Duration = Duration::from_secs(25 * 60);
/// How long a publisher confirm may take before the publish counts as failed; a message's
/// hold time may include one.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// The most fields `create = true` creates per list in 24 hours: a large Engage space holds
/// about 125 audiences, created over days.
pub(super) const DEFAULT_FIELD_CREATION_BUDGET: i64 = 100;
pub(super) const MAX_FIELD_CREATION_BUDGET: i64 = 100_000;
/// The applied log reaches a week back: dead letters are replayed within days, and a retry
/// gives up after `retry.max_age` (a day by default).
pub(super) const DEFAULT_APPLIED_LOG_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A record costs about 35 bytes per applied contact with its fields and message ids
/// (compressed): a week of 10 million applied updates is about 340 MB, so 4 GB leaves the age,
/// not the size, to bound the log for ten times that traffic.
pub(super) const DEFAULT_APPLIED_LOG_MAX_BYTES: i64 = 4_000_000_000;
pub(super) const MIN_APPLIED_LOG_MAX_BYTES: i64 = 1 << 20;
/// Keys the guard watches for an outstanding older copy: 1% of a week's 10 million updates
/// through the retry queues and 0.1% dead-lettered, with room; about 96 bytes each.
pub(super) const DEFAULT_WATCH_CAPACITY: i64 = 150_000;
pub(super) const MAX_WATCH_CAPACITY: i64 = 100_000_000;
/// Listrak completes most imports within seconds; two minutes leaves room for a slow one
/// before a key at risk is read back.
pub const DEFAULT_RECONCILE_AFTER: Duration = Duration::from_secs(120);
/// Updates of one key within an hour of each other may complete in either order (or race
/// between replicas); further apart, the first import completed long before the second.
pub(super) const DEFAULT_RECONCILE_WINDOW: Duration = Duration::from_secs(3600);
/// Reads per second per worker: a fraction of what Listrak answers, so that read-backs
/// never crowd out updates.
pub(super) const DEFAULT_MAX_READ_RATE: f64 = 50.0;
pub(super) const MAX_MAX_READ_RATE: f64 = 10_000.0;
/// A read-back waits in a queue with a per-message TTL; RabbitMQ takes up to 2³²−1 ms.
pub(super) const MAX_RECONCILE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// A request body must hold at least one contact with a few fields.
pub(super) const MIN_MAX_BYTES: i64 = 1024;
/// AMQP short strings are at most 255 bytes; the retry and dead queues append to the name.
pub(super) const MAX_QUEUE_NAME_BYTES: usize = 200;

/// The default budget, or less in a container whose memory limit leaves less room.
pub(super) fn default_memory_budget() -> u64 {
    match container_memory_limit() {
        Some(limit) => limit
            .saturating_sub(PROCESS_HEADROOM)
            .clamp(MIN_MEMORY_BUDGET as u64, DEFAULT_MEMORY_BUDGET),
        None => DEFAULT_MEMORY_BUDGET,
    }
}

/// The cgroup's memory limit (v2, then v1), if one is set.
fn container_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit.
    .and_then(|text| text.trim().parse::<u64>().ok())
    .filter(|&limit| limit < 1 << 50)
}
