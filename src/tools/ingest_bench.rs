//! `listrak-bench --ingest`: events per second into the queue through `ingest` (single events
//! and batches, each request confirmed before its answer) against `publish` from a file, on
//! the same broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::{Secret, Settings};
use crate::edges::broker::{self, Topology};
use crate::edges::ingest::IngestMetrics;
use crate::stages::ingest::signature;
use crate::tools::sample::{self, TrafficShape};

pub struct IngestBenchOptions {
    /// One URL, or a cluster's separated by commas.
    pub amqp_url: String,
    pub events: usize,
    /// Requests in flight at once, as Segment's delivery workers send them.
    pub concurrency: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct IngestReport {
    pub events: usize,
    pub concurrency: usize,
    /// `publish` from a file: one connection, a window of confirms.
    pub publish_events_per_second: f64,
    /// One event per request (so as many requests per second).
    pub single_events_per_second: f64,
    /// A hundred events per request.
    pub batch_events_per_second: f64,
}

const BATCH: usize = 100;
const SECRET: &str = "listrak-bench";

pub async fn run(options: IngestBenchOptions) -> anyhow::Result<IngestReport> {
    let traffic = sample::generate(TrafficShape {
        events: options.events,
        people: (options.events / 5).max(10),
        poison_every: 0,
        ..TrafficShape::default()
    });
    let bodies = traffic.bodies;
    let publish = measure("publish", &options, |settings, topology| {
        let bodies = bodies.clone();
        async move {
            crate::commands::publish::publish_lines(
                &settings.amqp,
                &topology,
                bodies.into_iter().map(Ok),
                options.events as u64,
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let single = measure("ingest, single events", &options, |settings, _| {
        post_all(settings, bodies.clone(), options.concurrency)
    })
    .await?;
    let batch_requests: Vec<Vec<u8>> = bodies.chunks(BATCH).map(sample::json_array).collect();
    let batch = measure("ingest, batches of 100", &options, |settings, _| {
        post_all(settings, batch_requests, options.concurrency)
    })
    .await?;
    let rate = |elapsed: Duration| options.events as f64 / elapsed.as_secs_f64();
    let report = IngestReport {
        events: options.events,
        concurrency: options.concurrency,
        publish_events_per_second: rate(publish),
        single_events_per_second: rate(single),
        batch_events_per_second: rate(batch),
    };
    println!(
        "ingest                      {} Engage events into the queue, confirmed, \
         {} requests at a time",
        options.events, options.concurrency
    );
    println!(
        "  publish from a file       {:.0} events/s",
        report.publish_events_per_second
    );
    println!(
        "  ingest, single events     {:.0} events/s (as many requests/s)",
        report.single_events_per_second
    );
    println!(
        "  ingest, batches of 100    {:.0} events/s",
        report.batch_events_per_second
    );
    Ok(report)
}

/// Times `send` into a queue of its own (declared, then deleted), until every event is in
/// the queue.
async fn measure<F, Fut>(
    what: &str,
    options: &IngestBenchOptions,
    send: F,
) -> anyhow::Result<Duration>
where
    F: FnOnce(Settings, Topology) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    eprintln!("{what}: {} events…", options.events);
    let queue = format!("listrak-bench.ingest.{}", std::process::id());
    let urls: Vec<String> = options
        .amqp_url
        .split(',')
        .map(|url| crate::config::toml_str(url.trim()))
        .collect();
    let text = format!(
        "[amqp]\nurl = [{}]\nexchange = \"{queue}\"\nqueue = \"{queue}\"\n\
         [listrak]\nclient_id = \"bench\"\nclient_secret = \"bench\"\n",
        urls.join(", ")
    );
    let mut settings = parse(&text)?;
    settings.ingest.shared_secret = Some(Secret::new(SECRET));
    let topology = Topology::of(&settings);
    let connection = broker::connect(&settings.amqp, "listrak-bench ingest").await?;
    topology.declare(&connection).await?;
    let started = Instant::now();
    send(settings, topology.clone()).await?;
    let elapsed = started.elapsed();
    let channel = connection.create_channel().await?;
    let (ready, _) = broker::queue_counts(&channel, &topology.queue).await?;
    anyhow::ensure!(
        ready as usize >= options.events,
        "{what}: {ready} of {} events in the queue",
        options.events
    );
    topology.delete(&channel).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}

fn parse(text: &str) -> anyhow::Result<Settings> {
    Ok(Settings::from_toml(
        &format!(
            "{text}\n[[mappings]]\nname = \"bench\"\nevents = [\"Audience Entered\"]\n\
             list_id = 1\nprofile_fields = {{ \"1\" = \"on\" }}\n"
        ),
        |_| None,
    )?)
}

/// Starts `ingest` in this process and posts every request, signed, `concurrency` at a time;
/// each must be answered 200.
async fn post_all(
    settings: Settings,
    requests: Vec<Vec<u8>>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let endpoint = crate::commands::ingest::Running::start(&settings, IngestMetrics::new()).await?;
    let address = endpoint.address;
    let client = reqwest::Client::new();
    let url = format!("http://{address}/");
    // Ready once connected to the broker.
    for _ in 0..100 {
        let ready = client.get(format!("http://{address}/readyz")).send().await;
        if ready.is_ok_and(|answer| answer.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut sent = tokio::task::JoinSet::new();
    for body in requests {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let client = client.clone();
        let url = url.clone();
        sent.spawn(async move {
            let _permit = permit;
            let answer = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-signature", signature(SECRET.as_bytes(), &body))
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(
                answer.status() == 200,
                "ingest answered {}",
                answer.status()
            );
            Ok(())
        });
    }
    while let Some(result) = sent.join_next().await {
        result??;
    }
    endpoint.stop().await
}
