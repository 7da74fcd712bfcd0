//! Several workers on one queue: they share the work, the result is the one a single worker
//! reaches, a replica killed mid-run loses nothing, and `amqp.single_active_consumer` keeps
//! all but one of them standing by.
//!
//! The traffic gives every (list, contact, field) a single event. Replicas keep no order
//! between them: two events for the same field, taken by two workers, reach Listrak in
//! whichever order their batches happen to be sent, so with repeated fields the final state
//! of a multi-worker run may rightly differ from a single worker's (docs/design.md, "Several
//! replicas", says so).
//! With one event per field, the final state does not depend on the order of application,
//! and any difference from one worker's result is a lost or wrongly applied update.

use std::time::Duration;

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, Traffic, TrafficShape};

use crate::support::{self, Harness, Knobs, WorkerProcess};

const EVENTS: usize = 3000;
const WITHIN: Duration = Duration::from_secs(60);

fn traffic() -> Traffic {
    sample::generate(TrafficShape {
        events: EVENTS,
        people: 1000,
        poison_every: 0,
        one_event_per_field: true,
        ..TrafficShape::default()
    })
}

/// Small batches and a small prefetch, so that a backlog of a few thousand events is many
/// rounds of work for each worker.
fn knobs() -> Knobs {
    Knobs {
        max_contacts: 20,
        prefetch: 60,
        max_wait: "20ms",
        in_process: "30s",
        ..Knobs::default()
    }
}

/// Listrak is down from the start, until every worker holds deliveries (see [`share`]).
fn gated(latency: Duration) -> Faults {
    Faults {
        latency,
        outage_for: Some(Duration::from_secs(600)),
        ..Faults::default()
    }
}

/// Starts `count` worker processes on the harness's backlog, then lifts the Listrak outage
/// [`gated`] began with once each of them holds deliveries. While nobody can settle what it
/// took, RabbitMQ hands the rest of the backlog to the others, so every worker gets a share
/// however the processes' start-up times fall.
async fn share(h: &Harness, count: usize, knobs: &Knobs) -> Vec<WorkerProcess> {
    let workers: Vec<WorkerProcess> = (0..count)
        .map(|i| WorkerProcess::spawn(h, &format!("replica{i}"), knobs))
        .collect();
    for worker in &workers {
        wait_until(
            &format!("worker {} to hold deliveries", worker.id()),
            async || worker.received().await > 0,
        )
        .await;
    }
    h.fake.update_faults(|faults| faults.outage_for = None);
    workers
}

async fn wait_until(what: &str, condition: impl AsyncFn() -> bool) {
    support::wait_until(what, WITHIN, condition).await;
}

async fn acked_by_all(workers: &[WorkerProcess]) -> u64 {
    let mut total = 0;
    for worker in workers {
        total += worker.acked().await;
    }
    total
}

/// SIGTERM to each: every one drains and exits 0.
async fn stop_all(workers: &mut [WorkerProcess]) {
    for worker in workers.iter() {
        worker.signal("TERM");
    }
    for worker in workers.iter_mut() {
        let status = worker.wait_exit(WITHIN).await;
        assert_eq!(status.code(), Some(0), "SIGTERM ends a replica with 0");
    }
}

/// Once every worker is stopped: nothing left in the queue (unsettled deliveries would be
/// back in it), nothing dead-lettered.
async fn assert_drained(h: &Harness) {
    assert_eq!(
        h.depth(&h.topology.queue).await,
        0,
        "the main queue is empty"
    );
    assert!(
        h.take_dead_letters().await.is_empty(),
        "nothing was dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_backlog_and_reach_the_state_one_worker_reaches() {
    let traffic = traffic();

    let mut one = Harness::new("replicas-one", Faults::default(), knobs()).await;
    one.publish(&traffic.bodies).await;
    one.start_worker();
    one.wait_acked(EVENTS as u64, WITHIN).await;
    let one_worker = one.fake.contacts();
    one.finish().await;
    assert_eq!(
        one_worker, traffic.expected,
        "one worker applies exactly what the events say"
    );

    let h = Harness::new("replicas-three", gated(Duration::ZERO), knobs()).await;
    h.publish(&traffic.bodies).await;
    let mut workers = share(&h, 3, &knobs()).await;
    wait_until("every event to be acknowledged", async || {
        acked_by_all(&workers).await >= EVENTS as u64
    })
    .await;
    let mut shares = Vec::new();
    for worker in &workers {
        shares.push(worker.acked().await);
    }
    assert_eq!(h.fake.contacts(), one_worker);
    assert!(
        shares.iter().all(|&acked| acked > 0),
        "every worker got a share: {shares:?}"
    );
    assert_eq!(
        shares.iter().sum::<u64>(),
        EVENTS as u64,
        "each message was settled once: {shares:?}"
    );
    stop_all(&mut workers).await;
    assert_drained(&h).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_loses_nothing() {
    let traffic = traffic();
    // Some latency, so that the run lasts long enough to be interrupted in the middle.
    let h = Harness::new("replicas-kill", gated(Duration::from_millis(20)), knobs()).await;
    h.publish(&traffic.bodies).await;
    let mut workers = share(&h, 3, &knobs()).await;

    let mut victim = workers.remove(0);
    // The replica settles its deliveries a window at a time, so a moment after an ack may
    // find it holding nothing: wait for one scrape (one scrape, so that no ack falls between
    // the two readings) that shows it has applied some and holds more, and kill it then.
    wait_until(
        "the first replica to have applied some events and hold more",
        async || {
            let Some(scraped) = victim.metrics().await else {
                return false;
            };
            let received = support::counter_total(&scraped, "listrak_messages_received_total");
            let acked = support::counter_total(&scraped, "listrak_messages_acked_total");
            acked > 0.0 && received > acked
        },
    )
    .await;
    victim.signal("KILL");
    assert_eq!(victim.wait_exit(WITHIN).await.code(), None, "killed");

    h.wait_for("the other replicas to apply everything", WITHIN, |h| {
        h.fake.contacts() == traffic.expected
    })
    .await;
    stop_all(&mut workers).await;
    assert_drained(&h).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_single_active_consumer_one_worker_consumes_until_it_stops() {
    let traffic = traffic();
    let (first_half, second_half) = traffic.bodies.split_at(EVENTS / 2);
    let knobs = Knobs {
        single_active_consumer: true,
        ..knobs()
    };
    let h = Harness::new("replicas-sac", Faults::default(), knobs.clone()).await;
    let mut first = WorkerProcess::spawn(&h, "first", &knobs);
    first.wait_ready(WITHIN).await;
    let mut second = WorkerProcess::spawn(&h, "second", &knobs);
    second.wait_ready(WITHIN).await;

    h.publish(first_half).await;
    wait_until("the first worker to settle the first half", async || {
        first.acked().await >= first_half.len() as u64
    })
    .await;
    assert_eq!(first.acked().await, first_half.len() as u64);
    assert_eq!(second.received().await, 0, "the second stands by");
    assert_eq!(second.acked().await, 0);

    first.signal("TERM");
    assert_eq!(first.wait_exit(WITHIN).await.code(), Some(0));
    h.publish(second_half).await;
    wait_until("the second worker to take over", async || {
        second.acked().await >= second_half.len() as u64
    })
    .await;
    assert_eq!(second.acked().await, second_half.len() as u64);
    assert_eq!(h.fake.contacts(), traffic.expected);

    stop_all(std::slice::from_mut(&mut second)).await;
    assert_drained(&h).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_setting_the_queue_does_not_have_stops_the_worker_with_2() {
    for (queue_has_it, worker_wants_it) in [(false, true), (true, false)] {
        let h = Harness::new(
            "replicas-mismatch",
            Faults::default(),
            Knobs {
                single_active_consumer: queue_has_it,
                ..knobs()
            },
        )
        .await;
        let worker = Knobs {
            single_active_consumer: worker_wants_it,
            ..knobs()
        };
        let (status, stderr) = WorkerProcess::run_to_exit(&h, "mismatch", &worker, WITHIN).await;
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("amqp.single_active_consumer = {worker_wants_it}")),
            "{stderr}"
        );
        assert!(stderr.contains("recreate the queue"), "{stderr}");
        h.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_an_older_update_from_a_retry_queue_does_not_overwrite_a_newer_one() {
    const CONTACTS: usize = 120;
    let knobs = Knobs {
        single_active_consumer: true,
        max_wait: "50ms",
        in_process: "300ms",
        request_timeout: "1s",
        schedule: r#"["8s"]"#,
        ..Knobs::default()
    };
    let h = Harness::new("replicas-failover", Faults::default(), knobs.clone()).await;
    let mut active = WorkerProcess::spawn(&h, "active", &knobs);
    active.wait_ready(WITHIN).await;
    let mut standby = WorkerProcess::spawn(&h, "standby", &knobs);
    standby.wait_ready(WITHIN).await;
    let update = |value: &str, micros: i64| -> Vec<Vec<u8>> {
        (0..CONTACTS)
            .map(|i| support::profile_update(7, &format!("p{i}@example.com"), 3, value, micros))
            .collect()
    };
    // Entered fails in an outage and waits in the retry queue.
    h.fake
        .update_faults(|faults| faults.outage_for = Some(Duration::from_secs(600)));
    h.publish(&update("on", sample::BASE_MICROS)).await;
    wait_until("Entered in the retry queue", async || {
        h.depth(&h.topology.retries[0].0).await >= CONTACTS as u32
    })
    .await;
    // Exited, an hour newer, is applied by the active worker, which is then killed.
    h.fake.update_faults(|faults| faults.outage_for = None);
    h.publish(&update("off", sample::BASE_MICROS + 3_600_000_000))
        .await;
    wait_until("Exited applied", async || {
        (0..CONTACTS)
            .all(|i| h.fake.value(7, &format!("p{i}@example.com"), 3).as_deref() == Some("off"))
    })
    .await;
    active.signal("KILL");
    assert_eq!(active.wait_exit(WITHIN).await.code(), None, "killed");
    // The standby takes over and meets the Entered copies.
    wait_until("the standby to supersede the Entered copies", async || {
        standby.metrics().await.is_some_and(|text| {
            support::counter_total(&text, "listrak_messages_acked_total") >= CONTACTS as f64
        })
    })
    .await;
    let stale = (0..CONTACTS)
        .filter(|i| h.fake.value(7, &format!("p{i}@example.com"), 3).as_deref() != Some("off"))
        .count();
    assert_eq!(
        stale, 0,
        "fields left on the older value after the failover"
    );
    stop_all(std::slice::from_mut(&mut standby)).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_competing_replicas_on_enter_exit_flips_leave_only_the_in_flight_window() {
    const PEOPLE: usize = 300;
    const FLIPS: usize = 10;
    let knobs = Knobs {
        max_contacts: 50,
        prefetch: 200,
        max_wait: "20ms",
        in_process: "30s",
        ..Knobs::default()
    };
    let h = Harness::new(
        "replicas-flips",
        Faults {
            latency: Duration::from_millis(20),
            latency_jitter: Duration::from_millis(100),
            outage_for: Some(Duration::from_secs(600)),
            ..Faults::default()
        },
        knobs.clone(),
    )
    .await;
    // Each person enters and leaves in turn, ten times; the last event is an exit.
    let mut bodies = Vec::new();
    for round in 0..FLIPS {
        for person in 0..PEOPLE {
            let value = if round % 2 == 0 { "on" } else { "off" };
            let at = sample::BASE_MICROS + (round * 1_000_000 + person) as i64;
            bodies.push(support::profile_update(
                7,
                &format!("p{person}@example.com"),
                3,
                value,
                at,
            ));
        }
    }
    h.publish(&bodies).await;
    let mut workers = share(&h, 3, &knobs).await;
    wait_until("every flip settled", async || {
        acked_by_all(&workers).await >= bodies.len() as u64
    })
    .await;
    let stale = (0..PEOPLE)
        .filter(|p| h.fake.value(7, &format!("p{p}@example.com"), 3).as_deref() != Some("off"))
        .count();
    println!(
        "three competing replicas, {PEOPLE} contacts flipping {FLIPS} times, Listrak answering \
         in 20-120 ms: {stale} fields left on an older value"
    );
    stop_all(&mut workers).await;
    assert_drained(&h).await;
    h.finish().await;
}
