//! The applied log survives a broker restart: RabbitMQ's application is stopped and started
//! in the middle of a run, and the worker still ends with every field on its newest value,
//! and a worker started after it refuses the older copies from what the log kept.
//!
//! A binary of its own: stopping the broker would fail every test running beside it, and
//! cargo runs test binaries one after another.

use std::process::Command;
use std::time::Duration;

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::BASE_MICROS;

#[allow(dead_code)]
#[path = "integration/support.rs"]
mod support;

use support::{profile_update, Harness, Knobs};

const LIST: u32 = 7;
const FIELD: u32 = 3;
const CONTACTS: usize = 200;
const HOUR: i64 = 3_600_000_000;

fn email(i: usize) -> String {
    format!("person-{i}@example.com")
}

/// Every contact's update of round `round`: value `v{round}`, `round` hours after the base.
fn round(round: i64) -> Vec<Vec<u8>> {
    (0..CONTACTS)
        .map(|i| {
            let at = BASE_MICROS + round * HOUR;
            profile_update(LIST, &email(i), FIELD, &format!("v{round}"), at)
        })
        .collect()
}

fn stale(h: &Harness, newest: &str) -> usize {
    (0..CONTACTS)
        .filter(|i| h.fake.value(LIST, &email(*i), FIELD).as_deref() != Some(newest))
        .count()
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs (the broker of these tests is the local one)");
    assert!(status.success(), "rabbitmqctl {args:?} failed: {status}");
}

/// Starts the broker's application again when dropped, so a failing test leaves it running.
struct StoppedBroker;

impl StoppedBroker {
    fn stop() -> StoppedBroker {
        rabbitmqctl(&["stop_app"]);
        StoppedBroker
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applied_log_survives_a_broker_restart_mid_run() {
    let faults = Faults {
        latency: Duration::from_millis(400),
        ..Faults::default()
    };
    let knobs = Knobs {
        max_wait: "50ms",
        max_contacts: 20,
        // Rounds 4–6 then take about six seconds: the restart comes in the middle.
        max_concurrency: 2,
        ..Knobs::default()
    };
    let mut h = Harness::new("broker_restart", faults, knobs).await;
    h.start_worker();
    // What the log must keep through the restart: rounds 1 to 3, all applied.
    for r in 1..=3 {
        h.publish(&round(r)).await;
    }
    h.wait_for("round 3 applied", Duration::from_secs(60), |h| {
        stale(h, "v3") == 0
    })
    .await;
    let acked_before = h.acked();

    // Rounds 4 to 6 are on their way when the broker goes.
    for r in 4..=6 {
        h.publish(&round(r)).await;
    }
    h.wait_for(
        "the drain of rounds 4–6 under way",
        Duration::from_secs(60),
        |h| h.acked() >= acked_before + CONTACTS as u64 / 2,
    )
    .await;
    let broker = StoppedBroker::stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(broker);
    h.reconnect().await;
    h.wait_for(
        "round 6 applied after the restart",
        Duration::from_secs(90),
        |h| stale(h, "v6") == 0,
    )
    .await;
    let reconnects = h.metrics.sample("listrak_amqp_reconnects_total", &[]);
    assert!(reconnects >= 1.0, "the worker reconnected ({reconnects})");

    // A redeploy after the restart: the new worker knows only what the log kept.
    h.stop_worker().await;
    let superseded_before = h.acked_as("superseded");
    h.start_worker();
    let older: Vec<Vec<u8>> = (1..=5).flat_map(round).collect();
    h.publish(&older).await;
    h.wait_for(
        "the older copies acked as superseded",
        Duration::from_secs(60),
        |h| h.acked_as("superseded") >= superseded_before + older.len() as u64,
    )
    .await;
    assert_eq!(stale(&h, "v6"), 0, "fields left on an older value");

    // The records of rounds 1–3, confirmed before the restart, are still in the stream.
    let records = h.applied_records(Duration::from_secs(2)).await;
    let kept_v3 = (0..CONTACTS)
        .filter(|i| {
            let email = email(*i);
            records
                .iter()
                .flat_map(|record| &record.a)
                .any(|c| c.e == email && c.f.iter().any(|(_, value, _)| value == "v3"))
        })
        .count();
    assert_eq!(kept_v3, CONTACTS, "contacts whose round-3 record survived");
    h.finish().await;
}
