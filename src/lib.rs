//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.
//!
//! # Layout
//!
//! ```text
//!  RabbitMQ ──► decode ──► mapping ──► fields ──► batch ──► deliver ──► Listrak
//!  (broker)     bytes to    events to   audience   per list,  requests,    (listrak)
//!               messages    updates     key to     contact,   retries,
//!                                       field id   field      bisection
//!                                                                │
//!                            ack / retry queue / dead letter ◄── settle
//! ```
//!
//! The decisions are pure functions (decode, mapping, batch, guard, classify, retry,
//! concurrency, settle; disposition adds the broker's header names and queue names to them);
//! the I/O sits around them (broker, listrak, http), and `session` drives the whole.
//!
//! - [`config`]: the TOML file and environment, validated once into [`config::Settings`];
//!   `src/config/` holds its parts (the defaults, the walk over the file, the environment,
//!   secrets, one reader per section, `[amqp.tls]`, `[[mappings]]`, the redacted printout).
//! - [`model`]: list and field ids, event times, updates, dead-letter reasons; the vocabulary
//!   the stages share (verdicts, rejections, ack outcomes, readiness), so the pure stages need
//!   no edge (a test checks their imports).
//! - [`decode`]: message bytes into a Segment event (a borrowed JSON tree) or a direct
//!   update, or poison.
//! - [`mapping`]: Segment's `updateEmailContactProfileFields` semantics, made stricter; an
//!   `audience_field` mapping leaves the field to be resolved by the audience key. The
//!   mapping rules (`[[mappings]]`) and their JSON paths are defined here; `config` reads them.
//! - [`fields`]: each list's field catalogue in memory, resolving `audience_field` mappings
//!   (audience key → Check Box field id); misses read again at a bounded rate, missing
//!   fields created on request, the lowest id winning among duplicates.
//! - [`batch`]: grouping per list, merging per contact, last write wins per field; when a
//!   batch leaves (size, bytes, `max_wait`, or input gone quiet); the order per contact (a
//!   contact in flight is never in a second request: its newer updates wait for the answer).
//! - [`guard`]: the bounded memory that keeps an older update from overwriting a newer one.
//! - [`classify`]: one pure decision from a Listrak answer to ok / auth / systemic /
//!   ambiguous / permanent.
//! - [`retry`]: the retry schedule (the only user of the `backoff` crate).
//! - [`concurrency`]: adaptive request concurrency (slow start, then additive increase,
//!   multiplicative decrease) and a request rate after a 429.
//! - [`deliver`]: one batch to Listrak: in-process retries within the batch's hold budget
//!   (counted from its oldest message's delivery), bisection, size ceilings.
//! - [`listrak`]: the Listrak API client and its shared OAuth token; the catalogue requests
//!   (lists, profile field groups and fields).
//! - [`catalogue`]: an account's lists and fields against the mappings (`check --listrak`),
//!   and which group and Check Box fields `listrak provision` must create.
//! - [`setup`]: the `listrak lists | fields | provision` commands and `check --listrak`.
//! - [`settle`]: following each message to its acknowledgement; folding acks.
//! - [`disposition`]: what a settled message becomes: an ack, a copy in a retry queue, or a
//!   dead letter, with the headers that say why.
//! - [`broker`]: connection, queue topology, confirmed publishing, headers.
//! - [`tls`]: the broker's `amqps://` settings: CA and client certificate files.
//! - [`session`]: the loop of one broker session that drives everything: consume, resolve
//!   fields (holding aside the messages that wait for Listrak), batch, dispatch, settle,
//!   publish, ack.
//! - [`worker`]: sessions one after another (reconnection), shutdown.
//! - [`telemetry`]: every metric, one function per occurrence.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`publish`], [`progress`]: the `publish` command.
//! - [`dlq`]: the `dlq` commands: stats, peek, replay, export and purge of dead letters.
//! - [`allocator`]: mimalloc, set to give freed memory back at once.
//!
//! Everything above runs in production. [`tools`] holds what runs beside it, never imported
//! by the modules above: the demo (its command stays in the main binary), the sample traffic
//! it shares with the tests, the benchmark (`listrak-bench`) and the Listrak stand-in
//! (`listrak-fake`).

pub mod allocator;
pub mod batch;
pub mod broker;
pub mod catalogue;
pub mod classify;
pub mod concurrency;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod disposition;
pub mod dlq;
pub mod fields;
pub mod guard;
pub mod http;
pub mod listrak;
pub mod mapping;
pub mod model;
pub mod progress;
pub mod publish;
pub mod retry;
#[cfg(test)]
mod robustness;
pub mod session;
pub mod settle;
pub mod setup;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod worker;

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[cfg(test)]
mod layers {
    /// The stages whose decisions are pure: they import neither the edges (the broker,
    /// Listrak, the HTTP server, the metrics) nor the driver (the session loop, delivery).
    const PURE: [(&str, &str); 11] = [
        ("decode", include_str!("decode.rs")),
        ("mapping", include_str!("mapping.rs")),
        ("mapping", include_str!("mapping/rules.rs")),
        ("mapping", include_str!("mapping/json_path.rs")),
        ("batch", include_str!("batch.rs")),
        ("guard", include_str!("guard.rs")),
        ("classify", include_str!("classify.rs")),
        ("retry", include_str!("retry.rs")),
        ("concurrency", include_str!("concurrency.rs")),
        ("settle", include_str!("settle.rs")),
        ("model", include_str!("model.rs")),
    ];
    const EDGES_AND_DRIVER: [&str; 7] = [
        "broker",
        "listrak",
        "http",
        "telemetry",
        "worker",
        "session",
        "deliver",
    ];

    /// What runs in production; `tools` (the demo, the sample traffic, the benchmark, the
    /// stand-in) runs beside it.
    const PRODUCTION: [(&str, &str); 23] = [
        ("session", include_str!("session.rs")),
        ("worker", include_str!("worker.rs")),
        ("deliver", include_str!("deliver.rs")),
        ("disposition", include_str!("disposition.rs")),
        ("fields", include_str!("fields.rs")),
        ("broker", include_str!("broker.rs")),
        ("listrak", include_str!("listrak.rs")),
        ("http", include_str!("http.rs")),
        ("telemetry", include_str!("telemetry.rs")),
        ("config", include_str!("config.rs")),
        ("config", include_str!("config/broker_tls.rs")),
        ("config", include_str!("config/defaults.rs")),
        ("config", include_str!("config/document.rs")),
        ("config", include_str!("config/environment.rs")),
        ("config", include_str!("config/mappings.rs")),
        ("config", include_str!("config/print.rs")),
        ("config", include_str!("config/secret.rs")),
        ("config", include_str!("config/sections.rs")),
        ("config", include_str!("config/urls.rs")),
        ("catalogue", include_str!("catalogue.rs")),
        ("setup", include_str!("setup.rs")),
        ("publish", include_str!("publish.rs")),
        ("dlq", include_str!("dlq/mod.rs")),
    ];

    #[test]
    fn production_modules_never_import_the_tools() {
        for (module, source) in PURE.iter().chain(&PRODUCTION) {
            // Tests may use the sample traffic: look at the code before them.
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            assert!(
                !code.contains("crate::tools"),
                "{module} imports the development tools"
            );
        }
    }

    #[test]
    fn pure_stages_import_neither_the_edges_nor_the_driver() {
        for (stage, source) in PURE {
            for line in source.lines().filter(|line| line.contains("crate::")) {
                for module in EDGES_AND_DRIVER {
                    let named = format!("crate::{module}");
                    let uses = line.match_indices(&named).any(|(at, _)| {
                        !line[at + named.len()..].starts_with(char::is_alphanumeric)
                    });
                    assert!(!uses, "{stage} uses {module}: {}", line.trim());
                }
            }
        }
    }
}
