//! `listrak-worker`: the command line. Parses, loads the configuration, starts telemetry,
//! and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use listrak_worker::config::Settings;
use listrak_worker::listrak::ListrakClient;
use listrak_worker::telemetry::Metrics;
use listrak_worker::worker::Health;
use listrak_worker::{broker, demo, http, publish, shutdown_signal};

/// The hot path allocates per message (decoding, batching); mimalloc makes that cheap where
/// glibc's allocator took a quarter of the worker's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "listrak-worker",
    version,
    about = "Keeps Listrak profile fields in step with Segment Engage audiences, from RabbitMQ"
)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, global = true, env = "LISTRAK_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log as human-readable text or as JSON lines.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The async runtime: one thread, or one per core.
    #[arg(long, global = true, env = "LISTRAK_WORKER_RUNTIME", value_enum, default_value_t = Runtime::CurrentThread)]
    runtime: Runtime,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Runtime {
    CurrentThread,
    MultiThread,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume audience events and apply them to Listrak.
    Run,
    /// Validate the configuration and print it (secrets redacted).
    Check {
        /// Also obtain a Listrak token with the configured credentials.
        #[arg(long)]
        auth: bool,
    },
    /// Publish events from a JSON-lines file, each with a publisher confirm.
    Publish { file: PathBuf },
    /// Run the whole pipeline on this machine against an in-process Listrak stand-in.
    Demo {
        /// How many events to generate.
        #[arg(long, default_value_t = 3000)]
        events: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; its log stays quiet unless asked.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
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
            Command::Demo { events } => exit(demo::run(events).await),
            command => {
                let settings =
                    match Settings::load(cli.config.as_deref(), |key| std::env::var(key).ok()) {
                        Ok(settings) => settings,
                        Err(error) => {
                            eprintln!("error: {error}");
                            return ExitCode::from(2);
                        }
                    };
                exit(dispatch(command, settings).await)
            }
        }
    })
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // The configuration does not match the broker's queues: fixing it is a change
            // of configuration (or of the queues), as for an invalid file.
            if error.downcast_ref::<broker::TopologyMismatch>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            let metrics = Metrics::new(settings.batch.max_contacts.get());
            let health = Health::default();
            let listener = tokio::net::TcpListener::bind(settings.http.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot listen on {} (http.listen): {e}",
                        settings.http.listen
                    )
                })?;
            tracing::info!(listen = %settings.http.listen, "serving /metrics, /healthz, /readyz");
            let stop_http = tokio_util::sync::CancellationToken::new();
            let server = tokio::spawn(http::serve(
                listener,
                metrics.clone(),
                health.clone(),
                stop_http.clone().cancelled_owned(),
            ));
            let api = Arc::new(ListrakClient::new(&settings.listrak, metrics.clone())?);
            let result =
                listrak_worker::worker::run(settings, api, metrics, health, shutdown_signal())
                    .await;
            stop_http.cancel();
            let _ = server.await;
            result
        }
        Command::Check { auth } => {
            print!("{}", settings.redacted_toml());
            if auth {
                let client = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
                let lifetime = client
                    .authenticate()
                    .await
                    .map_err(|reason| anyhow::anyhow!("authentication failed: {reason}"))?;
                println!(
                    "# authentication: ok, token valid for about {}s",
                    lifetime.as_secs()
                );
            }
            Ok(())
        }
        Command::Publish { file } => {
            let topology = broker::Topology::of(&settings);
            let published = publish::publish_file(&settings.amqp, &topology, &file).await?;
            println!(
                "published {} messages to exchange {:?}{}",
                published.messages,
                topology.exchange,
                if published.not_json > 0 {
                    format!(
                        " ({} lines were not JSON; the worker will dead-letter them)",
                        published.not_json
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::Demo { .. } => unreachable!("handled before the configuration is loaded"),
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
