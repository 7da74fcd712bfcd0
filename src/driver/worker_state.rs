//! The worker's state: what its broker sessions share and keep from one session to the next
//! (settings, the Listrak client and its delivery state, field catalogues, the superseded
//! guard, read-backs, health), and how it is built. `worker` runs the sessions.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::driver::concurrency::AdaptiveConcurrency;
use crate::driver::deliver::{Deliverer, SizeCeilings};
use crate::driver::fields::Fields;
use crate::driver::readback::Reconciler;
use crate::driver::superseded::SupersededGuard;
use crate::edges::broker::Topology;
use crate::edges::listrak::ListrakApi;
use crate::edges::telemetry::Metrics;
use crate::stages::mapping::ListSource;
use crate::stages::model::{Health, ListId};

/// What the broker sessions of one worker share, and keep from one session to the next.
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

impl<A: ListrakApi> Worker<A> {
    pub(crate) fn new(
        settings: Settings,
        api: Arc<A>,
        metrics: Metrics,
        health: Health,
        stop: CancellationToken,
    ) -> Self {
        let topology = Topology::of(&settings);
        let fields = Arc::new(Fields::new(
            Arc::clone(&api),
            metrics.clone(),
            settings.listrak.field_creation_budget,
        ));
        let reconciler = settings
            .reconcile
            .enabled
            .then(|| Arc::new(Reconciler::new(settings.reconcile.clone(), metrics.clone())));
        let deliverer = Arc::new(Deliverer {
            api,
            concurrency: AdaptiveConcurrency::new(settings.listrak.max_concurrency.get(), {
                let metrics = metrics.clone();
                move |limit| metrics.concurrency_limit(limit)
            }),
            guard: Arc::new(SupersededGuard::with_watch(
                settings.superseded.capacity,
                settings.applied_log.watch_capacity,
                settings.applied_log.max_age,
            )),
            ceilings: Arc::new(SizeCeilings::default()),
            metrics: metrics.clone(),
            hold_budget: settings.batch.max_wait + settings.retry.in_process,
            request_timeout: settings.listrak.request_timeout,
            shutdown: stop.clone(),
            reconciler: reconciler.clone(),
        });
        Self {
            settings: Arc::new(settings),
            topology,
            deliverer,
            fields,
            metrics,
            health,
            stop,
            log_offset: Arc::new(AtomicI64::new(-1)),
            writer: crate::edges::applied_log::new_writer(),
            reconciler,
        }
    }

    /// Reads, in the background, the field catalogues of the lists `audience_field`
    /// mappings name, so the first events find their fields in memory.
    pub(crate) fn preload_fields(&self) {
        let mut lists: Vec<ListId> = self
            .settings
            .mappings
            .iter()
            .filter(|mapping| mapping.audience_field.is_some())
            .filter_map(|mapping| match mapping.list {
                ListSource::Id(list) => Some(list),
                ListSource::Path(_) => None,
            })
            .collect();
        lists.sort();
        lists.dedup();
        for list in lists {
            let fields = Arc::clone(&self.fields);
            tokio::spawn(async move { fields.preload(list).await });
        }
    }
}
