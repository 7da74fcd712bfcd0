//! The newest value wins beyond one process: a redeploy, a message without a timestamp coming
//! back from a retry queue, a dead-letter replay after a fix, and a second replica all meet
//! the applied log, and every field ends on its newest value.

use std::time::Duration;

use lapin::types::ShortString;
use lapin::BasicProperties;
use listrak_worker::commands::dlq::superseded::SupersededCheck;
use listrak_worker::commands::dlq::{DeadLetters, Filter, ReplayOptions};
use listrak_worker::config::Settings;
use listrak_worker::driver::worker::{self, Health};
use listrak_worker::edges::listrak::ListrakClient;
use listrak_worker::edges::telemetry::Metrics;
use listrak_worker::tools::sample::BASE_MICROS;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::support::{profile_update, Harness, Knobs};

const LIST: u32 = 7;
const FIELD: u32 = 3;
const CONTACTS: usize = 120;
const HOUR: i64 = 3_600_000_000;

fn email(i: usize) -> String {
    format!("person-{i}@example.com")
}

/// Every contact's update at `micros`, to `value`.
fn updates(value: &str, micros: i64) -> Vec<Vec<u8>> {
    (0..CONTACTS)
        .map(|i| profile_update(LIST, &email(i), FIELD, value, micros))
        .collect()
}

fn stale(h: &Harness, newest: &str) -> usize {
    (0..CONTACTS)
        .filter(|i| h.fake.value(LIST, &email(*i), FIELD).as_deref() != Some(newest))
        .count()
}

/// Short retry steps; in-process retries end quickly so an outage fills the retry queue.
fn knobs(schedule: &'static str, max_age: &'static str) -> Knobs {
    Knobs {
        max_wait: "50ms",
        in_process: "300ms",
        request_timeout: "1s",
        schedule,
        max_age,
        ..Knobs::default()
    }
}

async fn outage(h: &Harness, on: bool) {
    h.fake.update_faults(|faults| {
        faults.outage_for = on.then_some(Duration::from_secs(600));
    });
}

/// "Audience Entered" for every contact fails in an outage until each of its messages is
/// acked as `outcome` (`retry_scheduled`: waiting in the retry queue; `dead_lettered`); then
/// the outage ends.
async fn entered_fails(h: &Harness, outcome: &str) {
    outage(h, true).await;
    h.publish(&updates("on", BASE_MICROS)).await;
    h.wait_for(
        &format!("Entered acked as {outcome}"),
        Duration::from_secs(60),
        |h| h.acked_as(outcome) >= CONTACTS as u64,
    )
    .await;
    outage(h, false).await;
}

/// "Audience Exited", an hour newer, for the first `contacts`, applied.
async fn exited_applied(h: &Harness, contacts: usize) {
    let exited: Vec<Vec<u8>> = updates("off", BASE_MICROS + HOUR)
        .into_iter()
        .take(contacts)
        .collect();
    h.publish(&exited).await;
    h.wait_for("Exited applied", Duration::from_secs(30), |h| {
        h.acked_as("applied") >= contacts as u64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_update_in_a_retry_queue_does_not_overwrite_a_newer_one_after_a_redeploy() {
    let mut h = Harness::new("log_redeploy", Default::default(), knobs(r#"["6s"]"#, "1h")).await;
    h.start_worker();
    entered_fails(&h, "retry_scheduled").await;
    exited_applied(&h, CONTACTS).await;
    // A redeploy: the process that applied Exited is gone; its memory with it.
    h.stop_worker().await;
    h.start_worker();
    h.wait_for(
        "the Entered copies back from the retry queue",
        Duration::from_secs(30),
        |h| h.acked_as("superseded") >= CONTACTS as u64,
    )
    .await;
    assert_eq!(stale(&h, "off"), 0, "fields left on the older value");
    assert!(h.metrics.sample("listrak_guard_keys", &[]) >= CONTACTS as f64);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_without_a_timestamp_keeps_its_first_receipt_time_through_a_retry() {
    let mut h = Harness::new(
        "log_no_timestamp",
        Default::default(),
        knobs(r#"["3s"]"#, "1h"),
    )
    .await;
    h.start_worker();
    // Neither a timestamp in the body nor an AMQP timestamp: the time of first receipt.
    let without_time = |value: &str| -> Vec<(Vec<u8>, BasicProperties)> {
        (0..CONTACTS)
            .map(|i| {
                let body = serde_json::to_vec(&serde_json::json!({
                    "type": "profile_update",
                    "list_id": LIST,
                    "email": email(i),
                    "fields": { FIELD.to_string(): value },
                }))
                .unwrap();
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json"));
                (body, properties)
            })
            .collect()
    };
    outage(&h, true).await;
    h.publish_raw(
        &h.topology.exchange.clone(),
        "event",
        &without_time("alpha"),
    )
    .await;
    h.wait_for("alpha in the retry queue", Duration::from_secs(30), |h| {
        h.acked_as("retry_scheduled") >= CONTACTS as u64
    })
    .await;
    let copies = h.take_all(&h.topology.retries[0].0.clone()).await;
    assert!(copies
        .iter()
        .all(|copy| copy.header("x-listrak-event-time").is_some()));
    // Put the copies back as they were, then apply beta.
    let back: Vec<(Vec<u8>, BasicProperties)> = copies
        .into_iter()
        .map(|copy| (copy.body, copy.properties))
        .collect();
    outage(&h, false).await;
    h.publish_raw(&h.topology.exchange.clone(), "event", &without_time("beta"))
        .await;
    h.wait_for("beta applied", Duration::from_secs(30), |h| {
        h.acked_as("applied") >= CONTACTS as u64
    })
    .await;
    h.publish_raw("", &h.topology.queue.clone(), &back).await;
    h.wait_for("alpha superseded", Duration::from_secs(30), |h| {
        h.acked_as("superseded") >= CONTACTS as u64
    })
    .await;
    assert_eq!(stale(&h, "beta"), 0, "fields left on the older value");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_after_a_restart_does_not_overwrite_a_newer_value() {
    let mut h = Harness::new("log_replay", Default::default(), knobs(r#"["1s"]"#, "2s")).await;
    h.start_worker();
    entered_fails(&h, "dead_lettered").await;
    exited_applied(&h, CONTACTS).await;
    h.stop_worker().await;
    h.start_worker();
    let exhausted = Filter {
        reasons: vec!["retries_exhausted".into()],
        ..Filter::default()
    };
    let check = SupersededCheck::read(h.connection(), &h.topology, &h.settings)
        .await
        .unwrap();
    let dry = DeadLetters::new(h.connection(), &h.topology)
        .knowing(&check)
        .replay(
            &exhausted,
            ReplayOptions {
                dry_run: true,
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(dry.walked.matched, CONTACTS as u64);
    assert_eq!(dry.superseded, Some(CONTACTS as u64), "{dry}");
    let summary = DeadLetters::new(h.connection(), &h.topology)
        .replay(&exhausted, ReplayOptions::default(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(summary.replayed, CONTACTS as u64);
    h.wait_for(
        "the replayed ones superseded",
        Duration::from_secs(30),
        |h| h.acked_as("superseded") >= CONTACTS as u64,
    )
    .await;
    assert_eq!(stale(&h, "off"), 0, "fields left on the older value");
    h.finish().await;
}

/// Another worker process's equal on the same queues: its own guard, fed only by the log.
struct Replica {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    metrics: Metrics,
}

impl Replica {
    fn start(settings: &Settings) -> Replica {
        let metrics = Metrics::new(settings.batch.max_contacts.get());
        let api = Arc::new(ListrakClient::new(&settings.listrak, metrics.clone()).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker::run(
            settings.clone(),
            api,
            metrics.clone(),
            Health::default(),
            stop.clone().cancelled_owned(),
        ));
        Replica {
            stop,
            task,
            metrics,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_saw_the_newer_value_learns_it_from_the_log() {
    let mut h = Harness::new("log_replicas", Default::default(), knobs(r#"["4s"]"#, "1h")).await;
    h.start_worker();
    entered_fails(&h, "retry_scheduled").await;
    // A second replica starts while the copies wait; the first applies Exited and leaves.
    let replica = Replica::start(&h.settings);
    h.stop_worker().await;
    h.start_worker();
    h.publish(&updates("off", BASE_MICROS + HOUR)).await;
    let total = |h: &Harness, replica: &Replica, outcome: &str| {
        h.acked_as(outcome)
            + replica
                .metrics
                .sample("listrak_messages_acked_total", &[("outcome", outcome)])
                as u64
    };
    h.wait_for(
        "Exited applied and Entered superseded, by either replica",
        Duration::from_secs(60),
        |h| {
            total(h, &replica, "applied") >= CONTACTS as u64
                && total(h, &replica, "superseded") >= CONTACTS as u64
        },
    )
    .await;
    replica.stop().await;
    assert_eq!(stale(&h, "off"), 0, "fields left on the older value");
    h.finish().await;
}

#[tokio::test]
async fn every_applied_batch_is_one_record_in_the_stream() {
    let mut h = Harness::new("log_records", Default::default(), Knobs::default()).await;
    h.start_worker();
    h.publish(&updates("on", BASE_MICROS)).await;
    h.wait_acked(CONTACTS as u64, Duration::from_secs(30)).await;
    h.stop_worker().await;
    let bytes = h.metrics.sample("listrak_applied_log_bytes_total", &[]);
    let contacts = h.metrics.sample("listrak_applied_log_contacts_total", &[]);
    assert_eq!(contacts, CONTACTS as f64);
    println!(
        "applied log: {:.0} bytes per applied contact (one field, with its message id)",
        bytes / contacts
    );
    assert!(bytes / contacts < 80.0, "compressed, a record is smaller");
    let records = h.applied_records(Duration::from_secs(2)).await;
    let applied: Vec<_> = records.iter().flat_map(|record| &record.a).collect();
    assert_eq!(
        applied.len(),
        CONTACTS,
        "every applied contact is in one record"
    );
    for record in &records {
        assert_eq!(record.list, LIST);
    }
    for contact in applied {
        assert_eq!(contact.f.len(), 1);
        assert_eq!(contact.f[0].1, "on");
    }
    h.finish().await;
}

/// `listrak-worker history` with a configuration for the harness's queues.
async fn history(h: &Harness, args: &[&str]) -> std::process::Output {
    let text = crate::support::settings_text(
        &h.topology.queue,
        &h.fake.api_url(),
        &h.fake.auth_url(),
        &Knobs::default(),
    );
    let path = std::env::temp_dir().join(format!("{}-history.toml", h.topology.queue));
    std::fs::write(&path, text).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_listrak-worker"));
    command
        .arg("history")
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env_remove("AMQP_URL");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let _ = std::fs::remove_file(&path);
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_every_value_applied_to_a_contact_oldest_first_and_what_waits_for_it() {
    let mut h = Harness::new(
        "log_history",
        listrak_worker::tools::fake::Faults {
            reject_emails: ["refused@example.com".to_string()].into(),
            ..Default::default()
        },
        Knobs::default(),
    )
    .await;
    h.start_worker();
    let person = "Someone@Example.com";
    for (value, at) in [("on", BASE_MICROS), ("off", BASE_MICROS + HOUR)] {
        h.publish(&[profile_update(LIST, person, FIELD, value, at)])
            .await;
        h.wait_for("applied", Duration::from_secs(30), |h| {
            h.acked_as("applied") >= if value == "on" { 1 } else { 2 }
        })
        .await;
    }
    h.publish(&[profile_update(
        LIST,
        "refused@example.com",
        FIELD,
        "on",
        BASE_MICROS,
    )])
    .await;
    h.wait_acked(3, Duration::from_secs(30)).await;
    h.stop_worker().await;

    let output = history(&h, &["--email", "someone@example.com", "--json"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let applied = found["applied"].as_array().unwrap();
    let values: Vec<&str> = applied
        .iter()
        .map(|v| v["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["on", "off"], "oldest first: {found}");
    assert_eq!(applied[0]["field_id"], FIELD);
    assert_eq!(applied[0]["list_id"], LIST);
    assert!(applied[1]["resource_ids"][0]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(found["dead_letters"].as_array().unwrap().is_empty());

    let output = history(&h, &["--email", "refused@example.com"]).await;
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("no value applied to refused@example.com"),
        "{text}"
    );
    assert!(text.contains("1 dead letters wait for it"), "{text}");
    assert!(text.contains("rejected"), "{text}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_superseded_removes_the_dead_letters_the_log_supersedes_and_replays_the_rest() {
    let mut h = Harness::new("log_skip", Default::default(), knobs(r#"["1s"]"#, "2s")).await;
    h.start_worker();
    entered_fails(&h, "dead_lettered").await;
    // Only the first half of the contacts exit; the others' dead letters are still news.
    exited_applied(&h, CONTACTS / 2).await;
    let check = SupersededCheck::read(h.connection(), &h.topology, &h.settings)
        .await
        .unwrap();
    let summary = DeadLetters::new(h.connection(), &h.topology)
        .knowing(&check)
        .replay(
            &Filter::default(),
            ReplayOptions {
                skip_superseded: true,
                ..ReplayOptions::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(summary.superseded, Some((CONTACTS / 2) as u64), "{summary}");
    assert_eq!(summary.replayed, (CONTACTS / 2) as u64, "{summary}");
    assert_eq!(h.depth(&h.topology.dead).await, 0);
    h.wait_for("the rest applied", Duration::from_secs(30), |h| {
        h.acked_as("applied") >= CONTACTS as u64
    })
    .await;
    for i in 0..CONTACTS {
        let expected = if i < CONTACTS / 2 { "off" } else { "on" };
        assert_eq!(
            h.fake.value(LIST, &email(i), FIELD).as_deref(),
            Some(expected)
        );
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_worker_cannot_read_is_skipped_and_counted_and_the_worker_goes_on() {
    let mut h = Harness::new("log_unreadable", Default::default(), Knobs::default()).await;
    let plain = BasicProperties::default().with_delivery_mode(2);
    h.publish_raw(
        "",
        &h.topology.applied.clone(),
        &[
            (b"not a record".to_vec(), plain.clone()),
            (br#"{"v":99,"list":7}"#.to_vec(), plain),
        ],
    )
    .await;
    h.start_worker();
    h.publish(&updates("on", BASE_MICROS)).await;
    h.wait_acked(CONTACTS as u64, Duration::from_secs(30)).await;
    assert_eq!(h.acked_as("applied"), CONTACTS as u64);
    assert_eq!(
        h.metrics
            .sample("listrak_applied_log_unreadable_total", &[]),
        2.0
    );
    h.finish().await;
}

#[tokio::test]
async fn a_log_declared_with_another_retention_stops_the_start_naming_the_keys() {
    let h = Harness::new("log_mismatch", Default::default(), Knobs::default()).await;
    let mut other = h.topology.clone();
    other.applied_max_age = Duration::from_secs(3600);
    let error = other.declare(h.connection()).await.unwrap_err();
    let mismatch = listrak_worker::edges::broker::TopologyMismatch::from_declare(&error, &other)
        .expect("a refusal of the arguments");
    let message = mismatch.to_string();
    assert!(message.contains("applied_log.max_age"), "{message}");
    assert!(message.contains(&h.topology.applied), "{message}");
    h.finish().await;
}
