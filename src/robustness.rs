//! No panic is reachable from outside input: every parser of it, fed arbitrary input.
//!
//! Each property below runs in the normal test suite; the fuzz targets in `fuzz/` feed the
//! same functions for longer.

use proptest::prelude::*;

use crate::config::Settings;
use crate::edges::broker::RetryHeaders;
use crate::stages::classify::{classify, parse_retry_after, ListrakError, Outcome};
use crate::stages::decode::decode;
use crate::stages::mapping::plan;
use crate::stages::model::EventTime;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

const NOW: EventTime = EventTime(1_700_000_000_000_000);

fn mappings() -> Settings {
    let text = format!(
        "[listrak]\nclient_id = \"c\"\nclient_secret = \"s\"\n{}",
        crate::tools::sample::MAPPINGS_TOML
    );
    Settings::from_toml(&text, |_| None).expect("the sample configuration loads")
}

/// Bytes that look like the JSON of an event often enough to get past the first checks.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(&br#"{"type":"track","event":"Audience Entered","#[..]),
        Just(&br#""properties":{"audience_key":"vip_customers","vip_customers":true},"#[..]),
        Just(
            concat!(
                r#""context":{"traits":{"email":"a@example.com"},"#,
                r#""personas":{"computation_key":"vip_customers"}},"#
            )
            .as_bytes()
        ),
        Just(&br#""timestamp":"9999-12-31T23:59:59Z","#[..]),
        Just(
            concat!(
                r#"{"type":"profile_update","list_id":123,"#,
                r#""email":"b@example.com","fields":{"456":"on"}"#
            )
            .as_bytes()
        ),
        Just(&br#""list_id":99999999999999999999,"#[..]),
        Just(&br#"}"#[..]),
        Just(&br#"]"#[..]),
        Just(&br#"\u0000"#[..]),
        Just(&b"\xff\xfe"[..]),
    ];
    prop::collection::vec(
        prop_oneof![
            piece.prop_map(<[u8]>::to_vec),
            prop::collection::vec(any::<u8>(), 0..8)
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

fn header_value() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<u64>().prop_map(AMQPValue::Timestamp),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        ".{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        "[0-9:TZ+-]{0,30}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        any::<bool>().prop_map(AMQPValue::Boolean),
    ]
}

proptest! {
    #[test]
    fn any_message_body_decodes_and_maps_or_becomes_poison(
        body in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), jsonish()],
    ) {
        let settings = mappings();
        if let Ok(inbound) = decode(&body, NOW) {
            let _ = plan(&inbound, &settings.mappings, &());
        }
    }

    #[test]
    fn any_ingest_body_splits_into_parts_of_itself_or_is_refused(
        body in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), jsonish()],
    ) {
        use crate::stages::ingest::split_events;
        if let Ok(events) = split_events(&body) {
            let text = std::str::from_utf8(&body).expect("accepted bodies are UTF-8");
            for event in &events {
                prop_assert!(text.contains(event.body));
            }
        }
    }

    #[test]
    fn any_retry_or_dead_letter_headers_read_without_panic(
        attempts in header_value(),
        first_failed_at in header_value(),
    ) {
        let mut table = FieldTable::default();
        table.insert(ShortString::from(crate::edges::broker::ATTEMPTS), attempts);
        table.insert(ShortString::from(crate::edges::broker::FIRST_FAILED_AT), first_failed_at);
        let _ = RetryHeaders::read(&BasicProperties::default().with_headers(table));
    }

    #[test]
    fn any_listrak_answer_is_classified(
        status in any::<u16>(),
        retry_after in ".{0,40}",
        body in prop::collection::vec(any::<u8>(), 0..256),
        contacts in 0usize..2000,
    ) {
        let outcome = Outcome::Answered {
            status,
            retry_after: parse_retry_after(&retry_after, chrono::Utc::now()),
            error: serde_json::from_slice::<ListrakError>(&body).ok(),
            resource_id: None,
        };
        let _ = classify(&outcome, contacts);
    }

    #[test]
    fn any_configuration_text_loads_or_is_refused(
        text in prop_oneof![
            ".{0,200}",
            "\\[(amqp|batch|retry|listrak|shutdown)\\]\n[a-z_]{1,16} = \
             (\"[0-9]{1,25}[a-z]{0,2}\"|[0-9-]{1,25}|true|\\[\\])",
        ],
    ) {
        let _ = Settings::from_toml(&text, |_| None);
    }
}
