//! `run`: the worker, with its operations endpoint (`/metrics`, `/healthz`, `/readyz`) and,
//! with `--ingest`, the ingest endpoint beside it in the same process.

use std::sync::Arc;

use crate::commands::cli::shutdown_signal;
use crate::commands::setup::verify_listrak;
use crate::config::Settings;
use crate::driver::worker::Health;
use crate::edges::http::OpsEndpoint;
use crate::edges::listrak::ListrakClient;
use crate::edges::telemetry::Metrics;

/// Runs the worker until SIGTERM or SIGINT, then drains within `shutdown.grace`.
pub async fn run(settings: Settings, ingest: bool) -> anyhow::Result<()> {
    let metrics = Metrics::new(settings.batch.max_contacts.get());
    // One client, so one token, for the check at start and the work after it.
    let api = Arc::new(ListrakClient::new(&settings.listrak, metrics.clone())?);
    if settings.listrak.verify_at_start {
        verify_listrak(&settings, &api, true).await?;
    }
    let health = Health::default();
    let ops = OpsEndpoint::start(settings.http.listen, metrics.clone(), health.clone())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (http.listen): {e}",
                settings.http.listen
            )
        })?;
    let stop_ingest = tokio_util::sync::CancellationToken::new();
    // Bound before the worker starts, so a port in use stops the start.
    let ingest = if ingest {
        let listen = settings.ingest.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (ingest.listen): {e}"))?;
        let stop = stop_ingest.clone();
        let settings = settings.clone();
        Some(tokio::spawn(async move {
            crate::commands::ingest::serve(
                listener,
                &settings,
                crate::edges::ingest::IngestMetrics::new(),
                stop.cancelled_owned(),
            )
            .await
        }))
    } else {
        None
    };
    let result =
        crate::driver::worker::run(settings, api, metrics, health, shutdown_signal()).await;
    stop_ingest.cancel();
    if let Some(ingest) = ingest {
        // The requests in flight finish before the endpoint stops.
        match ingest.await {
            Ok(Err(error)) => tracing::warn!(%error, "the ingest endpoint ended"),
            Err(error) => tracing::warn!(%error, "the ingest endpoint panicked"),
            Ok(Ok(())) => {}
        }
    }
    ops.stop().await;
    result
}
