//! The commands: `run` (the worker), `ingest`, the dead-letter queue (`dlq`), Listrak setup
//! (`listrak`, `check`), `publish`, `history` and `reconcile`; `cli` is the command line they
//! are asked from, `progress` their progress line on stderr.

pub mod cli;
pub mod dlq;
pub mod history;
pub mod ingest;
pub mod progress;
pub mod publish;
pub mod reconcile;
pub mod run;
pub mod setup;

use std::process::ExitCode;

use crate::commands::cli::{shutdown_signal, Command, DlqCommand};
use crate::commands::dlq::superseded::SupersededCheck;
use crate::commands::dlq::{DeadLetters, DlqError, ReplayOptions};
use crate::commands::setup::{ProblemsFound, SetupError};
use crate::config::Settings;
use crate::edges::broker;
use crate::edges::listrak::ListrakClient;
use crate::edges::telemetry::Metrics;

/// Runs one command (not `demo`, which needs no configuration) on `settings`; its exit code.
pub async fn dispatch(command: Command, settings: Settings) -> ExitCode {
    let result = match command {
        Command::Dlq { command } => return dead_letters(command, settings).await,
        Command::Ingest => ingest::run(&settings, shutdown_signal()).await,
        Command::Run { ingest } => run::run(settings, ingest).await,
        Command::Check { auth, listrak } => setup::check(&settings, auth, listrak).await,
        Command::Listrak { command } => {
            match ListrakClient::new(&settings.listrak, Metrics::new(1)) {
                Ok(client) => setup::listrak(command, &client, &settings.mappings).await,
                Err(error) => Err(error),
            }
        }
        Command::Publish { file } => publish::run(&settings, &file).await,
        Command::Reconcile {
            list,
            fields,
            apply,
            json,
            rate,
        } => {
            let options = reconcile::ReconcileOptions {
                list,
                fields,
                apply,
                pages_per_second: rate,
            };
            reconcile::run(&settings, &options, json).await
        }
        Command::History {
            email,
            list,
            since,
            json,
            listrak,
        } => {
            let request = history::HistoryRequest {
                email,
                list,
                since,
                json,
                listrak,
            };
            history::run(&settings, request).await
        }
        Command::Demo { .. } => unreachable!("the demo runs without a configuration"),
    };
    exit_code(result)
}

/// 0, or the error on stderr and 2 for what a change of configuration fixes, else 1.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // The configuration does not match the broker's queues or the Listrak account:
            // fixing it is a change of configuration (or of the queues, or of the account),
            // as for an invalid file.
            let usage = error.downcast_ref::<broker::TopologyMismatch>().is_some()
                || error.downcast_ref::<ProblemsFound>().is_some()
                || error
                    .downcast_ref::<SetupError>()
                    .is_some_and(SetupError::is_usage);
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// The `dlq` commands: results on stdout, progress on stderr.
async fn dead_letters(command: DlqCommand, settings: Settings) -> ExitCode {
    match run_dlq(command, settings).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(if error.is_usage() { 2 } else { 1 })
        }
    }
}

/// True when the command did all it was asked; false when it stopped early (said so).
async fn run_dlq(command: DlqCommand, settings: Settings) -> Result<bool, DlqError> {
    if let DlqCommand::Export { file, .. } = &command {
        if file.exists() {
            return Err(DlqError::FileExists { path: file.clone() });
        }
    }
    let topology = broker::Topology::new(
        &settings.amqp.exchange,
        &settings.amqp.queue,
        &settings.retry.schedule,
    );
    let connection = dlq::connect(&settings.amqp).await?;
    let dead = DeadLetters::new(&connection, &topology);
    let done = match command {
        DlqCommand::Stats { filters, json } => {
            let filter = filters.into_filter();
            let (stats, walked) = dead.stats(&filter).await?;
            let superseded = match SupersededCheck::read(&connection, &topology, &settings).await {
                Ok(check) => {
                    DeadLetters::new(&connection, &topology)
                        .knowing(&check)
                        .superseded_count(&filter)
                        .await?
                }
                Err(error) => {
                    eprintln!("cannot tell which dead letters are superseded: {error}");
                    None
                }
            };
            if json {
                let mut value = dlq::render::stats_json(&stats, dead.dead_queue(), &walked);
                if let Some(object) = value.as_object_mut() {
                    object.insert("superseded".into(), serde_json::json!(superseded));
                }
                println!("{value}");
            } else {
                print!(
                    "{}",
                    dlq::render::stats_table(&stats, dead.dead_queue(), &walked)
                );
                if let Some(superseded) = superseded {
                    println!(
                        "superseded by the applied log: {superseded} (replayed, they change \
                         nothing; `dlq replay --skip-superseded` removes them)"
                    );
                }
            }
            true
        }
        DlqCommand::Peek {
            filters,
            limit,
            json,
        } => {
            let (letters, walked) = dead.peek(&filters.into_filter(), limit).await?;
            if json {
                for letter in &letters {
                    println!("{}", dlq::record::to_line(&letter.body, &letter.properties));
                }
            } else {
                print!("{}", dlq::render::letters_text(&letters, &walked));
            }
            true
        }
        DlqCommand::Replay {
            filters,
            limit,
            rate,
            dry_run,
            skip_superseded,
        } => {
            let options = ReplayOptions {
                limit,
                rate,
                dry_run,
                skip_superseded,
            };
            let check = if dry_run || skip_superseded {
                Some(SupersededCheck::read(&connection, &topology, &settings).await?)
            } else {
                None
            };
            let summary = dlq::replay_across_node_loss(
                &settings.amqp,
                &topology,
                &filters.into_filter(),
                options,
                check.as_ref(),
                shutdown_signal(),
            )
            .await?;
            println!("{summary}");
            summary.stopped.is_none()
        }
        DlqCommand::Export {
            file,
            filters,
            remove,
        } => {
            let summary = dead.export(&filters.into_filter(), &file, remove).await?;
            println!("{summary}");
            summary.stopped.is_none()
        }
        DlqCommand::Purge { filters, yes } => {
            let summary = dead.purge(&filters.into_filter(), yes).await?;
            println!("{summary}");
            summary.stopped.is_none()
        }
    };
    let _ = connection.close(200, "done".into()).await;
    Ok(done)
}
