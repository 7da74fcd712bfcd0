//! `listrak-worker`: the command line. Parses, loads the configuration, starts logging and
//! the runtime, and hands over to the library (`commands::dispatch`).

use std::process::ExitCode;

use clap::Parser;

use listrak_worker::allocator;
use listrak_worker::commands::cli::{init_logging, Cli, Command, Runtime};
use listrak_worker::commands::{dispatch, exit_code};
use listrak_worker::config::Settings;
use listrak_worker::tools::demo;

// Every message is allocated by lapin's I/O thread and freed on the worker's: glibc's
// allocator takes a lock for each such free, mimalloc does not.
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

fn main() -> ExitCode {
    allocator::purge_freed_memory_at_once();
    let cli = Cli::parse();
    // The demo prints its own summary; its log stays quiet unless asked.
    // The commands that stop on a broker error say so in their own words: the client
    // library's own ERROR line for the same refusal (a missing queue, say) would come first
    // and read as a second failure. The long-running processes keep it.
    let default_level = match cli.command {
        Command::Demo { .. } => "warn,lapin=off",
        Command::Run { .. } | Command::Ingest => "info",
        _ => "info,lapin=off",
    };
    init_logging(cli.log_format, default_level);
    let runtime = match cli.runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("a tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::Demo {
                events,
                through_ingest,
            } => {
                let route = if through_ingest {
                    demo::Route::Ingest
                } else {
                    demo::Route::Publish
                };
                exit_code(demo::run(events as usize, route).await)
            }
            command => {
                let env = |key: &str| std::env::var(key).ok();
                // The setup commands need only the credentials: they help write the mappings.
                let loaded = if matches!(command, Command::Ingest) {
                    Settings::load_for_broker(cli.config.as_deref(), env)
                } else if matches!(
                    command,
                    Command::Listrak { .. } | Command::History { .. } | Command::Reconcile { .. }
                ) {
                    Settings::load_without_mappings(cli.config.as_deref(), env)
                } else {
                    Settings::load(cli.config.as_deref(), env)
                };
                let settings = match loaded {
                    Ok(settings) => settings,
                    Err(error) => {
                        eprintln!("error: {error}");
                        return ExitCode::from(2);
                    }
                };
                dispatch(command, settings).await
            }
        }
    })
}
