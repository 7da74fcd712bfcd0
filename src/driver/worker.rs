//! The worker: broker sessions (see `session`) one after another, with reconnection, and a
//! bounded, clean shutdown.

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::driver::concurrency::AdaptiveConcurrency;
use crate::driver::deliver::{Deliverer, SizeCeilings};
use crate::driver::fields::Fields;
use crate::driver::guard::SupersededGuard;
use crate::driver::readback::Reconciler;
use crate::driver::session::{Session, SessionError};
use crate::driver::shared::Worker;
use crate::edges::broker::{self, bounded, Topology};
use crate::edges::listrak::ListrakApi;
use crate::edges::telemetry::Metrics;
use crate::stages::mapping::ListSource;
use crate::stages::model::ListId;

pub use crate::stages::model::Health;

/// The pause before reconnecting after a node answered; it doubles while none answers.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The pause after `delay` while no broker node answers.
pub fn next_reconnect_pause(delay: Duration) -> Duration {
    (delay * 2).min(RECONNECT_MAX)
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
    worker.preload_fields();
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

impl<A: ListrakApi> Worker<A> {
    fn new(
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
    fn preload_fields(&self) {
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

    async fn run_sessions(&self) -> anyhow::Result<()> {
        let mut delay = RECONNECT_FIRST;
        let mut sessions = 0u64;
        let urls = &self.settings.amqp.urls;
        let nodes = urls.nodes();
        // The node tried first: after a lost connection, the next one, so that a node that
        // went down is tried last.
        let mut first = 0;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let attempt = broker::connect_from(&self.settings.amqp, "listrak-worker", first);
            let attempt = tokio::select! {
                attempt = attempt => attempt,
                _ = self.stop.cancelled() => return Ok(()),
            };
            let (connected, node) = match attempt {
                Ok(connected) => connected,
                Err(error) => {
                    tracing::warn!(%error, ?delay, "cannot reach the broker; trying again");
                    self.pause(&mut delay).await;
                    continue;
                }
            };
            sessions += 1;
            if sessions > 1 {
                self.metrics.amqp_reconnected();
            }
            // A node answered: the next loss starts again from a short pause, whatever the
            // pauses grew to while no node answered.
            delay = RECONNECT_FIRST;
            tracing::info!(node = %nodes[node], "connected to the broker");
            self.metrics.amqp_node(&nodes, Some(&nodes[node]));
            let result = Session::run(self, &connected).await;
            self.health.set(false);
            self.metrics.amqp_connected(false);
            self.metrics.amqp_node(&nodes, None);
            first = (node + 1) % urls.len();
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
                    let node = &nodes[node];
                    tracing::warn!(%error, %node, "broker session ended; reconnecting");
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
        *delay = next_reconnect_pause(*delay);
    }
}
