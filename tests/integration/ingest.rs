//! `listrak-worker ingest`: Segment's Webhooks destination posts events, the endpoint
//! publishes each with a confirm, and the worker applies them. Refusals publish nothing, and
//! a broker that cannot confirm gets 503, never 200.

use std::net::SocketAddr;
use std::time::Duration;

use listrak_worker::config::{BrokerUrls, Secret, Settings};
use listrak_worker::edges::ingest::IngestMetrics;
use listrak_worker::stages::ingest::signature;
use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, TrafficShape};

use crate::support::{amqp_url, wait_until, Harness, Knobs, Relay};

const SECRET: &str = "segment-shared-secret";

/// The endpoint, in this process, and its metrics.
struct Endpoint {
    running: listrak_worker::commands::ingest::Running,
    address: SocketAddr,
    metrics: IngestMetrics,
}

impl Endpoint {
    async fn start(settings: &Settings) -> Endpoint {
        let metrics = IngestMetrics::new();
        let running = listrak_worker::commands::ingest::Running::start(settings, metrics.clone())
            .await
            .unwrap();
        let endpoint = Endpoint {
            address: running.address,
            running,
            metrics,
        };
        endpoint.wait_ready().await;
        endpoint
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.address);
        wait_until("the endpoint ready", Duration::from_secs(20), async || {
            reqwest::get(&url)
                .await
                .is_ok_and(|response| response.status() == 200)
        })
        .await;
    }

    async fn post(&self, body: &[u8], signature: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("http://{}/", self.address))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("x-signature", signature);
        }
        request.send().await.unwrap()
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

fn settings_with_secret(h: &Harness) -> Settings {
    let mut settings = h.settings.clone();
    settings.ingest.shared_secret = Some(Secret::new(SECRET));
    settings.ingest.max_body = 2_000_000;
    settings
}

fn engage_traffic(events: usize) -> sample::Traffic {
    sample::generate(TrafficShape {
        events,
        people: events / 3,
        poison_every: 0,
        ..TrafficShape::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_batch_of_a_thousand_engage_events_ends_in_listrak_exactly() {
    let mut h = Harness::new("ingest_batch", Faults::default(), Knobs::default()).await;
    let endpoint = Endpoint::start(&settings_with_secret(&h)).await;
    let traffic = engage_traffic(1000);
    let body = sample::json_array(&traffic.bodies);
    let response = endpoint
        .post(&body, Some(&signature(SECRET.as_bytes(), &body)))
        .await;
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(answer["published"], 1000);
    assert_eq!(h.depth(&h.topology.queue).await, 1000);

    h.start_worker();
    h.wait_for("every event applied", Duration::from_secs(60), |h| {
        h.fake.contacts() == traffic.expected
    })
    .await;
    let metrics = endpoint.metrics.render();
    assert!(
        metrics.contains("listrak_ingest_events_published_total 1000"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(SECRET),
        "the secret never reaches the metrics"
    );
    endpoint.stop().await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_a_body_too_large_or_not_json_is_refused_and_publishes_nothing() {
    let h = Harness::new("ingest_refusals", Faults::default(), Knobs::default()).await;
    let endpoint = Endpoint::start(&settings_with_secret(&h)).await;
    let traffic = engage_traffic(30);
    let body = sample::json_array(&traffic.bodies);
    let signed = signature(SECRET.as_bytes(), &body);

    let missing = endpoint.post(&body, None).await;
    assert_eq!(missing.status(), 401);
    let wrong = endpoint
        .post(&body, Some(&signature(b"another secret", &body)))
        .await;
    assert_eq!(wrong.status(), 401);
    let other_body = endpoint.post(b"[]", Some(&signed)).await;
    assert_eq!(other_body.status(), 401);

    let large = vec![b' '; 2_000_001];
    let too_large = endpoint
        .post(&large, Some(&signature(SECRET.as_bytes(), &large)))
        .await;
    assert_eq!(too_large.status(), 413);

    let not_json = b"{\"type\": \"track\", ";
    let refused = endpoint
        .post(not_json, Some(&signature(SECRET.as_bytes(), not_json)))
        .await;
    assert_eq!(refused.status(), 400);
    let reason = refused.text().await.unwrap();
    assert!(reason.contains("not JSON"), "{reason}");
    assert!(!reason.contains(SECRET));

    assert_eq!(h.depth(&h.topology.queue).await, 0, "nothing published");
    let metrics = endpoint.metrics.render();
    for (reason, count) in [("signature", 3), ("too_large", 1), ("not_json", 1)] {
        let line = format!("listrak_ingest_refused_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    endpoint.stop().await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_mid_body_publishes_nothing() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::new("ingest_cut_off", Faults::default(), Knobs::default()).await;
    let endpoint = Endpoint::start(&h.settings).await;
    let traffic = engage_traffic(30);
    let body = sample::json_array(&traffic.bodies);
    let mut stream = tokio::net::TcpStream::connect(endpoint.address)
        .await
        .unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    drop(stream);
    wait_until(
        "the cut-off request counted",
        Duration::from_secs(10),
        async || {
            endpoint
                .metrics
                .render()
                .contains("listrak_ingest_refused_total{reason=\"cut_off\"} 1")
        },
    )
    .await;
    assert_eq!(h.depth(&h.topology.queue).await, 0, "nothing published");
    endpoint.stop().await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_broker_the_endpoint_answers_503_and_a_retry_is_applied_once() {
    let mut h = Harness::new("ingest_broker_down", Faults::default(), Knobs::default()).await;
    let upstream: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], upstream.authority.port))).await;
    let mut settings = settings_with_secret(&h);
    settings.amqp.urls = BrokerUrls::one(relay.url());
    let endpoint = Endpoint::start(&settings).await;
    let traffic = engage_traffic(300);
    let body = sample::json_array(&traffic.bodies);
    let signed = signature(SECRET.as_bytes(), &body);

    relay.cut();
    wait_until(
        "not ready without the broker",
        Duration::from_secs(10),
        async || {
            reqwest::get(format!("http://{}/readyz", endpoint.address))
                .await
                .is_ok_and(|response| response.status() == 503)
        },
    )
    .await;
    let refused = endpoint.post(&body, Some(&signed)).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(h.depth(&h.topology.queue).await, 0);

    // Segment sends the same request again once the broker is back.
    relay.restore();
    endpoint.wait_ready().await;
    let accepted = endpoint.post(&body, Some(&signed)).await;
    assert_eq!(accepted.status(), 200);
    h.start_worker();
    h.wait_for("every event applied", Duration::from_secs(60), |h| {
        h.fake.contacts() == traffic.expected
    })
    .await;
    h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(30))
        .await;
    let received = h.metrics.sample("listrak_messages_received_total", &[]);
    assert_eq!(received as usize, traffic.bodies.len(), "each event once");
    endpoint.stop().await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_command_takes_signed_events_and_exits_0_on_sigterm() {
    let h = Harness::new("ingest_process", Faults::default(), Knobs::default()).await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = std::env::temp_dir().join(format!("ingest-{}-{port}.toml", std::process::id()));
    let text = crate::support::settings_text(
        &h.topology.queue,
        &h.fake.api_url(),
        &h.fake.auth_url(),
        &Knobs::default(),
    );
    std::fs::write(
        &config,
        format!("{text}\n[ingest]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_listrak-worker"))
        .args(["ingest", "--config"])
        .arg(&config)
        .env("LISTRAK_INGEST_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until(
        "the ingest process ready",
        Duration::from_secs(30),
        async || {
            reqwest::get(format!("http://{address}/readyz"))
                .await
                .is_ok_and(|response| response.status() == 200)
        },
    )
    .await;
    let traffic = engage_traffic(60);
    let body = sample::json_array(&traffic.bodies);
    let answer = reqwest::Client::new()
        .post(format!("http://{address}/v1/batch"))
        .header("x-signature", signature(SECRET.as_bytes(), &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(h.depth(&h.topology.queue).await, 60);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exited.code(), Some(0), "SIGTERM ends ingest cleanly");
    let _ = std::fs::remove_file(&config);
    h.finish().await;
}
