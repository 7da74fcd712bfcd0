//! Read-backs: keys updated twice within the window are read back from Listrak `after` their
//! last update and repaired when Listrak holds an older value; keys updated once cost no
//! read. Against listrak-fake with imports that complete late and out of order, replicas
//! that race, and a guard that forgets.

use std::time::{Duration, Instant};

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::BASE_MICROS;

use crate::support::{profile_update, wait_until, Harness, Knobs, WorkerProcess};

const LIST: u32 = 7;
const FIELD: u32 = 3;
/// `reconcile.after` in these tests.
const AFTER: Duration = Duration::from_secs(5);
/// What the read-backs get to leave every field on its newest value, after `AFTER`.
const REPAIRED_WITHIN: Duration = Duration::from_secs(65);

fn email(test: &str, i: usize) -> String {
    format!("{test}-{i}@example.com")
}

/// The two updates of each person: a third leave "off" then "on", the rest "on" then "off".
fn value(i: usize, round: usize) -> &'static str {
    let first_on = !i.is_multiple_of(3);
    if (round == 0) == first_on {
        "on"
    } else {
        "off"
    }
}

fn round(test: &str, people: usize, round: usize) -> Vec<Vec<u8>> {
    (0..people)
        .map(|i| {
            let at = BASE_MICROS + (round * 1_000_000 + i) as i64;
            profile_update(LIST, &email(test, i), FIELD, value(i, round), at)
        })
        .collect()
}

/// People whose field in the fake is not `newest(i)`.
fn stale(h: &Harness, test: &str, people: usize, newest: impl Fn(usize) -> &'static str) -> usize {
    (0..people)
        .filter(|i| h.fake.value(LIST, &email(test, *i), FIELD).as_deref() != Some(newest(*i)))
        .count()
}

fn sample(h: &Harness, name: &str, labels: &[(&str, &str)]) -> u64 {
    h.metrics.sample(name, labels) as u64
}

fn knobs(reconcile: &'static str) -> Knobs {
    Knobs {
        // Small requests: each completes its import after a delay of its own.
        max_contacts: 10,
        max_wait: "20ms",
        reconcile,
        ..Knobs::default()
    }
}

fn out_of_order() -> Faults {
    Faults {
        import_delay_min: Duration::ZERO,
        import_delay_max: Duration::from_secs(3),
        ..Faults::default()
    }
}

/// Waits until listrak-fake completed every import it accepted (they take up to 3 s).
async fn imports_completed(h: &Harness) {
    wait_until(
        "every import completed",
        Duration::from_secs(10),
        async || h.fake.imports_pending() == 0,
    )
    .await;
}

/// Publishes both rounds for `people`, the second once the first is acked (so in separate
/// requests), and waits for every import to complete.
async fn two_rounds(h: &Harness, test: &str, people: usize) {
    h.publish(&round(test, people, 0)).await;
    h.wait_acked(people as u64, Duration::from_secs(60)).await;
    h.publish(&round(test, people, 1)).await;
    h.wait_acked(2 * people as u64, Duration::from_secs(60))
        .await;
    imports_completed(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_completing_out_of_order_leave_no_field_stale_across_a_restart() {
    const PEOPLE: usize = 300;
    let test = "readback-order";
    let mut h = Harness::new(test, out_of_order(), knobs(r#"after = "5s""#)).await;
    h.start_worker();
    let started = Instant::now();
    two_rounds(&h, test, PEOPLE).await;
    let stale_before = stale(&h, test, PEOPLE, |i| value(i, 1));
    let scheduled = || {
        sample(
            &h,
            "listrak_reconcile_scheduled_total",
            &[("outcome", "scheduled")],
        )
    };
    // Every second update found its key at risk.
    wait_until(
        "a read-back scheduled for every second update",
        Duration::from_secs(10),
        async || scheduled() >= PEOPLE as u64,
    )
    .await;

    // Stopped and started again before the read-backs are due: they wait in the broker.
    h.stop_worker().await;
    h.start_worker();
    wait_until("no field left stale", REPAIRED_WITHIN, async || {
        stale(&h, test, PEOPLE, |i| value(i, 1)) == 0
    })
    .await;
    let read = |outcome| sample(&h, "listrak_reconcile_reads_total", &[("outcome", outcome)]);
    // Keys Listrak held right read back in their own time too.
    wait_until("every key at risk read back", REPAIRED_WITHIN, async || {
        read("in_sync") + read("differs") >= PEOPLE as u64
    })
    .await;
    let repairs = sample(&h, "listrak_reconcile_repairs_total", &[]);
    println!(
        "imports completing 0-3 s after their 201, in any order: {stale_before} of {PEOPLE} \
         fields stale once every import completed; read back {} in sync, {} differing, all \
         repaired {:?} after the first publish ({repairs} repairs)",
        read("in_sync"),
        read("differs"),
        started.elapsed(),
    );
    assert!(
        repairs >= stale_before as u64,
        "every stale field was repaired"
    );
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_read_backs_imports_completing_out_of_order_leave_fields_stale() {
    const PEOPLE: usize = 300;
    let test = "readback-off";
    let mut h = Harness::new(test, out_of_order(), knobs("enabled = false")).await;
    h.start_worker();
    two_rounds(&h, test, PEOPLE).await;
    let stale = stale(&h, test, PEOPLE, |i| value(i, 1));
    println!(
        "reconcile.enabled = false, imports completing 0-3 s after their 201 in any order: \
         {stale} of {PEOPLE} fields stale"
    );
    assert!(
        stale > 0,
        "out-of-order imports leave stale fields when nothing reads back"
    );
    assert_eq!(h.fake.contact_reads(), 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_updated_once_are_never_read() {
    const PEOPLE: usize = 500;
    let test = "readback-once";
    let mut h = Harness::new(test, Faults::default(), knobs(r#"after = "1s""#)).await;
    h.start_worker();
    h.publish(&round(test, PEOPLE, 0)).await;
    h.wait_acked(PEOPLE as u64, Duration::from_secs(60)).await;
    // Past `after`, with room for a read-back that should not be there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.fake.contact_reads(), 0, "the normal path costs no read");
    assert_eq!(
        sample(
            &h,
            "listrak_reconcile_scheduled_total",
            &[("outcome", "scheduled")]
        ),
        0
    );
    assert_eq!(stale(&h, test, PEOPLE, |i| value(i, 0)), 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_older_updates_the_guard_let_through_are_repaired_from_the_applied_log() {
    const PEOPLE: usize = 5_000;
    let test = "readback-forgot";
    let knobs = Knobs {
        max_contacts: 1000,
        superseded_capacity: 1000,
        reconcile: r#"after = "5s"
max_read_rate = 250"#,
        ..Knobs::default()
    };
    let mut h = Harness::new(test, Faults::default(), knobs).await;
    h.start_worker();
    let newest = |i: usize| if i.is_multiple_of(2) { "on" } else { "off" };
    let older = |i: usize| if i.is_multiple_of(2) { "off" } else { "on" };
    let updates = |value: &dyn Fn(usize) -> &'static str, at: i64| -> Vec<Vec<u8>> {
        (0..PEOPLE)
            .map(|i| profile_update(LIST, &email(test, i), FIELD, value(i), at + i as i64))
            .collect()
    };
    h.publish(&updates(&newest, BASE_MICROS + 1_000_000_000))
        .await;
    h.wait_acked(PEOPLE as u64, Duration::from_secs(60)).await;
    // Older events, published late: the guard remembers only the last 1,000 values applied.
    h.publish(&updates(&older, BASE_MICROS)).await;
    h.wait_acked(2 * PEOPLE as u64, Duration::from_secs(60))
        .await;
    let stale_before = stale(&h, test, PEOPLE, newest);
    assert!(
        stale_before >= PEOPLE / 2,
        "the guard let most late older updates through ({stale_before} stale)"
    );
    let started = Instant::now();
    wait_until("no field left stale", REPAIRED_WITHIN + AFTER, async || {
        stale(&h, test, PEOPLE, newest) == 0
    })
    .await;
    println!(
        "guard capacity 1000, {PEOPLE} contacts, late older updates: {stale_before} stale, all \
         repaired {:?} later ({} reads, {} repairs)",
        started.elapsed(),
        h.fake.contact_reads(),
        sample(&h, "listrak_reconcile_repairs_total", &[]),
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_racing_on_one_queue_leave_no_field_stale() {
    const PEOPLE: usize = 300;
    const UPDATES: usize = 4;
    let test = "readback-race";
    let knobs = Knobs {
        max_contacts: 50,
        max_wait: "20ms",
        prefetch: 200,
        reconcile: r#"after = "5s""#,
        ..Knobs::default()
    };
    let h = Harness::new(
        test,
        Faults {
            latency: Duration::from_millis(20),
            latency_jitter: Duration::from_millis(250),
            import_delay_max: Duration::from_secs(1),
            ..Faults::default()
        },
        knobs.clone(),
    )
    .await;
    // Each person's four updates alternate; the last (newest) is "off" for even people.
    let last = |i: usize| if i.is_multiple_of(2) { "off" } else { "on" };
    let mut bodies = Vec::new();
    for update in 0..UPDATES {
        for i in 0..PEOPLE {
            let value = if (update % 2 == 1) == (i.is_multiple_of(2)) {
                "off"
            } else {
                "on"
            };
            let at = BASE_MICROS + (update * 1_000_000 + i) as i64;
            bodies.push(profile_update(LIST, &email(test, i), FIELD, value, at));
        }
    }
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|n| WorkerProcess::spawn(&h, &format!("replica{n}"), &knobs))
        .collect();
    for worker in &workers {
        worker.wait_ready(Duration::from_secs(30)).await;
    }
    h.publish(&bodies).await;
    wait_until("every update acked", Duration::from_secs(60), async || {
        let mut acked = 0;
        for worker in &workers {
            acked += worker.acked().await;
        }
        acked >= bodies.len() as u64
    })
    .await;
    imports_completed(&h).await;
    let stale_before = stale(&h, test, PEOPLE, last);
    let started = Instant::now();
    let total = async |name: &str| {
        let mut total = 0;
        for worker in &workers {
            total += worker.counter(name).await;
        }
        total
    };
    // Keys updated by two replicas, or twice by one, are read back whatever they hold.
    wait_until("the keys at risk read back", REPAIRED_WITHIN, async || {
        total("listrak_reconcile_reads_total").await > 0
    })
    .await;
    wait_until("no field left stale", REPAIRED_WITHIN, async || {
        stale(&h, test, PEOPLE, last) == 0
    })
    .await;
    let repairs = total("listrak_reconcile_repairs_total").await;
    println!(
        "three replicas on one queue, {PEOPLE} contacts x {UPDATES} alternating updates, Listrak \
         answering in 20-270 ms, imports completing within 1 s: {stale_before} stale once all \
         were acked, none {:?} later \
         ({} reads, {repairs} repairs)",
        started.elapsed(),
        h.fake.contact_reads(),
    );
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        let status = worker.wait_exit(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(0));
    }
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_backs_of_a_replica_killed_with_sigkill_are_done_by_another() {
    const PEOPLE: usize = 200;
    let test = "readback-failover";
    let knobs = knobs(r#"after = "5s""#);
    let h = Harness::new(test, out_of_order(), knobs.clone()).await;
    let mut first = WorkerProcess::spawn(&h, "first", &knobs);
    first.wait_ready(Duration::from_secs(30)).await;
    h.publish(&round(test, PEOPLE, 0)).await;
    wait_until(
        "the first round acked",
        Duration::from_secs(60),
        async || first.acked().await >= PEOPLE as u64,
    )
    .await;
    h.publish(&round(test, PEOPLE, 1)).await;
    wait_until(
        "every second update's read-back scheduled",
        Duration::from_secs(60),
        async || first.counter("listrak_reconcile_scheduled_total").await >= PEOPLE as u64,
    )
    .await;
    // Killed before any read-back is due: what it scheduled waits in the broker.
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(30)).await;
    imports_completed(&h).await;
    let stale_before = stale(&h, test, PEOPLE, |i| value(i, 1));

    let mut second = WorkerProcess::spawn(&h, "second", &knobs);
    second.wait_ready(Duration::from_secs(30)).await;
    wait_until("no field left stale", REPAIRED_WITHIN, async || {
        stale(&h, test, PEOPLE, |i| value(i, 1)) == 0
    })
    .await;
    // Keys Listrak held right are read back in their own time too, by the other replica.
    wait_until(
        "the other replica reading every key at risk back",
        REPAIRED_WITHIN,
        async || second.counter("listrak_reconcile_reads_total").await >= PEOPLE as u64,
    )
    .await;
    println!(
        "a replica SIGKILLed with its read-backs scheduled: {stale_before} of {PEOPLE} stale, \
         none once another replica read them back"
    );
    second.signal("TERM");
    assert_eq!(
        second.wait_exit(Duration::from_secs(60)).await.code(),
        Some(0)
    );
    h.finish().await;
}
