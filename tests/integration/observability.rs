//! The dashboard and the alert rules ask only for series a running worker serves.
//!
//! Every PromQL expression in `deploy/grafana/listrak-worker.json` and
//! `deploy/prometheus/alerts.yml` is read for the `listrak_…` series it selects and the label
//! matchers it applies; a real worker then runs a little traffic, its `/metrics` is scraped
//! over HTTP, and each series, label and fixed label value must be in that scrape.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use listrak_worker::edges::http;
use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, TrafficShape};

use crate::support::{Harness, Knobs};

/// Labels Prometheus attaches to every target (scrape and Kubernetes discovery), never the
/// worker: a matcher on them is always allowed.
const TARGET_LABELS: [&str; 5] = ["instance", "job", "pod", "namespace", "service"];

/// Labels whose values are open-ended (an HTTP status), so an equality matcher on them
/// cannot be checked against one scrape.
const OPEN_LABELS: [&str; 1] = ["status"];

/// One label matcher of a selector: `name`, operator, value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// A series selected by an expression: its name and matchers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `listrak_…` selector in a PromQL expression, with the matchers in its braces.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_name = (i == 0 || !is_name_char(chars[i - 1]))
            && chars[i..]
                .iter()
                .collect::<String>()
                .starts_with("listrak_");
        if !starts_name {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_name_char(chars[i]) {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let mut matchers = Vec::new();
        if j < chars.len() && chars[j] == '{' {
            let (parsed, end) = parse_matchers(&chars, j + 1, expr);
            matchers = parsed;
            i = end;
        }
        found.push(Selector { name, matchers });
    }
    found
}

/// Parses `label op "value", …}` from `at`; returns the matchers and the index after `}`.
fn parse_matchers(chars: &[char], mut at: usize, expr: &str) -> (Vec<Matcher>, usize) {
    let mut matchers = Vec::new();
    let skip_space = |at: &mut usize| {
        while *at < chars.len() && (chars[*at].is_whitespace() || chars[*at] == ',') {
            *at += 1;
        }
    };
    loop {
        skip_space(&mut at);
        assert!(at < chars.len(), "unclosed selector in {expr:?}");
        if chars[at] == '}' {
            return (matchers, at + 1);
        }
        let start = at;
        while at < chars.len() && is_name_char(chars[at]) {
            at += 1;
        }
        let label: String = chars[start..at].iter().collect();
        let op_start = at;
        while at < chars.len() && "=~!".contains(chars[at]) {
            at += 1;
        }
        let op: String = chars[op_start..at].iter().collect();
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "cannot read the matcher at {:?} in {expr:?}",
            chars[start..].iter().collect::<String>()
        );
        assert_eq!(chars.get(at), Some(&'"'), "unquoted value in {expr:?}");
        at += 1;
        let mut value = String::new();
        while at < chars.len() && chars[at] != '"' {
            if chars[at] == '\\' {
                at += 1;
            }
            value.push(chars[at]);
            at += 1;
        }
        at += 1;
        matchers.push(Matcher { label, op, value });
    }
}

fn repository_file(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Every `expr` string anywhere in the dashboard JSON (panels, rows, templating).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| walk(item, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// Every `expr:` of a rules file: the rest of the line, or the indented block after `|`/`>`.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !rest.starts_with(['|', '>']) {
            exprs.push(rest.trim_matches(['"', '\'']).to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[index + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        exprs.push(block.join("\n"));
    }
    exprs
}

/// A scrape, read as sample name → the label sets of its samples, plus each family's type.
struct Scrape {
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let selector = selectors(line)
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("not a listrak sample: {line:?}"));
            let labels = selector
                .matchers
                .into_iter()
                .map(|m| (m.label, m.value))
                .collect();
            samples.entry(selector.name).or_default().push(labels);
        }
        Scrape { samples, types }
    }

    /// Why `selector` selects nothing the worker serves, if it does not.
    fn problem(&self, selector: &Selector) -> Option<String> {
        let name = &selector.name;
        if self.types.get(name).map(String::as_str) == Some("histogram") {
            return Some(format!(
                "{name} is a histogram: select {name}_bucket, {name}_sum or {name}_count"
            ));
        }
        let Some(series) = self.samples.get(name) else {
            return Some(format!("{name} is not in the worker's /metrics"));
        };
        for matcher in &selector.matchers {
            if TARGET_LABELS.contains(&matcher.label.as_str()) {
                continue;
            }
            let values: BTreeSet<&str> = series
                .iter()
                .filter_map(|labels| labels.get(&matcher.label).map(String::as_str))
                .collect();
            if values.is_empty() {
                return Some(format!("{name} has no label {:?}", matcher.label));
            }
            let fixed = !OPEN_LABELS.contains(&matcher.label.as_str());
            if fixed && matcher.op == "=" && !values.contains(matcher.value.as_str()) {
                return Some(format!(
                    "{name}{{{}={:?}}}: the worker serves only {values:?}",
                    matcher.label, matcher.value
                ));
            }
        }
        None
    }
}

/// Checks every selector of `exprs` against the scrape; returns the distinct names used.
fn assert_served(what: &str, exprs: &[String], scrape: &Scrape) -> BTreeSet<String> {
    let mut problems = BTreeSet::new();
    let mut names = BTreeSet::new();
    for expr in exprs {
        for selector in selectors(expr) {
            names.insert(selector.name.clone());
            if let Some(problem) = scrape.problem(&selector) {
                problems.insert(format!("{problem}\n    in: {expr}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{what} asks for series the worker does not serve:\n  {}",
        problems.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    names
}

async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    listrak_worker::edges::listrak::install_crypto_provider();
    let response = reqwest::Client::new()
        .get(format!("http://{address}{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, response.text().await.unwrap())
}

#[test]
fn selectors_are_read_with_their_matchers_through_functions_and_line_breaks() {
    let expr = "histogram_quantile(0.95, sum without (instance) \
                (rate(listrak_event_lag_seconds_bucket{job=\"w\", le!=\"1\"}[15m])))\n/ ignoring \
                (reason) group_left\nlistrak_dead_letters_total {reason=~\"a|b\"} > 0 and \
                not_listrak_metric";
    assert_eq!(
        selectors(expr),
        [
            Selector {
                name: "listrak_event_lag_seconds_bucket".into(),
                matchers: vec![
                    Matcher {
                        label: "job".into(),
                        op: "=".into(),
                        value: "w".into()
                    },
                    Matcher {
                        label: "le".into(),
                        op: "!=".into(),
                        value: "1".into()
                    },
                ],
            },
            Selector {
                name: "listrak_dead_letters_total".into(),
                matchers: vec![Matcher {
                    label: "reason".into(),
                    op: "=~".into(),
                    value: "a|b".into()
                }],
            },
        ]
    );
    let rules = "rules:\n  - alert: A\n    expr: |\n      up\n      == 0\n    for: 5m\n  - alert: \
                 B\n    expr: listrak_x > 1\n";
    assert_eq!(rule_exprs(rules), ["up\n== 0", "listrak_x > 1"]);
}

#[test]
fn a_histogram_is_selected_through_its_bucket_sum_or_count_series() {
    let scrape = Scrape::parse(
        "# TYPE listrak_lag_seconds histogram\n\
         listrak_lag_seconds_bucket{le=\"1\"} 0\n\
         listrak_lag_seconds_bucket{le=\"+Inf\"} 0\n\
         listrak_lag_seconds_sum 0\n\
         listrak_lag_seconds_count 0\n",
    );
    let problem = |expr: &str| scrape.problem(&selectors(expr)[0]);
    assert_eq!(
        problem("listrak_lag_seconds_bucket{le=\"1\", job=\"w\"}"),
        None
    );
    assert_eq!(problem("listrak_lag_seconds_count"), None);
    assert!(problem("listrak_lag_seconds").is_some_and(|p| p.contains("is a histogram")));
    assert!(problem("listrak_lag_seconds_bucket{le=\"2\"}").is_some());
    assert!(problem("listrak_lag_seconds_bucket{queue=~\".*\"}").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_on_the_dashboard_and_in_the_alerts_is_served_by_a_running_worker() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repository_file("deploy/grafana/listrak-worker.json"))
            .expect("the dashboard is JSON");
    let panel_exprs = dashboard_exprs(&dashboard);
    let alerts = repository_file("deploy/prometheus/alerts.yml");
    let alert_exprs = rule_exprs(&alerts);
    assert_eq!(
        alert_exprs.len(),
        alerts.matches("- alert:").count(),
        "one expression read per alert"
    );

    let traffic = sample::generate(TrafficShape {
        events: 300,
        people: 60,
        poison_every: 25,
        ..TrafficShape::default()
    });
    let mut h = Harness::new("observability", Faults::default(), Knobs::default()).await;
    h.publish(&traffic.bodies).await;
    h.start_worker();
    h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(60))
        .await;
    h.wait_for(
        "the queue depths to be polled",
        Duration::from_secs(30),
        |h| {
            h.metrics
                .render()
                .contains("listrak_queue_messages{queue=\"dead\"}")
        },
    )
    .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(http::serve(
        listener,
        h.metrics.clone(),
        h.health.clone(),
        stop.clone().cancelled_owned(),
    ));
    let (status, content_type, text) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    // The paths the Kubernetes probes and the image's HEALTHCHECK use.
    assert_eq!(get(address, "/healthz").await.0, 200);
    assert_eq!(get(address, "/readyz").await.0, 200);
    stop.cancel();
    server.await.unwrap().unwrap();

    // The ingest endpoint serves its own series (a job of its own): one request answered.
    let endpoint = listrak_worker::commands::ingest::Running::start(
        &h.settings,
        listrak_worker::edges::ingest::IngestMetrics::new(),
    )
    .await
    .unwrap();
    let ingest = endpoint.address;
    crate::support::wait_until("ingest ready", Duration::from_secs(20), async || {
        get(ingest, "/readyz").await.0 == 200
    })
    .await;
    let answered = reqwest::Client::new()
        .post(format!("http://{ingest}/v1/batch"))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let (status, _, ingest_text) = get(ingest, "/metrics").await;
    assert_eq!(status, 200);
    endpoint.stop().await.unwrap();

    let scrape = Scrape::parse(&format!("{text}{ingest_text}"));
    let on_dashboard = assert_served("the dashboard", &panel_exprs, &scrape);
    let in_alerts = assert_served("deploy/prometheus/alerts.yml", &alert_exprs, &scrape);
    let test_series: Vec<String> = repository_file("deploy/prometheus/alerts.test.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- series:"))
        .map(|s| s.trim().trim_matches('\'').to_string())
        .collect();
    assert_served("deploy/prometheus/alerts.test.yml", &test_series, &scrape);

    // The brief's panels and alerts are all there.
    for name in [
        "listrak_messages_acked_total",
        "listrak_requests_total",
        "listrak_request_duration_seconds_bucket",
        "listrak_batch_contacts_bucket",
        "listrak_concurrency_limit",
        "listrak_requests_in_flight",
        "listrak_event_lag_seconds_bucket",
        "listrak_queue_messages",
        "listrak_dead_letters_total",
        "listrak_token_refreshes_total",
        "listrak_amqp_connected",
        "listrak_amqp_reconnects_total",
        "listrak_last_success_timestamp_seconds",
        "listrak_amqp_node",
        "listrak_ingest_requests_total",
        "listrak_ingest_refused_total",
        "listrak_ingest_events_published_total",
    ] {
        assert!(on_dashboard.contains(name), "no panel shows {name}");
    }
    for name in [
        "listrak_queue_messages",
        "listrak_last_success_timestamp_seconds",
        "listrak_requests_total",
        "listrak_event_lag_seconds_bucket",
        "listrak_amqp_connected",
        "listrak_token_refreshes_total",
        "listrak_dead_letters_total",
        "listrak_ingest_refused_total",
    ] {
        assert!(in_alerts.contains(name), "no alert watches {name}");
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_in_the_middle_of_a_request_does_not_hold_up_the_exit() {
    use tokio::io::AsyncWriteExt;

    let h = Harness::new("half_request", Faults::default(), Knobs::default()).await;
    let mut worker = crate::support::WorkerProcess::spawn(&h, "half-request", &Knobs::default());
    worker.wait_ready(Duration::from_secs(20)).await;
    let mut stuck = tokio::net::TcpStream::connect(worker.ops()).await.unwrap();
    stuck.write_all(b"GET /metr").await.unwrap();
    // The server accepts connections in order: once a request on a later connection is
    // answered, the stuck one is held by the server too.
    worker.metrics().await.expect("metrics are served");

    let asked = std::time::Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the exit took {:?}",
        asked.elapsed()
    );
    drop(stuck);
    h.finish().await;
}
