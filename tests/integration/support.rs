//! A worker wired to the local RabbitMQ and an in-process listrak-fake, on queues of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use listrak_worker::commands::publish::event_properties;
use listrak_worker::config::{AmqpSettings, BrokerUrls, Settings};
use listrak_worker::driver::worker::{self, Health};
use listrak_worker::edges::applied_log::Record;
use listrak_worker::edges::broker::{self, as_text, Topology};
use listrak_worker::edges::listrak::{ListrakApi, ListrakClient};
use listrak_worker::edges::telemetry::Metrics;
use listrak_worker::tools::fake::{FakeOptions, FakeServer, Faults};
use listrak_worker::tools::sample::MAPPINGS_TOML;

/// The broker of the tests: `AMQP_URL` (its first URL, when it names several), else the
/// local one.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .and_then(|urls| urls.split(',').next().map(|url| url.trim().to_owned()))
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| listrak_worker::config::DEFAULT_AMQP_URL.into())
}

/// The broker settings of the test's own connections: straight to the broker, whatever
/// route the worker is given (a relay, a TLS proxy).
pub fn direct(amqp: &AmqpSettings) -> AmqpSettings {
    AmqpSettings {
        urls: BrokerUrls::one(amqp_url()),
        tls: None,
        ..amqp.clone()
    }
}

/// The broker settings of the test's own connections for `knobs`: the cluster's nodes when
/// the test runs on one, else [`direct`].
fn own_amqp(amqp: &AmqpSettings, knobs: &Knobs) -> AmqpSettings {
    match &knobs.cluster_urls {
        Some(_) => AmqpSettings {
            tls: None,
            ..amqp.clone()
        },
        None => direct(amqp),
    }
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
    /// The broker URL the worker uses, when not the test's own (a relay, say).
    pub worker_amqp_url: Option<String>,
    /// The nodes of a cluster, which the worker and the test's own connections both use, in
    /// this order.
    pub cluster_urls: Option<Vec<String>>,
    /// The keys of an `[amqp.tls]` table.
    pub amqp_tls: Option<String>,
    pub single_active_consumer: bool,
    /// `http.listen`.
    pub http_listen: String,
    /// `listrak.verify_at_start`.
    pub verify_at_start: bool,
    /// The `[[mappings]]` tables, when not the demo's.
    pub mappings: Option<String>,
    /// `listrak.field_creation_budget`.
    pub field_creation_budget: usize,
    /// The keys of the `[reconcile]` table.
    pub reconcile: &'static str,
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
            worker_amqp_url: None,
            cluster_urls: None,
            amqp_tls: None,
            single_active_consumer: false,
            http_listen: "127.0.0.1:0".to_owned(),
            verify_at_start: false,
            mappings: None,
            field_creation_budget: 100,
            reconcile: "",
        }
    }
}

pub fn settings_text(queue: &str, api_url: &str, auth_url: &str, knobs: &Knobs) -> String {
    let options = FakeOptions::default();
    format!(
        r#"
[amqp]
url = {amqp}
exchange = "{queue}"
queue = "{queue}"
prefetch = {prefetch}
single_active_consumer = {single_active_consumer}
{tls}
[listrak]
client_id = "{client_id}"
client_secret = "{client_secret}"
api_url = "{api_url}"
auth_url = "{auth_url}"
request_timeout = "{request_timeout}"
max_concurrency = {max_concurrency}
verify_at_start = {verify_at_start}
field_creation_budget = {field_creation_budget}

[batch]
max_contacts = {max_contacts}
max_wait = "{max_wait}"

[retry]
schedule = {schedule}
max_age = "{max_age}"
in_process = "{in_process}"

[http]
listen = "{http_listen}"

[shutdown]
grace = "{grace}"

[superseded]
capacity = {superseded_capacity}

[reconcile]
{reconcile}
{mappings}"#,
        reconcile = knobs.reconcile,
        mappings = knobs.mappings.as_deref().unwrap_or(MAPPINGS_TOML),
        amqp = match &knobs.cluster_urls {
            Some(urls) => format!(
                "[{}]",
                urls.iter()
                    .map(|url| format!("{url:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "{:?}",
                knobs.worker_amqp_url.clone().unwrap_or_else(amqp_url)
            ),
        },
        tls = knobs
            .amqp_tls
            .as_ref()
            .map(|keys| format!("\n[amqp.tls]\n{keys}\n"))
            .unwrap_or_default(),
        client_id = options.client_id,
        client_secret = options.client_secret,
        prefetch = knobs.prefetch,
        single_active_consumer = knobs.single_active_consumer,
        http_listen = knobs.http_listen,
        request_timeout = knobs.request_timeout,
        max_concurrency = knobs.max_concurrency,
        verify_at_start = knobs.verify_at_start,
        field_creation_budget = knobs.field_creation_budget,
        max_contacts = knobs.max_contacts,
        max_wait = knobs.max_wait,
        schedule = knobs.schedule,
        max_age = knobs.max_age,
        in_process = knobs.in_process,
        grace = knobs.grace,
        superseded_capacity = knobs.superseded_capacity,
    )
}

/// Warnings and errors of the worker, shown with a failing test's output.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "listrak_worker=warn".into()),
        )
        .with_test_writer()
        .try_init();
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
    /// The broker settings of the test's own connections.
    own: AmqpSettings,
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
        let options = FakeOptions {
            faults,
            ..FakeOptions::default()
        };
        Self::with_fake(test, options, knobs).await
    }

    /// A harness whose listrak-fake starts with `options` (a catalogue, say).
    pub async fn with_fake(test: &str, options: FakeOptions, knobs: Knobs) -> Harness {
        init_logging();
        let fake = FakeServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
            .await
            .expect("listrak-fake starts");
        let queue = unique_queue(test);
        let text = settings_text(&queue, &fake.api_url(), &fake.auth_url(), &knobs);
        let settings = Settings::from_toml(&text, |_| None).expect("valid test settings");
        let topology = Topology::of(&settings);
        let own = own_amqp(&settings.amqp, &knobs);
        let connection = broker::connect(&own, "listrak-worker tests")
            .await
            .expect("RabbitMQ is running (see README)");
        let publisher = broker::Publisher::new(&connection).await.unwrap();
        topology.declare(&connection).await.unwrap();
        let metrics = Metrics::new(settings.batch.max_contacts.get());
        Harness {
            fake,
            own,
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
        let api =
            Arc::new(ListrakClient::new(&self.settings.listrak, self.metrics.clone()).unwrap());
        self.start_worker_with(api);
    }

    /// Starts the worker in this process with `api` in place of the Listrak client.
    pub fn start_worker_with<A: ListrakApi>(&mut self, api: Arc<A>) {
        assert!(self.worker.is_none(), "one worker at a time");
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker::run(
            self.settings.clone(),
            api,
            self.metrics.clone(),
            self.health.clone(),
            stop.clone().cancelled_owned(),
        ));
        self.worker = Some((stop, task));
    }

    /// The worker started here has not ended (a run ends only at shutdown or on an error
    /// that no reconnection can mend). For the cluster tests, a binary of their own.
    #[allow(dead_code)]
    pub fn worker_running(&self) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|(_, task)| !task.is_finished())
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

    /// A new connection and publisher for the test itself, after the broker went away (the
    /// broker-restart test, a binary of its own).
    #[allow(dead_code)]
    pub async fn reconnect(&mut self) {
        let connection = broker::connect(&self.own, "listrak-worker tests")
            .await
            .expect("RabbitMQ is back");
        self.publisher = broker::Publisher::new(&connection).await.unwrap();
        self.connection = connection;
    }

    /// Every record of an applied batch in the applied log, oldest first, read as another
    /// worker would (from the stream's first offset); stops after `quiet` without a new one.
    pub async fn applied_records(&self, quiet: Duration) -> Vec<Record> {
        use futures_util::StreamExt;
        let channel = self.connection.create_channel().await.unwrap();
        channel.basic_qos(1000, Default::default()).await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut consumer = channel
            .basic_consume(
                self.topology.applied.as_str().into(),
                "records".into(),
                Default::default(),
                arguments,
            )
            .await
            .unwrap();
        let mut records = Vec::new();
        while let Ok(Some(delivery)) = tokio::time::timeout(quiet, consumer.next()).await {
            let delivery = delivery.unwrap();
            let record = Record::decode(&delivery.data).expect("a record the worker wrote");
            // A session's marker, to read up to, applied nothing.
            if record.sync.is_none() {
                // The stream keeps the writer in `app-id`: a tailing worker skips its own
                // records by it, unread.
                let app_id = delivery
                    .properties
                    .app_id()
                    .as_ref()
                    .map(|id| id.to_string());
                assert_eq!(app_id, record.w, "the writer of a record is its app-id");
                assert!(record.w.is_some());
                records.push(record);
            }
            delivery.ack(Default::default()).await.unwrap();
        }
        let _ = channel.close(200, "done".into()).await;
        records
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
        wait_until(what, timeout, async || condition(self)).await;
    }

    pub async fn wait_acked(&self, count: u64, timeout: Duration) {
        self.wait_for(&format!("{count} messages acked"), timeout, |h| {
            h.acked() >= count
        })
        .await;
    }

    /// Waits until `count` messages reached a final outcome: a message moved to a retry
    /// queue is acknowledged once on the way out and again when it comes back.
    pub async fn wait_settled(&self, count: u64, timeout: Duration) {
        self.wait_for(&format!("{count} messages settled"), timeout, |h| {
            h.acked() - h.acked_as("retry_scheduled") >= count
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

/// The worker binary, run on a harness's queues with a configuration file of its own and its
/// operations endpoint (`/metrics`, `/readyz`) on a loopback port picked for it.
pub struct WorkerProcess {
    child: Child,
    config: PathBuf,
    ops: SocketAddr,
    http: reqwest::Client,
}

/// Polls `condition` until it holds; panics naming `what` after `within`. For states that
/// announce no event of their own (queue depths, another process's counters).
pub async fn wait_until(what: &str, within: Duration, condition: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `listrak-worker run` on `config`, quiet but for warnings.
fn run_command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_listrak-worker"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    command
}

impl WorkerProcess {
    /// Starts `listrak-worker run`; `name` tells this process's configuration file apart.
    pub fn spawn(h: &Harness, name: &str, knobs: &Knobs) -> WorkerProcess {
        let (config, ops) = write_process_config(h, name, knobs);
        let child = run_command(&config).spawn().unwrap();
        listrak_worker::edges::listrak::install_crypto_provider();
        WorkerProcess {
            child,
            config,
            ops,
            http: reqwest::Client::new(),
        }
    }

    /// Runs `listrak-worker run` expecting it to stop by itself; its exit status and stderr.
    pub async fn run_to_exit(
        h: &Harness,
        name: &str,
        knobs: &Knobs,
        within: Duration,
    ) -> (ExitStatus, String) {
        let (config, ops) = write_process_config(h, name, knobs);
        let child = run_command(&config).stderr(Stdio::piped()).spawn().unwrap();
        let mut process = WorkerProcess {
            child,
            config,
            ops,
            http: reqwest::Client::new(),
        };
        let status = process.wait_exit(within).await;
        let mut stderr = String::new();
        if let Some(mut pipe) = process.child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        }
        (status, stderr)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The `/metrics` text, or `None` while the endpoint is not up.
    pub async fn metrics(&self) -> Option<String> {
        let response = self
            .http
            .get(format!("http://{}/metrics", self.ops))
            .send()
            .await
            .ok()?;
        response.text().await.ok()
    }

    /// Where its `/metrics`, `/healthz` and `/readyz` are served.
    pub fn ops(&self) -> SocketAddr {
        self.ops
    }

    /// The sum of every sample of a counter (all its labels); 0 while the endpoint is not up.
    pub async fn counter(&self, name: &str) -> u64 {
        self.metrics()
            .await
            .map_or(0.0, |text| counter_total(&text, name)) as u64
    }

    pub async fn acked(&self) -> u64 {
        self.counter("listrak_messages_acked_total").await
    }

    pub async fn received(&self) -> u64 {
        self.counter("listrak_messages_received_total").await
    }

    /// Waits until `/readyz` answers 200: connected and consuming.
    pub async fn wait_ready(&self, within: Duration) {
        wait_until("the worker to be ready", within, async || {
            self.http
                .get(format!("http://{}/readyz", self.ops))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success())
        })
        .await;
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not exit in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    /// A failed test leaves no worker behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Writes the configuration of one worker process, with `http.listen` on a free port.
fn write_process_config(h: &Harness, name: &str, knobs: &Knobs) -> (PathBuf, SocketAddr) {
    // Bound and released at once: another process could take the port in between, which on
    // loopback in a test run does not happen in practice.
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let knobs = Knobs {
        http_listen: ops.to_string(),
        ..knobs.clone()
    };
    let text = settings_text(
        &h.topology.queue,
        &h.fake.api_url(),
        &h.fake.auth_url(),
        &knobs,
    );
    let config = std::env::temp_dir().join(format!("{}.{name}.toml", h.topology.queue));
    std::fs::write(&config, text).unwrap();
    (config, ops)
}

/// The sum of every sample of `name` in Prometheus text (`name{labels} value` lines).
pub fn counter_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A direct update body for `list`, setting `field` to `value`.
pub fn profile_update(list: u32, email: &str, field: u32, value: &str, micros: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": "profile_update",
        "list_id": list,
        "email": email,
        "fields": { field.to_string(): value },
        "timestamp": listrak_worker::stages::model::EventTime(micros).to_rfc3339(),
    }))
    .unwrap()
}

/// A TCP relay in front of RabbitMQ that a test can cut, as a network failure would.
pub struct Relay {
    pub port: u16,
    cut: tokio::sync::watch::Sender<u64>,
    open: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = tokio::spawn({
            let cut = cut.clone();
            let open = Arc::clone(&open);
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut cut = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Relay {
            port,
            cut,
            open,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Drops every relayed connection and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the harness' metrics over HTTP, scrapes `/metrics` once, and returns every sample
/// as `name{labels}` → value (labels as the exposition writes them).
pub async fn scrape(h: &Harness) -> BTreeMap<String, f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(listrak_worker::edges::http::serve(
        listener,
        h.metrics.clone(),
        h.health.clone(),
        stop.clone().cancelled_owned(),
    ));
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop.cancel();
    let _ = server.await;
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// One line on what the worker did under a fault (shown with `--nocapture`): requests by
/// status, retries, and how long the test took to see everything settled.
pub fn report_fault(h: &Harness, fault: &str, started: Instant) {
    let statuses = h.fake.status_counts();
    let requests: usize = statuses.values().sum();
    println!(
        "fault report: {fault}: {requests} requests {statuses:?}, retries systemic {} auth {} \
         ambiguous {}, retry-queue round trips {}, settled in {:.1}s",
        h.metrics
            .sample("listrak_retries_total", &[("class", "systemic")]),
        h.metrics
            .sample("listrak_retries_total", &[("class", "auth")]),
        h.metrics
            .sample("listrak_retries_total", &[("class", "ambiguous")]),
        h.acked_as("retry_scheduled"),
        started.elapsed().as_secs_f64()
    );
}

/// A configuration holding only `[listrak]` for `fake` and `mappings`, which is what the
/// `check` and `listrak` commands need; the file is removed when this is dropped.
pub struct ListrakConfig {
    path: PathBuf,
}

impl ListrakConfig {
    pub fn new(fake: &FakeServer, name: &str, mappings: &str) -> Self {
        let options = FakeOptions::default();
        let text = format!(
            r#"
[listrak]
client_id = "{}"
client_secret = "{}"
api_url = "{}"
auth_url = "{}"
request_timeout = "5s"

{mappings}"#,
            options.client_id,
            options.client_secret,
            fake.api_url(),
            fake.auth_url()
        );
        let path = std::env::temp_dir().join(format!(
            "listrak-worker-cli-{name}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        ListrakConfig { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the worker binary with `args` and this configuration, off the runtime's thread
    /// (which keeps serving an in-process fake).
    pub async fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_listrak-worker"));
        command
            .args(args)
            .arg("--config")
            .arg(&self.path)
            .env("RUST_LOG", "warn");
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for ListrakConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
