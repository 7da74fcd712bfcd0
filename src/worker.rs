//! The worker: broker sessions (see `session`) one after another, with reconnection, and a
//! bounded, clean shutdown.

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Topology};
use crate::concurrency::AdaptiveConcurrency;
use crate::config::Settings;
use crate::deliver::{Deliverer, SizeCeilings};
use crate::fields::Fields;
use crate::guard::SupersededGuard;
use crate::listrak::ListrakApi;
use crate::mapping::ListSource;
use crate::model::ListId;
use crate::session::{Session, SessionError};
use crate::telemetry::{Metrics, QueueRole};

pub use crate::model::Health;

const QUEUE_POLL: Duration = Duration::from_secs(10);
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Bound on one connect, cancel or close, so a broker that stopped answering cannot hold up
/// a reconnection or a shutdown.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn bounded<T>(call: impl Future<Output = lapin::Result<T>>) {
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
            writer: crate::applied_log::new_writer(),
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
            self.health.set(false);
            self.metrics.amqp_connected(false);
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

/// Polls the depth of the main, retry and dead-letter queues into `listrak_queue_messages`.
pub(crate) async fn poll_queue_depths(channel: Channel, topology: Topology, metrics: Metrics) {
    let depth = |name: &str| {
        let channel = channel.clone();
        let name = name.to_owned();
        async move {
            broker::queue_counts(&channel, &name)
                .await
                .map(|(ready, _)| ready)
        }
    };
    loop {
        if let Ok(main) = depth(&topology.queue).await {
            metrics.queue_depth(QueueRole::Main, main);
        }
        if let Ok(dead) = depth(&topology.dead).await {
            metrics.queue_depth(QueueRole::Dead, dead);
        }
        let mut retry = 0;
        for (name, _) in &topology.retries {
            retry += depth(name).await.unwrap_or(0);
        }
        metrics.queue_depth(QueueRole::Retry, retry);
        tokio::time::sleep(QUEUE_POLL).await;
    }
}
