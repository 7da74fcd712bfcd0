//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.
//!
//! # Layout
//!
//! ```text
//!  RabbitMQ ──► decode ──► mapping ──► fields ──► batch ──► deliver ──► Listrak
//!  (broker)     bytes to    events to   audience   per list,  requests,    (listrak)
//!               messages    updates     key to     contact,   retries,       │ 201
//!                                       field id   field      bisection      ▼
//!                                                                │      applied log ──► guard
//!                            ack / retry queue / dead letter ◄── settle  (every replica's)
//!                                                                            │ a key applied
//!   main queue ◄── repair ◄── Listrak read back ◄── readback queues ◄────────┘ twice
//! ```
//!
//! One broker session (`driver::session`) carries out what its core
//! (`driver::session_core`) decides: which messages form a batch, when it leaves, what is
//! held, acked, copied to a retry queue or dead-lettered, when a shutdown is done. The core
//! does no I/O and reads no clock: the session hands it the time (`driver::clock`).
//!
//! The folders say what a module is:
//!
//! - [`stages`], the pure decisions, functions of their inputs (time comes in as a value):
//!   [`model`](stages::model) (the vocabulary the stages share: ids, event times, updates,
//!   verdicts, rejections, ack outcomes), [`decode`](stages::decode) (message bytes into a
//!   Segment event or a direct update, or poison), [`mapping`](stages::mapping) (Segment's
//!   `updateEmailContactProfileFields` semantics, made stricter, and the `[[mappings]]`
//!   rules), [`batch`](stages::batch) (per list, merged per contact, last write wins per
//!   field; when a batch leaves; a contact in flight is never in a second request),
//!   [`classify`](stages::classify) (a Listrak answer to ok / auth / systemic / ambiguous /
//!   permanent; a field that cannot be resolved to a dead letter or a retry),
//!   [`settle`](stages::settle) (each message to its acknowledgement; folding acks),
//!   [`disposition`](stages::disposition) (an ack, a retry queue's copy or a dead
//!   letter, with the headers that say why), [`headers`](stages::headers) (the header names,
//!   the properties a copy carries, the queue names), [`catalogue`](stages::catalogue) (an
//!   account's lists and fields against the mappings, and what `listrak provision` creates),
//!   [`arrival`](stages::arrival) (a delivery decoded and mapped, its event times trusted
//!   as far as `batch.clock_skew`, or poison),
//!   [`readback`](stages::readback) (which keys are at risk of a stale value in Listrak, and
//!   what reading one back decides), [`pace`](stages::pace) (send times at most a rate apart).
//! - [`edges`], where the worker meets the world: [`broker`](edges::broker) (connection,
//!   topology, confirmed publishing), [`applied_log`](edges::applied_log) (the stream every
//!   worker appends to and tails), [`listrak`](edges::listrak) (the API client and its
//!   OAuth token), [`http`](edges::http) (`/metrics`, `/healthz`, `/readyz`),
//!   [`telemetry`](edges::telemetry) (every metric, one function per occurrence),
//!   [`ingest`](edges::ingest) (Segment's Webhooks destination into the exchange).
//! - [`driver`], the state that lives while the worker runs and the loops that move messages
//!   through the stages: [`worker`](driver::worker) (sessions one after another,
//!   reconnection, shutdown), [`worker_state`](driver::worker_state) (what the sessions share
//!   and keep), [`session`](driver::session) (one broker session: consume,
//!   resolve fields, batch, dispatch, settle, publish, ack: what touches lapin, tasks and the
//!   clock), [`session_core`](driver::session_core) (every decision of a session, without
//!   I/O: batches, holds, acks, copies, shutdown), [`clock`](driver::clock) (the one clock the
//!   driver reads), [`deliver`](driver::deliver) (one batch to Listrak: in-process
//!   retries within the hold budget, bisection, size ceilings), [`fields`](driver::fields)
//!   (each list's field catalogue, resolving `audience_field` mappings),
//!   [`superseded`](driver::superseded) (the superseded guard: the newest event time applied
//!   per key, from this worker's 201s and the applied log),
//!   [`readback`](driver::readback) (keys at risk scheduled in the broker, read back from
//!   Listrak and repaired),
//!   [`concurrency`](driver::concurrency) (adaptive request concurrency and a rate after a
//!   429), [`retry`](driver::retry) (every retry schedule: in-process backoff, the only user
//!   of `backoff`, publish attempts, reconnections),
//!   [`unpoisoned`](driver::unpoisoned) (a mutex a panic does not poison).
//! - [`commands`], what runs beside `run`: [`dlq`](commands::dlq) (stats, peek, replay,
//!   export, purge), [`setup`](commands::setup) (`listrak lists | fields | provision`,
//!   `check --listrak`), [`publish`](commands::publish), [`history`](commands::history),
//!   [`progress`](commands::progress) (their progress line).
//! - [`config`]: the TOML file and environment, validated once into [`config::Settings`].
//! - [`allocator`]: mimalloc, set to give freed memory back at once.
//!
//! Everything above runs in production. [`tools`] holds what runs beside it, never imported
//! by the modules above: the demo (its command stays in the main binary), the sample traffic
//! it shares with the tests, the benchmark (`listrak-bench`) and the Listrak stand-in
//! (`listrak-fake`). A test below holds the folders to their roles.

pub mod allocator;
pub mod commands;
pub mod config;
pub mod driver;
pub mod edges;
#[cfg(test)]
mod robustness;
pub mod stages;
pub mod tools;

#[cfg(test)]
mod layers {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    /// The folders of `src/`, by role.
    const FOLDERS: [&str; 5] = ["stages", "edges", "driver", "commands", "tools"];
    /// Which folders each folder's code may name (besides its own, `config` and `allocator`).
    const MAY_USE: [(&str, &[&str]); 5] = [
        ("stages", &[]),
        ("edges", &["stages"]),
        ("driver", &["stages", "edges"]),
        ("commands", &["stages", "edges", "driver"]),
        ("tools", &["stages", "edges", "driver", "commands"]),
    ];
    /// What a pure stage never does outside its tests: read a clock, draw a random number,
    /// wait on a runtime, hold a lock, or talk to the broker. `model` defines the clock read
    /// the driver uses (`EventTime::now`); no stage calls it.
    const IMPURE: [&str; 9] = [
        "Instant::now",
        "SystemTime",
        "Utc::now",
        "EventTime::now",
        "rand::",
        "tokio::",
        "Mutex",
        "lapin::Channel",
        "lapin::Connection",
    ];

    struct Source {
        path: PathBuf,
        /// `stages/batch` for `src/stages/batch.rs` and `src/stages/batch/tests.rs`;
        /// `config` for everything of `config`, `lib` for `lib.rs`.
        module: String,
        folder: String,
        /// The code before its tests (a file of tests has none).
        code: String,
    }

    /// Every source file under `src/`: a new file is checked without being listed anywhere.
    fn sources() -> Vec<Source> {
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
            .map(|path| {
                let relative = path.strip_prefix(&root).expect("under src/");
                let parts: Vec<String> = relative
                    .components()
                    .map(|c| {
                        c.as_os_str()
                            .to_string_lossy()
                            .trim_end_matches(".rs")
                            .to_owned()
                    })
                    .collect();
                let folder = parts[0].clone();
                let module = if FOLDERS.contains(&folder.as_str()) && parts.len() > 1 {
                    format!("{}/{}", parts[0], parts[1])
                } else {
                    folder.clone()
                };
                let source = std::fs::read_to_string(&path).expect("UTF-8 source");
                let is_tests = parts.last().is_some_and(|name| name == "tests");
                let code = if is_tests {
                    String::new()
                } else {
                    // The inline test module is the file's last item; `mod tests;` is a file
                    // of its own, and the code after it is checked.
                    let tests = source.find("#[cfg(test)]\nmod tests {");
                    source[..tests.unwrap_or(source.len())].to_owned()
                };
                Source {
                    path,
                    module,
                    folder,
                    code,
                }
            })
            .collect()
    }

    /// The `folder/module`s a piece of code names through `crate::` (in `use` lines or
    /// inline, one per line or grouped).
    fn named(code: &str) -> BTreeSet<String> {
        let mut modules = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut parts = path.split("::").filter(|part| !part.is_empty());
            let Some(first) = parts.next() else { continue };
            match parts.next() {
                Some(second) if FOLDERS.contains(&first) => {
                    modules.insert(format!("{first}/{second}"));
                }
                // `crate::edges::{broker, http}` and the like.
                None if FOLDERS.contains(&first) && rest[first.len()..].starts_with("::{") => {
                    let group = &rest[first.len() + 3..];
                    for name in top_level_names(group) {
                        modules.insert(format!("{first}/{name}"));
                    }
                }
                _ => {
                    modules.insert(first.to_owned());
                }
            }
        }
        modules
    }

    /// The first name of each item of a `{…}` group, up to its closing brace:
    /// `broker::{self, Topology}, http}` gives `broker` and `http`.
    fn top_level_names(group: &str) -> Vec<&str> {
        let mut items = Vec::new();
        let (mut depth, mut from) = (0, 0);
        for (at, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth > 0 => depth -= 1,
                ',' | '}' if depth == 0 => {
                    items.push(&group[from..at]);
                    from = at + 1;
                    if c == '}' {
                        break;
                    }
                }
                _ => {}
            }
        }
        items
            .into_iter()
            .filter_map(|item| item.split("::").next().map(str::trim))
            .filter(|name| !name.is_empty())
            .collect()
    }

    #[test]
    fn the_configuration_uses_only_the_stages() {
        for source in sources().into_iter().filter(|s| s.folder == "config") {
            for module in named(&source.code) {
                let folder = module.split('/').next().unwrap_or_default();
                assert!(
                    !FOLDERS.contains(&folder) || folder == "stages",
                    "{} names {module}: the configuration uses only the stages",
                    source.path.display()
                );
            }
        }
    }

    #[test]
    fn every_folder_has_its_modules() {
        let modules: BTreeSet<String> = sources().into_iter().map(|s| s.module).collect();
        for module in [
            "stages/decode",
            "stages/mapping",
            "stages/batch",
            "stages/settle",
            "stages/disposition",
            "stages/headers",
            "edges/broker",
            "edges/listrak",
            "driver/session",
            "driver/deliver",
            "commands/dlq",
            "tools/fake",
            "config",
        ] {
            assert!(modules.contains(module), "no source of {module}");
        }
    }

    #[test]
    fn each_folder_names_only_the_folders_its_role_allows() {
        let allowed: BTreeMap<&str, &[&str]> = MAY_USE.into_iter().collect();
        for source in sources() {
            // The binaries, the library's root, `config`, the allocator and the test-only
            // robustness checks stand outside the folders.
            let Some(may) = allowed.get(source.folder.as_str()) else {
                continue;
            };
            for module in named(&source.code) {
                let folder = module.split('/').next().unwrap_or(&module);
                let fine = folder == source.folder
                    || may.contains(&folder)
                    || ["config", "allocator"].contains(&folder);
                assert!(
                    fine,
                    "{} ({}) uses {module}",
                    source.path.display(),
                    source.folder
                );
            }
        }
    }

    #[test]
    fn production_code_never_uses_the_tools() {
        for source in sources() {
            if ["tools", "bin", "main", "robustness"].contains(&source.folder.as_str()) {
                continue;
            }
            assert!(
                !named(&source.code).iter().any(|m| m.starts_with("tools")),
                "{} uses the development tools",
                source.path.display()
            );
        }
    }

    #[test]
    fn the_stages_and_the_session_core_stay_pure() {
        let pure = |s: &Source| s.folder == "stages" || s.module == "driver/session_core";
        for source in sources().into_iter().filter(pure) {
            for line in source.code.lines().map(str::trim) {
                if line.starts_with("//") {
                    continue;
                }
                for impure in IMPURE {
                    let defines_now = impure == "Utc::now" && source.module == "stages/model";
                    assert!(
                        defines_now || !line.contains(impure),
                        "{} is a pure stage but uses {impure}: {line}",
                        source.path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn no_two_modules_import_each_other() {
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for source in sources() {
            let named = named(&source.code);
            let entry = imports.entry(source.module.clone()).or_default();
            entry.extend(named.into_iter().filter(|m| *m != source.module));
        }
        for (module, names) in &imports {
            for other in names {
                let back = imports.get(other).is_some_and(|n| n.contains(module));
                assert!(!back, "{module} and {other} import each other");
            }
        }
    }

    #[test]
    fn the_import_reader_sees_grouped_and_inline_paths() {
        let code = "use crate::edges::{broker::{self, Topology}, http};\n\
                    fn f() { crate::driver::superseded::x(); }\nuse crate::config::Settings;";
        let named: Vec<String> = named(code).into_iter().collect();
        assert_eq!(
            named,
            ["config", "driver/superseded", "edges/broker", "edges/http"]
        );
    }
}
