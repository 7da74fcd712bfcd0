//! `listrak-worker`: the command line. Parses, loads the configuration, starts telemetry,
//! and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use listrak_worker::commands::dlq::superseded::SupersededCheck;
use listrak_worker::commands::dlq::{self, DeadLetters, DlqError, Filter, ReplayOptions};
use listrak_worker::commands::setup::{self, ProblemsFound, ProvisionRequest, SetupError};
use listrak_worker::commands::{history, publish, reconcile};
use listrak_worker::config::Settings;
use listrak_worker::driver::worker::Health;
use listrak_worker::edges::listrak::ListrakClient;
use listrak_worker::edges::telemetry::Metrics;
use listrak_worker::edges::{broker, http};
use listrak_worker::stages::model::ListId;
use listrak_worker::tools::demo;
use listrak_worker::{allocator, shutdown_signal};

// Every message is allocated by lapin's I/O thread and freed on the worker's: glibc's
// allocator takes a lock for each such free, mimalloc does not.
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

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
    #[arg(
        long,
        global = true,
        env = "LISTRAK_WORKER_RUNTIME",
        value_enum,
        default_value_t = Runtime::CurrentThread
    )]
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
    Run {
        /// Also serve the ingest endpoint (`[ingest]`) in this process, for a single-box
        /// setup; in production run `listrak-worker ingest` as a process of its own.
        #[arg(long)]
        ingest: bool,
    },
    /// Take Segment's events over HTTP (its Webhooks destination) and publish each to the
    /// exchange with a publisher confirm: 200 once every event of a request is confirmed,
    /// 503 with Retry-After otherwise, 401/413/400 for a bad signature or token, a body too
    /// large, or one that is not JSON.
    Ingest,
    /// Validate the configuration and print it (secrets redacted).
    Check {
        /// Also obtain a Listrak token with the configured credentials.
        #[arg(long)]
        auth: bool,
        /// Also check every mapping against the Listrak account: its list exists, its
        /// profile fields exist in that list, on/off/useAudienceKey go to Check Box fields,
        /// text fits its field. Exits 2 when there is a problem.
        #[arg(long)]
        listrak: bool,
    },
    /// Look at the Listrak account's lists and profile fields, or create the fields audiences
    /// need.
    Listrak {
        #[command(subcommand)]
        command: ListrakCommand,
    },
    /// Publish events from a JSON-lines file, each with a publisher confirm. Lines exported
    /// by `dlq export` are published with their original properties and headers.
    Publish {
        /// The file: one JSON event per line (a Segment event or a direct update), or lines
        /// written by `dlq export`.
        file: PathBuf,
    },
    /// Inspect, replay, export or purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Compare what Listrak holds for a list's fields with the newest value applied to each
    /// (from the applied log): counts, and a row per differing key. Changes nothing unless
    /// --apply, which sends the newest values again. Exits 0 whether or not it finds drift.
    Reconcile {
        /// The list.
        #[arg(long)]
        list: ListId,
        /// Only this profile field (repeatable); by default every field the applied log names
        /// for the list.
        #[arg(long = "field", value_name = "FIELD_ID")]
        fields: Vec<u32>,
        /// Send the newest value of every differing key again (to the exchange, as a direct
        /// update with its own event time: the worker applies it).
        #[arg(long)]
        apply: bool,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Pages of contacts (5,000 each) read per second at most.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
    },
    /// Every value applied to one contact, oldest first, from the applied log, and the dead
    /// letters that still wait for it.
    History {
        /// The contact's email address (letter case aside).
        #[arg(long)]
        email: String,
        /// Only this list.
        #[arg(long)]
        list: Option<ListId>,
        /// Only what was applied this long ago or since, e.g. 2h or 3d (default: all the log
        /// holds).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also read what Listrak holds now for each field applied (one Get a Contact per
        /// list), beside the newest value applied.
        #[arg(long)]
        listrak: bool,
    },
    /// Run the whole pipeline on this machine against an in-process Listrak stand-in.
    Demo {
        /// How many events to generate (at most a million).
        #[arg(
            long,
            default_value_t = 3000,
            value_parser = clap::value_parser!(u32).range(1..=1_000_000)
        )]
        events: u32,
        /// Send the events through `ingest` over HTTP, signed and in batches, as Segment's
        /// Webhooks destination does, instead of publishing them.
        #[arg(long)]
        through_ingest: bool,
    },
}

#[derive(Subcommand)]
enum ListrakCommand {
    /// The account's lists.
    Lists {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A list's profile field groups and fields: id, name, data type, max length.
    Fields {
        /// The list id.
        #[arg(long)]
        list: ListId,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a profile field group and one Check Box field per audience, those missing
    /// only (found by name first), and print the [[mappings]] tables that use them (none
    /// when an `audience_field` mapping of the configuration already covers the group).
    Provision {
        /// The list id; by default, that of the configuration's `audience_field` mapping.
        #[arg(long)]
        list: Option<ListId>,
        /// The profile field group's name; created when the list has none of that name. By
        /// default, that of the configuration's `audience_field` mapping.
        #[arg(long)]
        group: Option<String>,
        /// An Engage audience key (repeatable); its field is named after it.
        #[arg(long = "audience", value_name = "KEY", required = true)]
        audiences: Vec<String>,
        /// The field's name instead of the audience key (one --audience only).
        #[arg(long)]
        name: Option<String>,
        /// Say what would be created; create nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters grouped by reason, list, HTTP status and Listrak error code: counts,
    /// oldest and newest.
    Stats {
        #[command(flatten)]
        filters: Filters,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters with their headers and body, without removing them.
    Peek {
        #[command(flatten)]
        filters: Filters,
        /// Show at most this many.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// One JSON object a line, in the export format.
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back to the main queue, each confirmed before it is removed.
    Replay {
        #[command(flatten)]
        filters: Filters,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// At most this many messages per second: 50, 50/s, 3000/m.
        #[arg(long, value_parser = dlq::pace::parse_rate)]
        rate: Option<f64>,
        /// Count what would be replayed (and how many of those the applied log supersedes);
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remove the dead letters the applied log supersedes instead of replaying them
        /// (replayed, the worker would acknowledge them as superseded).
        #[arg(long)]
        skip_superseded: bool,
    },
    /// Write dead letters with their properties and headers to a new JSON-lines file.
    Export {
        /// The file to create (an existing file is not overwritten).
        file: PathBuf,
        #[command(flatten)]
        filters: Filters,
        /// Remove the exported messages from the queue once the file is synced to disk.
        #[arg(long)]
        remove: bool,
    },
    /// Delete matching dead letters; without --yes, only say what would be deleted.
    Purge {
        #[command(flatten)]
        filters: Filters,
        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

/// Every filter given must hold; a filter may take several values (comma-separated or
/// repeated), one of which must hold.
#[derive(Args)]
struct Filters {
    /// Dead-letter reason: invalid_json, invalid_event, rejected, list_not_found,
    /// unknown_field, retries_exhausted, delivery_limit, unknown.
    #[arg(long, value_delimiter = ',', value_parser = dlq::filter::parse_reason)]
    reason: Vec<String>,
    /// Listrak list id (`--list` is the same, as the other commands spell it).
    #[arg(long, visible_alias = "list", value_delimiter = ',')]
    list_id: Vec<ListId>,
    /// HTTP status Listrak answered.
    #[arg(long, value_delimiter = ',')]
    status: Vec<u16>,
    /// Listrak error code, such as ERROR_INVALID_PARAMETER.
    #[arg(long, value_delimiter = ',')]
    error: Vec<String>,
    /// Failed longer ago than this: 30m, 2h, 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

impl Filters {
    fn into_filter(self) -> Filter {
        Filter {
            reasons: self.reason,
            list_ids: self
                .list_id
                .into_iter()
                .map(|id| i64::from(id.get()))
                .collect(),
            statuses: self.status.into_iter().map(i64::from).collect(),
            errors: self.error,
            older_than: self.older_than,
        }
    }
}

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
                exit(demo::run(events as usize, route).await)
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
                match command {
                    Command::Dlq { command } => dead_letters(command, settings).await,
                    command => exit(dispatch(command, settings).await),
                }
            }
        }
    })
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
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

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Ingest => {
            listrak_worker::commands::ingest::run(&settings, shutdown_signal()).await
        }
        Command::Run { ingest } => {
            let metrics = Metrics::new(settings.batch.max_contacts.get());
            // One client, so one token, for the check at start and the work after it.
            let api = Arc::new(ListrakClient::new(&settings.listrak, metrics.clone())?);
            if settings.listrak.verify_at_start {
                verify_listrak(&settings, &api, true).await?;
            }
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
            // Bound before the worker starts, so a port in use stops the start.
            let ingest = if ingest {
                let listen = settings.ingest.listen;
                let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                    anyhow::anyhow!("cannot listen on {listen} (ingest.listen): {e}")
                })?;
                let stop = stop_http.clone();
                let settings = settings.clone();
                Some(tokio::spawn(async move {
                    listrak_worker::commands::ingest::serve(
                        listener,
                        &settings,
                        listrak_worker::edges::ingest::IngestMetrics::new(),
                        stop.cancelled_owned(),
                    )
                    .await
                }))
            } else {
                None
            };
            let result = listrak_worker::driver::worker::run(
                settings,
                api,
                metrics,
                health,
                shutdown_signal(),
            )
            .await;
            stop_http.cancel();
            if let Some(ingest) = ingest {
                // The requests in flight finish before the endpoint stops.
                match ingest.await {
                    Ok(Err(error)) => tracing::warn!(%error, "the ingest endpoint ended"),
                    Err(error) => tracing::warn!(%error, "the ingest endpoint panicked"),
                    Ok(Ok(())) => {}
                }
            }
            // Open scrapes get a moment to finish; a client holding a connection does not
            // hold up the exit.
            let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
            result
        }
        Command::Check { auth, listrak } => {
            print!("{}", settings.redacted_toml());
            if auth || listrak {
                let client = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
                if auth {
                    let lifetime = client
                        .authenticate()
                        .await
                        .map_err(|reason| anyhow::anyhow!("authentication failed: {reason}"))?;
                    println!(
                        "# authentication: ok, token valid for about {}s",
                        lifetime.as_secs()
                    );
                }
                if listrak {
                    verify_listrak(&settings, &client, false).await?;
                }
            }
            Ok(())
        }
        Command::Listrak { command } => {
            let client = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
            listrak_command(command, &client, &settings.mappings).await
        }
        Command::Publish { file } => {
            let topology = broker::Topology::of(&settings);
            let published = publish::publish_file(&settings.amqp, &topology, &file).await?;
            println!(
                "published {} messages to exchange {:?}{}{}",
                published.messages,
                topology.exchange,
                if published.restored > 0 {
                    format!(
                        " ({} exported dead letters with their properties and headers)",
                        published.restored
                    )
                } else {
                    String::new()
                },
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
        Command::Reconcile {
            list,
            fields,
            apply,
            json,
            rate,
        } => {
            let api = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
            let connection = dlq::connect(&settings.amqp).await?;
            let options = reconcile::ReconcileOptions {
                list,
                fields,
                apply,
                pages_per_second: rate,
            };
            let found = reconcile::reconcile(&settings, &connection, &api, &options).await;
            let _ = connection.close(200, "done".into()).await;
            let found = found?;
            if json {
                println!("{}", serde_json::to_string(&found)?);
            } else {
                print!("{}", reconcile::table(&found, apply));
            }
            Ok(())
        }
        Command::History {
            email,
            list,
            since,
            json,
            listrak,
        } => {
            let topology = broker::Topology::of(&settings);
            let connection = dlq::connect(&settings.amqp).await?;
            let list = list.map(ListId::get);
            let found = history::history(&connection, &topology, &email, list, since).await;
            let _ = connection.close(200, "done".into()).await;
            let mut found = found?;
            if listrak {
                let api = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
                found.listrak = Some(history::listrak_now(&api, &found, &email).await?);
            }
            if json {
                println!("{}", history::to_json(&found, &email));
            } else {
                print!("{}", history::table(&found, &email));
            }
            Ok(())
        }
        Command::Dlq { .. } => unreachable!("handled by dead_letters"),
    }
}

/// Checks every mapping against the account; problems are printed (to stderr and the log at
/// start, to stdout for `check`) and make an error that exits 2.
async fn verify_listrak(
    settings: &Settings,
    client: &ListrakClient,
    at_start: bool,
) -> anyhow::Result<()> {
    let report = setup::verify(client, &settings.mappings)
        .await
        .map_err(|error| anyhow::anyhow!("cannot check the mappings against Listrak: {error}"))?;
    let text = setup::report_text(&report, settings.mappings.len());
    if at_start {
        for problem in &report.problems {
            tracing::error!(%problem, "a mapping does not match the Listrak account");
        }
        for unchecked in &report.unchecked {
            tracing::warn!(
                %unchecked,
                "a mapping could not be checked against the Listrak account"
            );
        }
        if !report.problems.is_empty() {
            eprint!("{text}");
        }
    } else {
        print!("{text}");
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(ProblemsFound(report.problems.len()).into())
    }
}

async fn listrak_command(
    command: ListrakCommand,
    client: &ListrakClient,
    mappings: &[listrak_worker::stages::mapping::Mapping],
) -> anyhow::Result<()> {
    match command {
        ListrakCommand::Lists { json } => {
            let lists = client.lists().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lists)?);
            } else {
                print!("{}", setup::lists_table(&lists));
            }
        }
        ListrakCommand::Fields { list, json } => {
            let groups = setup::field_groups(client, list).await?;
            if json {
                let answer = serde_json::json!({ "list": list, "groups": groups });
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", setup::fields_table(&groups));
            }
        }
        ListrakCommand::Provision {
            list,
            group,
            audiences,
            name,
            dry_run,
        } => {
            let target = setup::provision_target(mappings, list, group)?;
            let request = ProvisionRequest {
                list: target.list,
                group: target.group,
                audiences,
                name,
                dry_run,
            };
            let provisioned = setup::provision(client, &request).await?;
            // What happened goes to stderr, so that stdout is the configuration to paste.
            eprint!("{}", provisioned.summary());
            let mappings = provisioned.mappings_toml();
            if let Some(mapping) = target.covered_by {
                eprintln!(
                    "mapping {mapping:?} (audience_field) already writes these audiences; no \
                     [[mappings]] tables to add"
                );
            } else if mappings.is_empty() {
                eprintln!(
                    "dry run: nothing created; run without --dry-run for the [[mappings]] tables"
                );
            } else {
                print!("{mappings}");
            }
        }
    }
    Ok(())
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
