//! The worker on a real three-node RabbitMQ cluster, with nodes killed (SIGKILL), restarted
//! and wiped under load: nothing is lost, nothing is dead-lettered, Listrak ends on the
//! newest value of every field, and every queue ends empty.
//!
//! The cluster is the test's own (`.ci/rabbitmq-cluster`, brought up here when it is not
//! running), beside the local broker, which these tests never touch. A binary of its own,
//! its tests one at a time: each takes nodes down that the others would need.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::BASE_MICROS;

#[allow(dead_code)]
#[path = "integration/support.rs"]
mod support;

use support::{profile_update, wait_until, Harness, Knobs};

/// One test at a time holds the cluster.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HOUR: i64 = 3_600_000_000;
const FIELD: u32 = 3;

/// Runs `.ci/rabbitmq-cluster` with `args`; its standard output.
fn cluster(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/rabbitmq-cluster");
    let output = Command::new(&script)
        .args(args)
        .output()
        .expect("the cluster script runs");
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The whole cluster up (started, or its stopped nodes started again), held by this test;
/// the nodes' URLs, node 1 first.
async fn take_cluster() -> (tokio::sync::MutexGuard<'static, ()>, Vec<String>) {
    let guard = CLUSTER.lock().await;
    let urls = tokio::task::spawn_blocking(|| cluster(&["up"]))
        .await
        .unwrap();
    let urls: Vec<String> = urls
        .lines()
        .last()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(urls.len(), 3, "three node URLs: {urls:?}");
    cluster_ready(&urls).await;
    (guard, urls)
}

/// Waits until every node declares and deletes a stream and a quorum queue: a node that
/// joined again answers stream declarations with `coordinator_unavailable` until it is a
/// member of the stream coordinator again (which `.ci/rabbitmq-cluster wipe` sees to).
async fn cluster_ready(urls: &[String]) {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let started = Instant::now();
    for url in urls {
        let probe = |kind: &str| format!("test.cluster_ready.{kind}.{}", std::process::id());
        wait_until(
            "the cluster ready for streams",
            Duration::from_secs(120),
            async || {
                let Ok(connection) = listrak_worker::edges::broker::connect_url(url, "probe").await
                else {
                    return false;
                };
                let works = async {
                    let channel = connection.create_channel().await?;
                    for kind in ["stream", "quorum"] {
                        let mut args = FieldTable::default();
                        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
                        let durable = QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        };
                        channel
                            .queue_declare(probe(kind).as_str().into(), durable, args)
                            .await?;
                        channel
                            .queue_delete(
                                probe(kind).as_str().into(),
                                QueueDeleteOptions::default(),
                            )
                            .await?;
                    }
                    Ok::<_, lapin::Error>(())
                }
                .await;
                let _ = connection.close(200, "probed".into()).await;
                works.is_ok()
            },
        )
        .await;
    }
    if started.elapsed() > Duration::from_secs(2) {
        println!(
            "the cluster answered for streams after {:?}",
            started.elapsed()
        );
    }
}

async fn node(action: &'static str, n: u8) {
    tokio::task::spawn_blocking(move || cluster(&[action, &n.to_string()]))
        .await
        .unwrap();
}

/// Kills node 1 once `queue` holds `messages`, as seen from node 3.
fn kill_node_1_at(urls: &[String], queue: &str, messages: usize) -> tokio::task::JoinHandle<()> {
    let node3 = urls[2].clone();
    let queue = queue.to_owned();
    tokio::spawn(async move {
        let connection = listrak_worker::edges::broker::connect_url(&node3, "watcher")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        loop {
            let (ready, _) = listrak_worker::edges::broker::queue_counts(&channel, &queue)
                .await
                .unwrap();
            if ready as usize >= messages {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node("kill", 1).await;
    })
}

fn email(i: usize) -> String {
    format!("person-{i}@example.com")
}

/// Two updates per contact on each list, `"old"` an hour before `"new"`, every odd contact's
/// newer one published first: last write wins leaves every field on `"new"`.
fn engage_pair_events(lists: &[u32], contacts: usize) -> Vec<Vec<u8>> {
    let mut events = Vec::with_capacity(lists.len() * contacts * 2);
    for list in lists {
        for i in 0..contacts {
            let old = profile_update(*list, &email(i), FIELD, "old", BASE_MICROS);
            let new = profile_update(*list, &email(i), FIELD, "new", BASE_MICROS + HOUR);
            if i % 2 == 0 {
                events.extend([old, new]);
            } else {
                events.extend([new, old]);
            }
        }
    }
    events
}

fn stale(h: &Harness, lists: &[u32], contacts: usize) -> usize {
    lists
        .iter()
        .map(|list| {
            (0..contacts)
                .filter(|i| h.fake.value(*list, &email(*i), FIELD).as_deref() != Some("new"))
                .count()
        })
        .sum()
}

/// Every queue of the test empty: main, retries, dead letters.
async fn assert_queues_empty(h: &Harness) {
    let mut queues = vec![h.topology.queue.clone(), h.topology.dead.clone()];
    queues.extend(h.topology.retries.iter().map(|(name, _)| name.clone()));
    for queue in queues {
        let depth = h.depth(&queue).await;
        assert_eq!(depth, 0, "{queue} holds {depth} messages");
    }
}

/// The knobs of a drain on the cluster that lasts long enough to lose a node in its middle:
/// small requests, two at a time, and a window of four of them, so that a message waits for
/// a request slot well within its in-process budget.
fn drain_knobs(urls: &[String]) -> Knobs {
    Knobs {
        cluster_urls: Some(urls.to_vec()),
        max_contacts: 100,
        prefetch: 400,
        max_concurrency: 2,
        max_wait: "50ms",
        in_process: "1s",
        schedule: r#"["2s"]"#,
        ..Knobs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_that_leads_the_main_queue_under_load_loses_nothing() {
    let (_cluster, urls) = take_cluster().await;
    let lists = [11, 12];
    let contacts = 5_000;
    let faults = Faults {
        latency: Duration::from_millis(200),
        error_rate: 0.05,
        ..Faults::default()
    };
    // The test declares the queues through node 1, so node 1 leads them all, and the
    // worker, given node 1 first, connects there.
    let mut h = Harness::new("cluster_node_loss", faults, drain_knobs(&urls)).await;
    let events = engage_pair_events(&lists, contacts);
    h.publish(&events).await;
    h.start_worker();
    let total = events.len() as u64;
    h.wait_for("a third of the drain", Duration::from_secs(120), |h| {
        h.acked() >= total / 3
    })
    .await;
    assert_eq!(
        h.metrics
            .sample("listrak_amqp_node", &[("node", "127.0.0.1:5681")]),
        1.0
    );

    node("kill", 1).await;
    let killed = Instant::now();
    h.wait_for(
        "not ready once its node is gone",
        Duration::from_secs(10),
        |h| !h.health.is_ready(),
    )
    .await;
    // Acks sent as the node died may still be counted: count from a moment later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked_at_loss = h.acked();
    h.wait_for("acknowledging again", Duration::from_secs(20), |h| {
        h.acked() > acked_at_loss
    })
    .await;
    let resumed = killed.elapsed();
    assert!(
        h.health.is_ready(),
        "ready again once consuming on another node"
    );
    println!("node 1 killed: acknowledging again after {resumed:?}");
    assert_eq!(
        h.metrics
            .sample("listrak_amqp_node", &[("node", "127.0.0.1:5681")]),
        0.0
    );

    h.reconnect().await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(killed.elapsed())).await;
    node("start", 1).await;

    h.wait_for(
        "every field on its newest value",
        Duration::from_secs(180),
        |h| stale(h, &lists, contacts) == 0,
    )
    .await;
    wait_until("every queue empty", Duration::from_secs(60), async || {
        let mut depths = 0;
        for queue in [&h.topology.queue, &h.topology.dead] {
            depths += h.depth(queue).await;
        }
        for (queue, _) in &h.topology.retries {
            depths += h.depth(queue).await;
        }
        depths == 0
    })
    .await;
    assert_eq!(h.acked_as("dead_lettered"), 0, "nothing dead-lettered");
    assert_queues_empty(&h).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_disk_of_the_node_that_holds_the_retry_queues_loses_no_event() {
    let (_cluster, urls) = take_cluster().await;
    let lists = [21];
    let contacts = 1_000;
    // Listrak is down: every message goes to the retry queue after two seconds of failures
    // in process, and waits there 30 s.
    let outage = Faults {
        error_rate: 1.0,
        ..Faults::default()
    };
    let knobs = Knobs {
        cluster_urls: Some(urls.clone()),
        in_process: "2s",
        schedule: r#"["30s"]"#,
        ..Knobs::default()
    };
    let mut h = Harness::new("cluster_disk_loss", outage, knobs).await;
    let events = engage_pair_events(&lists, contacts);
    h.publish(&events).await;
    h.start_worker();
    let retry_queue = h.topology.retries[0].0.clone();
    let waiting = events.len() as u32;
    wait_until(
        "every message waiting in the retry queue",
        Duration::from_secs(60),
        async || h.depth(&retry_queue).await == waiting,
    )
    .await;

    // Node 1 holds the retry queue's leader: its disk is lost, and it joins again empty.
    let wiped = Instant::now();
    node("wipe", 1).await;
    println!("node 1 wiped and joined again in {:?}", wiped.elapsed());
    h.reconnect().await;
    h.fake.set_faults(Faults::default());

    h.wait_for(
        "every field on its newest value",
        Duration::from_secs(120),
        |h| stale(h, &lists, contacts) == 0,
    )
    .await;
    wait_until("every queue empty", Duration::from_secs(60), async || {
        h.depth(&h.topology.queue).await == 0 && h.depth(&retry_queue).await == 0
    })
    .await;
    assert_eq!(h.acked_as("dead_lettered"), 0, "nothing dead-lettered");
    assert_queues_empty(&h).await;
    h.stop_worker().await;
    cluster_ready(&urls).await;
    h.reconnect().await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_majority_stops_progress_until_it_returns_and_loses_nothing() {
    let (_cluster, urls) = take_cluster().await;
    let lists = [31, 32];
    let contacts = 2_500;
    let faults = Faults {
        latency: Duration::from_millis(200),
        ..Faults::default()
    };
    let mut h = Harness::new("cluster_majority_loss", faults, drain_knobs(&urls)).await;
    let events = engage_pair_events(&lists, contacts);
    h.publish(&events).await;
    h.start_worker();
    let total = events.len() as u64;
    h.wait_for("a third of the drain", Duration::from_secs(120), |h| {
        h.acked() >= total / 3
    })
    .await;

    node("kill", 1).await;
    node("kill", 2).await;
    // Without a majority the queues can neither deliver nor take an ack: the worker keeps
    // trying, and settles nothing it could not.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        h.worker_running(),
        "the worker is still running without a majority"
    );

    node("start", 1).await;
    node("start", 2).await;
    h.reconnect().await;
    h.wait_for(
        "every field on its newest value",
        Duration::from_secs(180),
        |h| stale(h, &lists, contacts) == 0,
    )
    .await;
    wait_until("every queue empty", Duration::from_secs(60), async || {
        h.depth(&h.topology.queue).await == 0
    })
    .await;
    assert_eq!(h.acked_as("dead_lettered"), 0, "nothing dead-lettered");
    assert_queues_empty(&h).await;
    h.finish().await;
}

const LIST: u32 = 7;
const CONTACTS: usize = 200;

/// Every contact's update of round `round` on `LIST`: value `v{round}`, `round` hours after
/// the base.
fn round(round: i64) -> Vec<Vec<u8>> {
    (0..CONTACTS)
        .map(|i| {
            let at = BASE_MICROS + round * HOUR;
            profile_update(LIST, &email(i), FIELD, &format!("v{round}"), at)
        })
        .collect()
}

fn stale_rounds(h: &Harness, newest: &str) -> usize {
    (0..CONTACTS)
        .filter(|i| h.fake.value(LIST, &email(*i), FIELD).as_deref() != Some(newest))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applied_log_survives_the_loss_of_the_node_that_leads_it() {
    let (_cluster, urls) = take_cluster().await;
    let faults = Faults {
        latency: Duration::from_millis(400),
        ..Faults::default()
    };
    let knobs = Knobs {
        max_wait: "50ms",
        max_contacts: 20,
        // Rounds 4–6 then take about six seconds: the restart comes in the middle.
        max_concurrency: 2,
        cluster_urls: Some(urls),
        ..Knobs::default()
    };
    let mut h = Harness::new("cluster_applied_log", faults, knobs).await;
    h.start_worker();
    // What the log must keep through the restart: rounds 1 to 3, all applied.
    for r in 1..=3 {
        h.publish(&round(r)).await;
    }
    h.wait_for("round 3 applied", Duration::from_secs(60), |h| {
        stale_rounds(h, "v3") == 0
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
    // Node 1 leads every queue and the log; it stays down until the end, so that the
    // redeploy below reads the log from the replicas.
    node("kill", 1).await;
    h.reconnect().await;
    h.wait_for(
        "round 6 applied after the node loss",
        Duration::from_secs(90),
        |h| stale_rounds(h, "v6") == 0,
    )
    .await;
    let reconnects = h.metrics.sample("listrak_amqp_reconnects_total", &[]);
    assert!(reconnects >= 1.0, "the worker reconnected ({reconnects})");

    // A redeploy while node 1 is down: the new worker knows only what the log kept.
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
    assert_eq!(stale_rounds(&h, "v6"), 0, "fields left on an older value");

    // The records of rounds 1–3, confirmed before the node loss, are still in the stream.
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
    node("start", 1).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_across_the_loss_of_its_node_sends_every_line() {
    let (_cluster, urls) = take_cluster().await;
    let list = 41;
    let lines = 20_000;
    let mut h = Harness::new("cluster_publish", Faults::default(), drain_knobs(&urls)).await;
    let bodies: Vec<std::io::Result<Vec<u8>>> = (0..lines)
        .map(|i| Ok(profile_update(list, &email(i), FIELD, "new", BASE_MICROS)))
        .collect();

    // Node 1 goes once a quarter of the lines are in the queue.
    let watcher = kill_node_1_at(&urls, &h.topology.queue, lines / 4);
    let published = listrak_worker::commands::publish::publish_lines(
        &h.settings.amqp,
        &h.topology,
        bodies,
        lines as u64,
    )
    .await
    .expect("publish carries on through another node");
    watcher.await.unwrap();
    assert_eq!(published.messages, lines as u64);

    h.reconnect().await;
    let depth = h.depth(&h.topology.queue).await as usize;
    println!("{depth} messages in the queue for {lines} lines");
    assert!(depth >= lines, "{depth} messages for {lines} lines");
    h.start_worker();
    h.wait_for("every line applied", Duration::from_secs(120), |h| {
        (0..lines)
            .filter(|i| h.fake.value(list, &email(*i), FIELD).as_deref() != Some("new"))
            .count()
            == 0
    })
    .await;
    node("start", 1).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_across_the_loss_of_its_node_replays_every_dead_letter() {
    use lapin::types::{AMQPValue, FieldTable};
    use listrak_worker::commands::dlq::{self, Filter, ReplayOptions};

    let (_cluster, urls) = take_cluster().await;
    let list = 51;
    let letters = 5_000;
    let mut h = Harness::new("cluster_replay", Faults::default(), drain_knobs(&urls)).await;
    // Dead letters as the worker leaves them: the event, and why it was refused.
    let dead_letters: Vec<(Vec<u8>, lapin::BasicProperties)> = (0..letters)
        .map(|i| {
            let body = profile_update(list, &email(i), FIELD, "new", BASE_MICROS);
            let mut headers = FieldTable::default();
            headers.insert(
                "x-listrak-reason".into(),
                AMQPValue::LongString("rejected".into()),
            );
            let properties =
                listrak_worker::commands::publish::event_properties(&body).with_headers(headers);
            (body, properties)
        })
        .collect();
    h.publish_raw("", &h.topology.dead, &dead_letters).await;

    // Node 1 leads the dead-letter and main queues: it goes once a fifth is replayed.
    let watcher = kill_node_1_at(&urls, &h.topology.queue, letters / 5);
    let options = ReplayOptions {
        rate: Some(2_000.0),
        ..ReplayOptions::default()
    };
    let summary = dlq::replay_across_node_loss(
        &h.settings.amqp,
        &h.topology,
        &Filter::default(),
        options,
        None,
        std::future::pending::<()>(),
    )
    .await
    .expect("the replay carries on through another node");
    watcher.await.unwrap();
    println!("{summary}");
    assert!(summary.stopped.is_none(), "{summary}");
    assert_eq!(summary.replayed, letters as u64);

    h.reconnect().await;
    assert_eq!(
        h.depth(&h.topology.dead).await,
        0,
        "every dead letter replayed"
    );
    let depth = h.depth(&h.topology.queue).await as usize;
    println!("{depth} messages in the main queue for {letters} dead letters");
    assert!(
        depth >= letters,
        "{depth} messages for {letters} dead letters"
    );
    h.start_worker();
    h.wait_for(
        "every replayed dead letter applied",
        Duration::from_secs(120),
        |h| {
            (0..letters)
                .filter(|i| h.fake.value(list, &email(*i), FIELD).as_deref() != Some("new"))
                .count()
                == 0
        },
    )
    .await;
    node("start", 1).await;
    h.finish().await;
}
