//! Decoding: a message body's bytes into a Segment event or a direct update, or poison.
//!
//! Only the shape is checked here (what the mappings rely on: the type, the event name,
//! objects where objects are expected, the timestamp); which fields matter is the
//! mapping's business. A body that fails is poison: it can never succeed, so it goes to
//! the dead-letter queue at once instead of being retried.

use std::str::FromStr;

use crate::stages::model::{DeadLetterReason, EventTime, FieldId, ListId, Update};

/// Larger bodies are refused before parsing; an audience event is a few kilobytes.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A decoded body; its strings are borrowed from the message wherever they need no
/// unescaping, so reading an event allocates little more than its arrays and objects.
pub type Json<'a> = serde_json_borrow::Value<'a>;
pub type JsonObject<'a> = serde_json_borrow::ObjectAsVec<'a>;

/// The member `name` of an object; when a producer wrote it twice, the last one, as most
/// JSON readers take it.
pub fn member<'v, 'a>(object: &'v JsonObject<'a>, name: &str) -> Option<&'v Json<'a>> {
    object
        .iter()
        .filter(|(key, _)| *key == name)
        .last()
        .map(|(_, value)| value)
}

/// The value under a path of object keys, if every step exists.
pub fn at<'v, 'a>(root: &'v Json<'a>, path: &[&str]) -> Option<&'v Json<'a>> {
    path.iter()
        .try_fold(root, |value, key| member(value.as_object()?, key))
}

/// A message the worker understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound<'a> {
    Segment(SegmentEvent<'a>),
    ProfileUpdate(DirectUpdate),
}

/// A Segment `track` or `identify` event, as Engage sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentEvent<'a> {
    pub kind: SegmentKind,
    pub message_id: Option<String>,
    /// `timestamp`, else `originalTimestamp`, `receivedAt`, `sentAt`, else when the worker
    /// received it: the clock that decides which of two updates to a field is newer.
    pub timestamp: EventTime,
    /// The whole event, for the mappings' JSON paths. Always an object.
    pub body: Json<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentKind {
    Track { event: String },
    Identify,
}

/// A `profile_update` from a producer that is not Segment, applied as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectUpdate {
    pub update: Update,
    pub message_id: Option<String>,
}

/// A message that can never be applied, and why; it is dead-lettered at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Poison {
    pub reason: DeadLetterReason,
    /// Names the field at fault; never quotes an email address.
    pub detail: String,
}

impl Poison {
    pub fn invalid_json(detail: impl Into<String>) -> Self {
        Poison {
            reason: DeadLetterReason::InvalidJson,
            detail: detail.into(),
        }
    }

    pub fn invalid_event(detail: impl Into<String>) -> Self {
        Poison {
            reason: DeadLetterReason::InvalidEvent,
            detail: detail.into(),
        }
    }
}

/// The time fields Segment sets, in the order they are trusted.
const TIME_FIELDS: [&str; 4] = ["timestamp", "originalTimestamp", "receivedAt", "sentAt"];

pub fn decode(body: &[u8], received_at: EventTime) -> Result<Inbound<'_>, Poison> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Poison::invalid_json(format!(
            "the body is {} bytes, over the {MAX_BODY_BYTES}-byte limit",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|error| {
        Poison::invalid_json(format!(
            "the body is not UTF-8 (invalid byte at offset {})",
            error.valid_up_to()
        ))
    })?;
    // Some producers (.NET, PowerShell) start UTF-8 text with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: Json<'_> = serde_json::from_str(text)
        .map_err(|error| Poison::invalid_json(format!("the body is not JSON: {error}")))?;
    let Json::Object(object) = &value else {
        return Err(Poison::invalid_event(format!(
            "the body is {}, not a JSON object",
            kind_of(&value)
        )));
    };
    let kind = match present(object, "type") {
        None => return Err(Poison::invalid_event("`type` is missing")),
        Some(Json::Str(kind)) => kind.as_ref(),
        Some(other) => {
            return Err(Poison::invalid_event(format!(
                "`type` must be a string, found {}",
                kind_of(other)
            )))
        }
    };
    match kind {
        "track" | "identify" => segment_event(value, received_at).map(Inbound::Segment),
        "profile_update" => profile_update(object, received_at).map(Inbound::ProfileUpdate),
        other => Err(Poison::invalid_event(format!(
            "`type` {} is not \"track\", \"identify\" or \"profile_update\"",
            excerpt(other)
        ))),
    }
}

fn segment_event(body: Json<'_>, received_at: EventTime) -> Result<SegmentEvent<'_>, Poison> {
    let object = body.as_object().expect("checked to be an object");
    let kind = match member(object, "type").and_then(Json::as_str) {
        Some("track") => SegmentKind::Track {
            event: match present(object, "event") {
                Some(Json::Str(event)) => event.to_string(),
                None => return Err(Poison::invalid_event("a track event needs an `event` name")),
                Some(other) => return Err(must_be("event", "a string", other)),
            },
        },
        _ => SegmentKind::Identify,
    };
    let message_id = optional_string(object, "messageId", "messageId")?;
    for name in ["properties", "traits", "context"] {
        optional_object(object, name, name)?;
    }
    if let Some(context) = optional_object(object, "context", "context")? {
        optional_object(context, "traits", "context.traits")?;
        optional_object(context, "personas", "context.personas")?;
    }
    let timestamp = event_time(object, &TIME_FIELDS)?.unwrap_or(received_at);
    Ok(SegmentEvent {
        kind,
        message_id,
        timestamp,
        body,
    })
}

fn profile_update(object: &JsonObject<'_>, received_at: EventTime) -> Result<DirectUpdate, Poison> {
    let list_id = match present(object, "list_id") {
        None => return Err(Poison::invalid_event("`list_id` is missing")),
        Some(value) => list_id_from_json(value).ok_or_else(|| {
            Poison::invalid_event(format!(
                "`list_id` must be a positive 32-bit integer (a number or a numeric string), found \
                 {}",
                excerpt_value(value)
            ))
        })?,
    };
    let email = match present(object, "email") {
        None => return Err(Poison::invalid_event("`email` is missing")),
        Some(Json::Str(raw)) => normalize_email(raw)
            .ok_or_else(|| Poison::invalid_event("`email` is not a plausible email address"))?,
        Some(other) => return Err(must_be("email", "a string", other)),
    };
    let fields = match present(object, "fields") {
        None => return Err(Poison::invalid_event("`fields` is missing")),
        Some(Json::Object(fields)) if fields.is_empty() => {
            return Err(Poison::invalid_event(
                "`fields` is empty: there is nothing to set",
            ))
        }
        Some(Json::Object(fields)) => fields,
        Some(other) => return Err(must_be("fields", "an object", other)),
    };
    let mut values = fields
        .iter()
        .map(|(key, value)| {
            let id = field_id(key).ok_or_else(|| {
                Poison::invalid_event(format!(
                    "`fields` key {} is not a profile field id (a positive 32-bit integer)",
                    excerpt(key)
                ))
            })?;
            match value {
                Json::Str(text) if !text.is_empty() => Ok((id, text.to_string())),
                Json::Str(_) => Err(Poison::invalid_event(format!("`fields.{key}` is empty"))),
                other => Err(must_be(&format!("fields.{key}"), "a string", other)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // JSON object keys sort as text ("10" before "9"); updates list fields by id. A key
    // written twice counts once, with its last value, as for every other member.
    values.reverse();
    values.sort_by_key(|(id, _)| *id);
    values.dedup_by_key(|(id, _)| *id);
    let message_id = optional_string(object, "message_id", "message_id")?;
    let timestamp = event_time(object, &["timestamp"])?.unwrap_or(received_at);
    Ok(DirectUpdate {
        update: Update {
            list_id,
            email,
            fields: values,
            timestamp,
        },
        message_id,
    })
}

/// Trims and lower-cases an address, so that one person is one contact, and refuses what
/// cannot be an address (Listrak would reject the whole request for it).
pub fn normalize_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    if email.is_empty()
        || email.len() > 254
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    let (local, domain) = email.split_once('@')?;
    if local.is_empty()
        || local.len() > 64
        || domain.contains('@')
        || !domain.contains('.')
        || domain.split('.').any(str::is_empty)
    {
        return None;
    }
    Some(email)
}

/// A list id from an event: a positive 32-bit integer, as a JSON number or a numeric
/// string (producers write both).
pub(crate) fn list_id_from_json(value: &Json<'_>) -> Option<ListId> {
    match value {
        Json::Number(number) => number.as_i64().and_then(ListId::new),
        Json::Str(text) => ListId::from_str(text).ok(),
        _ => None,
    }
}

/// Field ids are written plainly ("456", not "0456" or " 456"), so that two keys of one
/// object can never name the same field.
fn field_id(key: &str) -> Option<FieldId> {
    key.parse::<FieldId>()
        .ok()
        .filter(|id| id.to_string() == key)
}

/// The value of `name`, unless it is absent or `null` (which Segment libraries send for
/// fields they have no value for).
fn present<'v, 'a>(object: &'v JsonObject<'a>, name: &str) -> Option<&'v Json<'a>> {
    member(object, name).filter(|value| !value.is_null())
}

fn optional_string(
    object: &JsonObject<'_>,
    name: &str,
    path: &str,
) -> Result<Option<String>, Poison> {
    match present(object, name) {
        None => Ok(None),
        Some(Json::Str(text)) => Ok(Some(text.to_string())),
        Some(other) => Err(must_be(path, "a string", other)),
    }
}

fn optional_object<'v, 'a>(
    object: &'v JsonObject<'a>,
    name: &str,
    path: &str,
) -> Result<Option<&'v JsonObject<'a>>, Poison> {
    match present(object, name) {
        None => Ok(None),
        Some(Json::Object(inner)) => Ok(Some(inner)),
        Some(other) => Err(must_be(path, "an object", other)),
    }
}

/// The first of `fields` that is present decides; if it is not an RFC 3339 time the
/// event is refused rather than ordered by a guess.
fn event_time(object: &JsonObject<'_>, fields: &[&str]) -> Result<Option<EventTime>, Poison> {
    let Some((name, value)) = fields
        .iter()
        .find_map(|name| present(object, name).map(|value| (*name, value)))
    else {
        return Ok(None);
    };
    let Json::Str(text) = value else {
        return Err(must_be(name, "an RFC 3339 time string", value));
    };
    EventTime::parse_rfc3339(text).map(Some).ok_or_else(|| {
        Poison::invalid_event(format!(
            "`{name}` {} is not an RFC 3339 time such as \"2024-05-01T12:00:00.000Z\"",
            excerpt(text)
        ))
    })
}

fn must_be(path: &str, expected: &str, found: &Json<'_>) -> Poison {
    Poison::invalid_event(format!(
        "`{path}` must be {expected}, found {}",
        kind_of(found)
    ))
}

/// How error messages name a JSON value's type ("a string", "an array"…).
pub(crate) fn kind_of(value: &impl JsonKind) -> &'static str {
    value.kind()
}

/// The JSON trees whose values error messages name: the worker's borrowed one and
/// `serde_json`'s, which `listrak-fake` reads request bodies into.
pub(crate) trait JsonKind {
    fn kind(&self) -> &'static str;
}

impl JsonKind for Json<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::Str(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

impl JsonKind for serde_json::Value {
    fn kind(&self) -> &'static str {
        match self {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        }
    }
}

/// A producer's text, quoted and cut short: details end up in headers and logs.
fn excerpt(text: &str) -> String {
    const LIMIT: usize = 40;
    if text.chars().count() <= LIMIT {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(LIMIT).collect();
        format!("{head:?}…")
    }
}

fn excerpt_value(value: &Json<'_>) -> String {
    match value {
        Json::Str(text) => excerpt(text),
        Json::Number(number) => number.to_string(),
        other => kind_of(other).to_owned(),
    }
}

/// The body of a `profile_update` setting one field: how a value the worker applied is sent
/// again (a read-back's repair, `reconcile --apply`), with its own event time (RFC 3339, to
/// the microsecond, so that the guard sees the very time it recorded).
pub fn profile_update_body(
    list: ListId,
    email: &str,
    field: u32,
    value: &str,
    event_time: &str,
    message_id: &str,
) -> Vec<u8> {
    let mut fields = serde_json::Map::new();
    fields.insert(field.to_string(), value.into());
    serde_json::json!({
        "type": "profile_update",
        "list_id": list.get(),
        "email": email,
        "fields": fields,
        "timestamp": event_time,
        "message_id": message_id,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    const RECEIVED: EventTime = EventTime(1_700_000_000_000_000);

    fn time(text: &str) -> EventTime {
        EventTime::parse_rfc3339(text).unwrap()
    }

    /// Decodes a test body; the text is leaked, as a decoded event borrows from it.
    pub(crate) fn decoded(body: &Value) -> Inbound<'static> {
        let text: &'static str = Box::leak(body.to_string().into_boxed_str());
        decode(text.as_bytes(), RECEIVED).unwrap_or_else(|poison| panic!("{poison}"))
    }

    fn segment(body: &Value) -> SegmentEvent<'static> {
        match decoded(body) {
            Inbound::Segment(event) => event,
            other => panic!("expected a Segment event, got {other:?}"),
        }
    }

    /// The example from the contract, as Engage sends it.
    pub(crate) fn engage_track() -> Value {
        json!({
            "type": "track",
            "event": "Audience Entered",
            "messageId": "api-2Yb8nKz",
            "timestamp": "2024-05-01T12:00:00.123Z",
            "properties": {"audience_key": "vip_customers", "vip_customers": true},
            "context": {
                "traits": {"email": "a@example.com"},
                "personas": {"computation_key": "vip_customers", "computation_class": "audience"}
            }
        })
    }

    #[test]
    fn engage_track_event_decodes_whole() {
        let body = engage_track();
        let event = segment(&body);
        assert_eq!(
            event.kind,
            SegmentKind::Track {
                event: "Audience Entered".into()
            }
        );
        assert_eq!(event.message_id.as_deref(), Some("api-2Yb8nKz"));
        assert_eq!(event.timestamp, time("2024-05-01T12:00:00.123Z"));
        assert_eq!(
            Value::from(&event.body),
            body,
            "the whole event is kept for the mappings"
        );
    }

    #[test]
    fn identify_event_decodes() {
        let event = segment(&json!({"type": "identify", "traits": {"email": "a@example.com"}}));
        assert_eq!(event.kind, SegmentKind::Identify);
        assert_eq!(event.message_id, None);
    }

    #[test]
    fn a_member_written_twice_counts_with_its_last_value() {
        let body = concat!(
            r#"{"type":"identify","type":"track","event":"Audience Exited","#,
            r#""event":"Audience Entered"}"#
        );
        match decode(body.as_bytes(), RECEIVED).unwrap() {
            Inbound::Segment(event) => assert_eq!(
                event.kind,
                SegmentKind::Track {
                    event: "Audience Entered".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        let body = concat!(
            r#"{"type":"profile_update","list_id":1,"email":"a@example.com","fields":{"456":"on","#,
            r#""7":"x","456":"off"}}"#
        );
        match decode(body.as_bytes(), RECEIVED).unwrap() {
            Inbound::ProfileUpdate(direct) => assert_eq!(
                direct.update.fields,
                [
                    (FieldId::new(7).unwrap(), "x".to_owned()),
                    (FieldId::new(456).unwrap(), "off".to_owned())
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_strings_are_read_unescaped() {
        let body = concat!(
            r#"{"type":"track","event":"Audience\u0020Entered","#,
            r#""context":{"traits":{"email":"a\u0040example.com"}}}"#
        );
        let Inbound::Segment(event) = decode(body.as_bytes(), RECEIVED).unwrap() else {
            panic!("a Segment event")
        };
        assert_eq!(
            event.kind,
            SegmentKind::Track {
                event: "Audience Entered".into()
            }
        );
        assert_eq!(
            at(&event.body, &["context", "traits", "email"]).and_then(Json::as_str),
            Some("a@example.com")
        );
    }

    #[test]
    fn body_with_byte_order_mark_decodes() {
        let body = format!("\u{feff}{}", engage_track());
        assert!(decode(body.as_bytes(), RECEIVED).is_ok());
    }

    #[test]
    fn body_at_the_size_limit_is_read_and_one_byte_over_is_not() {
        let event = engage_track().to_string();
        let padded = format!("{event}{}", " ".repeat(MAX_BODY_BYTES - event.len()));
        assert!(decode(padded.as_bytes(), RECEIVED).is_ok());
        let over = format!("{padded} ");
        let poison = decode(over.as_bytes(), RECEIVED).unwrap_err();
        assert_eq!(poison.reason, DeadLetterReason::InvalidJson);
        assert!(poison.detail.contains("limit"), "{poison}");
    }

    #[test]
    fn bodies_that_are_not_json_are_invalid_json() {
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "not_utf8",
                b"{\"type\":\"track\",\"event\":\"\xff\"}",
                "not UTF-8",
            ),
            ("not_json", b"<event type=\"track\"/>", "line 1 column 1"),
            ("truncated_json", b"{\"type\":\"track\"", "line 1 column 15"),
            ("empty_body", b"", "not JSON"),
        ];
        for (behaviour, body, mentions) in cases {
            let poison = decode(body, RECEIVED).unwrap_err();
            assert_eq!(poison.reason, DeadLetterReason::InvalidJson, "{behaviour}");
            assert!(poison.detail.contains(mentions), "{behaviour}: {poison}");
        }
    }

    #[test]
    fn json_that_is_not_an_event_is_invalid_event_naming_the_field() {
        let cases = [
            (
                "array_body",
                json!([engage_track()]),
                "an array, not a JSON object",
            ),
            ("string_body", json!("track"), "a string, not a JSON object"),
            (
                "missing_type",
                json!({"event": "Audience Entered"}),
                "`type` is missing",
            ),
            ("null_type", json!({"type": null}), "`type` is missing"),
            (
                "numeric_type",
                json!({"type": 1}),
                "`type` must be a string",
            ),
            (
                "unknown_type",
                json!({"type": "page", "name": "Home"}),
                "\"page\"",
            ),
            (
                "type_in_capitals",
                json!({"type": "Track", "event": "E"}),
                "\"Track\"",
            ),
            ("track_without_event", json!({"type": "track"}), "`event`"),
            (
                "track_with_numeric_event",
                json!({"type": "track", "event": 7}),
                "`event` must be a string",
            ),
            (
                "numeric_message_id",
                json!({"type": "track", "event": "E", "messageId": 5}),
                "`messageId`",
            ),
            (
                "properties_as_text",
                json!({"type": "track", "event": "E", "properties": "x"}),
                "`properties`",
            ),
            (
                "traits_as_array",
                json!({"type": "identify", "traits": []}),
                "`traits`",
            ),
            (
                "context_as_number",
                json!({"type": "identify", "context": 1}),
                "`context`",
            ),
            (
                "context_traits_as_text",
                json!({"type": "identify", "context": {"traits": "a"}}),
                "`context.traits`",
            ),
            (
                "personas_as_array",
                json!({"type": "track", "event": "E", "context": {"personas": []}}),
                "`context.personas`",
            ),
            (
                "unparseable_timestamp",
                json!({"type": "track", "event": "E", "timestamp": "yesterday"}),
                "`timestamp` \"yesterday\"",
            ),
            (
                "numeric_timestamp",
                json!({"type": "track", "event": "E", "timestamp": 1714564800}),
                "`timestamp` must be",
            ),
            (
                "unparseable_fallback_time",
                json!({"type": "identify", "originalTimestamp": "soon"}),
                "`originalTimestamp`",
            ),
        ];
        for (behaviour, body, mentions) in cases {
            let poison = decode(body.to_string().as_bytes(), RECEIVED).unwrap_err();
            assert_eq!(
                poison.reason,
                DeadLetterReason::InvalidEvent,
                "{behaviour}: {poison}"
            );
            assert!(poison.detail.contains(mentions), "{behaviour}: {poison}");
        }
    }

    #[test]
    fn event_time_falls_back_through_segment_time_fields() {
        let t1 = "2024-05-01T10:00:00Z";
        let t2 = "2024-05-01T11:00:00Z";
        let t3 = "2024-05-01T12:00:00Z";
        let t4 = "2024-05-01T13:00:00Z";
        let cases = [
            (
                "timestamp_wins_over_the_others",
                json!({"timestamp": t1, "originalTimestamp": t2, "receivedAt": t3, "sentAt": t4}),
                time(t1),
            ),
            (
                "original_timestamp_without_timestamp",
                json!({"originalTimestamp": t2, "receivedAt": t3, "sentAt": t4}),
                time(t2),
            ),
            (
                "received_at_next",
                json!({"receivedAt": t3, "sentAt": t4}),
                time(t3),
            ),
            ("sent_at_last", json!({"sentAt": t4}), time(t4)),
            (
                "null_timestamp_counts_as_absent",
                json!({"timestamp": null, "sentAt": t4}),
                time(t4),
            ),
            ("no_time_at_all_means_when_received", json!({}), RECEIVED),
            (
                "offsets_are_honoured",
                json!({"timestamp": "2024-05-01T12:00:00+02:00"}),
                time("2024-05-01T10:00:00Z"),
            ),
        ];
        for (behaviour, times, expected) in cases {
            let mut body = json!({"type": "track", "event": "Audience Entered"});
            body.as_object_mut()
                .unwrap()
                .extend(times.as_object().unwrap().clone());
            assert_eq!(segment(&body).timestamp, expected, "{behaviour}");
        }
    }

    fn direct(body: &Value) -> DirectUpdate {
        match decoded(body) {
            Inbound::ProfileUpdate(direct) => direct,
            other => panic!("expected a direct update, got {other:?}"),
        }
    }

    fn list(id: i64) -> ListId {
        ListId::new(id).unwrap()
    }

    fn field(id: i64) -> FieldId {
        FieldId::new(id).unwrap()
    }

    #[test]
    fn profile_update_is_applied_as_given_with_a_normalised_email() {
        let decoded = direct(&json!({
            "type": "profile_update",
            "list_id": 123,
            "email": "  Ann.Lee@Example.COM ",
            "fields": {"9": "on", "10": "Gold", "456": "off"},
            "timestamp": "2024-05-01T12:00:00Z",
            "message_id": "m-1",
        }));
        assert_eq!(
            decoded,
            DirectUpdate {
                update: Update {
                    list_id: list(123),
                    email: "ann.lee@example.com".into(),
                    fields: vec![
                        (field(9), "on".into()),
                        (field(10), "Gold".into()),
                        (field(456), "off".into()),
                    ],
                    timestamp: time("2024-05-01T12:00:00Z"),
                },
                message_id: Some("m-1".into()),
            }
        );
    }

    #[test]
    fn profile_update_takes_a_numeric_string_list_id_and_defaults_its_time() {
        let decoded = direct(&json!({
            "type": "profile_update",
            "list_id": "123",
            "email": "a@example.com",
            "fields": {"1": "on"}
        }));
        assert_eq!(decoded.update.list_id, list(123));
        assert_eq!(decoded.update.timestamp, RECEIVED);
        assert_eq!(decoded.message_id, None);
    }

    #[test]
    fn bad_profile_updates_are_invalid_event_naming_the_field() {
        let valid = json!({
            "type": "profile_update",
            "list_id": 123,
            "email": "a@example.com",
            "fields": {"456": "on"}
        });
        let cases = [
            (
                "missing_list_id",
                "list_id",
                Value::Null,
                "`list_id` is missing",
            ),
            ("zero_list_id", "list_id", json!(0), "`list_id`"),
            ("negative_list_id", "list_id", json!(-3), "`list_id`"),
            (
                "list_id_over_int32",
                "list_id",
                json!(2_147_483_648_i64),
                "`list_id`",
            ),
            ("fractional_list_id", "list_id", json!(1.5), "`list_id`"),
            ("word_list_id", "list_id", json!("abc"), "`list_id`"),
            ("boolean_list_id", "list_id", json!(true), "`list_id`"),
            ("missing_email", "email", Value::Null, "`email` is missing"),
            (
                "implausible_email",
                "email",
                json!("not-an-email"),
                "`email` is not a plausible",
            ),
            (
                "numeric_email",
                "email",
                json!(42),
                "`email` must be a string",
            ),
            (
                "missing_fields",
                "fields",
                Value::Null,
                "`fields` is missing",
            ),
            ("empty_fields", "fields", json!({}), "`fields` is empty"),
            (
                "fields_as_array",
                "fields",
                json!([["456", "on"]]),
                "`fields` must be an object",
            ),
            (
                "field_key_that_is_a_word",
                "fields",
                json!({"abc": "on"}),
                "\"abc\"",
            ),
            ("field_key_zero", "fields", json!({"0": "on"}), "\"0\""),
            (
                "field_key_with_leading_zero",
                "fields",
                json!({"0456": "on"}),
                "\"0456\"",
            ),
            (
                "field_value_that_is_a_boolean",
                "fields",
                json!({"456": true}),
                "`fields.456` must be a string",
            ),
            (
                "empty_field_value",
                "fields",
                json!({"456": ""}),
                "`fields.456` is empty",
            ),
            ("numeric_message_id", "message_id", json!(7), "`message_id`"),
            (
                "unparseable_timestamp",
                "timestamp",
                json!("now"),
                "`timestamp`",
            ),
        ];
        for (behaviour, key, value, mentions) in cases {
            let mut body = valid.clone();
            body[key] = value;
            let poison = decode(body.to_string().as_bytes(), RECEIVED).unwrap_err();
            assert_eq!(
                poison.reason,
                DeadLetterReason::InvalidEvent,
                "{behaviour}: {poison}"
            );
            assert!(poison.detail.contains(mentions), "{behaviour}: {poison}");
            assert!(
                !poison.detail.contains("not-an-email"),
                "{behaviour}: quotes the email"
            );
        }
    }

    #[test]
    fn email_normalisation() {
        let cases = [
            (
                "plain_address_is_kept",
                "a@example.com",
                Some("a@example.com"),
            ),
            (
                "trimmed_and_lower_cased",
                " \tAnn@Example.COM\n",
                Some("ann@example.com"),
            ),
            (
                "subdomains_and_plus_tags",
                "a.b+tag@mail.example.co.uk",
                Some("a.b+tag@mail.example.co.uk"),
            ),
            ("empty", "", None),
            ("only_spaces", "   ", None),
            ("no_at_sign", "a.example.com", None),
            ("two_at_signs", "a@b@example.com", None),
            ("empty_local_part", "@example.com", None),
            ("domain_without_dot", "a@localhost", None),
            ("domain_with_empty_label", "a@example..com", None),
            ("domain_ending_in_dot", "a@example.com.", None),
            ("domain_starting_with_dot", "a@.example.com", None),
            ("inner_space", "a b@example.com", None),
            ("control_character", "a\u{7}@example.com", None),
            (
                "local_part_over_64",
                &format!("{}@example.com", "a".repeat(65)),
                None,
            ),
            (
                "over_254_characters",
                &format!("a@{}.com", "b".repeat(250)),
                None,
            ),
        ];
        for (behaviour, raw, expected) in cases {
            assert_eq!(normalize_email(raw).as_deref(), expected, "{behaviour}");
        }
    }

    #[test]
    fn poison_reads_as_reason_then_detail() {
        let poison = Poison::invalid_event("`type` is missing");
        assert_eq!(poison.to_string(), "invalid_event: `type` is missing");
    }

    #[test]
    fn a_profile_update_body_decodes_to_the_update_it_was_made_from() {
        let at = EventTime(1_800_000_000_123_456);
        let body = profile_update_body(
            ListId::new(7).unwrap(),
            "a@example.com",
            456,
            "on",
            &at.to_rfc3339_micros(),
            "readback-1",
        );
        let Ok(Inbound::ProfileUpdate(direct)) = decode(&body, EventTime(0)) else {
            panic!("a profile update");
        };
        assert_eq!(direct.update.list_id.get(), 7);
        assert_eq!(direct.update.email, "a@example.com");
        assert_eq!(
            direct.update.fields,
            [(FieldId::new(456).unwrap(), "on".to_owned())]
        );
        assert_eq!(direct.update.timestamp, at, "to the microsecond");
        assert_eq!(direct.message_id.as_deref(), Some("readback-1"));
    }
}
