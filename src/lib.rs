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
pub mod applied_log;
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
pub mod history;
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
pub mod unpoisoned;
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
    use std::path::{Path, PathBuf};

    /// The stages whose decisions are pure: they import neither the edges (the broker,
    /// Listrak, the HTTP server, the metrics) nor the driver (the session loop, delivery).
    const PURE: [&str; 9] = [
        "decode",
        "mapping",
        "batch",
        "guard",
        "classify",
        "retry",
        "concurrency",
        "settle",
        "model",
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
    /// What runs beside production (the demo, the sample traffic, the benchmark, the
    /// stand-in), and the binaries and test-only modules that may use it.
    const TOOLS: &str = "tools";
    const NOT_PRODUCTION: [&str; 4] = ["tools", "bin", "main", "robustness"];

    /// Every source file of the library under `src/`, with the top-level module it belongs
    /// to: a new file is checked without being listed anywhere.
    fn sources() -> Vec<(String, PathBuf, String)> {
        fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("src/ is readable") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    walk(&path, files);
                } else if path.extension().is_some_and(|ext| ext == "rs") {
                    files.push(path);
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&root, &mut files);
        files
            .into_iter()
            .filter(|path| path != &root.join("lib.rs"))
            .map(|path| {
                let relative = path.strip_prefix(&root).expect("under src/");
                let first = relative.components().next().expect("a file name");
                let module = Path::new(first.as_os_str())
                    .file_stem()
                    .expect("a name")
                    .to_string_lossy()
                    .into_owned();
                let code = std::fs::read_to_string(&path).expect("UTF-8 source");
                (module, path, code)
            })
            .collect()
    }

    #[test]
    fn every_module_is_found() {
        let modules: Vec<String> = sources().into_iter().map(|(m, _, _)| m).collect();
        for module in PURE
            .iter()
            .chain(&EDGES_AND_DRIVER)
            .chain(&[TOOLS, "config", "dlq"])
        {
            assert!(modules.iter().any(|m| m == module), "no source of {module}");
        }
    }

    #[test]
    fn production_modules_never_import_the_tools() {
        for (module, path, source) in sources() {
            if NOT_PRODUCTION.contains(&module.as_str()) {
                continue;
            }
            // Tests may use the sample traffic: look at the code before them.
            let code = source.split("#[cfg(test)]").next().unwrap_or(&source);
            assert!(
                !code.contains("crate::tools"),
                "{} ({module}) imports the development tools",
                path.display()
            );
        }
    }

    #[test]
    fn pure_stages_import_neither_the_edges_nor_the_driver() {
        for (stage, path, source) in sources() {
            if !PURE.contains(&stage.as_str()) {
                continue;
            }
            for line in source.lines().filter(|line| line.contains("crate::")) {
                for module in EDGES_AND_DRIVER {
                    let named = format!("crate::{module}");
                    let uses = line.match_indices(&named).any(|(at, _)| {
                        !line[at + named.len()..].starts_with(char::is_alphanumeric)
                    });
                    assert!(
                        !uses,
                        "{} ({stage}) uses {module}: {}",
                        path.display(),
                        line.trim()
                    );
                }
            }
        }
    }
}
