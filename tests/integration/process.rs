//! The worker as a process: signals and crashes lose nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use listrak_worker::fake::Faults;
use listrak_worker::sample::{self, TrafficShape};

use crate::support::{settings_text, Harness, Knobs};

fn spawn_worker(h: &Harness, knobs: &Knobs) -> (Child, std::path::PathBuf) {
    let text = settings_text(
        &h.topology.queue,
        &h.fake.api_url(),
        &h.fake.auth_url(),
        knobs,
    );
    let path = std::env::temp_dir().join(format!("{}.toml", h.topology.queue));
    std::fs::write(&path, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_listrak-worker"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, path)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_exit(mut child: Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    let (child, config) = spawn_worker(&h, &knobs);
    h.wait_for(
        "the worker process to send requests",
        Duration::from_secs(30),
        |h| h.fake.requests().len() >= 5,
    )
    .await;
    signal(&child, signal_name);
    let status = wait_exit(child, Duration::from_secs(30)).await;
    let _ = std::fs::remove_file(config);
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
