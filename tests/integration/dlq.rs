//! The `dlq` commands against the real broker: stats, peek, replay, export, purge.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use listrak_worker::commands::dlq::{stats, DeadLetters, Filter, ReplayOptions};
use listrak_worker::commands::publish::{event_properties, publish_file};
use listrak_worker::edges::broker::{self, int_header, text_header};
use listrak_worker::stages::model::EventTime;
use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{email, track, BASE_MICROS};

use crate::support::{settings_text, wait_until, DeadLetter, Harness, Knobs};

const HOUR: i64 = 3_600_000_000;

/// What the worker writes on a dead letter (see `worker.rs`, `dead_letter`).
#[derive(Clone, Copy)]
struct Cause {
    reason: &'static str,
    list: Option<i64>,
    status: Option<i64>,
    error: Option<&'static str>,
}

const REJECTED: Cause = Cause {
    reason: "rejected",
    list: Some(1001),
    status: Some(400),
    error: Some("ERROR_INVALID_PARAMETER"),
};
const LIST_NOT_FOUND: Cause = Cause {
    reason: "list_not_found",
    list: Some(999),
    status: Some(404),
    error: Some("ERROR_RESOURCE_NOT_FOUND"),
};
const INVALID_JSON: Cause = Cause {
    reason: "invalid_json",
    list: None,
    status: None,
    error: None,
};
const EXHAUSTED: Cause = Cause {
    reason: "retries_exhausted",
    list: None,
    status: None,
    error: None,
};

/// A dead letter as the worker leaves it: the producer's body and properties (plus a header
/// of the producer's own), and the worker's failure headers.
fn dead_letter(index: usize, cause: Cause, failed_at: EventTime) -> (Vec<u8>, BasicProperties) {
    let body = if cause.reason == "invalid_json" {
        format!("not json {index}").into_bytes()
    } else {
        serde_json::to_vec(&serde_json::json!({
            "type": "profile_update",
            "list_id": cause.list.unwrap_or(1001),
            "email": email(index),
            "fields": {"101": "on"},
            "message_id": format!("seed-{index}"),
        }))
        .unwrap()
    };
    let mut headers = vec![
        ("x-producer", text_header("shop")),
        (broker::REASON, text_header(cause.reason)),
        (broker::ATTEMPTS, int_header(2)),
        (
            broker::FIRST_FAILED_AT,
            text_header(EventTime(failed_at.0 - HOUR).to_rfc3339()),
        ),
        (broker::LAST_FAILED_AT, text_header(failed_at.to_rfc3339())),
        (broker::MESSAGE, text_header("as Listrak said")),
    ];
    if let Some(list) = cause.list {
        headers.push((broker::LIST_ID, int_header(list)));
    }
    if let Some(status) = cause.status {
        headers.push((broker::STATUS, int_header(status)));
    }
    if let Some(error) = cause.error {
        headers.push((broker::ERROR, text_header(error)));
    }
    let properties = broker::with_headers(
        &event_properties(&body).with_app_id(ShortString::from("shop")),
        headers,
    );
    (body, properties)
}

fn now_minus(hours: i64) -> EventTime {
    EventTime(EventTime::now().0 - hours * HOUR)
}

async fn seed(h: &Harness, letters: &[(Vec<u8>, BasicProperties)]) {
    h.publish_raw("", &h.topology.dead, letters).await;
}

/// Message bodies as text, for readable failures.
fn bodies(letters: &[DeadLetter]) -> Vec<String> {
    letters
        .iter()
        .map(|l| String::from_utf8_lossy(&l.body).into_owned())
        .collect()
}

fn seeded(letters: &[(Vec<u8>, BasicProperties)]) -> Vec<String> {
    letters
        .iter()
        .map(|(body, _)| String::from_utf8_lossy(body).into_owned())
        .collect()
}

/// The same messages in the same order; on failure, says where they part and how the
/// messages found run (by the number in each body).
fn assert_same_order(found: &[String], expected: &[String], what: &str) {
    if found == expected {
        return;
    }
    let number = |body: &String| {
        body.split(|c: char| !c.is_ascii_digit())
            .rfind(|t| !t.is_empty())
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let numbers: Vec<i64> = found.iter().map(number).collect();
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=numbers.len() {
        if i == numbers.len() || numbers[i] <= numbers[i - 1] || numbers[i] > numbers[i - 1] + 5 {
            runs.push(format!("{}..{}", numbers[start], numbers[i - 1]));
            start = i;
        }
    }
    let at = found
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(found.len().min(expected.len()));
    panic!(
        "{what}: {} found, {} expected; first difference at {at}: {:?} instead of {:?}; \
         found in runs {:?}",
        found.len(),
        expected.len(),
        found.get(at),
        expected.get(at),
        &runs[..runs.len().min(12)]
    );
}

/// Everything but the headers.
fn without_headers(properties: &BasicProperties) -> BasicProperties {
    properties.clone().with_headers(FieldTable::default())
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

async fn harness(test: &str) -> Harness {
    Harness::new(test, Faults::default(), Knobs::default()).await
}

/// Makes the broker dead-letter a message at the main queue's delivery limit, as it does
/// for a message that crashes every worker it reaches.
async fn dead_letter_at_the_delivery_limit(h: &Harness, body: &[u8]) {
    let before = h.depth(&h.topology.dead).await;
    h.publish_raw(
        &h.topology.exchange,
        "track",
        &[(body.to_vec(), event_properties(body))],
    )
    .await;
    let channel = h.connection().create_channel().await.unwrap();
    for _ in 0..100 {
        let Some(message) = channel
            .basic_get(h.topology.queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        else {
            break;
        };
        channel
            .basic_nack(
                message.delivery.delivery_tag,
                BasicNackOptions {
                    requeue: true,
                    multiple: false,
                },
            )
            .await
            .unwrap();
    }
    wait_until(
        "the broker to dead-letter it",
        Duration::from_secs(10),
        async || h.depth(&h.topology.dead).await != before,
    )
    .await;
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_a_seeded_queue_exactly_by_cause_and_change_nothing() {
    let h = harness("dlq_stats").await;
    let mut letters = Vec::new();
    for i in 0..40 {
        let (cause, hours) = match i % 8 {
            0..=3 => (REJECTED, 1 + i as i64),
            4 | 5 => (LIST_NOT_FOUND, 2),
            6 => (INVALID_JSON, 3),
            _ => (EXHAUSTED, 4),
        };
        letters.push(dead_letter(i, cause, now_minus(hours)));
    }
    // Another list answering 400: another cause.
    letters.push(dead_letter(
        40,
        Cause {
            list: Some(2002),
            ..REJECTED
        },
        now_minus(1),
    ));
    seed(&h, &letters).await;
    dead_letter_at_the_delivery_limit(&h, br#"{"type":"track","crashes":"the worker"}"#).await;

    let dead = DeadLetters::new(h.connection(), &h.topology);
    let (counted, walked) = dead.stats(&Filter::default()).await.unwrap();

    let rows: BTreeMap<stats::Cause, u64> = counted
        .groups()
        .iter()
        .map(|g| (g.cause.clone(), g.count))
        .collect();
    let key = |c: Cause| stats::Cause {
        reason: c.reason.to_string(),
        list_id: c.list,
        status: c.status,
        error: c.error.map(String::from),
    };
    let expected = BTreeMap::from([
        (key(REJECTED), 20),
        (
            key(Cause {
                list: Some(2002),
                ..REJECTED
            }),
            1,
        ),
        (key(LIST_NOT_FOUND), 10),
        (key(INVALID_JSON), 5),
        (key(EXHAUSTED), 5),
        (
            key(Cause {
                reason: "delivery_limit",
                ..INVALID_JSON
            }),
            1,
        ),
    ]);
    assert_eq!(rows, expected);
    assert_eq!((walked.present, walked.read, counted.total()), (42, 42, 42));
    let rejected = counted.groups()[0];
    assert_eq!(rejected.cause.reason, "rejected");
    let span = rejected.newest.unwrap().0 - rejected.oldest.unwrap().0;
    assert!(
        (span - 35 * HOUR).abs() < 60_000_000,
        "oldest 36h ago, newest 1h ago"
    );

    let (only, _) = dead
        .stats(&Filter {
            reasons: vec!["list_not_found".into(), "delivery_limit".into()],
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(only.total(), 11);

    let mut after = h.take_dead_letters().await;
    let limited = after.pop().unwrap();
    assert_same_order(&bodies(&after), &seeded(&letters), "after stats");
    assert!(header(&limited.properties, "x-death").is_some());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_a_filter_moves_exactly_the_matching_messages_unchanged() {
    let h = harness("dlq_replay_filter").await;
    // More non-matching messages than one consumer's prefetch holds, before and between the
    // matching ones: the walk must hold them all and still reach the end.
    let mut letters = Vec::new();
    for i in 0..2600 {
        let cause = if i % 100 == 7 {
            LIST_NOT_FOUND
        } else if i % 3 == 0 {
            INVALID_JSON
        } else {
            REJECTED
        };
        letters.push(dead_letter(i, cause, now_minus(1)));
    }
    seed(&h, &letters).await;
    let (matching, others): (Vec<_>, Vec<_>) = letters
        .iter()
        .cloned()
        .partition(|(_, p)| header(p, broker::REASON) == Some(&text_header("list_not_found")));
    assert_eq!(matching.len(), 26);

    let dead = DeadLetters::new(h.connection(), &h.topology);
    let filter = Filter {
        reasons: vec!["list_not_found".into()],
        list_ids: vec![999],
        ..Filter::default()
    };
    let summary = dead
        .replay(&filter, ReplayOptions::default(), std::future::pending())
        .await
        .unwrap();
    assert!(summary.stopped.is_none(), "{summary}");
    assert_eq!(summary.replayed, 26);
    assert_eq!(summary.walked.present, 2600);

    let replayed = h.take_all(&h.topology.queue).await;
    assert_same_order(&bodies(&replayed), &seeded(&matching), "replayed");
    for (message, (_, original)) in replayed.iter().zip(&matching) {
        assert_eq!(
            without_headers(&message.properties),
            without_headers(original)
        );
        assert_eq!(message.header("x-listrak-replays"), Some("1"));
        assert_eq!(message.header("x-producer"), Some("shop"));
        for reset in [
            broker::REASON,
            broker::STATUS,
            broker::ERROR,
            broker::LIST_ID,
            broker::ATTEMPTS,
            broker::FIRST_FAILED_AT,
            broker::LAST_FAILED_AT,
        ] {
            assert_eq!(message.header(reset), None, "{reset} is reset");
        }
    }
    let left = h.take_dead_letters().await;
    assert_same_order(
        &bodies(&left),
        &seeded(&others),
        "left in the dead-letter queue",
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_peeks_and_an_unconfirmed_purge_change_nothing() {
    let h = harness("dlq_dry").await;
    let letters: Vec<_> = (0..30)
        .map(|i| {
            let cause = [REJECTED, LIST_NOT_FOUND, INVALID_JSON][i % 3];
            dead_letter(i, cause, now_minus(i as i64))
        })
        .collect();
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let rejected = Filter {
        reasons: vec!["rejected".into()],
        ..Filter::default()
    };

    let dry = dead
        .replay(
            &rejected,
            ReplayOptions {
                dry_run: true,
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((dry.walked.matched, dry.replayed), (10, 0), "{dry:?}");
    let limited = dead
        .replay(
            &Filter::default(),
            ReplayOptions {
                dry_run: true,
                limit: Some(4),
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(limited.walked.matched, 4);

    let purge = dead.purge(&rejected, false).await.unwrap();
    assert_eq!((purge.walked.matched, purge.deleted), (10, 0));
    assert!(purge.to_string().contains("nothing was deleted"), "{purge}");

    let older = Filter {
        older_than: Some(Duration::from_secs(20 * 3600) - Duration::from_secs(60)),
        ..rejected.clone()
    };
    let (shown, walked) = dead.peek(&older, 2).await.unwrap();
    assert_eq!(shown.len(), 2);
    assert!(walked.read < walked.present, "peek stops at its limit");
    let (all_old, _) = dead.peek(&older, 100).await.unwrap();
    // Rejected messages are 0, 3, 6, ... hours old; 20h and more: 21, 24, 27.
    let ids: Vec<String> = all_old
        .iter()
        .map(|l| l.properties.message_id().clone().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["seed-21", "seed-24", "seed-27"]);
    assert_eq!(all_old[0].facts.list_id, Some(1001));
    assert_eq!(all_old[0].facts.status, Some(400));

    assert_eq!(h.depth(&h.topology.queue).await, 0, "nothing replayed");
    let after = h.take_dead_letters().await;
    assert_same_order(&bodies(&after), &seeded(&letters), "after the dry runs");
    for (message, (_, original)) in after.iter().zip(&letters) {
        assert_eq!(
            without_headers(&message.properties),
            without_headers(original)
        );
        assert_eq!(
            message.header(broker::REASON),
            header(original, broker::REASON)
                .and_then(broker::as_text)
                .as_deref()
        );
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looking_leaves_a_queue_larger_than_a_prefetch_exactly_as_it_was() {
    let h = harness("dlq_look_large").await;
    let letters: Vec<_> = (0..5000)
        .map(|i| {
            dead_letter(
                i,
                [REJECTED, LIST_NOT_FOUND, INVALID_JSON][i % 3],
                now_minus(1),
            )
        })
        .collect();
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let rare = Filter {
        list_ids: vec![999],
        ..Filter::default()
    };

    let (first, _) = dead.peek(&Filter::default(), 2).await.unwrap();
    let (again, _) = dead.peek(&Filter::default(), 2).await.unwrap();
    assert_eq!(first[0].body, letters[0].0);
    assert_eq!(
        again[0].body, letters[0].0,
        "a peek gives back what it showed"
    );
    let (stats, _) = dead.stats(&Filter::default()).await.unwrap();
    assert_eq!(stats.total(), 5000);
    let (last, walked) = dead.peek(&rare, 5000).await.unwrap();
    assert_eq!((last.len(), walked.read), (1667, 5000));
    let dry = dead
        .replay(
            &rare,
            ReplayOptions {
                dry_run: true,
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(dry.walked.matched, 1667);

    let after = h.take_dead_letters().await;
    assert_same_order(&bodies(&after), &seeded(&letters), "after looking");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_with_a_filter_deletes_only_what_matches_and_the_rest_keeps_its_order() {
    let h = harness("dlq_purge_filter").await;
    let letters: Vec<_> = (0..5000)
        .map(|i| {
            dead_letter(
                i,
                [REJECTED, INVALID_JSON][usize::from(i % 5 == 0)],
                now_minus(1),
            )
        })
        .collect();
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let summary = dead
        .purge(
            &Filter {
                reasons: vec!["invalid_json".into()],
                ..Filter::default()
            },
            true,
        )
        .await
        .unwrap();
    assert!(summary.stopped.is_none(), "{summary}");
    assert_eq!(summary.deleted, 1000);
    let rest: Vec<_> = letters
        .iter()
        .filter(|(_, p)| header(p, broker::REASON) == Some(&text_header("rejected")))
        .cloned()
        .collect();
    let after = h.take_dead_letters().await;
    assert_same_order(&bodies(&after), &seeded(&rest), "after the purge");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_holds_its_rate_within_a_fifth() {
    let h = harness("dlq_rate").await;
    let letters: Vec<_> = (0..101)
        .map(|i| dead_letter(i, REJECTED, now_minus(1)))
        .collect();
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let started = Instant::now();
    let summary = dead
        .replay(
            &Filter::default(),
            ReplayOptions {
                rate: Some(50.0),
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(summary.replayed, 101);
    // 101 messages at 50/s: the last leaves 2s after the first.
    let rate = 100.0 / elapsed;
    assert!(
        (40.0..=60.0).contains(&rate),
        "{rate:.1}/s over {elapsed:.2}s"
    );
    assert_eq!(h.depth(&h.topology.queue).await, 101);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_purge_then_publish_restores_the_same_messages() {
    let h = harness("dlq_export").await;
    let mut letters: Vec<_> = (0..24)
        .map(|i| {
            let cause = [REJECTED, LIST_NOT_FOUND, EXHAUSTED][i % 3];
            dead_letter(i, cause, now_minus(2))
        })
        .collect();
    // A body that is not UTF-8, and headers of kinds JSON does not have.
    let mut death = FieldTable::default();
    death.insert("reason".into(), text_header("delivery_limit"));
    death.insert("count".into(), int_header(1));
    death.insert("time".into(), AMQPValue::Timestamp(1_767_225_600));
    letters.push((
        vec![0xff, 0xfe, b'{', 0],
        broker::with_headers(
            &BasicProperties::default()
                .with_delivery_mode(2)
                .with_timestamp(1_767_225_600),
            [
                (
                    "x-death",
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
                ),
                ("x-flag", AMQPValue::Boolean(true)),
                (
                    "x-raw",
                    AMQPValue::LongString(LongString::from(vec![0xc3u8])),
                ),
            ],
        ),
    ));
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let path = std::env::temp_dir().join(format!("{}.jsonl", h.topology.queue));

    let exported = dead.export(&Filter::default(), &path, false).await.unwrap();
    assert_eq!((exported.walked.matched, exported.removed), (25, 0));
    assert_eq!(
        h.depth(&h.topology.dead).await,
        25,
        "export alone removes nothing"
    );
    assert!(
        dead.export(&Filter::default(), &path, false).await.is_err(),
        "an existing file is not overwritten"
    );
    let purged = dead.purge(&Filter::default(), true).await.unwrap();
    assert_eq!(purged.deleted, 25);
    assert_eq!(h.depth(&h.topology.dead).await, 0);

    let published = publish_file(
        &crate::support::direct(&h.settings.amqp),
        &h.topology,
        &path,
    )
    .await
    .unwrap();
    assert_eq!((published.messages, published.restored), (25, 25));
    let restored = h.take_all(&h.topology.queue).await;
    assert_same_order(&bodies(&restored), &seeded(&letters), "restored");
    for (message, (_, original)) in restored.iter().zip(&letters) {
        assert_eq!(
            without_headers(&message.properties),
            without_headers(original)
        );
        assert_eq!(message.header("x-listrak-replays"), Some("1"));
        assert_eq!(message.header(broker::REASON), None, "a fresh retry budget");
        for name in ["x-producer", "x-death", "x-flag", "x-raw"] {
            assert_eq!(
                header(&message.properties, name),
                header(original, name),
                "{name} keeps its value and kind"
            );
        }
    }
    let _ = std::fs::remove_file(&path);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_with_remove_takes_only_what_it_wrote() {
    let h = harness("dlq_export_remove").await;
    let letters: Vec<_> = (0..20)
        .map(|i| dead_letter(i, [REJECTED, INVALID_JSON][i % 2], now_minus(1)))
        .collect();
    seed(&h, &letters).await;
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let path = std::env::temp_dir().join(format!("{}.jsonl", h.topology.queue));
    let summary = dead
        .export(
            &Filter {
                reasons: vec!["invalid_json".into()],
                ..Filter::default()
            },
            &path,
            true,
        )
        .await
        .unwrap();
    assert_eq!((summary.walked.matched, summary.removed), (10, 10));
    let lines = std::fs::read_to_string(&path).unwrap();
    assert_eq!(lines.lines().count(), 10);
    assert!(lines
        .lines()
        .all(|l| l.contains("\"x-listrak-reason\":\"invalid_json\"")));
    let left = h.take_dead_letters().await;
    assert_eq!(left.len(), 10);
    assert!(left
        .iter()
        .all(|l| l.header(broker::REASON) == Some("rejected")));
    let _ = std::fs::remove_file(&path);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_messages_that_fail_again_handles_each_once_and_ends() {
    // List 1001 does not exist: every replayed message comes straight back as a dead letter
    // while the replay is still running.
    let mut h = Harness::new(
        "dlq_no_loop",
        Faults {
            unknown_lists: BTreeSet::from([1001]),
            ..Faults::default()
        },
        Knobs {
            max_wait: "20ms",
            ..Knobs::default()
        },
    )
    .await;
    let count = 300;
    let letters: Vec<_> = (0..count)
        .map(|i| {
            let body = track(
                "Audience Entered",
                "vip_customers",
                true,
                &email(i),
                i,
                BASE_MICROS + i as i64,
            );
            let properties = broker::with_headers(
                &event_properties(&body),
                [
                    (broker::REASON, text_header("list_not_found")),
                    (broker::LIST_ID, int_header(1001)),
                    (broker::STATUS, int_header(404)),
                ],
            );
            (body, properties)
        })
        .collect();
    seed(&h, &letters).await;
    h.start_worker();
    let dead = DeadLetters::new(h.connection(), &h.topology);
    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        dead.replay(
            &Filter::default(),
            ReplayOptions {
                rate: Some(300.0),
                ..ReplayOptions::default()
            },
            std::future::pending(),
        ),
    )
    .await
    .expect("the replay ends")
    .unwrap();
    assert_eq!(summary.replayed, count as u64, "{summary}");
    assert!(
        h.acked_as("dead_lettered") > 0,
        "some failed again while the replay ran"
    );
    h.wait_for(
        "every replayed message to fail again",
        Duration::from_secs(30),
        |h| h.acked_as("dead_lettered") >= count as u64,
    )
    .await;
    h.stop_worker().await;
    let again = h.take_dead_letters().await;
    assert_eq!(again.len(), count, "each message once");
    assert!(again
        .iter()
        .all(|l| l.header("x-listrak-replays") == Some("1")));
    assert_eq!(
        again
            .iter()
            .map(|l| l.body.clone())
            .collect::<BTreeSet<_>>(),
        letters
            .iter()
            .map(|(b, _)| b.clone())
            .collect::<BTreeSet<_>>()
    );
    h.finish().await;
}

fn write_config(h: &Harness) -> std::path::PathBuf {
    let text = settings_text(
        &h.topology.queue,
        &h.fake.api_url(),
        &h.fake.auth_url(),
        &Knobs::default(),
    );
    let path = std::env::temp_dir().join(format!("{}.toml", h.topology.queue));
    std::fs::write(&path, text).unwrap();
    path
}

fn worker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_listrak-worker"));
    command.env("RUST_LOG", "warn").env_remove("AMQP_URL");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_leaves_every_message_in_one_queue_or_the_other() {
    let h = harness("dlq_sigkill").await;
    let letters: Vec<_> = (0..2000)
        .map(|i| dead_letter(i, REJECTED, now_minus(1)))
        .collect();
    seed(&h, &letters).await;
    let config = write_config(&h);
    let mut child = worker()
        .args(["dlq", "replay", "--rate", "400", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the replay to start", Duration::from_secs(20), async || {
        h.depth(&h.topology.queue).await >= 300
    })
    .await;
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), None, "killed by the signal");
    let _ = std::fs::remove_file(config);

    // The broker returns the dead process's unacked messages once it sees the connection go.
    wait_until(
        "every message back in one of the two queues",
        Duration::from_secs(10),
        async || h.depth(&h.topology.queue).await + h.depth(&h.topology.dead).await >= 2000,
    )
    .await;
    let main = h.take_all(&h.topology.queue).await;
    let dead = h.take_dead_letters().await;
    assert!(
        !main.is_empty() && !dead.is_empty(),
        "killed midway: {} replayed, {} left",
        main.len(),
        dead.len()
    );
    let found: BTreeSet<Vec<u8>> = main.iter().chain(&dead).map(|l| l.body.clone()).collect();
    let missing = letters.iter().filter(|(b, _)| !found.contains(b)).count();
    assert_eq!(missing, 0, "{} in main, {} in dead", main.len(), dead.len());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_exit_as_the_contract_says() {
    let h = harness("dlq_cli").await;
    seed(&h, &[dead_letter(1, REJECTED, now_minus(1))]).await;
    let config = write_config(&h);
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = worker();
        command
            .args(["dlq"])
            .args(args)
            .arg("--config")
            .arg(&config);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };

    let stats = run(&["stats", "--json"], &[]);
    assert_eq!(stats.status.code(), Some(0));
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(value["groups"][0]["reason"], "rejected");
    assert_eq!(value["groups"][0]["count"], 1);

    let purge = run(&["purge"], &[]);
    assert_eq!(purge.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&purge.stdout).contains("would delete 1 of 1"));

    let typo = run(&["replay", "--reason", "rejcted"], &[]);
    assert_eq!(typo.status.code(), Some(2), "a usage error");

    let exists = run(&["export", config.to_str().unwrap()], &[]);
    assert_eq!(
        exists.status.code(),
        Some(2),
        "an existing file is a usage error"
    );

    let down = run(
        &["stats"],
        &[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    );
    assert_eq!(down.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("cannot connect to RabbitMQ at amqp://guest:"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "the password is redacted: {stderr}"
    );

    let absent = std::env::temp_dir().join(format!("{}.absent.toml", h.topology.queue));
    std::fs::write(
        &absent,
        settings_text(
            &format!("{}.absent", h.topology.queue),
            &h.fake.api_url(),
            &h.fake.auth_url(),
            &Knobs::default(),
        ),
    )
    .unwrap();
    let missing = worker()
        .args(["dlq", "stats", "--config"])
        .arg(&absent)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(absent);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    assert_eq!(h.depth(&h.topology.dead).await, 1, "nothing was deleted");
    let _ = std::fs::remove_file(config);
    h.finish().await;
}
