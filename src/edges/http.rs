//! The operations endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::edges::telemetry::Metrics;
use crate::stages::model::Health;

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    health: Health,
}

/// The operations endpoint of a running worker: bound, and serving until stopped.
pub struct OpsEndpoint {
    stop: tokio_util::sync::CancellationToken,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsEndpoint {
    /// Binds `listen` (an error when the port is taken, so a worker that cannot be watched
    /// does not start) and serves `/metrics`, `/healthz` and `/readyz`.
    pub async fn start(
        listen: std::net::SocketAddr,
        metrics: Metrics,
        health: Health,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(serve(
            listener,
            metrics,
            health,
            stop.clone().cancelled_owned(),
        ));
        Ok(Self { stop, serving })
    }

    /// Stops taking connections. Open scrapes get a moment to finish; a client holding a
    /// connection does not hold up the exit.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.serving).await;
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Ops { metrics, health });
    serve_router(listener, app, MAX_CONNECTIONS, shutdown).await
}

/// Serves `app` with at most `connections` open at once, each closed when it sends nothing
/// for a while, until `shutdown` completes; requests in flight then finish first.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    connections: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = Guarded {
        listener,
        open: Arc::new(Semaphore::new(connections)),
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Scrapers and probes need a handful of connections; more wait for one to close.
const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed: a client that sent half a
/// request (or holds an idle keep-alive) cannot hold a connection, or a shutdown, for ever.
const IDLE_READ: Duration = Duration::from_secs(10);

/// The listener, with a bound on open connections and an idle timeout on each.
struct Guarded {
    listener: TcpListener,
    open: Arc<Semaphore>,
}

impl axum::serve::Listener for Guarded {
    type Io = GuardedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = Arc::clone(&self.open)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        let stream = GuardedStream {
            stream,
            _permit: permit,
            idle: Box::pin(tokio::time::sleep(IDLE_READ)),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

struct GuardedStream {
    stream: TcpStream,
    /// Held while the connection is open.
    _permit: OwnedSemaphorePermit,
    /// Reset whenever bytes arrive.
    idle: Pin<Box<Sleep>>,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let deadline = Instant::now() + IDLE_READ;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

async fn readiness(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to the broker or not consuming\n",
        )
    }
}
