//! `listrak-bench`: measures the worker against a bare consumer on the same broker; prints a
//! table and writes the same figures as JSON.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use listrak_worker::tools::bench::{self, BenchOptions, Report, Setting};
use listrak_worker::tools::log_bench::LogBenchOptions;

#[derive(Parser)]
#[command(
    name = "listrak-bench",
    about = "Throughput, requests, memory, lag and throttling of listrak-worker"
)]
struct Args {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = listrak_worker::config::DEFAULT_AMQP_URL
    )]
    amqp_url: String,
    /// Events in the backlog.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// The settings a backlog is drained in, as LISTSxLATENCY[/APPEARANCES] (lists, one
    /// audience each; listrak-fake's answer time per request; with /APPEARANCES, each person
    /// appears about that many times, entering and leaving five audiences of each list). The
    /// defaults: one list at a remote API's latency, the most common deployment; eight lists
    /// at a fast one; one list shaped like an Engage space.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1x300ms,8x50ms,1x300ms/10"
    )]
    settings: Vec<Setting>,
    /// The lists and latency of the lag and throttling measurements.
    #[arg(long, default_value = "8x50ms")]
    lag_setting: Setting,
    /// The worker's prefetch; by default the worker sizes its own window, as it does for
    /// its users.
    #[arg(long)]
    prefetch: Option<u16>,
    /// The bare consumer's prefetch (it acks every 100 messages, so a larger window gains
    /// it nothing).
    #[arg(long, default_value_t = 20_000)]
    baseline_prefetch: u16,
    #[arg(long, default_value_t = 1000)]
    max_contacts: usize,
    /// The worker's runtime: current-thread or multi-thread.
    #[arg(long, default_value = "current-thread")]
    runtime: String,
    /// Events per second for the lag measurement (0 skips it).
    #[arg(long, default_value_t = 500)]
    lag_rate: u32,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lag_duration: Duration,
    /// Requests per second a throttling Listrak accepts (0 skips this measurement).
    #[arg(long, default_value_t = 20.0)]
    throttle_rps: f64,
    /// How long throttling is measured, after 10 s of warm-up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    throttle_duration: Duration,
    /// How many times everything is measured; the table shows each figure's median and
    /// every run's figure beside it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Measure the applied log instead: write a week of an account's traffic to a log
    /// directly, then rebuild the guard from it as a worker does at start.
    #[arg(long)]
    applied_log: bool,
    /// The applied-log measurement's account: contacts, audience fields each, and updates
    /// applied in its week.
    #[arg(long, default_value_t = 1_000_000)]
    log_contacts: usize,
    #[arg(long, default_value_t = 3)]
    log_fields: usize,
    #[arg(long, default_value_t = 10_000_000)]
    log_updates: usize,
    /// Measure `ingest` instead: `--events` Engage events into the queue through the
    /// endpoint (single events, then batches of 100, `--ingest-concurrency` requests at a
    /// time), against `publish` from a file, on the same broker.
    #[arg(long)]
    ingest: bool,
    #[arg(long, default_value_t = 16)]
    ingest_concurrency: usize,
    /// Measure read-backs instead: `--events` Engage events for one list (`--lag-setting`'s
    /// latency, each person appearing ten times) into a Listrak whose imports complete 0-3 s
    /// after their 201 in any order; reads, repairs and fields left stale.
    #[arg(long)]
    readback: bool,
    /// With --readback: the share of events published last, after newer ones (late events).
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// With --readback: the worker's reconcile.max_read_rate.
    #[arg(long, default_value_t = 50.0)]
    read_rate: f64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/listrak-bench.json")]
    json: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.applied_log {
        let report = listrak_worker::tools::log_bench::run(LogBenchOptions {
            amqp_url: args.amqp_url,
            contacts: args.log_contacts,
            fields: args.log_fields,
            updates: args.log_updates,
            retried: 0.01,
            dead_lettered: 0.001,
            per_record: args.max_contacts,
            capacity: 200_000,
            watch_capacity: 150_000,
        })
        .await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if args.ingest {
        let report = listrak_worker::tools::ingest_bench::run(
            listrak_worker::tools::ingest_bench::IngestBenchOptions {
                amqp_url: args.amqp_url,
                events: args.events,
                concurrency: args.ingest_concurrency,
            },
        )
        .await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let worker_binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("listrak-worker"))
        .unwrap_or_else(|| PathBuf::from("listrak-worker"));
    let options = BenchOptions {
        amqp_url: args.amqp_url,
        events: args.events,
        settings: args.settings,
        lag_setting: args.lag_setting,
        prefetch: args.prefetch,
        baseline_prefetch: args.baseline_prefetch,
        max_contacts: args.max_contacts,
        runtime: args.runtime,
        worker_binary,
        lag_rate: args.lag_rate,
        lag_duration: args.lag_duration,
        throttle_rps: args.throttle_rps,
        throttle_duration: args.throttle_duration,
    };
    if args.readback {
        let setting = Setting {
            lists: 1,
            latency: options.lag_setting.latency,
            appearances: 10,
        };
        let shape = bench::ReadBackShape {
            late: args.late.clamp(0.0, 1.0),
            max_read_rate: args.read_rate,
            within: Duration::from_secs(3600),
        };
        let report = bench::readbacks(&options, setting, shape).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        if args.runs > 1 {
            eprintln!("run {run} of {}", args.runs);
        }
        runs.push(bench::run(options.clone()).await?);
    }
    print!("{}", Report::table(&runs));
    let report = serde_json::json!({ "median": Report::median(&runs), "runs": runs });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    eprintln!("written to {}", args.json.display());
    Ok(())
}
