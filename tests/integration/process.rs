//! The worker as a process: signals and crashes lose nothing.

use std::time::Duration;

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, TrafficShape};

use crate::support::{Harness, Knobs, WorkerProcess};

/// Publishes a backlog, lets a worker process start on it, interrupts it with `signal_name`,
/// then lets an in-process worker finish: the final state must be exactly what the events
/// imply, so nothing was lost.
async fn interrupted_run_loses_nothing(test: &str, signal_name: &str) -> std::process::ExitStatus {
    let traffic = sample::generate(TrafficShape {
        events: 3000,
        people: 900,
        poison_every: 0,
        ..TrafficShape::default()
    });
    let knobs = Knobs {
        max_contacts: 50,
        prefetch: 300,
        max_wait: "50ms",
        ..Knobs::default()
    };
    let mut h = Harness::new(
        test,
        Faults {
            latency: Duration::from_millis(30),
            ..Faults::default()
        },
        knobs.clone(),
    )
    .await;
    h.publish(&traffic.bodies).await;
    let mut worker = WorkerProcess::spawn(&h, "interrupted", &knobs);
    // Interrupted once it has settled some (acked after their record is in the applied log).
    crate::support::wait_until(
        "the worker process to settle some events",
        Duration::from_secs(30),
        async || worker.acked().await >= 50,
    )
    .await;
    worker.signal(signal_name);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let left = h.depth(&h.topology.queue).await;
    assert!(
        left > 0,
        "the run was interrupted before the backlog was drained"
    );
    assert!(
        (left as usize) < traffic.bodies.len(),
        "some events were settled"
    );

    h.start_worker();
    h.wait_for("the backlog to drain", Duration::from_secs(60), |h| {
        h.fake.contacts() == traffic.expected
    })
    .await;
    h.wait_for("the queue to be empty", Duration::from_secs(30), |h| {
        h.acked() >= left as u64
    })
    .await;
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_run_exits_cleanly_and_loses_nothing() {
    let status = interrupted_run_loses_nothing("sigterm", "TERM").await;
    assert_eq!(status.code(), Some(0), "SIGTERM ends the worker with 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_and_started_again_loses_nothing() {
    let status = interrupted_run_loses_nothing("sigkill", "KILL").await;
    assert_eq!(status.code(), None, "killed by the signal");
}
