//! `listrak-worker ingest`: the endpoint Segment's Webhooks (Actions) destination posts to,
//! with a broker connection kept up behind it (the nodes of `amqp.url` tried in turn).

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpSettings, Settings};
use crate::driver::retry::{next_reconnect_pause, RECONNECT_FIRST};
use crate::edges::broker::{self, bounded, Publisher, Topology};
use crate::edges::http::serve_router;
use crate::edges::ingest::{router, Door, IngestMetrics, PublisherSlot};

/// Segment sends a destination's requests over a handful of connections; more wait.
const MAX_CONNECTIONS: usize = 256;
/// How often the connection is looked at: a lost one is noticed within this.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// Binds `ingest.listen` and serves until `shutdown`; the requests in flight then finish.
pub async fn run(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = settings.ingest.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {listen} (ingest.listen): {error}"))?;
    serve(listener, settings, IngestMetrics::new(), shutdown).await
}

/// Serves on `listener` until `shutdown`, publishing through a connection it keeps up.
pub async fn serve(
    listener: TcpListener,
    settings: &Settings,
    metrics: IngestMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let door = Door {
        settings: settings.ingest.clone(),
        exchange: settings.amqp.exchange.clone(),
        publisher: PublisherSlot::default(),
        metrics,
    };
    let stop = CancellationToken::new();
    let keeper = tokio::spawn(keep_connected(
        settings.amqp.clone(),
        Topology::of(settings),
        door.publisher.clone(),
        stop.clone(),
    ));
    let address = listener.local_addr()?;
    tracing::info!(
        listen = %address,
        "ingest: taking Segment's events on POST / and POST /v1/batch"
    );
    let served = serve_router(listener, router(door), MAX_CONNECTIONS, shutdown).await;
    stop.cancel();
    let _ = keeper.await;
    served.map_err(|error| anyhow::anyhow!("the ingest endpoint failed: {error}"))
}

/// An endpoint serving on a port of loopback in this process, until [`Running::stop`]: what
/// the demo, the benchmark and the tests post to.
pub struct Running {
    pub address: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(settings: &Settings, metrics: IngestMetrics) -> std::io::Result<Running> {
        let listener = TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let settings = settings.clone();
            let stop = stop.clone();
            async move { serve(listener, &settings, metrics, stop.cancelled_owned()).await }
        });
        Ok(Running {
            address,
            stop,
            task,
        })
    }

    /// Stops it as SIGTERM would (the requests in flight finish) and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Keeps a confirmed publisher in `slot` while a broker connection is up, and none between
/// connections; declares the topology on every connection, so that an event published
/// before any worker started still has a queue to go to.
async fn keep_connected(
    amqp: AmqpSettings,
    topology: Topology,
    slot: PublisherSlot,
    stop: CancellationToken,
) {
    let mut delay = RECONNECT_FIRST;
    let mut first = 0;
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            connected = broker::connect_from(&amqp, "listrak-worker ingest", first) => connected,
            _ = stop.cancelled() => return,
        };
        match connected {
            Ok((connection, node)) => {
                let ready = async {
                    topology.declare(&connection).await?;
                    Publisher::new(&connection).await
                };
                match ready.await {
                    Ok(publisher) => {
                        let name = amqp.urls.node(node);
                        tracing::info!(node = %name, "ingest: connected to the broker");
                        delay = RECONNECT_FIRST;
                        slot.set(Some(publisher.clone()));
                        let lost = watch(&connection, &publisher, &stop).await;
                        slot.set(None);
                        if !lost {
                            bounded(connection.close(200, "shutdown".into())).await;
                            return;
                        }
                        tracing::warn!(
                            node = %name,
                            "ingest: lost the broker connection; reconnecting"
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "ingest: cannot set up publishing; reconnecting")
                    }
                }
                bounded(connection.close(320, "reconnecting".into())).await;
                first = (node + 1) % amqp.urls.len();
            }
            Err(error) => {
                tracing::warn!(%error, ?delay, "ingest: cannot reach the broker; trying again")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = next_reconnect_pause(delay);
    }
}

/// Waits until the connection or the publisher's channel is lost (true) or `stop` (false).
async fn watch(
    connection: &lapin::Connection,
    publisher: &Publisher,
    stop: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(CONNECTION_CHECK) => {
                if !connection.status().connected() || !publisher.channel().status().connected() {
                    return true;
                }
            }
        }
    }
}
