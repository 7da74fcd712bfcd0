//! `listrak-bench --applied-log`: a week of an account's traffic written to an applied log
//! directly, then read back as a worker does at start: how long the rebuild takes, what the
//! guard holds and costs, and what the log costs per applied contact.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::driver::superseded::{SupersededGuard, BYTES_PER_KEY};
use crate::edges::applied_log::{self, AppliedContact, PendingContact, Record, VERSION};
use crate::edges::broker::{self, Publisher, Topology};
use crate::edges::telemetry::Metrics;
use crate::stages::model::EventTime;

#[derive(Debug, Clone)]
pub struct LogBenchOptions {
    pub amqp_url: String,
    pub contacts: usize,
    pub fields: usize,
    pub updates: usize,
    /// Share of updates whose contact went through the retry queues.
    pub retried: f64,
    /// Share dead-lettered.
    pub dead_lettered: f64,
    /// Contacts per record (a batch).
    pub per_record: usize,
    /// The guard's sizes, as the worker's defaults.
    pub capacity: usize,
    pub watch_capacity: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LogBenchReport {
    pub records: u64,
    pub applied_contacts: u64,
    pub bytes: u64,
    pub bytes_per_applied_contact: f64,
    pub write_seconds: f64,
    pub rebuild_seconds: f64,
    pub guard_keys: usize,
    pub guard_watched: usize,
    pub guard_mib: f64,
    pub rss_growth_mib: f64,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub async fn run(options: LogBenchOptions) -> anyhow::Result<LogBenchReport> {
    let queue = format!("listrak-bench-log-{}", std::process::id());
    let topology = Topology::new(&queue, &queue, &[Duration::from_secs(10)]);
    let connection = broker::connect_url(&options.amqp_url, "listrak-bench").await?;
    let publisher = Publisher::new(&connection).await?;
    topology.declare(&connection).await?;
    let result = measure(&options, &connection, &publisher, &topology).await;
    let channel = connection.create_channel().await?;
    topology.delete(&channel).await?;
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn measure(
    options: &LogBenchOptions,
    connection: &lapin::Connection,
    publisher: &Publisher,
    topology: &Topology,
) -> anyhow::Result<LogBenchReport> {
    let mut random = rand::rngs::StdRng::seed_from_u64(7);
    let week = 7 * 24 * 3600 * 1_000_000i64;
    let start = EventTime::now().0 - week;
    let records = options.updates.div_ceil(options.per_record);
    let mut bytes = 0u64;
    let mut applied_contacts = 0u64;
    let written = Instant::now();
    let mut confirms = Vec::new();
    for index in 0..records {
        let at = start + (week / records as i64) * index as i64;
        let mut applied = Vec::with_capacity(options.per_record);
        let mut pending = Vec::new();
        for _ in 0..options.per_record {
            let contact = random.random_range(0..options.contacts);
            let field = 1000 + random.random_range(0..options.fields) as i64;
            let value = if random.random_bool(0.5) { "on" } else { "off" };
            let before = random.random_range(0..5_000_000i64);
            let email = format!("person-{contact}@example.com");
            let draw: f64 = random.random();
            if draw < options.retried + options.dead_lettered {
                pending.push(PendingContact {
                    e: email,
                    f: vec![(field, before)],
                });
            } else {
                applied.push(AppliedContact {
                    e: email,
                    f: vec![(field, value.to_owned(), before)],
                    m: vec![format!("{:032x}", random.random::<u128>())],
                });
            }
        }
        applied_contacts += applied.len() as u64;
        let record = Record {
            v: VERSION,
            w: None,
            sync: None,
            list: 1001,
            at,
            rid: vec![format!("{:032x}", random.random::<u128>())],
            a: applied,
            p: pending,
        }
        .encode();
        bytes += record.len() as u64;
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_encoding("deflate".into());
        confirms.push(
            publisher
                .start("", &topology.applied, &record, properties)
                .await?,
        );
        if confirms.len() >= 64 {
            for confirm in confirms.drain(..) {
                broker::wait_confirm(confirm).await?;
            }
        }
    }
    for confirm in confirms.drain(..) {
        broker::wait_confirm(confirm).await?;
    }
    let write_seconds = written.elapsed().as_secs_f64();
    eprintln!(
        "wrote {records} records ({:.0} MB) in {write_seconds:.1}s; reading them back",
        bytes as f64 / 1e6
    );

    let before = rss_mib();
    let guard = Arc::new(SupersededGuard::with_watch(
        options.capacity,
        options.watch_capacity,
        Duration::from_secs(7 * 24 * 3600),
    ));
    let rebuilt = Instant::now();
    // As a session does at start: follow from the horizon until the marker is read.
    let following = applied_log::follow(
        connection,
        publisher,
        topology,
        applied_log::ReadFrom::Age(Duration::from_secs(8 * 24 * 3600)),
        applied_log::Reader {
            guard: guard.clone(),
            metrics: Metrics::new(1000),
            next_offset: Arc::new(AtomicI64::new(-1)),
            writer: applied_log::new_writer(),
        },
    )
    .await?;
    let read = following.synced.await?;
    let rebuild_seconds = rebuilt.elapsed().as_secs_f64();
    following.task.abort();
    let rss_growth_mib = rss_mib() - before;
    Ok(LogBenchReport {
        records: read,
        applied_contacts,
        bytes,
        bytes_per_applied_contact: bytes as f64 / applied_contacts.max(1) as f64,
        write_seconds,
        rebuild_seconds,
        guard_keys: guard.len(),
        guard_watched: guard.watched(),
        guard_mib: (guard.len() * BYTES_PER_KEY) as f64 / (1 << 20) as f64,
        rss_growth_mib,
    })
}
