//! The core pipeline: consume, map, batch per list, apply to Listrak, ack.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, email, track, TrafficShape, BASE_MICROS};

use crate::support::{counts, scrape, Harness, Knobs};

const SECOND: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_for_several_lists_end_as_last_write_wins_field_by_field() {
    let traffic = sample::generate(TrafficShape {
        events: 4000,
        people: 700,
        ..TrafficShape::default()
    });
    let mut h = Harness::new("thousands", Faults::default(), Knobs::default()).await;
    h.publish(&traffic.bodies).await;
    h.start_worker();
    h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(60))
        .await;

    let state = h.fake.contacts();
    assert_eq!(state.keys().collect::<Vec<_>>(), [&1001, &2002]);
    for (list, contacts) in &traffic.expected {
        for (address, fields) in contacts {
            for (field, value) in fields {
                assert_eq!(
                    state[list][address].get(field),
                    Some(value),
                    "list {list}, {address}, field {field}"
                );
            }
            assert_eq!(state[list][address].len(), fields.len());
        }
        assert_eq!(state[list].len(), contacts.len(), "contacts of list {list}");
    }
    assert_eq!(h.acked_as("ignored"), traffic.ignored as u64);

    let dead = h.take_dead_letters().await;
    let by_reason = counts(&dead, "x-listrak-reason");
    let expected: BTreeMap<String, usize> = traffic
        .poison
        .iter()
        .map(|(reason, n)| (reason.to_string(), *n))
        .collect();
    assert_eq!(by_reason, expected);
    assert_eq!(h.acked_as("dead_lettered"), dead.len() as u64);

    // Grouped into few requests: far fewer than events.
    let requests = h.fake.requests().len();
    assert!(requests * 20 < traffic.bodies.len(), "{requests} requests");

    // The counters tell what happened, as Prometheus scrapes them.
    let scraped = scrape(&h).await;
    let sample = |series: &str| scraped.get(series).copied().unwrap_or(0.0) as usize;
    let total = traffic.bodies.len();
    assert_eq!(sample("listrak_messages_received_total"), total);
    let poisoned: usize = traffic.poison.values().sum();
    assert_eq!(
        sample(r#"listrak_messages_acked_total{outcome="dead_lettered"}"#),
        poisoned
    );
    assert_eq!(
        sample(r#"listrak_messages_acked_total{outcome="ignored"}"#),
        traffic.ignored
    );
    assert_eq!(
        sample(r#"listrak_messages_acked_total{outcome="applied"}"#)
            + sample(r#"listrak_messages_acked_total{outcome="superseded"}"#),
        total - poisoned - traffic.ignored
    );
    assert_eq!(
        sample(r#"listrak_messages_acked_total{outcome="retry_scheduled"}"#),
        0
    );
    for (reason, count) in &traffic.poison {
        assert_eq!(
            sample(&format!(
                r#"listrak_dead_letters_total{{reason="{reason}"}}"#
            )),
            *count
        );
    }
    assert_eq!(sample(r#"listrak_requests_total{status="201"}"#), requests);
    assert_eq!(sample("listrak_request_duration_seconds_count"), requests);
    assert_eq!(
        sample(r#"listrak_token_refreshes_total{result="success"}"#),
        1
    );
    assert_eq!(sample("listrak_amqp_connected"), 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entered_then_exited_inside_one_batch_ends_off() {
    let mut h = Harness::new(
        "one_batch_flip",
        Faults::default(),
        Knobs {
            max_wait: "2s",
            ..Knobs::default()
        },
    )
    .await;
    let who = email(1);
    h.publish(&[
        track(
            "Audience Entered",
            "vip_customers",
            true,
            &who,
            1,
            BASE_MICROS,
        ),
        track(
            "Audience Exited",
            "vip_customers",
            false,
            &who,
            2,
            BASE_MICROS + SECOND,
        ),
    ])
    .await;
    h.start_worker();
    h.wait_acked(2, Duration::from_secs(20)).await;
    assert_eq!(h.fake.value(1001, &who, 101).as_deref(), Some("off"));
    assert_eq!(h.fake.requests().len(), 1, "both in one request");
    h.finish().await;
}

/// A drained backlog, or a prefetch window too small to fill a batch, is sent as soon as
/// nothing more can come, not after `max_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_leave_when_nothing_more_can_come_not_after_max_wait() {
    // With two lists sharing a window of 100, neither list's batch can reach 100 contacts.
    for (name, max_contacts, prefetch) in
        [("drained_backlog", 1000, 2000), ("small_window", 100, 100)]
    {
        let traffic = sample::generate(TrafficShape {
            events: 1500,
            people: 400,
            poison_every: 0,
            ..TrafficShape::default()
        });
        let mut h = Harness::new(
            name,
            Faults::default(),
            Knobs {
                max_wait: "10m",
                max_contacts,
                prefetch,
                ..Knobs::default()
            },
        )
        .await;
        h.publish(&traffic.bodies).await;
        h.start_worker();
        h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(30))
            .await;
        assert_eq!(h.fake.contacts(), traffic.expected, "{name}");
        let flushes = |trigger| {
            h.metrics
                .sample("listrak_batch_flushes_total", &[("trigger", trigger)])
        };
        assert!(
            flushes("idle") > 0.0,
            "{name}: left because the input went quiet"
        );
        assert_eq!(flushes("time"), 0.0, "{name}: none waited for max_wait");
        h.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entered_then_exited_in_separate_batches_ends_off() {
    let mut h = Harness::new("two_batch_flip", Faults::default(), Knobs::default()).await;
    h.start_worker();
    let who = email(2);
    h.publish(&[track(
        "Audience Entered",
        "vip_customers",
        true,
        &who,
        1,
        BASE_MICROS,
    )])
    .await;
    h.wait_acked(1, Duration::from_secs(20)).await;
    assert_eq!(h.fake.value(1001, &who, 101).as_deref(), Some("on"));
    h.publish(&[track(
        "Audience Exited",
        "vip_customers",
        false,
        &who,
        2,
        BASE_MICROS + SECOND,
    )])
    .await;
    h.wait_acked(2, Duration::from_secs(20)).await;
    assert_eq!(h.fake.value(1001, &who, 101).as_deref(), Some("off"));
    assert_eq!(h.fake.requests().len(), 2);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_feeding_two_lists_is_acked_only_after_both_lists_accepted_it() {
    let mut h = Harness::new(
        "two_lists",
        Faults {
            failing_lists: [2002].into(),
            ..Faults::default()
        },
        Knobs::default(),
    )
    .await;
    h.start_worker();
    let who = email(3);
    h.publish(&[track(
        "Audience Entered",
        "cart_abandoners",
        true,
        &who,
        1,
        BASE_MICROS,
    )])
    .await;
    h.wait_for("list 1001 to be updated", Duration::from_secs(20), |h| {
        h.fake.value(1001, &who, 102).is_some()
    })
    .await;
    h.wait_for(
        "list 2002 to be tried a few times",
        Duration::from_secs(20),
        |h| h.fake.status_counts().get(&503).copied().unwrap_or(0) >= 2,
    )
    .await;
    assert_eq!(h.acked(), 0, "not acked while list 2002 fails");

    h.fake.update_faults(|f| f.failing_lists.clear());
    h.wait_acked(1, Duration::from_secs(30)).await;
    assert_eq!(h.acked_as("applied"), 1);
    assert_eq!(h.fake.value(1001, &who, 102).as_deref(), Some("on"));
    assert_eq!(h.fake.value(2002, &who, 201).as_deref(), Some("on"));
    assert_eq!(
        h.fake.value(2002, &who, 202).as_deref(),
        Some("abandoned-cart")
    );
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_mid_run_is_refreshed_once_and_nothing_fails() {
    let mut h = Harness::new(
        "token_expiry",
        Faults::default(),
        Knobs {
            max_contacts: 20,
            max_wait: "20ms",
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    let traffic = sample::generate(TrafficShape {
        events: 400,
        people: 300,
        poison_every: 0,
        ..TrafficShape::default()
    });
    h.publish(&traffic.bodies[..200]).await;
    h.wait_acked(200, Duration::from_secs(30)).await;
    assert_eq!(h.fake.tokens_issued(), 1);

    // The token (announced for 900 s) dies early: the next requests meet 401 and must
    // share one refresh.
    h.fake.expire_tokens();
    h.publish(&traffic.bodies[200..]).await;
    h.wait_acked(400, Duration::from_secs(30)).await;

    assert_eq!(h.fake.contacts(), traffic.expected);
    assert_eq!(
        h.fake.tokens_issued(),
        2,
        "one refresh for all requests in flight"
    );
    assert!(h.fake.status_counts().get(&401).copied().unwrap_or(0) >= 1);
    assert_eq!(
        h.metrics
            .sample("listrak_token_refreshes_total", &[("result", "failure")]),
        0.0
    );
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_the_worker_keeps_going() {
    let mut h = Harness::new("poison", Faults::default(), Knobs::default()).await;
    h.start_worker();
    let good = |n: usize| {
        track(
            "Audience Entered",
            "vip_customers",
            true,
            &email(n),
            n,
            BASE_MICROS,
        )
    };
    let oversize = {
        let mut body = br#"{"type":"track","event":"Audience Entered","pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 1 << 20));
        body.extend(br#""}"#);
        body
    };
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_json", vec![b'"', 0xc3, 0x28, b'"']),
        ("invalid_json", oversize),
        ("invalid_event", b"[1, 2, 3]".to_vec()),
        (
            "invalid_event",
            serde_json::to_vec(&json!({"type": "track", "event": ["x"]})).unwrap(),
        ),
        (
            "invalid_event",
            serde_json::to_vec(&json!({"event": "Audience Entered"})).unwrap(),
        ),
        (
            "invalid_event",
            serde_json::to_vec(&json!({
                "type": "track", "event": "Audience Entered",
                "properties": {"audience_key": "vip_customers", "vip_customers": true},
                "context": {"personas": {"computation_key": "vip_customers"}}
            }))
            .unwrap(),
        ),
        (
            "invalid_event",
            serde_json::to_vec(&json!({
                "type": "profile_update", "list_id": -4, "email": "a@example.com",
                "fields": {"101": "on"}
            }))
            .unwrap(),
        ),
    ];
    let mut bodies = vec![good(1)];
    bodies.extend(poison.iter().map(|(_, body)| body.clone()));
    bodies.push(good(2));
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(30))
        .await;

    assert_eq!(h.fake.value(1001, &email(1), 101).as_deref(), Some("on"));
    assert_eq!(h.fake.value(1001, &email(2), 101).as_deref(), Some("on"));
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), poison.len());
    for (reason, body) in &poison {
        let letter = dead
            .iter()
            .find(|d| d.body == *body)
            .unwrap_or_else(|| panic!("a {reason} body is in the dead-letter queue"));
        assert_eq!(letter.header("x-listrak-reason"), Some(*reason));
        assert!(letter
            .header("x-listrak-message")
            .is_some_and(|m| !m.is_empty()));
        assert!(letter.header("x-listrak-last-failed-at").is_some());
        assert_eq!(
            letter
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json"),
            "the producer's properties are kept"
        );
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_profile_update_is_applied_as_given() {
    let mut h = Harness::new("direct", Faults::default(), Knobs::default()).await;
    h.start_worker();
    h.publish(&[serde_json::to_vec(&json!({
        "type": "profile_update", "list_id": "777", "email": "Someone@Example.com",
        "fields": {"5": "gold", "6": "on"}, "timestamp": "2026-01-01T00:00:00Z", "message_id": "m-1"
    }))
    .unwrap()])
        .await;
    h.wait_acked(1, Duration::from_secs(20)).await;
    assert_eq!(
        h.fake.value(777, "someone@example.com", 5).as_deref(),
        Some("gold")
    );
    assert_eq!(
        h.fake.value(777, "someone@example.com", 6).as_deref(),
        Some("on")
    );
    h.finish().await;
}
