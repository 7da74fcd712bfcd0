//! listrak-fake: serves the Listrak stand-in from the command line until Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use listrak_worker::stages::model::ListId;
use listrak_worker::tools::fake::{CatalogueSeed, FakeOptions, FakeServer, Faults, SeedList};

/// A strict stand-in for Listrak's token, SegmentationField, list and profile field
/// endpoints, with faults on demand.
///
/// State and records: GET /_fake/contacts, GET /_fake/catalogue, GET /_fake/requests. Faults
/// while running: GET /_fake/faults, PUT (replace all) or PATCH (change some). Start over:
/// POST /_fake/reset.
#[derive(Debug, Parser)]
#[command(name = "listrak-fake", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Client id tokens are issued for [env: LISTRAK_CLIENT_ID] [default: fake-client-id].
    #[arg(long)]
    client_id: Option<String>,
    /// Client secret tokens are issued for [env: LISTRAK_CLIENT_SECRET]
    /// [default: fake-client-secret].
    #[arg(long)]
    client_secret: Option<String>,
    /// Delay added before every SegmentationField answer, e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Share (0 to 1) of SegmentationField requests answered 503 at random.
    #[arg(long, value_parser = share, default_value_t = 0.0)]
    error_rate: f64,
    /// Answer 429 above this many SegmentationField requests per second.
    #[arg(long, value_parser = rate)]
    throttle_rps: Option<f64>,
    /// Send Retry-After (whole seconds, rounded up) with 429 and 503 answers.
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_after: Option<Duration>,
    /// Answer every SegmentationField request 503 for this long after start, e.g. 2m.
    #[arg(long, value_parser = humantime::parse_duration)]
    outage: Option<Duration>,
    /// Tokens older than this are refused with 401.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "900s")]
    token_lifetime: Duration,
    /// Answer bodies larger than this many bytes with 404, as Listrak does.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Refuse, with 400, every request holding a contact with this email (repeatable).
    #[arg(long = "reject-email", value_name = "EMAIL")]
    reject_emails: Vec<String>,
    /// Answer this list id with 404 (repeatable).
    #[arg(long = "unknown-list", value_name = "LIST_ID", value_parser = list_id)]
    unknown_lists: Vec<u32>,
    /// Answer this list id with 503 (repeatable).
    #[arg(long = "failing-list", value_name = "LIST_ID", value_parser = list_id)]
    failing_lists: Vec<u32>,
    /// Wait up to this much more, at random, before each SegmentationField answer, e.g. 200ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency_jitter: Duration,
    /// Wait this long before every catalogue answer (lists, field groups, fields), e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    catalogue_latency: Duration,
    /// Answer every catalogue request 503 for this long after start, e.g. 2m.
    #[arg(long, value_parser = humantime::parse_duration)]
    catalogue_outage: Option<Duration>,
    /// Answer this share (0..1) of catalogue requests 503 at random.
    #[arg(long, value_parser = share, default_value_t = 0.0)]
    catalogue_error_rate: f64,
    /// Refuse every creation of a profile field or group with 400.
    #[arg(long)]
    refuse_creations: bool,
    /// Complete each accepted update's list import after a delay drawn at random in this
    /// range of milliseconds, e.g. 0..3000: imports then complete in any order, and reads
    /// show only completed ones.
    #[arg(long, value_name = "MIN..MAX", value_parser = delay_range)]
    import_delay: Option<(Duration, Duration)>,
    /// Lists, profile field groups and fields to start with, from a JSON file:
    /// {"lists":[{"listId":1001,"listName":"Customers","groups":[{"segmentationFieldGroupId":1,
    /// "segmentationFieldGroupName":"Engage Audiences","fields":[{"segmentationFieldId":101,
    /// "segmentationFieldName":"vip_customers","dataType":"CheckBox","maxLength":3}]}]}]}.
    /// Once the fake holds lists, updates to other lists get 404 and updates naming a field
    /// id the list does not have get 400.
    #[arg(long, value_name = "FILE")]
    catalogue: Option<std::path::PathBuf>,
    /// A list to hold, without fields: ID or ID:NAME (repeatable; added to --catalogue's).
    #[arg(long = "list", value_name = "ID[:NAME]", value_parser = seed_list)]
    lists: Vec<SeedList>,
}

fn seed_list(text: &str) -> Result<SeedList, String> {
    let (id, name) = text.split_once(':').unwrap_or((text, ""));
    Ok(SeedList {
        list_id: list_id(id)?,
        list_name: name.to_owned(),
        groups: Vec::new(),
    })
}

fn share(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|share| (0.0..=1.0).contains(share))
        .ok_or_else(|| format!("{text:?} is not a number between 0 and 1"))
}

fn rate(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|rate| rate.is_finite() && *rate > 0.0)
        .ok_or_else(|| format!("{text:?} is not a positive number"))
}

/// `MIN..MAX` milliseconds (or one number, for a fixed delay).
fn delay_range(text: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = text.split_once("..").unwrap_or((text, text));
    let millis = |part: &str| {
        part.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{text:?} is not MIN..MAX milliseconds, such as 0..3000"))
    };
    let (min, max) = (millis(min)?, millis(max)?);
    if min > max {
        return Err(format!("{text:?}: MIN is above MAX"));
    }
    Ok((min, max))
}

fn list_id(text: &str) -> Result<u32, String> {
    text.parse::<ListId>().map(ListId::get)
}

impl Args {
    /// Command line first, then the environment, then the defaults the tests use.
    fn options(self) -> anyhow::Result<FakeOptions> {
        let defaults = FakeOptions::default();
        let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let mut catalogue = match &self.catalogue {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --catalogue {}", path.display()))?;
                serde_json::from_str::<CatalogueSeed>(&text)
                    .with_context(|| format!("--catalogue {} is not a catalogue", path.display()))?
            }
            None => CatalogueSeed::default(),
        };
        catalogue.lists.extend(self.lists);
        catalogue
            .validate()
            .map_err(|why| anyhow::anyhow!("the catalogue is refused: {why}"))?;
        Ok(FakeOptions {
            client_id: self
                .client_id
                .or_else(|| from_env("LISTRAK_CLIENT_ID"))
                .unwrap_or(defaults.client_id),
            client_secret: self
                .client_secret
                .or_else(|| from_env("LISTRAK_CLIENT_SECRET"))
                .unwrap_or(defaults.client_secret),
            faults: Faults {
                latency: self.latency,
                latency_jitter: self.latency_jitter,
                error_rate: self.error_rate,
                throttle_rps: self.throttle_rps,
                retry_after: self.retry_after,
                outage_for: self.outage,
                token_lifetime: self.token_lifetime,
                max_body_bytes: self.max_body_bytes,
                reject_emails: self.reject_emails.into_iter().collect(),
                unknown_lists: self.unknown_lists.into_iter().collect(),
                failing_lists: self.failing_lists.into_iter().collect(),
                catalogue_latency: self.catalogue_latency,
                catalogue_outage_for: self.catalogue_outage,
                catalogue_error_rate: self.catalogue_error_rate,
                refuse_creations: self.refuse_creations,
                import_delay_min: self.import_delay.map_or(Duration::ZERO, |(min, _)| min),
                import_delay_max: self.import_delay.map_or(Duration::ZERO, |(_, max)| max),
            },
            catalogue,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs go to stderr so that stdout carries only the ready line, for scripts to wait on.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let listen = args.listen;
    // A catalogue that cannot be read or holds what Listrak could not is bad usage.
    let options = match args.options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(2);
        }
    };
    tracing::info!(faults = ?options.faults, client_id = %options.client_id, "starting");
    let fake = FakeServer::start(listen, options)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!(
        "listrak-fake ready: api_url={} auth_url={}",
        fake.api_url(),
        fake.auth_url()
    );
    stop_requested()
        .await
        .context("cannot watch for stop signals")?;
    tracing::info!("stop requested");
    fake.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, whichever comes first.
async fn stop_requested() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => interrupted,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
