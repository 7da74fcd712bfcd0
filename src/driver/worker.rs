//! The worker: broker sessions (see `session`) one after another, with reconnection, and a
//! bounded, clean shutdown. Its state is in `worker_state`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::driver::retry::{next_reconnect_pause, RECONNECT_FIRST};
use crate::driver::session::{Session, SessionError};
use crate::driver::worker_state::Worker;
use crate::edges::broker::{self, bounded};
use crate::edges::listrak::ListrakApi;
use crate::edges::telemetry::Metrics;

pub use crate::stages::model::Health;

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
