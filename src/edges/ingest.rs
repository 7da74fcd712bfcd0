//! The ingest endpoint: Segment's Webhooks (Actions) destination posts events here, and each
//! is published to the exchange as its own persistent message, with a publisher confirm. The
//! answer is 200 only once every event of the request is confirmed; otherwise 503 with
//! `Retry-After`, so that Segment sends the request again and nothing is lost between the
//! two systems. Refusals (401, 413, 400) publish nothing.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lapin::types::ShortString;
use lapin::BasicProperties;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::config::IngestSettings;
use crate::edges::broker::{wait_confirm, Publisher};
use crate::stages::ingest::{bearer_matches, signature_matches, split_events, IngestEvent};

/// How long Segment is told to wait before it sends a refused request again.
const RETRY_AFTER_SECONDS: u64 = 5;

/// Why a request was refused: the `reason` label of `listrak_ingest_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Signature,
    Token,
    TooLarge,
    NotJson,
    /// The body ended before its announced length (the client went away mid-request).
    CutOff,
    /// The broker is not connected or did not confirm every event.
    Broker,
}

impl Refused {
    pub const ALL: [Refused; 6] = [
        Self::Signature,
        Self::Token,
        Self::TooLarge,
        Self::NotJson,
        Self::CutOff,
        Self::Broker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signature => "signature",
            Self::Token => "token",
            Self::TooLarge => "too_large",
            Self::NotJson => "not_json",
            Self::CutOff => "cut_off",
            Self::Broker => "broker",
        }
    }
}

/// The endpoint's metrics, in a registry of their own (served on its own `/metrics`).
#[derive(Clone)]
pub struct IngestMetrics {
    registry: Registry,
    requests: IntCounterVec,
    published: IntCounter,
    confirm: Histogram,
    refused: IntCounterVec,
    connected: IntGauge,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "listrak_ingest_requests_total",
                "Requests answered by the ingest endpoint, by HTTP status.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let published = IntCounter::new(
            "listrak_ingest_events_published_total",
            "Events published to the exchange and confirmed by the broker.",
        )
        .expect("valid metric");
        let confirm = Histogram::with_opts(
            HistogramOpts::new(
                "listrak_ingest_confirm_seconds",
                "From a request's first publish to the broker's last confirm.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
            ]),
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "listrak_ingest_refused_total",
                "Requests refused (nothing of them published or confirmed), by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let connected = IntGauge::new(
            "listrak_ingest_broker_connected",
            "1 while the ingest endpoint holds a broker connection it can publish on.",
        )
        .expect("valid metric");
        for metric in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(published.clone()),
            Box::new(confirm.clone()),
            Box::new(refused.clone()),
            Box::new(connected.clone()),
        ] {
            registry.register(metric).expect("unique");
        }
        for reason in Refused::ALL {
            refused.with_label_values(&[reason.as_str()]);
        }
        Self {
            registry,
            requests,
            published,
            confirm,
            refused,
            connected,
        }
    }

    fn answered(&self, status: StatusCode) {
        self.requests.with_label_values(&[status.as_str()]).inc();
    }

    fn refused(&self, reason: Refused) {
        self.refused.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// The publisher the endpoint uses, while the broker connection is up: `None` between
/// connections, and then every request is answered 503.
#[derive(Clone, Default)]
pub struct PublisherSlot(Arc<RwLock<Option<Publisher>>>);

impl PublisherSlot {
    pub fn set(&self, publisher: Option<Publisher>) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = publisher;
    }

    fn get(&self) -> Option<Publisher> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }
}

/// What a request handler needs.
#[derive(Clone)]
pub struct Door {
    pub settings: IngestSettings,
    pub exchange: String,
    pub publisher: PublisherSlot,
    pub metrics: IngestMetrics,
}

/// The endpoint's routes: `POST /` and `POST /v1/batch` take events; `/healthz`, `/readyz`
/// (ready while a broker connection is up) and `/metrics`.
pub fn router(door: Door) -> Router {
    Router::new()
        .route("/", post(take))
        .route("/v1/batch", post(take))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/metrics", get(metrics_text))
        .with_state(door)
}

async fn readiness(State(door): State<Door>) -> Response {
    let connected = door.publisher.is_set();
    door.metrics.connected.set(i64::from(connected));
    if connected {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to the broker\n",
        )
            .into_response()
    }
}

async fn metrics_text(State(door): State<Door>) -> Response {
    door.metrics
        .connected
        .set(i64::from(door.publisher.is_set()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        door.metrics.render(),
    )
        .into_response()
}

async fn take(State(door): State<Door>, request: Request) -> Response {
    let (status, response) = answer(&door, request).await;
    door.metrics.answered(status);
    response
}

fn refusal(
    door: &Door,
    reason: Refused,
    status: StatusCode,
    message: String,
) -> (StatusCode, Response) {
    door.metrics.refused(reason);
    let body = serde_json::json!({
        "status": status.as_u16(),
        "error": reason.as_str(),
        "message": message,
    });
    let mut response = json(status, &body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            RETRY_AFTER_SECONDS
                .to_string()
                .parse()
                .expect("a header value"),
        );
    }
    (status, response)
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

async fn answer(door: &Door, request: Request) -> (StatusCode, Response) {
    let max_body = door.settings.max_body;
    let (parts, body) = request.into_parts();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|length| length > max_body as u64) {
        let _ = read_body(body, 0).await;
        return refusal(
            door,
            Refused::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than ingest.max_body ({max_body} bytes)"),
        );
    }
    let body = match read_body(body, max_body).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return refusal(
                door,
                Refused::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than ingest.max_body ({max_body} bytes)"),
            )
        }
        Err(BodyError::CutOff(why)) => {
            return refusal(
                door,
                Refused::CutOff,
                StatusCode::BAD_REQUEST,
                format!("the body could not be read to its end: {why}"),
            )
        }
    };
    if let Some(refused) = check_credentials(&door.settings, &parts.headers, &body) {
        let message = match refused {
            Refused::Signature => {
                "X-Signature is missing or does not sign this body with the shared secret"
            }
            _ => "Authorization does not carry the expected bearer token",
        };
        return refusal(door, refused, StatusCode::UNAUTHORIZED, message.to_owned());
    }
    let events = match split_events(&body) {
        Ok(events) => events,
        Err(why) => return refusal(door, Refused::NotJson, StatusCode::BAD_REQUEST, why),
    };
    let Some(publisher) = door.publisher.get() else {
        return refusal(
            door,
            Refused::Broker,
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the broker; send the request again".to_owned(),
        );
    };
    match publish_all(&publisher, &door.exchange, &events).await {
        Ok(elapsed) => {
            door.metrics.confirm.observe(elapsed.as_secs_f64());
            door.metrics.published.inc_by(events.len() as u64);
            let body = serde_json::json!({ "published": events.len() });
            (StatusCode::OK, json(StatusCode::OK, &body))
        }
        Err(why) => {
            tracing::warn!(
                %why,
                events = events.len(),
                "a request's events were not all confirmed; answered 503"
            );
            refusal(
                door,
                Refused::Broker,
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker did not confirm every event ({why}); send the request again"),
            )
        }
    }
}

/// The signature (when a shared secret is set) and the bearer token (when one is set).
fn check_credentials(
    settings: &IngestSettings,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Refused> {
    if let Some(secret) = &settings.shared_secret {
        let signed = headers
            .get("x-signature")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|signature| {
                signature_matches(secret.expose().as_bytes(), body, signature)
            });
        if !signed {
            return Some(Refused::Signature);
        }
    }
    if let Some(token) = &settings.bearer_token {
        let carried = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|given| bearer_matches(token.expose(), given));
        if !carried {
            return Some(Refused::Token);
        }
    }
    None
}

enum BodyError {
    TooLarge,
    CutOff(String),
}

/// Reads the body, at most `max` bytes. A larger one is read to its end all the same (up to
/// [`DRAIN_AT_MOST`] more bytes, within [`DRAIN_WITHIN`]) and thrown away as it comes: a client
/// still sending when the refusal is written would see a reset connection, not the 413.
async fn read_body(mut body: Body, max: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut kept = bytes::BytesMut::new();
    let mut too_large = false;
    let mut thrown = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_WITHIN;
    loop {
        let frame = if too_large {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return Err(BodyError::TooLarge),
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else {
            break;
        };
        let frame = frame.map_err(|error| BodyError::CutOff(error.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if too_large {
            thrown += data.len();
            if thrown > DRAIN_AT_MOST {
                return Err(BodyError::TooLarge);
            }
        } else if kept.len() + data.len() > max {
            too_large = true;
            thrown = kept.len() + data.len();
            kept = bytes::BytesMut::new();
        } else {
            kept.extend_from_slice(&data);
        }
    }
    if too_large {
        return Err(BodyError::TooLarge);
    }
    Ok(kept.freeze())
}

/// How much of a body too large is read and thrown away before the refusal, and for how long.
const DRAIN_AT_MOST: usize = 64 << 20;
const DRAIN_WITHIN: Duration = Duration::from_secs(10);

/// Publishes every event, persistent, and waits for all the confirms.
async fn publish_all(
    publisher: &Publisher,
    exchange: &str,
    events: &[IngestEvent<'_>],
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        if let Some(id) = &event.message_id {
            properties = properties.with_message_id(ShortString::from(id.as_str()));
        }
        if let Some(timestamp) = event.timestamp {
            properties = properties.with_timestamp(timestamp);
        }
        let routing_key = event.kind.as_deref().unwrap_or("event");
        let confirm = publisher
            .start(exchange, routing_key, event.body.as_bytes(), properties)
            .await
            .map_err(|error| error.to_string())?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        wait_confirm(confirm)
            .await
            .map_err(|error| error.to_string())?;
    }
    Ok(started.elapsed())
}
