//! `listrak-worker demo`: the whole pipeline on this machine, against an in-process Listrak
//! stand-in, on queues of its own; ends with a summary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::commands::publish::publish_lines;
use crate::commands::setup::{self, ProvisionRequest};
use crate::config::Settings;
use crate::driver::worker::{self, Health};
use crate::edges::broker::{self, Topology};
use crate::edges::listrak::ListrakClient;
use crate::edges::telemetry::{AckOutcome, Metrics};
use crate::stages::model::{DeadLetterReason, FieldId, ListId};
use crate::tools::fake::{CatalogueSeed, FakeOptions, FakeServer, SeedField, SeedGroup};
use crate::tools::sample::{self, TrafficShape, MAPPINGS_TOML};

use crate::config::DEFAULT_AMQP_URL;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Longer than the worker holds an ack back (at most 3 s): no ack for this long after every
/// message was acked once means none is in hand.
const QUIET: Duration = Duration::from_secs(4);

/// The configuration the demo runs with: its own queue names, the fake's URLs.
pub fn settings(amqp_url: &str, queue: &str, fake: &FakeServer) -> anyhow::Result<Settings> {
    let options = FakeOptions::default();
    // AMQP_URL may name several nodes of a cluster, separated by commas.
    let urls: Vec<String> = amqp_url
        .split(',')
        .map(|url| crate::config::toml_str(url.trim()))
        .collect();
    let urls = urls.join(", ");
    let text = format!(
        r#"
[amqp]
url = [{urls}]
exchange = "{queue}"
queue = "{queue}"

[listrak]
client_id = "{client_id}"
client_secret = "{client_secret}"
api_url = "{api_url}"
auth_url = "{auth_url}"
request_timeout = "10s"

[batch]
max_wait = "200ms"

[retry]
schedule = ["1s", "5s"]
in_process = "20s"

[http]
listen = "127.0.0.1:0"

[shutdown]
grace = "10s"
{MAPPINGS_TOML}"#,
        client_id = options.client_id,
        client_secret = options.client_secret,
        api_url = fake.api_url(),
        auth_url = fake.auth_url(),
    );
    Ok(Settings::from_toml(&text, |_| None)?)
}

/// The account the demo starts from: its two lists, and on the second a Text field the
/// mappings write to; the audiences' Check Box fields are left to `provision`.
fn catalogue() -> CatalogueSeed {
    let mut seed = CatalogueSeed::lists(&[(1001, "Demo customers"), (2002, "Demo newsletter")]);
    let (list, field) = sample::TEXT_FIELD;
    let second = seed
        .lists
        .iter_mut()
        .find(|seeded| seeded.list_id == list)
        .expect("the text field's list is seeded");
    second.groups.push(SeedGroup {
        segmentation_field_group_id: 20,
        segmentation_field_group_name: "Carts".into(),
        fields: vec![SeedField {
            segmentation_field_id: field,
            segmentation_field_name: "Abandoned cart".into(),
            data_type: "Text".into(),
            max_length: 40,
        }],
    });
    seed
}

/// Provisions a Check Box field per audience and list, as `listrak provision` does, and
/// puts the ids Listrak gave in place of the sample's in the mappings. Returns the sample's
/// field ids with the provisioned ones.
async fn provision_audiences(
    settings: &mut Settings,
    client: &ListrakClient,
) -> anyhow::Result<BTreeMap<(u32, u32), u32>> {
    let mut lists: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (list, _, audience) in sample::AUDIENCE_FIELDS {
        lists.entry(list).or_default().push(audience.to_owned());
    }
    let mut renumbered = BTreeMap::new();
    for (list, audiences) in lists {
        let request = ProvisionRequest {
            list: ListId::new(i64::from(list)).expect("the sample's list ids are valid"),
            group: "Engage Audiences".into(),
            audiences,
            name: None,
            dry_run: false,
        };
        let provisioned = setup::provision(client, &request)
            .await
            .context("provisioning the demo's audience fields")?;
        print!("{}", provisioned.summary());
        for field in &provisioned.fields {
            let (_, sample_id, _) = sample::AUDIENCE_FIELDS
                .into_iter()
                .find(|(l, _, audience)| *l == list && *audience == field.audience_key)
                .expect("provisioned for a sample audience");
            let id = field.id.expect("created, not a dry run");
            renumbered.insert((list, sample_id), id.get());
        }
    }
    for mapping in &mut settings.mappings {
        let crate::stages::mapping::ListSource::Id(list) = mapping.list else {
            continue;
        };
        for (field, _) in &mut mapping.profile_fields {
            if let Some(id) = renumbered.get(&(list.get(), field.get())) {
                *field = FieldId::new(i64::from(*id)).expect("a provisioned id");
            }
        }
        mapping.profile_fields.sort_by_key(|(field, _)| *field);
    }
    Ok(renumbered)
}

/// How the demo's events reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Published straight to the exchange, as `publish` does.
    Publish,
    /// Posted over HTTP to `ingest`, signed and in batches, as Segment's Webhooks
    /// destination sends them.
    Ingest,
}

pub async fn run(events: usize, route: Route) -> anyhow::Result<()> {
    let amqp_url = std::env::var("AMQP_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_string());
    let fake = FakeServer::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
    )
    .await
    .context("cannot start the Listrak stand-in")?;
    let queue = format!("listrak-worker-demo.{}", std::process::id());
    let mut settings = settings(&amqp_url, &queue, &fake)?;
    if let Err(error) = broker::connect(&settings.amqp, "listrak-worker demo probe").await {
        anyhow::bail!(
            "RabbitMQ is not reachable at {} ({error}).\n\
             Start it, then run the demo again:\n  \
             Debian/Ubuntu: sudo apt-get install -y rabbitmq-server && \
             sudo rabbitmq-server -detached\n  \
             Docker:        docker run -d -p 5672:5672 rabbitmq:3.13\n\
             or point AMQP_URL at a running broker.",
            settings.amqp.redacted_url()
        );
    }

    let metrics = Metrics::new(settings.batch.max_contacts.get());
    let api = Arc::new(ListrakClient::new(&settings.listrak, metrics.clone())?);
    let renumbered = provision_audiences(&mut settings, &api).await?;
    let report = setup::verify(&api, &settings.mappings).await?;
    anyhow::ensure!(
        report.problems.is_empty(),
        "the demo's mappings do not match its Listrak stand-in:\n{}",
        setup::report_text(&report, settings.mappings.len())
    );

    let topology = Topology::of(&settings);
    let mut traffic = sample::generate(TrafficShape {
        events,
        people: (events / 5).max(10),
        ..TrafficShape::default()
    });
    // What the events must leave behind, in the fields provisioning created.
    for (list, contacts) in &mut traffic.expected {
        for fields in contacts.values_mut() {
            *fields = std::mem::take(fields)
                .into_iter()
                .map(|(field, value)| (*renumbered.get(&(*list, field)).unwrap_or(&field), value))
                .collect();
        }
    }
    println!(
        "demo: {} Engage events for {} people, queue {queue}, Listrak stand-in at {}",
        traffic.bodies.len(),
        (events / 5).max(10),
        fake.api_url()
    );

    let started = Instant::now();
    let published = match route {
        Route::Publish => {
            publish_lines(
                &settings.amqp,
                &topology,
                traffic.bodies.iter().map(|b| Ok(b.clone())),
                traffic.bodies.len() as u64,
            )
            .await?
            .messages
        }
        Route::Ingest => post_to_ingest(&settings, &traffic.bodies).await?,
    };

    let health = Health::default();
    let drained = {
        let metrics = metrics.clone();
        let health = health.clone();
        let expected = published as f64;
        let amqp = settings.amqp.clone();
        let queue = topology.queue.clone();
        async move {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            let (mut last, mut since) = (0.0, Instant::now());
            while Instant::now() < deadline {
                // Acks counted are acks sent: those sent just before a lost connection are
                // counted, and their messages delivered and acked again. So the drain is
                // over once every message was acked, no ack came for longer than the worker
                // holds one back, and the queue holds nothing ready.
                let settled = acked(&metrics);
                // Between broker sessions nothing is acked, and messages wait to come again.
                if settled != last || !health.is_ready() {
                    (last, since) = (settled, Instant::now());
                }
                if settled >= expected
                    && since.elapsed() >= QUIET
                    && queue_empty(&amqp, &queue).await
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    worker::run(settings.clone(), api, metrics.clone(), health, drained).await?;
    let elapsed = started.elapsed();

    let cleanup = async {
        let connection = broker::connect(&settings.amqp, "listrak-worker demo cleanup").await?;
        let channel = connection.create_channel().await?;
        topology.delete(&channel).await?;
        connection.close(200, "done".into()).await
    };
    if let Err(error) = cleanup.await {
        eprintln!("demo: could not delete the demo queues: {error}");
    }

    let state = fake.contacts();
    let requests = fake.requests();
    let accepted = requests.iter().filter(|r| r.status == 201).count();
    println!();
    println!("events published     {published}");
    for outcome in AckOutcome::ALL {
        println!(
            "  acked {:<16}{}",
            outcome.as_str(),
            metrics.sample(
                "listrak_messages_acked_total",
                &[("outcome", outcome.as_str())]
            )
        );
    }
    // Only the events that reached Listrak: ignored and dead-lettered ones sent nothing.
    let applied = metrics.sample("listrak_messages_acked_total", &[("outcome", "applied")]);
    println!(
        "requests to Listrak  {} ({} accepted), {:.1} applied events per request",
        requests.len(),
        accepted,
        applied / requests.len().max(1) as f64
    );
    for (list, contacts) in &state {
        println!("  list {list:<14} {} contacts", contacts.len());
    }
    let unmapped = metrics.sample("listrak_unmapped_audience_events_total", &[]);
    println!("unmapped audience events {unmapped} (audiences no mapping names)");
    println!("dead letters");
    let mut dead: BTreeMap<&str, f64> = BTreeMap::new();
    for reason in DeadLetterReason::ALL {
        let count = metrics.sample("listrak_dead_letters_total", &[("reason", reason.as_str())]);
        if count > 0.0 {
            dead.insert(reason.as_str(), count);
        }
    }
    if dead.is_empty() {
        println!("  none");
    }
    for (reason, count) in &dead {
        println!("  {reason:<19}{count}");
    }
    let matches = state == traffic.expected;
    println!(
        "final Listrak state  {}",
        if matches {
            "matches last-write-wins over every event"
        } else {
            "DIFFERS from last-write-wins"
        }
    );
    println!("took                 {:.2}s", elapsed.as_secs_f64());
    fake.shutdown().await;
    anyhow::ensure!(
        matches,
        "the final state differs from what the events imply"
    );
    anyhow::ensure!(
        acked(&metrics) >= published as f64,
        "not every event was settled within {DRAIN_TIMEOUT:?}"
    );
    Ok(())
}

/// Whether `queue` holds no ready message, asked on a connection of its own (the worker's
/// may be between nodes).
async fn queue_empty(amqp: &crate::config::AmqpSettings, queue: &str) -> bool {
    let Ok(connection) = broker::connect(amqp, "listrak-worker demo drain").await else {
        return false;
    };
    let ready = match connection.create_channel().await {
        Ok(channel) => broker::queue_counts(&channel, queue).await.ok(),
        Err(_) => None,
    };
    let _ = connection.close(200, "checked".into()).await;
    ready.is_some_and(|(ready, _)| ready == 0)
}

fn acked(metrics: &Metrics) -> f64 {
    metrics.sample("listrak_messages_acked_total", &[])
}

/// Events in one request to `ingest`, as Segment's Webhooks destination batches them.
const INGEST_BATCH: usize = 100;

/// Starts `ingest` in this process with a shared secret, and posts `bodies` to it as
/// Segment would: JSON arrays of up to [`INGEST_BATCH`] events, each request signed. A body
/// that is not JSON goes alone and is refused with 400, as it would be from Segment. Answers
/// how many events the endpoint published.
async fn post_to_ingest(settings: &Settings, bodies: &[Vec<u8>]) -> anyhow::Result<u64> {
    use crate::stages::ingest::signature;
    let secret = format!("demo-{}", std::process::id());
    let mut settings = settings.clone();
    settings.ingest.shared_secret = Some(crate::config::Secret::new(secret.clone()));
    let endpoint = crate::commands::ingest::Running::start(
        &settings,
        crate::edges::ingest::IngestMetrics::new(),
    )
    .await?;
    let address = endpoint.address;
    let client = reqwest::Client::new();
    let url = format!("http://{address}/");
    let (mut json, mut not_json): (Vec<&[u8]>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    for body in bodies {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
            json.push(body);
        } else {
            not_json.push(body);
        }
    }
    let mut requests: Vec<(Vec<u8>, u64)> = json
        .chunks(INGEST_BATCH)
        .map(|chunk| (sample::json_array(chunk), chunk.len() as u64))
        .collect();
    requests.extend(not_json.iter().map(|body| (body.to_vec(), 0)));
    let mut published = 0;
    let mut refused = 0;
    for (body, events) in &requests {
        // Segment sends a request again while it is answered 503 (the endpoint not yet
        // connected, say).
        let mut attempts = 0;
        loop {
            let answer = client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-signature", signature(secret.as_bytes(), body))
                .body(body.clone())
                .send()
                .await
                .context("cannot reach the ingest endpoint")?;
            match answer.status().as_u16() {
                200 => {
                    published += events;
                    break;
                }
                400 => {
                    refused += 1;
                    break;
                }
                503 if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                status => anyhow::bail!("the ingest endpoint answered {status}"),
            }
        }
    }
    println!(
        "demo: through ingest at {address}: {} signed requests, {published} events published, \
         {refused} bodies refused as not JSON (400)",
        requests.len()
    );
    endpoint.stop().await?;
    Ok(published)
}
