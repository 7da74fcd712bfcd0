//! What `ingest` takes at its door: a Segment request body split into its events, what each
//! event's message carries, and the checks of Segment's signature and a bearer token. Pure:
//! the HTTP server and the publisher are edges.
//!
//! Segment's Webhooks (Actions) destination posts one event, or with batching a JSON array of
//! them; Segment's HTTP tracking API shape is `{"batch": [...]}`. An event that is JSON but
//! not one the worker can map is not refused here: the worker dead-letters it with its
//! reason, so Segment never retries for ever on content.

use hmac::{Hmac, Mac};
use serde_json::value::RawValue;
use sha1::Sha1;

/// One event of a request: its JSON text exactly as sent, and what its message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestEvent<'a> {
    pub body: &'a str,
    /// Segment's `messageId` (or a direct update's `message_id`): the AMQP `message_id`.
    pub message_id: Option<String>,
    /// The event's `timestamp` in seconds since the epoch: the AMQP `timestamp`.
    pub timestamp: Option<u64>,
    /// The event's `type`: the routing key, as `publish` uses it.
    pub kind: Option<String>,
}

/// Splits a request body into its events: one JSON object, a JSON array of events (Webhooks
/// batching), or `{"batch": [...]}`. Any other JSON value is one event too (the worker
/// dead-letters it). A body that is not JSON is refused with the parser's reason.
pub fn split_events(body: &[u8]) -> Result<Vec<IngestEvent<'_>>, String> {
    let text =
        std::str::from_utf8(body).map_err(|error| format!("the body is not UTF-8: {error}"))?;
    let whole: &RawValue =
        serde_json::from_str(text).map_err(|error| format!("the body is not JSON: {error}"))?;
    let raw = whole.get().trim_start();
    let events: Vec<&RawValue> = if raw.starts_with('[') {
        serde_json::from_str(whole.get())
            .map_err(|error| format!("the body is not JSON: {error}"))?
    } else if raw.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            batch: Option<Vec<&'a RawValue>>,
        }
        match serde_json::from_str::<Envelope<'_>>(whole.get()) {
            Ok(Envelope { batch: Some(batch) }) => batch,
            _ => vec![whole],
        }
    } else {
        vec![whole]
    };
    Ok(events.into_iter().map(event).collect())
}

fn event(raw: &RawValue) -> IngestEvent<'_> {
    #[derive(serde::Deserialize, Default)]
    struct Carried {
        #[serde(rename = "messageId")]
        segment_id: Option<serde_json::Value>,
        message_id: Option<serde_json::Value>,
        timestamp: Option<serde_json::Value>,
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
    }
    let carried: Carried = serde_json::from_str(raw.get()).unwrap_or_default();
    let text = |value: Option<serde_json::Value>| match value {
        Some(serde_json::Value::String(text)) => Some(text),
        _ => None,
    };
    let message_id = text(carried.segment_id)
        .or_else(|| text(carried.message_id))
        .filter(|id| !id.is_empty() && id.len() <= 255);
    let timestamp = text(carried.timestamp)
        .and_then(|time| chrono::DateTime::parse_from_rfc3339(&time).ok())
        .and_then(|time| u64::try_from(time.timestamp()).ok());
    let kind = text(carried.kind).filter(|kind| !kind.is_empty() && kind.len() < 200);
    IngestEvent {
        body: raw.get(),
        message_id,
        timestamp,
        kind,
    }
}

/// Whether `header` (Segment's `X-Signature`: the hex HMAC-SHA1 of the raw body with the
/// shared secret) signs `body`. Compared in constant time.
pub fn signature_matches(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(signature) = from_hex(header.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

/// The hex HMAC-SHA1 of `body` with `secret`, as Segment sends it.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Whether an `Authorization` header carries `Bearer <token>`; the token compared in
/// constant time (its length is not a secret worth hiding).
pub fn bearer_matches(token: &str, header: &str) -> bool {
    let Some(given) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
    else {
        return false;
    };
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = concat!(
        r#"{"type":"track","event":"Audience Entered","messageId":"m-1","#,
        r#""timestamp":"2026-12-07T10:00:00Z","properties":{"audience_key":"vip"}}"#
    );

    #[test]
    fn a_body_is_one_event_an_array_of_events_or_a_batch() {
        let one = split_events(EVENT.as_bytes()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].body, EVENT);
        assert_eq!(one[0].message_id.as_deref(), Some("m-1"));
        assert_eq!(one[0].timestamp, Some(1_796_637_600));
        assert_eq!(one[0].kind.as_deref(), Some("track"));

        let array = format!("[{EVENT}, {EVENT}]");
        assert_eq!(split_events(array.as_bytes()).unwrap().len(), 2);
        let batch = format!(r#"{{"batch": [{EVENT}, {EVENT}, {EVENT}], "sentAt": "x"}}"#);
        let events = split_events(batch.as_bytes()).unwrap();
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|event| event.body == EVENT));
    }

    #[test]
    fn json_the_worker_cannot_map_is_passed_on_and_not_json_is_refused() {
        let odd = split_events(br#"[1, "two", {"batch": 3}]"#).unwrap();
        assert_eq!(
            odd.iter().map(|event| event.body).collect::<Vec<_>>(),
            ["1", "\"two\"", r#"{"batch": 3}"#]
        );
        assert!(odd.iter().all(|event| event.message_id.is_none()));
        assert_eq!(split_events(b"42").unwrap().len(), 1);
        assert!(split_events(b"[]").unwrap().is_empty());
        for refused in [&b"{not json"[..], b"", b"\xff\xfe", b"[1,"] {
            assert!(split_events(refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn an_event_id_or_time_that_is_not_a_string_is_left_out() {
        let events =
            split_events(br#"{"messageId": 7, "timestamp": "yesterday", "type": ""}"#).unwrap();
        assert_eq!(events[0].message_id, None);
        assert_eq!(events[0].timestamp, None);
        assert_eq!(events[0].kind, None);
    }

    #[test]
    fn a_signature_matches_only_its_body_and_secret() {
        let body = EVENT.as_bytes();
        let signed = signature(b"shared", body);
        assert_eq!(signed.len(), 40);
        assert!(signature_matches(b"shared", body, &signed));
        assert!(signature_matches(b"shared", body, &signed.to_uppercase()));
        assert!(!signature_matches(b"other", body, &signed));
        assert!(!signature_matches(b"shared", b"{}", &signed));
        for bad in ["", "zz", &signed[..39], "sha1=abc"] {
            assert!(!signature_matches(b"shared", body, bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bearer_token_matches_only_itself() {
        assert!(bearer_matches("t0ken", "Bearer t0ken"));
        for bad in [
            "Bearer t0ke",
            "Bearer t0kenn",
            "Basic t0ken",
            "t0ken",
            "Bearer ",
        ] {
            assert!(!bearer_matches("t0ken", bad), "{bad:?}");
        }
    }
}
