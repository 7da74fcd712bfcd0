//! The command line: what `listrak-worker` takes (parsed by clap), where it logs, and the
//! signals that stop it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::dlq::{self, Filter};
use crate::stages::model::ListId;

#[derive(Parser)]
#[command(
    name = "listrak-worker",
    version,
    about = "Keeps Listrak profile fields in step with Segment Engage audiences, from RabbitMQ"
)]
pub struct Cli {
    /// The configuration file (TOML).
    #[arg(long, global = true, env = "LISTRAK_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log as human-readable text or as JSON lines.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The async runtime: one thread, or one per core.
    #[arg(
        long,
        global = true,
        env = "LISTRAK_WORKER_RUNTIME",
        value_enum,
        default_value_t = Runtime::CurrentThread
    )]
    pub runtime: Runtime,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Runtime {
    CurrentThread,
    MultiThread,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
pub enum ListrakCommand {
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
pub enum DlqCommand {
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
pub struct Filters {
    /// Dead-letter reason: invalid_json, invalid_event, rejected, list_not_found,
    /// unknown_field, retries_exhausted, delivery_limit, unknown.
    #[arg(long, value_delimiter = ',', value_parser = dlq::filter::parse_reason)]
    pub reason: Vec<String>,
    /// Listrak list id (`--list` is the same, as the other commands spell it).
    #[arg(long, visible_alias = "list", value_delimiter = ',')]
    pub list_id: Vec<ListId>,
    /// HTTP status Listrak answered.
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<u16>,
    /// Listrak error code, such as ERROR_INVALID_PARAMETER.
    #[arg(long, value_delimiter = ',')]
    pub error: Vec<String>,
    /// Failed longer ago than this: 30m, 2h, 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
}

impl Filters {
    pub fn into_filter(self) -> Filter {
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

/// Logs to stderr, as text (coloured on a terminal) or JSON lines; `RUST_LOG` overrides
/// `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
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
