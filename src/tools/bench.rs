//! `listrak-bench`: how fast the worker drains a backlog compared with a bare consumer on the
//! same broker and queue kind, how many requests it needs, how much memory, how much lag, and
//! how well it fits under a throttling Listrak.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::commands::publish::event_properties;
use crate::edges::broker::{self, wait_confirm, Publisher, Topology};
use crate::stages::headers::ReadBackQueues;
use crate::stages::model::EventTime;
use crate::tools::fake::{FakeOptions, FakeServer, Faults};

/// One setting a backlog is drained in: how many lists, how long Listrak takes to answer a
/// request, and how often each person appears in the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub lists: usize,
    pub latency: Duration,
    /// 1: every event is about a person of its own, mostly (one audience per list). More:
    /// events shaped like an Engage space, each person appearing about this many times,
    /// entering and leaving [`AUDIENCES`] audiences of each list.
    pub appearances: usize,
}

/// The audiences per list of a setting whose people appear several times.
pub const AUDIENCES: usize = 5;

impl Setting {
    fn audiences(&self) -> usize {
        if self.appearances > 1 {
            AUDIENCES
        } else {
            1
        }
    }
}

impl std::str::FromStr for Setting {
    type Err = String;

    /// `LISTSxLATENCY[/APPEARANCES]`, e.g. `1x300ms` or `1x300ms/10`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (text, appearances) = match text.split_once('/') {
            Some((setting, appearances)) => {
                let appearances = appearances
                    .parse()
                    .ok()
                    .filter(|&n| (1..=1000).contains(&n))
                    .ok_or_else(|| {
                        format!("{appearances:?} is not a number of appearances from 1 to 1000")
                    })?;
                (setting, appearances)
            }
            None => (text, 1),
        };
        let (lists, latency) = text
            .split_once('x')
            .ok_or_else(|| format!("{text:?} is not LISTSxLATENCY, e.g. 1x300ms"))?;
        let lists: usize = lists
            .parse()
            .ok()
            .filter(|&n| (1..=1000).contains(&n))
            .ok_or_else(|| format!("{lists:?} is not a number of lists from 1 to 1000"))?;
        let latency = humantime::parse_duration(latency)
            .ok()
            .filter(|d| *d <= Duration::from_secs(60))
            .ok_or_else(|| format!("{latency:?} is not a latency up to 60s, e.g. 300ms"))?;
        Ok(Self {
            lists,
            latency,
            appearances,
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// One URL, or the URLs of a cluster's nodes separated by commas.
    pub amqp_url: String,
    pub events: usize,
    /// The settings each backlog is drained in, one after another.
    pub settings: Vec<Setting>,
    /// The lists and latency of the lag and throttling measurements.
    pub lag_setting: Setting,
    /// The worker's prefetch; `None`: its own default (sized from its memory budget).
    pub prefetch: Option<u16>,
    /// The bare consumer's prefetch.
    pub baseline_prefetch: u16,
    pub max_contacts: usize,
    /// `current-thread` or `multi-thread`: the worker's runtime.
    pub runtime: String,
    /// The worker binary (`listrak-worker`), run as a child process so its memory is its own.
    pub worker_binary: PathBuf,
    /// Events per second for the lag measurement, and for how long.
    pub lag_rate: u32,
    pub lag_duration: Duration,
    /// Requests per second the throttling fake accepts (0: skip that measurement).
    pub throttle_rps: f64,
    pub throttle_duration: Duration,
}

impl BenchOptions {
    /// `amqp_url`'s URLs: several nodes of one cluster are separated by commas, as `AMQP_URL`
    /// takes them. The worker is given them all.
    pub fn amqp_urls(&self) -> Vec<&str> {
        self.amqp_url.split(',').map(str::trim).collect()
    }

    /// The node the benchmark's own connections (publishing, the bare consumer) use.
    pub fn first_amqp_url(&self) -> &str {
        self.amqp_urls()[0]
    }
}

/// The figures of one backlog drained in one setting.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Drain {
    pub events: usize,
    pub lists: usize,
    pub latency_ms: u128,
    /// About how many times each person appears in the backlog (see [`Setting`]).
    pub appearances: usize,
    pub baseline_events_per_second: f64,
    pub worker_events_per_second: f64,
    pub ratio: f64,
    pub requests: usize,
    pub minimum_requests: usize,
    /// Contacts per request, on average, against `max_contacts`.
    pub contacts_per_request: f64,
    pub max_contacts: usize,
    pub worker_peak_rss_mib: f64,
    /// Acknowledgement frames the worker sent, and how many acked one message alone (each
    /// costs RabbitMQ about what a `multiple` one does).
    pub ack_frames: f64,
    pub single_acks: f64,
    /// CPU time (user and system, from `/proc`) per 100,000 events drained.
    pub worker_cpu_seconds_per_100k: f64,
    pub baseline_cpu_seconds_per_100k: f64,
    /// The local RabbitMQ's CPU time per 100,000 events while each drained (0: not found).
    pub broker_cpu_seconds_per_100k_worker: f64,
    pub broker_cpu_seconds_per_100k_baseline: f64,
    /// How many of the machine's cores were busy, on average, while each drained (every
    /// process: the worker, RabbitMQ, the stand-in, everything else), of `cores`.
    pub cores_busy_worker: f64,
    pub cores_busy_baseline: f64,
    pub cores: usize,
    /// The worker's window of unacknowledged messages, as it reported it.
    pub worker_prefetch: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub runtime: String,
    pub drains: Vec<Drain>,
    pub lag_rate: u32,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub throttle_rps: f64,
    pub throttle_accepted_per_second: f64,
    pub throttle_accepted_share: f64,
    pub throttle_429_share: f64,
}

/// Engage events for a setting: people entering and leaving its lists' audiences. Returns
/// the bodies and, per list, how many distinct contacts they touch.
fn engage_events(events: usize, setting: Setting, seed: u64) -> (Vec<Vec<u8>>, Vec<usize>) {
    let backlog = engage_backlog(events, setting, seed);
    (backlog.bodies, backlog.contacts_per_list)
}

/// Engage events and where they leave each person.
struct Backlog {
    bodies: Vec<Vec<u8>>,
    contacts_per_list: Vec<usize>,
    /// (person, list, audience) → in the audience after the last event.
    last: HashMap<(usize, usize, usize), bool>,
}

fn engage_backlog(events: usize, setting: Setting, seed: u64) -> Backlog {
    let mut rng = StdRng::seed_from_u64(seed);
    // With one appearance, about 6% of events flip a contact already seen on the same list.
    let people = (events / setting.appearances).max(1);
    let audiences = setting.audiences();
    let mut member: HashMap<(usize, usize, usize), bool> = HashMap::new();
    let mut contacts: Vec<HashSet<usize>> = vec![HashSet::new(); setting.lists];
    let mut bodies = Vec::with_capacity(events);
    // One millisecond apart, ending now: every event has a time of its own (the times
    // events carry have millisecond precision), so their order is never a tie.
    let start = EventTime::now().0 - i64::try_from(events).unwrap_or(i64::MAX) * 1000;
    for index in 0..events {
        let person = rng.random_range(0..people);
        let list = rng.random_range(0..setting.lists);
        let audience = rng.random_range(0..audiences);
        let entered = !member
            .get(&(person, list, audience))
            .copied()
            .unwrap_or(false);
        member.insert((person, list, audience), entered);
        contacts[list].insert(person);
        let key = audience_key(list, audience, audiences);
        let at = EventTime(start + i64::try_from(index).unwrap_or(i64::MAX) * 1000);
        bodies.push(engage_event(index, &key, person, entered, at));
    }
    Backlog {
        bodies,
        contacts_per_list: contacts.iter().map(HashSet::len).collect(),
        last: member,
    }
}

fn audience_key(list: usize, audience: usize, audiences: usize) -> String {
    if audiences == 1 {
        format!("bench_audience_{list}")
    } else {
        format!("bench_audience_{list}_{audience}")
    }
}

fn engage_event(
    index: usize,
    audience: &str,
    person: usize,
    entered: bool,
    at: EventTime,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "track",
        "event": if entered { "Audience Entered" } else { "Audience Exited" },
        "messageId": format!("bench-{index}"),
        "timestamp": at.to_rfc3339(),
        "userId": format!("user-{person}"),
        "properties": { "audience_key": audience, audience: entered },
        "context": {
            "traits": { "email": format!("person{person}@example.com") },
            "personas": {
                "computation_key": audience,
                "computation_class": "audience",
                "space_id": "spa_bench"
            }
        }
    }))
    .expect("JSON")
}

fn config(
    options: &BenchOptions,
    setting: Setting,
    queue: &str,
    fake: &FakeServer,
    listen: SocketAddr,
) -> String {
    let credentials = FakeOptions::default();
    let prefetch = options
        .prefetch
        .map_or(String::new(), |p| format!("prefetch = {p}"));
    let mut text = format!(
        r#"
[amqp]
url = [{amqp}]
exchange = "{queue}"
queue = "{queue}"
{prefetch}

[listrak]
client_id = "{id}"
client_secret = "{secret}"
api_url = "{api}"
auth_url = "{auth}"

[batch]
max_contacts = {max_contacts}

[http]
listen = "{listen}"
"#,
        amqp = options
            .amqp_urls()
            .iter()
            .map(|url| crate::config::toml_str(url))
            .collect::<Vec<_>>()
            .join(", "),
        id = credentials.client_id,
        secret = credentials.client_secret,
        api = fake.api_url(),
        auth = fake.auth_url(),
        max_contacts = options.max_contacts,
    );
    let audiences = setting.audiences();
    for list in 0..setting.lists {
        for audience in 0..audiences {
            text.push_str(&format!(
                "\n[[mappings]]\nname = \"bench-{list}-{audience}\"\nevents = [\"Audience \
                 Entered\", \"Audience Exited\"]\naudience_key = \"{key}\"\nlist_id = {}\n\
                 profile_fields = {{ \"{}\" = \"useAudienceKey\" }}\n",
                1000 + list,
                100 + audience,
                key = audience_key(list, audience, audiences),
            ));
        }
    }
    text
}

async fn publish_all(
    publisher: &Publisher,
    exchange: &str,
    bodies: &[Vec<u8>],
) -> anyhow::Result<()> {
    let mut window = std::collections::VecDeque::new();
    for body in bodies {
        window.push_back(
            publisher
                .start(exchange, "track", body, event_properties(body))
                .await?,
        );
        if window.len() >= 2000 {
            wait_confirm(window.pop_front().expect("non-empty")).await?;
        }
    }
    for confirm in window {
        wait_confirm(confirm).await?;
    }
    Ok(())
}

/// What one drain cost the machine: the drainer's CPU, the broker's, and every core's.
struct CpuMeter {
    started: Instant,
    drainer: String,
    /// The local RabbitMQ's processes, found once: a drain does not restart the broker.
    broker: Vec<String>,
    drainer_at_start: f64,
    broker_at_start: f64,
    machine_at_start: f64,
}

/// How fast one drain went and what it cost, per 100,000 events.
struct DrainCost {
    events_per_second: f64,
    cpu_seconds_per_100k: f64,
    broker_cpu_seconds_per_100k: f64,
    cores_busy: f64,
}

impl CpuMeter {
    /// Starts measuring `drainer` (`self` or a pid), the broker and the machine.
    fn start(drainer: String) -> Self {
        let broker = broker_processes();
        Self {
            started: Instant::now(),
            drainer_at_start: cpu_seconds(&drainer),
            broker_at_start: broker.iter().map(|pid| cpu_seconds(pid)).sum(),
            machine_at_start: machine_busy_seconds(),
            drainer,
            broker,
        }
    }

    fn stop(&self, events: usize) -> DrainCost {
        let elapsed = self.started.elapsed().as_secs_f64();
        let broker: f64 = self.broker.iter().map(|pid| cpu_seconds(pid)).sum();
        DrainCost {
            events_per_second: events as f64 / elapsed,
            cpu_seconds_per_100k: per_100k(
                cpu_seconds(&self.drainer) - self.drainer_at_start,
                events,
            ),
            broker_cpu_seconds_per_100k: per_100k(broker - self.broker_at_start, events),
            cores_busy: (machine_busy_seconds() - self.machine_at_start) / elapsed,
        }
    }
}

/// The ceiling: a bare consumer that only decodes and acks (one `multiple` ack per 100).
async fn baseline(options: &BenchOptions, bodies: &[Vec<u8>]) -> anyhow::Result<DrainCost> {
    let queue = format!("listrak-bench.baseline.{}", std::process::id());
    let topology = Topology::new(&queue, &queue, &[Duration::from_secs(10)]);
    let connection =
        broker::connect_url(options.first_amqp_url(), "listrak-bench baseline").await?;
    let publisher = Publisher::new(&connection).await?;
    topology.declare(&connection).await?;
    publish_all(&publisher, &topology.exchange, bodies).await?;

    let channel = connection.create_channel().await?;
    channel
        .basic_qos(options.baseline_prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut meter = None;
    let mut consumed = 0usize;
    while consumed < bodies.len() {
        let delivery = consumer.next().await.context("consumer ended")??;
        meter.get_or_insert_with(|| CpuMeter::start("self".into()));
        let _: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        consumed += 1;
        if consumed.is_multiple_of(100) || consumed == bodies.len() {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let cost = meter
        .context("the baseline received nothing")?
        .stop(bodies.len());
    topology.delete(publisher.channel()).await?;
    connection.close(200, "done".into()).await?;
    Ok(cost)
}

/// User and system CPU time of a process (`self` or a pid) so far, from `/proc`.
fn cpu_seconds(process: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{process}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), from the third: state, ppid…;
    // utime and stime are the 14th and 15th fields of the whole line.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
        return 0.0;
    };
    (user + system) / clock_ticks_per_second()
}

/// The pids of the local RabbitMQ (the Erlang VM, `beam.smp`); none for a broker elsewhere.
fn broker_processes() -> Vec<String> {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
        .collect()
}

/// CPU time every core has spent busy since boot, from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| busy_ticks(&stat))
        .map_or(0.0, |ticks| ticks / clock_ticks_per_second())
}

/// The busy ticks of `/proc/stat`'s `cpu` line: all of user, nice, system, idle, iowait,
/// irq, softirq and steal but idle and iowait (guest time is counted inside user).
fn busy_ticks(stat: &str) -> Option<f64> {
    let total = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = total
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let waiting = ticks.get(3)? + ticks.get(4)?;
    Some(ticks.iter().sum::<f64>() - waiting)
}

fn clock_ticks_per_second() -> f64 {
    // The kernel's USER_HZ, 100 on every Linux this runs on; `getconf CLK_TCK` tells. Read
    // once: a measurement should not wait for a process to start.
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn per_100k(seconds: f64, events: usize) -> f64 {
    seconds * 100_000.0 / events.max(1) as f64
}

struct WorkerProcess {
    child: Child,
    metrics_url: String,
    /// One client for every scrape: a client per scrape loaded the system's certificates
    /// each time, and took CPU from the worker it was measuring.
    scraper: reqwest::Client,
    config: PathBuf,
}

impl WorkerProcess {
    /// Starts the worker on `queue` against `fake`, with its metrics on a free port.
    fn spawn(
        options: &BenchOptions,
        setting: Setting,
        queue: &str,
        fake: &FakeServer,
        tag: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(options, setting, queue, fake, tag, "")
    }

    /// As [`Self::spawn`], with `extra` tables added to the configuration.
    fn spawn_with(
        options: &BenchOptions,
        setting: Setting,
        queue: &str,
        fake: &FakeServer,
        tag: &str,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let listen = free_port()?;
        let config =
            std::env::temp_dir().join(format!("listrak-bench-{tag}-{}.toml", std::process::id()));
        let text = self::config(options, setting, queue, fake, listen);
        std::fs::write(&config, format!("{extra}\n{text}"))?;
        let child = Command::new(&options.worker_binary)
            .args(["run", "--runtime", &options.runtime, "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it: cargo build --release --bins)",
                    options.worker_binary.display()
                )
            })?;
        Ok(Self {
            child,
            metrics_url: format!("http://{listen}/metrics"),
            scraper: reqwest::Client::new(),
            config,
        })
    }

    async fn acked(&self) -> Option<f64> {
        self.counter("listrak_messages_acked_total").await
    }

    /// The sum of a counter's series; `None` while the metrics endpoint does not answer.
    async fn counter(&self, name: &str) -> Option<f64> {
        Some(series_sum(&self.scrape().await?, name))
    }

    /// The metrics endpoint's text; `None` while it does not answer.
    async fn scrape(&self) -> Option<String> {
        self.scraper
            .get(&self.metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    async fn wait_acked(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.acked().await.unwrap_or(0.0) >= count as f64 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the worker did not settle {count} events within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn fake(faults: Faults) -> anyhow::Result<(FakeServer, Instant)> {
    let started = Instant::now();
    let fake = FakeServer::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        FakeOptions {
            faults,
            ..FakeOptions::default()
        },
    )
    .await?;
    Ok((fake, started))
}

/// The `reconcile.after` the worker of a measurement runs with.
fn reconcile_after(tag: &str) -> Duration {
    if tag == READBACK_TAG {
        READBACK_AFTER
    } else {
        crate::config::DEFAULT_RECONCILE_AFTER
    }
}

async fn with_queue<T>(
    options: &BenchOptions,
    tag: &str,
    run: impl AsyncFnOnce(&Publisher, &Topology) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let queue = format!("listrak-bench.{tag}.{}", std::process::id());
    let connection = broker::connect_url(options.first_amqp_url(), "listrak-bench").await?;
    let publisher = Publisher::new(&connection).await?;
    let topology = Topology::new(
        &queue,
        &queue,
        &[
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(600),
            Duration::from_secs(3600),
            Duration::from_secs(4 * 3600),
        ],
    );
    // The worker declares its read-back queues (at the default `reconcile.after`, or the
    // read-back measurement's); they go with the others.
    let mut topology = topology;
    topology.readback = Some(ReadBackQueues::of(&queue, reconcile_after(tag)));
    topology.declare(&connection).await?;
    let result = run(&publisher, &topology).await;
    if let Err(error) = topology.delete(publisher.channel()).await {
        // RabbitMQ 3.10's quorum-queue log writer can crash while a queue it is compacting is
        // deleted (`ra_log_segment_writer`, `enoent`), closing this connection with
        // INTERNAL_ERROR; it restarts at once, so the deletion is tried on a new connection
        // rather than ending the benchmark and leaving the queues behind.
        eprintln!("deleting {queue} failed ({error}); trying again on a new connection");
        let again = broker::connect_url(options.first_amqp_url(), "listrak-bench").await?;
        let publisher = Publisher::new(&again).await?;
        topology.delete(publisher.channel()).await?;
        let _ = again.close(200, "done".into()).await;
    } else {
        connection.close(200, "done".into()).await?;
    }
    result
}

pub async fn run(options: BenchOptions) -> anyhow::Result<Report> {
    crate::edges::listrak::install_crypto_provider();
    let mut report = Report {
        runtime: options.runtime.clone(),
        lag_rate: options.lag_rate,
        throttle_rps: options.throttle_rps,
        ..Report::default()
    };
    for setting in &options.settings {
        report.drains.push(drain(&options, *setting).await?);
    }

    if options.lag_rate > 0 {
        eprintln!(
            "lag: {} events per second for {:?}…",
            options.lag_rate, options.lag_duration
        );
        let (p50, p99) = with_queue(&options, "lag", async |publisher, topology| {
            lag(&options, publisher, topology).await
        })
        .await?;
        report.lag_p50_ms = p50;
        report.lag_p99_ms = p99;
    }
    if options.throttle_rps > 0.0 {
        eprintln!(
            "throttle: listrak-fake accepting {} requests per second…",
            options.throttle_rps
        );
        let (accepted, share_429) =
            with_queue(&options, "throttle", async |publisher, topology| {
                throttle(&options, publisher, topology).await
            })
            .await?;
        report.throttle_accepted_per_second = accepted;
        report.throttle_accepted_share = accepted / options.throttle_rps;
        report.throttle_429_share = share_429;
    }
    Ok(report)
}

/// Drains the same backlog with a bare consumer, then with the worker.
async fn drain(options: &BenchOptions, setting: Setting) -> anyhow::Result<Drain> {
    let (bodies, contacts_per_list) = engage_events(options.events, setting, 42);
    let mut report = Drain {
        events: options.events,
        lists: setting.lists,
        latency_ms: setting.latency.as_millis(),
        appearances: setting.appearances,
        max_contacts: options.max_contacts,
        minimum_requests: contacts_per_list
            .iter()
            .map(|c| c.div_ceil(options.max_contacts))
            .sum(),
        ..Drain::default()
    };

    eprintln!(
        "{} lists, {:?} per request — baseline: a bare consumer draining {} events…",
        setting.lists, setting.latency, options.events
    );
    report.cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let baseline = baseline(options, &bodies).await?;
    report.baseline_events_per_second = baseline.events_per_second;
    report.baseline_cpu_seconds_per_100k = baseline.cpu_seconds_per_100k;
    report.broker_cpu_seconds_per_100k_baseline = baseline.broker_cpu_seconds_per_100k;
    report.cores_busy_baseline = baseline.cores_busy;

    eprintln!("worker: draining the same backlog into listrak-fake…");
    with_queue(options, "drain", async |publisher, topology| {
        publish_all(publisher, &topology.exchange, &bodies).await?;
        let (fake, _) = fake(Faults {
            latency: setting.latency,
            ..Faults::default()
        })
        .await?;
        let worker = WorkerProcess::spawn(options, setting, &topology.queue, &fake, "drain")?;
        // Timed from the first message received, as the baseline is: process start-up
        // (connection, topology, consumer) is not draining.
        while worker
            .counter("listrak_messages_received_total")
            .await
            .unwrap_or(0.0)
            == 0.0
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let meter = CpuMeter::start(worker.child.id().to_string());
        let result = worker
            .wait_acked(bodies.len(), Duration::from_secs(600))
            .await;
        let cost = meter.stop(bodies.len());
        report.worker_events_per_second = cost.events_per_second;
        report.worker_cpu_seconds_per_100k = cost.cpu_seconds_per_100k;
        report.broker_cpu_seconds_per_100k_worker = cost.broker_cpu_seconds_per_100k;
        report.cores_busy_worker = cost.cores_busy;
        report.worker_peak_rss_mib = worker.peak_rss_mib();
        let metrics = worker.scrape().await.unwrap_or_default();
        report.worker_prefetch = series_sum(&metrics, "listrak_prefetch_window");
        report.ack_frames = series_sum(&metrics, "listrak_ack_frames_total");
        report.single_acks = series_sum(&metrics, r#"listrak_ack_frames_total{kind="single"}"#);
        worker.stop();
        result?;
        let requests = fake.requests();
        report.requests = requests.len();
        report.contacts_per_request = requests
            .iter()
            .map(|r| r.contacts.unwrap_or(0))
            .sum::<usize>() as f64
            / requests.len().max(1) as f64;
        fake.shutdown().await;
        Ok(())
    })
    .await?;
    report.ratio = report.worker_events_per_second / report.baseline_events_per_second;
    Ok(report)
}

/// Publishes at a steady rate, each event to a new contact and stamped when published, and
/// measures from the stamp to the moment Listrak answered the request that carried it.
async fn lag(
    options: &BenchOptions,
    publisher: &Publisher,
    topology: &Topology,
) -> anyhow::Result<(f64, f64)> {
    let setting = options.lag_setting;
    let (fake, fake_started) = fake(Faults {
        latency: setting.latency,
        ..Faults::default()
    })
    .await?;
    let worker = WorkerProcess::spawn(options, setting, &topology.queue, &fake, "lag")?;
    while worker.acked().await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = (options.lag_rate as f64 * options.lag_duration.as_secs_f64()) as usize;
    let mut published_at: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / options.lag_rate as f64));
    for index in 0..total {
        ticker.tick().await;
        let person = 10_000_000 + index;
        let audience = audience_key(index % setting.lists, 0, setting.audiences());
        let body = engage_event(index, &audience, person, true, EventTime::now());
        published_at.insert(format!("person{person}@example.com"), Instant::now());
        let confirm = publisher
            .start(&topology.exchange, "track", &body, event_properties(&body))
            .await?;
        drop(confirm);
    }
    worker.wait_acked(total, Duration::from_secs(120)).await?;
    worker.stop();
    let mut lags: Vec<f64> = Vec::with_capacity(total);
    for request in fake.requests().iter().filter(|r| r.status == 201) {
        let answered = fake_started + request.elapsed + setting.latency;
        for email in &request.emails {
            if let Some(at) = published_at.get(email) {
                lags.push(answered.saturating_duration_since(*at).as_secs_f64() * 1000.0);
            }
        }
    }
    fake.shutdown().await;
    lags.sort_by(f64::total_cmp);
    anyhow::ensure!(!lags.is_empty(), "no event was applied");
    let quantile = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
    Ok((quantile(0.5), quantile(0.99)))
}

/// Drains a backlog into a fake that answers 429 above a fixed rate (no `Retry-After`), and
/// measures, after the first 10 seconds, the accepted requests per second and the share of 429.
async fn throttle(
    options: &BenchOptions,
    publisher: &Publisher,
    topology: &Topology,
) -> anyhow::Result<(f64, f64)> {
    let warmup = Duration::from_secs(10);
    // Enough requests to keep the fake busy well past the measured window.
    let max_contacts = 20;
    let wanted = (options.throttle_rps * (warmup + options.throttle_duration).as_secs_f64() * 1.5)
        as usize
        * max_contacts;
    let setting = options.lag_setting;
    let (bodies, _) = engage_events(wanted, setting, 7);
    publish_all(publisher, &topology.exchange, &bodies).await?;
    let (fake, _) = fake(Faults {
        latency: setting.latency,
        throttle_rps: Some(options.throttle_rps),
        ..Faults::default()
    })
    .await?;
    let throttled = BenchOptions {
        max_contacts,
        ..options.clone()
    };
    let worker = WorkerProcess::spawn(&throttled, setting, &topology.queue, &fake, "throttle")?;
    while fake.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(warmup + options.throttle_duration).await;
    worker.stop();
    let first = fake
        .requests()
        .first()
        .map(|r| r.elapsed)
        .unwrap_or_default();
    let window = first + warmup..first + warmup + options.throttle_duration;
    let measured: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| window.contains(&r.elapsed))
        .collect();
    fake.shutdown().await;
    let accepted = measured.iter().filter(|r| r.status == 201).count() as f64;
    let throttled_count = measured.iter().filter(|r| r.status == 429).count() as f64;
    Ok((
        accepted / options.throttle_duration.as_secs_f64(),
        throttled_count / (measured.len().max(1)) as f64,
    ))
}

/// The sum of the series of Prometheus text whose line starts with `name` (a metric's name,
/// or its name and labels).
fn series_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The median of one figure over several runs.
fn median_of<T>(runs: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

impl Drain {
    /// Each figure's median over `runs` of the same setting. The ratio is the median of
    /// each run's own ratio: a run's baseline and worker share the broker's state then.
    fn median(runs: &[&Drain]) -> Drain {
        let of = |figure: fn(&Drain) -> f64| median_of(runs, |r| figure(r));
        let first = runs.first().copied().cloned().unwrap_or_default();
        Drain {
            baseline_events_per_second: of(|r| r.baseline_events_per_second),
            worker_events_per_second: of(|r| r.worker_events_per_second),
            ratio: of(|r| r.ratio),
            requests: of(|r| r.requests as f64) as usize,
            contacts_per_request: of(|r| r.contacts_per_request),
            worker_peak_rss_mib: of(|r| r.worker_peak_rss_mib),
            ack_frames: of(|r| r.ack_frames),
            single_acks: of(|r| r.single_acks),
            worker_cpu_seconds_per_100k: of(|r| r.worker_cpu_seconds_per_100k),
            baseline_cpu_seconds_per_100k: of(|r| r.baseline_cpu_seconds_per_100k),
            broker_cpu_seconds_per_100k_worker: of(|r| r.broker_cpu_seconds_per_100k_worker),
            broker_cpu_seconds_per_100k_baseline: of(|r| r.broker_cpu_seconds_per_100k_baseline),
            cores_busy_worker: of(|r| r.cores_busy_worker),
            cores_busy_baseline: of(|r| r.cores_busy_baseline),
            worker_prefetch: of(|r| r.worker_prefetch),
            ..first
        }
    }

    fn rows(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |label: &str, value: String| rows.push((label.to_string(), value));
        row(
            "setting",
            format!(
                "{} events over {} list{}, {} ms per request{}",
                self.events,
                self.lists,
                if self.lists == 1 { "" } else { "s" },
                self.latency_ms,
                if self.appearances > 1 {
                    format!(
                        ", each person ~{} times over {AUDIENCES} audiences",
                        self.appearances
                    )
                } else {
                    String::new()
                }
            ),
        );
        row(
            "  baseline (bare consumer)",
            format!("{:.0} events/s", self.baseline_events_per_second),
        );
        row(
            "  worker",
            format!("{:.0} events/s", self.worker_events_per_second),
        );
        row("  worker / baseline", format!("{:.2}", self.ratio));
        row(
            "  HTTP requests",
            format!("{} (minimum {})", self.requests, self.minimum_requests),
        );
        row(
            "  contacts per request",
            format!(
                "{:.0} ({:.1}% of max_contacts {})",
                self.contacts_per_request,
                self.contacts_per_request * 100.0 / self.max_contacts.max(1) as f64,
                self.max_contacts
            ),
        );
        row(
            "  worker peak RSS",
            format!(
                "{:.1} MiB (window {:.0} messages)",
                self.worker_peak_rss_mib, self.worker_prefetch
            ),
        );
        row(
            "  acks sent alone",
            format!(
                "{:.0} of {:.0} ack frames",
                self.single_acks, self.ack_frames
            ),
        );
        row(
            "  CPU s per 100k events",
            format!(
                "worker {:.2}, baseline {:.2}",
                self.worker_cpu_seconds_per_100k, self.baseline_cpu_seconds_per_100k
            ),
        );
        row(
            "  RabbitMQ CPU s per 100k",
            format!(
                "while the worker drains {:.2}, the baseline {:.2}",
                self.broker_cpu_seconds_per_100k_worker, self.broker_cpu_seconds_per_100k_baseline
            ),
        );
        row(
            "  machine cores busy",
            format!(
                "worker {:.2}, baseline {:.2} (of {})",
                self.cores_busy_worker, self.cores_busy_baseline, self.cores
            ),
        );
        rows
    }
}

impl Report {
    /// Each figure's median over `runs`, setting by setting.
    pub fn median(runs: &[Report]) -> Report {
        let of = |figure: fn(&Report) -> f64| median_of(runs, figure);
        let first = runs.first();
        let settings = first.map_or(0, |r| r.drains.len());
        Report {
            runtime: first.map(|r| r.runtime.clone()).unwrap_or_default(),
            drains: (0..settings)
                .map(|i| {
                    let same: Vec<&Drain> = runs.iter().filter_map(|r| r.drains.get(i)).collect();
                    Drain::median(&same)
                })
                .collect(),
            lag_rate: first.map_or(0, |r| r.lag_rate),
            lag_p50_ms: of(|r| r.lag_p50_ms),
            lag_p99_ms: of(|r| r.lag_p99_ms),
            throttle_rps: first.map_or(0.0, |r| r.throttle_rps),
            throttle_accepted_per_second: of(|r| r.throttle_accepted_per_second),
            throttle_accepted_share: of(|r| r.throttle_accepted_share),
            throttle_429_share: of(|r| r.throttle_429_share),
        }
    }

    /// One line per figure: the median over `runs`, then each run's figure side by side.
    pub fn table(runs: &[Report]) -> String {
        let median = Report::median(runs);
        let each: Vec<Vec<(String, String)>> = runs.iter().map(Report::rows).collect();
        let rows = median.rows();
        let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let value_width = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        let mut out = String::new();
        if runs.len() > 1 {
            let _ = writeln!(out, "{:<width$}  median of {} runs", "", runs.len());
        }
        for (index, (label, value)) in rows.iter().enumerate() {
            let _ = write!(out, "{label:<width$}  {value}");
            let per_run: Vec<&str> = each.iter().map(|rows| rows[index].1.as_str()).collect();
            // A setting's first row describes the input, the same in every run.
            if runs.len() > 1 && label.starts_with(' ') {
                let _ = write!(
                    out,
                    "{:pad$}  runs: {}",
                    "",
                    per_run.join(" | "),
                    pad = value_width - value.len()
                );
            }
            out.push('\n');
        }
        out
    }

    fn rows(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = Vec::new();
        for drain in &self.drains {
            rows.extend(drain.rows());
        }
        let mut row = |label: &str, value: String| rows.push((label.to_string(), value));
        row("runtime", self.runtime.clone());
        if self.lag_rate > 0 {
            row(
                "event lag at",
                format!(
                    "{} events/s: p50 {:.0} ms, p99 {:.0} ms",
                    self.lag_rate, self.lag_p50_ms, self.lag_p99_ms
                ),
            );
        }
        if self.throttle_rps > 0.0 {
            row(
                "throttled at",
                format!(
                    "{} req/s: {:.1} accepted/s ({:.0}%), {:.1}% answered 429",
                    self.throttle_rps,
                    self.throttle_accepted_per_second,
                    self.throttle_accepted_share * 100.0,
                    self.throttle_429_share * 100.0
                ),
            );
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_sum_adds_every_series_of_a_name_or_the_ones_its_labels_pick() {
        let text = "# HELP listrak_ack_frames_total Acknowledgement frames sent.\n\
                    listrak_ack_frames_total{kind=\"multiple\"} 440\n\
                    listrak_ack_frames_total{kind=\"single\"} 3\n\
                    listrak_prefetch_window 49152\n";
        assert_eq!(series_sum(text, "listrak_ack_frames_total"), 443.0);
        assert_eq!(
            series_sum(text, r#"listrak_ack_frames_total{kind="single"}"#),
            3.0
        );
        assert_eq!(series_sum(text, "listrak_prefetch_window"), 49152.0);
        assert_eq!(series_sum(text, "listrak_missing"), 0.0);
    }

    fn run(baseline: f64, worker: f64, requests: usize) -> Report {
        Report {
            runtime: "current-thread".into(),
            drains: vec![Drain {
                events: 1000,
                lists: 2,
                baseline_events_per_second: baseline,
                worker_events_per_second: worker,
                ratio: worker / baseline,
                requests,
                ..Drain::default()
            }],
            ..Report::default()
        }
    }

    #[test]
    fn each_figure_is_the_median_of_its_runs_and_the_ratio_that_of_the_runs_ratios() {
        let runs = [
            run(100.0, 90.0, 5),
            run(200.0, 100.0, 7),
            run(50.0, 40.0, 6),
        ];
        let median = &Report::median(&runs).drains[0];
        assert_eq!(median.baseline_events_per_second, 100.0);
        assert_eq!(median.worker_events_per_second, 90.0);
        assert_eq!(median.ratio, 0.8, "ratios 0.9, 0.5, 0.8");
        assert_eq!(median.requests, 6);
        let table = Report::table(&runs);
        assert!(table.contains("median of 3 runs"), "{table}");
        assert!(
            table.contains("runs: 90 events/s | 100 events/s | 40 events/s"),
            "{table}"
        );
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(busy_ticks(stat), Some(161.0));
        assert_eq!(busy_ticks("intr 1 2 3\n"), None);
        assert_eq!(busy_ticks("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn a_setting_reads_as_lists_x_latency() {
        assert_eq!(
            "1x300ms".parse::<Setting>(),
            Ok(Setting {
                lists: 1,
                latency: Duration::from_millis(300),
                appearances: 1,
            })
        );
        assert_eq!(
            "1x300ms/10".parse::<Setting>().map(|s| s.appearances),
            Ok(10)
        );
        assert!("1x300ms/0".parse::<Setting>().is_err());
        assert!("0x300ms".parse::<Setting>().is_err());
        assert!("8".parse::<Setting>().is_err());
        assert!("8xsoon".parse::<Setting>().is_err());
    }
}

const READBACK_TAG: &str = "readback";
/// `reconcile.after` in the read-back measurement: imports complete within 3 s.
const READBACK_AFTER: Duration = Duration::from_secs(5);

/// The read-back measurement's knobs.
#[derive(Debug, Clone, Copy)]
pub struct ReadBackShape {
    /// The share of events published last, after newer ones.
    pub late: f64,
    /// `reconcile.max_read_rate`.
    pub max_read_rate: f64,
    /// How long after the drain Listrak may take to hold every newest value.
    pub within: Duration,
}

/// What read-backs cost and repair on an Engage-shaped backlog whose imports complete out of
/// order.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReadBackReport {
    pub events: usize,
    /// Events published after all the others, though older than many of them.
    pub late_events: usize,
    pub max_read_rate: f64,
    pub contacts: usize,
    /// (contact, audience field) pairs the backlog sets.
    pub keys: usize,
    /// Keys on another value than their newest once the backlog was drained and every
    /// import completed: what would stay without read-backs.
    pub stale_after_drain: usize,
    pub stale_at_end: usize,
    /// From the last ack until no key was stale.
    pub seconds_to_exact: f64,
    pub keys_scheduled: f64,
    pub reads: f64,
    pub repairs: f64,
    pub reads_per_1000_contacts: f64,
    pub repairs_per_1000_contacts: f64,
    pub drain_events_per_second: f64,
}

/// Drains an Engage-shaped backlog (one list, `setting`'s latency and appearances) into a
/// Listrak whose imports complete 0–3 s after their 201 in any order, with read-backs
/// `READBACK_AFTER` after each update at risk, and waits until Listrak holds every newest
/// value (or `within` passes).
pub async fn readbacks(
    options: &BenchOptions,
    setting: Setting,
    shape: ReadBackShape,
) -> anyhow::Result<ReadBackReport> {
    crate::edges::listrak::install_crypto_provider();
    let mut backlog = engage_backlog(options.events, setting, 11);
    // Late events: older than others already published, they come last.
    let mut rng = StdRng::seed_from_u64(12);
    let (mut on_time, mut late) = (Vec::new(), Vec::new());
    for body in std::mem::take(&mut backlog.bodies) {
        if rng.random_bool(shape.late) {
            late.push(body);
        } else {
            on_time.push(body);
        }
    }
    let late_events = late.len();
    on_time.extend(late);
    backlog.bodies = on_time;
    let mut report = ReadBackReport {
        events: options.events,
        late_events,
        max_read_rate: shape.max_read_rate,
        contacts: backlog.contacts_per_list.iter().sum(),
        keys: backlog.last.len(),
        ..ReadBackReport::default()
    };
    let stale = |fake: &FakeServer| {
        backlog
            .last
            .iter()
            .filter(|((person, list, audience), entered)| {
                let held = fake.value(
                    1000 + *list as u32,
                    &format!("person{person}@example.com"),
                    100 + *audience as u32,
                );
                held.as_deref() != Some(if **entered { "on" } else { "off" })
            })
            .count()
    };
    with_queue(options, READBACK_TAG, async |publisher, topology| {
        publish_all(publisher, &topology.exchange, &backlog.bodies).await?;
        let (fake, _) = fake(Faults {
            latency: setting.latency,
            import_delay_max: Duration::from_secs(3),
            ..Faults::default()
        })
        .await?;
        let after = humantime::format_duration(READBACK_AFTER);
        let worker = WorkerProcess::spawn_with(
            options,
            setting,
            &topology.queue,
            &fake,
            READBACK_TAG,
            &format!(
                "[reconcile]\nafter = \"{after}\"\nmax_read_rate = {}\n",
                shape.max_read_rate
            ),
        )?;
        let started = Instant::now();
        worker
            .wait_acked(backlog.bodies.len(), Duration::from_secs(600))
            .await?;
        report.drain_events_per_second =
            backlog.bodies.len() as f64 / started.elapsed().as_secs_f64();
        let drained = Instant::now();
        while fake.imports_pending() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.stale_after_drain = stale(&fake);
        loop {
            report.stale_at_end = stale(&fake);
            if report.stale_at_end == 0 || drained.elapsed() > shape.within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        report.seconds_to_exact = drained.elapsed().as_secs_f64();
        // The repairs' own read-backs confirm them; let them finish before counting.
        tokio::time::sleep(READBACK_AFTER * 2).await;
        let metrics = worker.scrape().await.unwrap_or_default();
        report.keys_scheduled = series_sum(
            &metrics,
            r#"listrak_reconcile_scheduled_total{outcome="scheduled"}"#,
        );
        report.reads = series_sum(&metrics, "listrak_reconcile_reads_total");
        report.repairs = series_sum(&metrics, "listrak_reconcile_repairs_total");
        worker.stop();
        fake.shutdown().await;
        Ok(())
    })
    .await?;
    let per_1000 = 1000.0 / report.contacts.max(1) as f64;
    report.reads_per_1000_contacts = report.reads * per_1000;
    report.repairs_per_1000_contacts = report.repairs * per_1000;
    Ok(report)
}
