//! The export format: one dead letter as one JSON object, and back.
//!
//! ```json
//! {"body":"{\"type\":\"track\",...}",
//!  "properties":{"content_type":"application/json","delivery_mode":2,"message_id":"m-1",
//!                "timestamp":1767225600},
//!  "headers":{"x-listrak-reason":"rejected","x-listrak-status":400,
//!             "x-death":[{"count":1,"time":{"$timestamp":1767225600}}]}}
//! ```
//!
//! The body is the exact bytes: a JSON string when they are UTF-8, else `body_base64`.
//! Header values keep their kind: strings, integers (read back as 64-bit), floats, booleans,
//! arrays, tables and null as plain JSON; the kinds JSON lacks as a one-key object:
//! `{"$timestamp": seconds}`, `{"$bytes": base64}` (a byte array), `{"$base64": base64}` (a
//! string that is not UTF-8), `{"$decimal": {"scale": s, "value": v}}`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::types::{ShortShortUInt, ShortString};
use lapin::BasicProperties;
use serde_json::{Map, Number, Value};

use super::letter::message_headers;

/// A message read back from an export line.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// What a line of a JSON-lines file is.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// An exported message: an object with `body` (or `body_base64`) and `properties`, and
    /// nothing but those and `headers`. Events always carry `type`, so they never look so.
    Record(Box<Record>),
    /// Shaped like an export but not a valid one; the reason.
    BadRecord(String),
    /// Anything else: an event to publish as it is.
    Other,
}

/// The export line of a message (without the newline).
pub fn to_line(body: &[u8], properties: &BasicProperties) -> String {
    let mut object = Map::new();
    match std::str::from_utf8(body) {
        Ok(text) => object.insert("body".into(), Value::String(text.into())),
        Err(_) => object.insert("body_base64".into(), Value::String(STANDARD.encode(body))),
    };
    object.insert("properties".into(), properties_json(properties));
    let headers: Map<String, Value> = message_headers(properties)
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), header_json(value)))
        .collect();
    object.insert("headers".into(), Value::Object(headers));
    Value::Object(object).to_string()
}

pub fn parse_line(line: &[u8]) -> Line {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(line) else {
        return Line::Other;
    };
    let shaped = object.contains_key("properties")
        && (object.contains_key("body") != object.contains_key("body_base64"))
        && object.keys().all(|k| {
            matches!(
                k.as_str(),
                "body" | "body_base64" | "properties" | "headers"
            )
        });
    if !shaped {
        return Line::Other;
    }
    match record(&object) {
        Ok(record) => Line::Record(Box::new(record)),
        Err(reason) => Line::BadRecord(reason),
    }
}

fn record(object: &Map<String, Value>) -> Result<Record, String> {
    let body = match (object.get("body"), object.get("body_base64")) {
        (Some(Value::String(text)), None) => text.clone().into_bytes(),
        (None, Some(Value::String(encoded))) => STANDARD
            .decode(encoded)
            .map_err(|e| format!("body_base64 is not base64: {e}"))?,
        _ => return Err("the body is not a string".into()),
    };
    let Some(Value::Object(fields)) = object.get("properties") else {
        return Err("properties is not an object".into());
    };
    let mut properties = properties_from(fields)?;
    match object.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(headers)) => {
            let mut table = BTreeMap::new();
            for (name, value) in headers {
                table.insert(short(name, "a header name")?, value_from(value)?);
            }
            if !table.is_empty() {
                properties = properties.with_headers(FieldTable::from(table));
            }
        }
        Some(_) => return Err("headers is not an object".into()),
    }
    Ok(Record { body, properties })
}

fn properties_json(p: &BasicProperties) -> Value {
    let mut object = Map::new();
    let mut text = |name: &str, value: &Option<ShortString>| {
        if let Some(value) = value {
            object.insert(name.into(), Value::String(value.as_str().into()));
        }
    };
    text("content_type", p.content_type());
    text("content_encoding", p.content_encoding());
    text("correlation_id", p.correlation_id());
    text("reply_to", p.reply_to());
    text("expiration", p.expiration());
    text("message_id", p.message_id());
    text("type", p.kind());
    text("user_id", p.user_id());
    text("app_id", p.app_id());
    text("cluster_id", p.cluster_id());
    if let Some(mode) = p.delivery_mode() {
        object.insert("delivery_mode".into(), Value::from(*mode));
    }
    if let Some(priority) = p.priority() {
        object.insert("priority".into(), Value::from(*priority));
    }
    if let Some(timestamp) = p.timestamp() {
        object.insert("timestamp".into(), Value::from(*timestamp));
    }
    Value::Object(object)
}

fn properties_from(fields: &Map<String, Value>) -> Result<BasicProperties, String> {
    let mut p = BasicProperties::default();
    for (name, value) in fields {
        let text = || match value {
            Value::String(s) => short(s, name),
            _ => Err(format!("property {name} is not a string")),
        };
        let octet = || -> Result<ShortShortUInt, String> {
            value
                .as_u64()
                .and_then(|n| ShortShortUInt::try_from(n).ok())
                .ok_or_else(|| format!("property {name} is not an integer from 0 to 255"))
        };
        p = match name.as_str() {
            "content_type" => p.with_content_type(text()?),
            "content_encoding" => p.with_content_encoding(text()?),
            "correlation_id" => p.with_correlation_id(text()?),
            "reply_to" => p.with_reply_to(text()?),
            "expiration" => p.with_expiration(text()?),
            "message_id" => p.with_message_id(text()?),
            "type" => p.with_type(text()?),
            "user_id" => p.with_user_id(text()?),
            "app_id" => p.with_app_id(text()?),
            "cluster_id" => p.with_cluster_id(text()?),
            "delivery_mode" => p.with_delivery_mode(octet()?),
            "priority" => p.with_priority(octet()?),
            "timestamp" => p.with_timestamp(
                value
                    .as_u64()
                    .ok_or("property timestamp is not a number of seconds")?,
            ),
            other => return Err(format!("unknown property {other:?}")),
        };
    }
    Ok(p)
}

fn short(text: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(text).map_err(|_| format!("{what} is longer than 255 bytes"))
}

fn tagged(tag: &str, value: Value) -> Value {
    Value::Object(Map::from_iter([(tag.to_string(), value)]))
}

/// A header value as JSON, in the export's notation.
pub fn header_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => tagged(
            "$decimal",
            serde_json::json!({"scale": d.scale, "value": d.value}),
        ),
        AMQPValue::ShortString(s) => Value::String(s.as_str().into()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::String(text.into()),
            Err(_) => tagged("$base64", Value::String(STANDARD.encode(s.as_bytes()))),
        },
        AMQPValue::FieldArray(values) => {
            Value::Array(values.as_slice().iter().map(header_json).collect())
        }
        AMQPValue::Timestamp(seconds) => tagged("$timestamp", Value::from(*seconds)),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), header_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(bytes) => {
            tagged("$bytes", Value::String(STANDARD.encode(bytes.as_slice())))
        }
        AMQPValue::Void => Value::Null,
    }
}

fn value_from(value: &Value) -> Result<AMQPValue, String> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(x)) => AMQPValue::Double(x),
            (None, None) => return Err(format!("{n} is not a number a header can hold")),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(values) => AMQPValue::FieldArray(FieldArray::from(
            values
                .iter()
                .map(value_from)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(object) => {
            if let Some(special) = special_value(object)? {
                return Ok(special);
            }
            let mut table = BTreeMap::new();
            for (name, value) in object {
                table.insert(short(name, "a header field name")?, value_from(value)?);
            }
            AMQPValue::FieldTable(FieldTable::from(table))
        }
    })
}

/// The one-key objects that stand for the kinds JSON lacks.
fn special_value(object: &Map<String, Value>) -> Result<Option<AMQPValue>, String> {
    let mut entries = object.iter();
    let (Some((tag, value)), None) = (entries.next(), entries.next()) else {
        return Ok(None);
    };
    let base64 = |value: &Value| -> Result<Vec<u8>, String> {
        value
            .as_str()
            .and_then(|text| STANDARD.decode(text).ok())
            .ok_or_else(|| format!("{tag} is not base64 text"))
    };
    Ok(Some(match tag.as_str() {
        "$timestamp" => AMQPValue::Timestamp(
            value
                .as_u64()
                .ok_or("$timestamp is not a number of seconds")?,
        ),
        "$bytes" => AMQPValue::ByteArray(ByteArray::from(base64(value)?)),
        "$base64" => AMQPValue::LongString(LongString::from(base64(value)?)),
        "$decimal" => {
            let part = |name: &str| value.get(name).and_then(Value::as_u64);
            match (part("scale"), part("value")) {
                (Some(scale), Some(v)) if scale <= 255 && v <= u64::from(u32::MAX) => {
                    AMQPValue::DecimalValue(DecimalValue {
                        scale: scale as u8,
                        value: v as u32,
                    })
                }
                _ => return Err("$decimal needs a scale (0-255) and a value (u32)".into()),
            }
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::broker::{int_header, text_header};

    fn header_table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        FieldTable::from(
            entries
                .into_iter()
                .map(|(k, v)| (ShortString::from(k), v))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn dead_letter() -> BasicProperties {
        let death = header_table(vec![
            ("count", int_header(1)),
            ("reason", text_header("delivery_limit")),
            ("time", AMQPValue::Timestamp(1_767_225_600)),
            (
                "routing-keys",
                AMQPValue::FieldArray(FieldArray::from(vec![text_header("track")])),
            ),
        ]);
        let headers = header_table(vec![
            ("x-listrak-reason", text_header("rejected")),
            ("x-listrak-status", int_header(400)),
            ("x-listrak-list-id", AMQPValue::LongInt(12345)),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            ("x-flag", AMQPValue::Boolean(true)),
            ("x-ratio", AMQPValue::Double(0.25)),
            ("x-nothing", AMQPValue::Void),
            ("x-raw", AMQPValue::ByteArray(ByteArray::from(vec![0, 159]))),
            (
                "x-odd",
                AMQPValue::LongString(LongString::from(vec![255u8])),
            ),
            (
                "x-price",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 1999,
                }),
            ),
        ]);
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1_767_225_600)
            .with_type("track".into())
            .with_app_id("shop".into())
            .with_headers(headers)
    }

    /// What a read-back header table should equal: every integer read back as 64-bit.
    fn widened(value: &AMQPValue) -> AMQPValue {
        match value {
            AMQPValue::LongInt(n) => AMQPValue::LongLongInt(i64::from(*n)),
            AMQPValue::FieldArray(values) => AMQPValue::FieldArray(FieldArray::from(
                values.as_slice().iter().map(widened).collect::<Vec<_>>(),
            )),
            AMQPValue::FieldTable(table) => AMQPValue::FieldTable(FieldTable::from(
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.clone(), widened(v)))
                    .collect::<BTreeMap<_, _>>(),
            )),
            other => other.clone(),
        }
    }

    #[test]
    fn a_message_survives_export_and_import_with_its_body_properties_and_header_kinds() {
        let properties = dead_letter();
        let body = br#"{"type":"track","event":"Audience Entered"}"#;
        let line = to_line(body, &properties);
        let Line::Record(record) = parse_line(line.as_bytes()) else {
            panic!("{line}");
        };
        assert_eq!(record.body, body);
        let expected = properties.clone().with_headers(
            match widened(&AMQPValue::FieldTable(
                properties.headers().clone().unwrap(),
            )) {
                AMQPValue::FieldTable(table) => table,
                _ => unreachable!(),
            },
        );
        assert_eq!(record.properties, expected);
    }

    #[test]
    fn a_body_that_is_not_utf8_is_exported_as_base64() {
        let body = [0xff, 0x00, b'{'];
        let line = to_line(&body, &BasicProperties::default());
        assert!(line.contains("\"body_base64\":\"/wB7\""), "{line}");
        assert_eq!(
            parse_line(line.as_bytes()),
            Line::Record(Box::new(Record {
                body: body.to_vec(),
                properties: BasicProperties::default(),
            }))
        );
    }

    #[test]
    fn the_export_line_is_readable_json_with_integers_as_integers() {
        let line = to_line(b"{}", &dead_letter());
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["body"], "{}");
        assert_eq!(value["properties"]["delivery_mode"], 2);
        assert_eq!(value["properties"]["timestamp"], 1_767_225_600);
        assert_eq!(value["headers"]["x-listrak-status"], 400);
        assert_eq!(value["headers"]["x-listrak-list-id"], 12345);
        assert_eq!(
            value["headers"]["x-death"][0]["time"]["$timestamp"],
            1_767_225_600
        );
    }

    #[test]
    fn the_dead_letter_queue_delivery_count_is_not_exported() {
        let properties = BasicProperties::default().with_headers(header_table(vec![
            ("x-delivery-count", int_header(3)),
            ("x-listrak-reason", text_header("rejected")),
        ]));
        let line = to_line(b"{}", &properties);
        assert!(!line.contains("x-delivery-count"), "{line}");
    }

    #[test]
    fn events_and_other_lines_are_not_records() {
        let table: [&[u8]; 6] = [
            br#"{"type":"track","event":"Audience Entered","properties":{"vip":true}}"#,
            br#"{"type":"profile_update","list_id":1,"email":"a@example.com","fields":{}}"#,
            br#"{"body":"x","properties":{},"type":"track"}"#,
            br#"{"body":"x"}"#,
            b"not json",
            b"[1,2]",
        ];
        for line in table {
            assert_eq!(
                parse_line(line),
                Line::Other,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_broken_record_says_what_is_wrong() {
        let table = [
            (r#"{"body":1,"properties":{}}"#, "body"),
            (r#"{"body_base64":"%%","properties":{}}"#, "base64"),
            (r#"{"body":"x","properties":{"colour":"red"}}"#, "colour"),
            (
                r#"{"body":"x","properties":{"delivery_mode":300}}"#,
                "delivery_mode",
            ),
            (r#"{"body":"x","properties":{},"headers":[]}"#, "headers"),
        ];
        for (line, says) in table {
            match parse_line(line.as_bytes()) {
                Line::BadRecord(reason) => assert!(reason.contains(says), "{line}: {reason}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }
}
