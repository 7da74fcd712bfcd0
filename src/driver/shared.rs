//! What the broker sessions of one worker share, and keep from one session to the next.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::driver::deliver::Deliverer;
use crate::driver::fields::Fields;
use crate::driver::readback::Reconciler;
use crate::edges::broker::Topology;
use crate::edges::telemetry::Metrics;
use crate::stages::model::Health;

pub(crate) struct Worker<A> {
    pub(crate) settings: Arc<Settings>,
    pub(crate) topology: Topology,
    pub(crate) deliverer: Arc<Deliverer<A>>,
    /// The field catalogues `audience_field` mappings resolve against, kept across sessions.
    pub(crate) fields: Arc<Fields<A>>,
    pub(crate) metrics: Metrics,
    pub(crate) health: Health,
    pub(crate) stop: CancellationToken,
    /// Where the next read of the applied log resumes (the offset after the last record
    /// read), or -1 before the first read, which starts at the log's horizon.
    pub(crate) log_offset: Arc<AtomicI64>,
    /// This worker's id in the applied log: its tail skips its own records, whose values
    /// its guard learnt when they were written.
    pub(crate) writer: String,
    /// Read-backs of keys at risk, unless `reconcile.enabled` is false.
    pub(crate) reconciler: Option<Arc<Reconciler>>,
}
