//! A worker wired to the local RabbitMQ and an in-process listrak-fake, on queues of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use listrak_worker::broker::{self, as_text, Topology};
use listrak_worker::config::Settings;
use listrak_worker::fake::{FakeOptions, FakeServer, Faults};
use listrak_worker::listrak::ListrakClient;
use listrak_worker::publish::event_properties;
use listrak_worker::sample::MAPPINGS_TOML;
use listrak_worker::telemetry::Metrics;
use listrak_worker::worker::{self, Health};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The knobs tests turn; everything else is the demo's configuration.
#[derive(Clone)]
pub struct Knobs {
    pub max_contacts: usize,
    pub max_wait: &'static str,
    pub prefetch: u16,
    pub in_process: &'static str,
    pub schedule: &'static str,
    pub max_age: &'static str,
    pub grace: &'static str,
    pub max_concurrency: usize,
    pub request_timeout: &'static str,
    pub superseded_capacity: usize,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            max_contacts: 1000,
            max_wait: "100ms",
            prefetch: 2000,
            in_process: "10s",
            schedule: r#"["1s", "2s"]"#,
            max_age: "1h",
            grace: "20s",
            max_concurrency: 8,
            request_timeout: "5s",
            superseded_capacity: 100_000,
        }
    }
}

pub fn settings_text(queue: &str, api_url: &str, auth_url: &str, knobs: &Knobs) -> String {
    let options = FakeOptions::default();
    format!(
        r#"
[amqp]
url = "{amqp}"
exchange = "{queue}"
queue = "{queue}"
prefetch = {prefetch}

[listrak]
client_id = "{client_id}"
client_secret = "{client_secret}"
api_url = "{api_url}"
auth_url = "{auth_url}"
request_timeout = "{request_timeout}"
max_concurrency = {max_concurrency}

[batch]
max_contacts = {max_contacts}
max_wait = "{max_wait}"

[retry]
schedule = {schedule}
max_age = "{max_age}"
in_process = "{in_process}"

[http]
listen = "127.0.0.1:0"

[shutdown]
grace = "{grace}"

[superseded]
capacity = {superseded_capacity}
{MAPPINGS_TOML}"#,
        amqp = amqp_url(),
        client_id = options.client_id,
        client_secret = options.client_secret,
        prefetch = knobs.prefetch,
        request_timeout = knobs.request_timeout,
        max_concurrency = knobs.max_concurrency,
        max_contacts = knobs.max_contacts,
        max_wait = knobs.max_wait,
        schedule = knobs.schedule,
        max_age = knobs.max_age,
        in_process = knobs.in_process,
        grace = knobs.grace,
        superseded_capacity = knobs.superseded_capacity,
    )
}

pub fn unique_queue(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("test.{test}.{}.{nanos}", std::process::id())
}

/// A dead letter as read back from the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub headers: BTreeMap<String, String>,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

pub struct Harness {
    pub fake: FakeServer,
    pub settings: Settings,
    pub topology: Topology,
    pub metrics: Metrics,
    pub health: Health,
    connection: lapin::Connection,
    publisher: broker::Publisher,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

impl Harness {
    pub async fn new(test: &str, faults: Faults, knobs: Knobs) -> Harness {
        let fake = FakeServer::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            FakeOptions {
                faults,
                ..FakeOptions::default()
            },
        )
        .await
        .expect("listrak-fake starts");
        let queue = unique_queue(test);
        let text = settings_text(&queue, &fake.api_url(), &fake.auth_url(), &knobs);
        let settings = Settings::from_toml(&text, |_| None).expect("valid test settings");
        let topology = Topology::new(&queue, &queue, &settings.retry.schedule);
        let connection = broker::connect(&amqp_url(), "listrak-worker tests")
            .await
            .expect("RabbitMQ is running (see README)");
        let publisher = broker::Publisher::new(&connection).await.unwrap();
        topology.declare(publisher.channel()).await.unwrap();
        let metrics = Metrics::new(settings.batch.max_contacts.get());
        Harness {
            fake,
            settings,
            topology,
            metrics,
            health: Health::default(),
            connection,
            publisher,
            worker: None,
        }
    }

    /// Starts the worker in this process (fresh metrics each time).
    pub fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "one worker at a time");
        let stop = CancellationToken::new();
        let api =
            Arc::new(ListrakClient::new(&self.settings.listrak, self.metrics.clone()).unwrap());
        let task = tokio::spawn(worker::run(
            self.settings.clone(),
            api,
            self.metrics.clone(),
            self.health.clone(),
            stop.clone().cancelled_owned(),
        ));
        self.worker = Some((stop, task));
    }

    /// Stops the worker as SIGTERM would, and waits for it to finish.
    pub async fn stop_worker(&mut self) {
        let (stop, task) = self.worker.take().expect("a worker runs");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the worker stops within its grace")
            .unwrap()
            .expect("the worker stops cleanly");
    }

    pub async fn publish(&self, bodies: &[Vec<u8>]) {
        let mut confirms = Vec::new();
        for body in bodies {
            confirms.push(
                self.publisher
                    .start(
                        &self.topology.exchange,
                        "event",
                        body,
                        event_properties(body),
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            broker::wait_confirm(confirm).await.unwrap();
        }
    }

    /// Publishes messages as they are, each confirmed; through the default exchange when
    /// `exchange` is empty (routing key = queue name).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[(Vec<u8>, BasicProperties)],
    ) {
        let mut confirms = Vec::new();
        for (body, properties) in messages {
            confirms.push(
                self.publisher
                    .start(exchange, routing_key, body, properties.clone())
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            broker::wait_confirm(confirm).await.unwrap();
        }
    }

    pub fn connection(&self) -> &lapin::Connection {
        &self.connection
    }

    pub fn acked(&self) -> u64 {
        self.metrics.sample("listrak_messages_acked_total", &[]) as u64
    }

    pub fn acked_as(&self, outcome: &str) -> u64 {
        self.metrics
            .sample("listrak_messages_acked_total", &[("outcome", outcome)]) as u64
    }

    /// Polls `condition` until it holds; panics with `what` after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Harness) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !condition(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_acked(&self, count: u64, timeout: Duration) {
        self.wait_for(&format!("{count} messages acked"), timeout, |h| {
            h.acked() >= count
        })
        .await;
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let depth = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count();
        let _ = channel.close(200, "done".into()).await;
        depth
    }

    /// Takes every message out of the dead-letter queue.
    pub async fn take_dead_letters(&self) -> Vec<DeadLetter> {
        self.take_all(&self.topology.dead.clone()).await
    }

    pub async fn take_all(&self, queue: &str) -> Vec<DeadLetter> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut letters = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let delivery = message.delivery;
            let headers = delivery
                .properties
                .headers()
                .as_ref()
                .map(|table| {
                    table
                        .inner()
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str().to_string(), as_text(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .unwrap();
            letters.push(DeadLetter {
                body: delivery.data,
                properties: delivery.properties,
                headers,
            });
        }
        let _ = channel.close(200, "done".into()).await;
        letters
    }

    /// Stops the worker if it runs, and deletes every queue and exchange of the test.
    pub async fn finish(mut self) {
        if self.worker.is_some() {
            self.stop_worker().await;
        }
        let channel = self.connection.create_channel().await.unwrap();
        self.topology.delete(&channel).await.unwrap();
        let _ = self.connection.close(200, "done".into()).await;
        self.fake.shutdown().await;
    }
}

pub fn counts<'a>(
    letters: impl IntoIterator<Item = &'a DeadLetter>,
    header: &str,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for letter in letters {
        *counts
            .entry(letter.header(header).unwrap_or("-").to_string())
            .or_default() += 1;
    }
    counts
}
