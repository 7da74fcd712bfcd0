//! Failures that lose nothing and dead-letter only the guilty: every test checks Listrak's
//! final state field by field and the exact content of the dead-letter queue.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, email, track, TrafficShape, BASE_MICROS};

use crate::support::{profile_update, report_fault, Harness, Knobs, Relay};

const SECOND: i64 = 1_000_000;

fn assert_state(h: &Harness, expected: &sample::State) {
    let state = h.fake.contacts();
    for (list, contacts) in expected {
        for (address, fields) in contacts {
            assert_eq!(
                state.get(list).and_then(|c| c.get(address)),
                Some(fields),
                "list {list}, contact {address}"
            );
        }
    }
    assert_eq!(&state, expected);
}

fn traffic(events: usize) -> sample::Traffic {
    sample::generate(TrafficShape {
        events,
        people: events / 3,
        poison_every: 0,
        ..TrafficShape::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_of_5xx_answers_apply_everything_and_dead_letter_nothing() {
    let traffic = traffic(2000);
    let mut h = Harness::new(
        "random_5xx",
        Faults {
            error_rate: 0.3,
            ..Faults::default()
        },
        Knobs {
            max_contacts: 25,
            max_wait: "20ms",
            prefetch: 200,
            ..Knobs::default()
        },
    )
    .await;
    h.publish(&traffic.bodies).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_settled(traffic.bodies.len() as u64, Duration::from_secs(90))
        .await;
    assert_state(&h, &traffic.expected);
    assert!(h.take_dead_letters().await.is_empty());
    let failed = h.fake.status_counts().get(&503).copied().unwrap_or(0);
    assert!(
        failed > 10,
        "the fault was exercised ({failed} answers 503)"
    );
    assert_eq!(
        h.metrics
            .sample("listrak_retries_total", &[("class", "systemic")]) as usize,
        failed,
        "each 503 was retried"
    );
    report_fault(
        &h,
        "thirty_percent_of_5xx_answers_apply_everything_and_dead_letter_nothing",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_lowers_the_concurrency_which_comes_back_after() {
    let mut h = Harness::new(
        "throttle_storm",
        Faults {
            latency: Duration::from_millis(20),
            ..Faults::default()
        },
        Knobs {
            max_contacts: 5,
            max_wait: "10ms",
            prefetch: 400,
            max_concurrency: 12,
            ..Knobs::default()
        },
    )
    .await;
    const WAVE: usize = 800;
    // Many lists, so many request chains can run at once.
    let wave = |n: usize, offset: i64| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                profile_update(
                    5000 + (i % 40) as u32,
                    &email(i),
                    1,
                    &format!("v{offset}"),
                    BASE_MICROS + offset * SECOND + i as i64,
                )
            })
            .collect()
    };
    let limits = Arc::new(std::sync::Mutex::new(Vec::<(Instant, f64)>::new()));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let limits = Arc::clone(&limits);
        let watching = Arc::clone(&watching);
        let metrics = h.metrics.clone();
        async move {
            while watching.load(Ordering::Relaxed) {
                let limit = metrics.sample("listrak_concurrency_limit", &[]);
                limits.lock().unwrap().push((Instant::now(), limit));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let started = Instant::now();
    h.start_worker();

    h.publish(&wave(WAVE, 1)).await;
    h.wait_acked(WAVE as u64, Duration::from_secs(60)).await;
    let before_storm = h.metrics.sample("listrak_concurrency_limit", &[]);
    assert!(
        before_storm >= 6.0,
        "the limit grew while Listrak answered well: {before_storm}"
    );

    h.fake.update_faults(|f| f.throttle_rps = Some(20.0));
    let storm_started = Instant::now();
    h.publish(&wave(WAVE, 2)).await;
    // Retried messages are acked twice (once into a retry queue): wait on the state.
    let all = |h: &Harness, value: &str| {
        (0..WAVE).all(|i| {
            h.fake
                .value(5000 + (i % 40) as u32, &email(i), 1)
                .as_deref()
                == Some(value)
        })
    };
    h.wait_for("the second wave applied", Duration::from_secs(120), |h| {
        all(h, "v2")
    })
    .await;
    let storm_ended = Instant::now();
    h.fake.update_faults(|f| f.throttle_rps = None);
    h.publish(&wave(WAVE, 3)).await;
    h.wait_for("the third wave applied", Duration::from_secs(60), |h| {
        all(h, "v3")
    })
    .await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();

    let limits = std::mem::take(&mut *limits.lock().unwrap());
    let lowest_in_storm = limits
        .iter()
        .filter(|(t, _)| *t >= storm_started && *t <= storm_ended)
        .map(|(_, l)| *l)
        .fold(f64::MAX, f64::min);
    let after = limits.last().unwrap().1;
    assert!(
        lowest_in_storm <= before_storm / 2.0,
        "went down: {before_storm} → {lowest_in_storm}"
    );
    assert!(
        after > lowest_in_storm,
        "came back up: {lowest_in_storm} → {after}"
    );
    assert!(h.fake.status_counts().get(&429).copied().unwrap_or(0) > 0);
    assert!(h.take_dead_letters().await.is_empty());
    report_fault(
        &h,
        "a_429_storm_lowers_the_concurrency_which_comes_back_after",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_in_process_goes_through_the_retry_queues_and_applies_everything() {
    let traffic = traffic(600);
    let mut h = Harness::new(
        "outage",
        Faults {
            outage_for: Some(Duration::from_secs(4)),
            ..Faults::default()
        },
        Knobs {
            in_process: "1s",
            schedule: r#"["1s", "2s"]"#,
            ..Knobs::default()
        },
    )
    .await;
    h.publish(&traffic.bodies).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(30))
        .await;
    assert!(
        h.acked_as("retry_scheduled") > 0,
        "messages waited in the retry queues"
    );
    h.wait_for(
        "everything applied after the outage",
        Duration::from_secs(60),
        |h| h.fake.contacts() == traffic.expected,
    )
    .await;
    assert_state(&h, &traffic.expected);
    assert!(h.take_dead_letters().await.is_empty());
    // The newest values can all be applied while older copies still wait out their step:
    // those come back, are acknowledged as superseded, and leave the retry queues empty.
    for (queue, _) in &h.topology.retries {
        crate::support::wait_until(
            &format!("{queue} drained"),
            Duration::from_secs(20),
            async || h.depth(queue).await == 0,
        )
        .await;
    }
    report_fault(
        &h,
        "an_outage_longer_than_in_process_goes_through_the_retry_queues_and_applies_everything",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_past_max_age_are_dead_lettered_as_retries_exhausted() {
    let mut h = Harness::new(
        "exhausted",
        Faults {
            outage_for: Some(Duration::from_secs(600)),
            ..Faults::default()
        },
        Knobs {
            in_process: "0s",
            schedule: r#"["1s"]"#,
            max_age: "2s",
            ..Knobs::default()
        },
    )
    .await;
    let body = track(
        "Audience Entered",
        "vip_customers",
        true,
        &email(1),
        1,
        BASE_MICROS,
    );
    h.publish(std::slice::from_ref(&body)).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_for(
        "the message to be dead-lettered",
        Duration::from_secs(30),
        |h| h.acked_as("dead_lettered") == 1,
    )
    .await;
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, body);
    assert_eq!(
        dead[0].header("x-listrak-reason"),
        Some("retries_exhausted")
    );
    let attempts: u32 = dead[0]
        .header("x-listrak-attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts >= 1, "it went through the retry queue first");
    assert!(dead[0].header("x-listrak-first-failed-at").is_some());
    report_fault(
        &h,
        "failures_past_max_age_are_dead_lettered_as_retries_exhausted",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expiring_every_few_seconds_are_refreshed_one_at_a_time_and_nothing_fails() {
    let mut h = Harness::new(
        "short_tokens",
        Faults {
            token_lifetime: Duration::from_secs(2),
            latency: Duration::from_millis(10),
            ..Faults::default()
        },
        Knobs {
            max_contacts: 10,
            max_wait: "10ms",
            ..Knobs::default()
        },
    )
    .await;
    let started = Instant::now();
    h.start_worker();
    let mut published = 0;
    let mut expected: BTreeMap<(u32, String), String> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(7) {
        let bodies: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                let list = 7000 + (i % 5) as u32;
                let who = email(published + i);
                expected.insert((list, who.clone()), "on".into());
                profile_update(list, &who, 3, "on", BASE_MICROS + (published + i) as i64)
            })
            .collect();
        h.publish(&bodies).await;
        published += bodies.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.wait_acked(published as u64, Duration::from_secs(30))
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    for ((list, who), value) in &expected {
        assert_eq!(h.fake.value(*list, who, 3).as_ref(), Some(value));
    }
    let issued = h.fake.tokens_issued();
    // A token lives 2 s and is refreshed 0.2 s early: one per 1.8 s, plus the first.
    let at_most = (elapsed / 1.8).ceil() as usize + 1;
    assert!(
        issued >= 3 && issued <= at_most,
        "{issued} tokens in {elapsed:.1}s"
    );
    assert_eq!(
        h.metrics
            .sample("listrak_token_refreshes_total", &[("result", "failure")]),
        0.0
    );
    assert!(h.take_dead_letters().await.is_empty());
    report_fault(
        &h,
        "tokens_expiring_every_few_seconds_are_refreshed_one_at_a_time_and_nothing_fails",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_with_3_rejected_emails_dead_letters_exactly_those_3() {
    let rejected = [email(17), email(512), email(999)];
    let mut h = Harness::new(
        "rejected",
        Faults {
            reject_emails: rejected.iter().cloned().collect(),
            ..Faults::default()
        },
        Knobs {
            max_wait: "1s",
            ..Knobs::default()
        },
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..1000)
        .map(|i| profile_update(3003, &email(i), 9, "on", BASE_MICROS + i as i64))
        .collect();
    h.publish(&bodies).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_acked(1000, Duration::from_secs(30)).await;

    let dead = h.take_dead_letters().await;
    let mut dead_bodies: Vec<&Vec<u8>> = dead.iter().map(|d| &d.body).collect();
    dead_bodies.sort();
    let mut expected: Vec<&Vec<u8>> = [17, 512, 999].iter().map(|&i| &bodies[i]).collect();
    expected.sort();
    assert_eq!(dead_bodies, expected, "exactly the three rejected messages");
    for letter in &dead {
        assert_eq!(letter.header("x-listrak-reason"), Some("rejected"));
        assert_eq!(letter.header("x-listrak-status"), Some("400"));
        assert_eq!(
            letter.header("x-listrak-error"),
            Some("ERROR_INVALID_PARAMETER")
        );
        assert_eq!(letter.header("x-listrak-list-id"), Some("3003"));
        assert!(letter
            .header("x-listrak-message")
            .is_some_and(|m| m.contains("not accepted")));
    }
    let state = h.fake.contacts();
    assert_eq!(state[&3003].len(), 997);
    for i in 0..1000 {
        let applied = h.fake.value(3003, &email(i), 9);
        if rejected.contains(&email(i)) {
            assert_eq!(applied, None);
        } else {
            assert_eq!(applied.as_deref(), Some("on"), "{}", email(i));
        }
    }
    let requests = h.fake.requests().len();
    assert!(requests <= 5, "close to the minimum of 4: {requests}");
    report_fault(
        &h,
        "a_batch_of_1000_with_3_rejected_emails_dead_letters_exactly_those_3",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_size_limit_applies_everything_in_smaller_batches_and_is_remembered() {
    let mut h = Harness::new(
        "size_limit",
        Faults {
            max_body_bytes: Some(20_000),
            ..Faults::default()
        },
        Knobs {
            max_wait: "500ms",
            ..Knobs::default()
        },
    )
    .await;
    let wave = |from: usize| -> Vec<Vec<u8>> {
        (from..from + 1000)
            .map(|i| profile_update(4004, &email(i), 2, "gold", BASE_MICROS + i as i64))
            .collect()
    };
    h.publish(&wave(0)).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_acked(1000, Duration::from_secs(30)).await;
    let first_wave_requests = h.fake.requests().len();

    h.publish(&wave(1000)).await;
    h.wait_acked(2000, Duration::from_secs(30)).await;
    let second_wave: Vec<_> = h.fake.requests()[first_wave_requests..].to_vec();
    assert!(
        second_wave.iter().all(|r| r.status == 201),
        "the learned ceiling spares the next batches a 404: {:?}",
        second_wave.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(second_wave.iter().all(|r| r.body_bytes <= 20_000));
    assert_eq!(h.fake.contacts()[&4004].len(), 2000);
    assert!(h.take_dead_letters().await.is_empty());
    report_fault(
        &h,
        "a_body_size_limit_applies_everything_in_smaller_batches_and_is_remembered",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_list_dead_letters_its_messages_as_list_not_found() {
    let mut h = Harness::new(
        "unknown_list",
        Faults {
            unknown_lists: [999].into(),
            ..Faults::default()
        },
        Knobs::default(),
    )
    .await;
    let missing: Vec<Vec<u8>> = (0..50)
        .map(|i| profile_update(999, &email(i), 1, "on", BASE_MICROS))
        .collect();
    let fine: Vec<Vec<u8>> = (0..50)
        .map(|i| profile_update(1001, &email(i), 1, "on", BASE_MICROS))
        .collect();
    h.publish(&missing).await;
    h.publish(&fine).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_acked(100, Duration::from_secs(30)).await;
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), 50);
    for letter in &dead {
        assert!(missing.contains(&letter.body));
        assert_eq!(letter.header("x-listrak-reason"), Some("list_not_found"));
        assert_eq!(letter.header("x-listrak-status"), Some("404"));
        assert_eq!(letter.header("x-listrak-list-id"), Some("999"));
        assert_eq!(
            letter.header("x-listrak-error"),
            Some("ERROR_UNABLE_TO_LOCATE_RESOURCE")
        );
    }
    assert_eq!(h.fake.contacts()[&1001].len(), 50);
    assert!(
        h.fake
            .requests()
            .iter()
            .filter(|r| r.list_id == Some(999))
            .count()
            <= 3
    );
    report_fault(
        &h,
        "an_unknown_list_dead_letters_its_messages_as_list_not_found",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_cut_mid_run_loses_nothing_and_readiness_follows_it() {
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], 5672))).await;
    let traffic = traffic(3000);
    let mut h = Harness::new(
        "broker_cut",
        Faults {
            latency: Duration::from_millis(20),
            ..Faults::default()
        },
        Knobs {
            max_contacts: 50,
            prefetch: 300,
            max_wait: "20ms",
            worker_amqp_url: Some(relay.url()),
            ..Knobs::default()
        },
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = listener.local_addr().unwrap();
    tokio::spawn(listrak_worker::edges::http::serve(
        listener,
        h.metrics.clone(),
        h.health.clone(),
        std::future::pending(),
    ));
    let readyz = || async move {
        reqwest::get(format!("http://{ops}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    h.publish(&traffic.bodies).await;
    let started = Instant::now();
    h.start_worker();
    h.wait_for("some progress", Duration::from_secs(30), |h| {
        h.fake.requests().len() >= 5
    })
    .await;
    assert_eq!(readyz().await, 200);
    relay.cut();
    h.wait_for("unready", Duration::from_secs(10), |h| !h.health.is_ready())
        .await;
    assert_eq!(readyz().await, 503);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.restore();
    h.wait_for("ready again", Duration::from_secs(30), |h| {
        h.health.is_ready()
    })
    .await;
    assert_eq!(readyz().await, 200);
    h.wait_for("everything applied", Duration::from_secs(90), |h| {
        h.fake.contacts() == traffic.expected
    })
    .await;
    h.wait_for("the main queue to drain", Duration::from_secs(30), |h| {
        h.metrics
            .sample("listrak_queue_messages", &[("queue", "main")])
            == 0.0
            || h.acked() >= traffic.bodies.len() as u64
    })
    .await;
    assert!(h.metrics.sample("listrak_amqp_reconnects_total", &[]) >= 1.0);
    assert!(h.take_dead_letters().await.is_empty());
    assert_eq!(h.depth(&h.topology.queue).await, 0);
    report_fault(
        &h,
        "a_broker_connection_cut_mid_run_loses_nothing_and_readiness_follows_it",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_retried_entered_arriving_after_a_newer_exited_was_applied_leaves_the_field_off() {
    let mut h = Harness::new("late_retry", Faults::default(), Knobs::default()).await;
    let started = Instant::now();
    h.start_worker();
    let who = email(5);
    h.publish(&[track(
        "Audience Exited",
        "vip_customers",
        false,
        &who,
        2,
        BASE_MICROS + SECOND,
    )])
    .await;
    h.wait_acked(1, Duration::from_secs(20)).await;
    let retried = track(
        "Audience Entered",
        "vip_customers",
        true,
        &who,
        1,
        BASE_MICROS,
    );
    let properties = listrak_worker::edges::broker::with_headers(
        &listrak_worker::commands::publish::event_properties(&retried),
        [
            (
                "x-listrak-attempts",
                listrak_worker::edges::broker::int_header(2),
            ),
            (
                "x-listrak-first-failed-at",
                listrak_worker::edges::broker::text_header("2026-01-01T00:00:05Z"),
            ),
        ],
    );
    let publisher = listrak_worker::edges::broker::Publisher::new(
        &listrak_worker::edges::broker::connect(&crate::support::direct(&h.settings.amqp), "test")
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    publisher
        .publish("", &h.topology.queue, &retried, properties)
        .await
        .unwrap();
    h.wait_acked(2, Duration::from_secs(20)).await;
    assert_eq!(h.fake.value(1001, &who, 101).as_deref(), Some("off"));
    assert_eq!(h.acked_as("superseded"), 1);
    report_fault(
        &h,
        "an_old_retried_entered_arriving_after_a_newer_exited_was_applied_leaves_the_field_off",
        started,
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_outage_every_message_reaches_the_retry_queue_within_its_hold_budget() {
    // Listrak is down throughout. 800 events arrive over 4 s; most are for contacts whose
    // earlier update is still being retried, so they wait behind it.
    let mut h = Harness::new(
        "hold_budget",
        Faults {
            outage_for: Some(Duration::from_secs(600)),
            ..Faults::default()
        },
        Knobs {
            max_wait: "100ms",
            in_process: "1s",
            request_timeout: "1s",
            schedule: r#"["10m"]"#,
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    let mut published = 0u64;
    for round in 0..8u64 {
        let bodies: Vec<Vec<u8>> = (0..100u64)
            .map(|i| {
                let value = if round % 2 == 0 { "on" } else { "off" };
                let at = BASE_MICROS + (round * 100 + i) as i64;
                profile_update(7, &email(((round * 100 + i) % 150) as usize), 3, value, at)
            })
            .collect();
        h.publish(&bodies).await;
        published += bodies.len() as u64;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // max_wait + in_process + request_timeout is 2.1 s, then a confirm and an ack (held up
    // to 500 ms to fold it with others); the rest is room for a loaded machine.
    h.wait_for(
        "every message handed to the retry queue within its budget",
        Duration::from_secs(4),
        |h| h.acked_as("retry_scheduled") == published,
    )
    .await;
    assert_eq!(h.depth(&h.topology.retries[0].0).await, published as u32);
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_is_published_again_and_the_rest_flows() {
    let mut h = Harness::new("refused_publish", Faults::default(), Knobs::default()).await;
    h.start_worker();
    h.wait_for("the worker consuming", Duration::from_secs(10), |h| {
        h.health.is_ready()
    })
    .await;
    // Someone deletes the dead-letter exchange: the broker refuses the next dead letter and
    // closes the channel it came on.
    let channel = h.connection().create_channel().await.unwrap();
    channel
        .exchange_delete(h.topology.dead.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = channel.close(200, "done".into()).await;

    let mut bodies = vec![b"{not json".to_vec()];
    bodies.extend((0..200).map(|i| profile_update(7, &email(i), 3, "on", BASE_MICROS)));
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(30))
        .await;

    assert_eq!(h.acked_as("applied"), 200, "every other message flowed");
    assert_eq!(h.fake.contacts()[&7].len(), 200);
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), 1, "the refused one was not lost");
    assert_eq!(dead[0].body, bodies[0]);
    assert_eq!(dead[0].header("x-listrak-reason"), Some("invalid_json"));
    assert!(h.metrics.sample("listrak_publish_failures_total", &[]) >= 1.0);
    h.finish().await;
}

/// A RabbitMQ user of its own, as a producer connected under its own name has; created with
/// `rabbitmqctl` (the broker the tests run against is local).
fn producer_user() -> (&'static str, &'static str) {
    const USER: &str = "listrak-test-producer";
    const PASSWORD: &str = "producer-password";
    let rabbitmqctl = |args: &[&str]| {
        std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl runs (the tests need a local RabbitMQ)")
    };
    // Adding an existing user fails harmlessly; the password is set either way.
    let _ = rabbitmqctl(&["add_user", USER, PASSWORD]);
    assert!(rabbitmqctl(&["change_password", USER, PASSWORD])
        .status
        .success());
    assert!(
        rabbitmqctl(&["set_permissions", "-p", "/", USER, ".*", ".*", ".*"])
            .status
            .success()
    );
    (USER, PASSWORD)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_a_producer_with_its_own_user_and_an_expiration_are_kept_and_do_not_expire()
{
    let (user, password) = producer_user();
    let mut h = Harness::new("producer_user", Faults::default(), Knobs::default()).await;
    let url = crate::support::amqp_url().replacen("guest:guest", &format!("{user}:{password}"), 1);
    let producer = listrak_worker::edges::broker::connect_url(&url, "producer")
        .await
        .unwrap();
    let publisher = listrak_worker::edges::broker::Publisher::new(&producer)
        .await
        .unwrap();
    // RabbitMQ accepts a user_id only from its own user: this one is the producer's.
    let poison = lapin::BasicProperties::default()
        .with_user_id(user.into())
        .with_expiration("1000".into())
        .with_message_id("poison-1".into());
    publisher
        .publish(&h.topology.exchange, "event", b"{not json", poison)
        .await
        .unwrap();
    let good = profile_update(7, &email(1), 3, "on", BASE_MICROS);
    let good_properties = lapin::BasicProperties::default().with_user_id(user.into());
    publisher
        .publish(&h.topology.exchange, "event", &good, good_properties)
        .await
        .unwrap();
    h.start_worker();
    h.wait_acked(2, Duration::from_secs(30)).await;
    // Longer than the producer's expiration: a dead letter that kept it would be gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), 1, "the dead letter was published and kept");
    assert_eq!(dead[0].properties.user_id(), &None);
    assert_eq!(dead[0].properties.expiration(), &None);
    assert_eq!(dead[0].header("x-listrak-original-user-id"), Some(user));
    assert_eq!(
        dead[0].properties.message_id().as_ref().map(|m| m.as_str()),
        Some("poison-1")
    );
    assert_eq!(h.acked_as("applied"), 1);
    let _ = producer.close(200, "done".into()).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dated_far_in_the_future_does_not_win_over_later_ones() {
    let mut h = Harness::new("future_event", Faults::default(), Knobs::default()).await;
    h.start_worker();
    let now = listrak_worker::stages::model::EventTime::now().0;
    // Year 9999, then an ordinary later event for the same field.
    let year_9999 = 253_402_300_799 * SECOND;
    h.publish(&[profile_update(7, &email(1), 3, "on", year_9999)])
        .await;
    // Acked once applied: the guard has seen it before the next event arrives.
    h.wait_acked(1, Duration::from_secs(30)).await;
    h.publish(&[profile_update(7, &email(1), 3, "off", now + 5 * SECOND)])
        .await;
    h.wait_acked(2, Duration::from_secs(30)).await;
    assert_eq!(
        h.acked_as("applied"),
        2,
        "the later event was not superseded"
    );
    assert_eq!(h.fake.contacts()[&7][&email(1)][&3], "off");
    assert_eq!(
        h.metrics.sample("listrak_future_timestamps_total", &[]),
        1.0
    );
    h.finish().await;
}

/// A deployment of the earlier release kept its retry queues as classic queues named
/// `<queue>.retry.<delay>`. Upgrading loses nothing: what waits there still expires into the
/// main queue and is applied, and the worker deletes such a queue once it is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_applies_what_waits_in_the_classic_retry_queues_and_deletes_them_once_empty() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use listrak_worker::edges::broker::classic_retry_queue_name;

    let mut h = Harness::new("upgrade", Faults::default(), Knobs::default()).await;
    let classic = classic_retry_queue_name(&h.topology.queue, Duration::from_secs(2));
    // The earlier release's declaration, and messages waiting in it, as an outage left them.
    let channel = h.connection().create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(2_000));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(h.topology.queue.as_str().into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(classic.as_str().into(), durable, args)
        .await
        .unwrap();
    let waiting: Vec<(Vec<u8>, lapin::BasicProperties)> = (0..50)
        .map(|i| {
            let body = profile_update(
                9,
                &format!("upgraded-{i}@example.com"),
                5,
                "on",
                BASE_MICROS,
            );
            let properties = listrak_worker::commands::publish::event_properties(&body);
            (body, properties)
        })
        .collect();
    h.publish_raw("", &classic, &waiting).await;

    // The new release starts while they wait: its first session finds the queue in use.
    h.start_worker();
    h.wait_for(
        "what waited in the classic queue applied",
        Duration::from_secs(30),
        |h| {
            (0..50).all(|i| {
                h.fake
                    .value(9, &format!("upgraded-{i}@example.com"), 5)
                    .as_deref()
                    == Some("on")
            })
        },
    )
    .await;
    assert_eq!(h.depth(&classic).await, 0);

    // Its next start finds the classic queue empty, and deletes it.
    h.stop_worker().await;
    h.start_worker();
    crate::support::wait_until(
        "the empty classic queue deleted",
        Duration::from_secs(20),
        async || {
            let probe = h.connection().create_channel().await.unwrap();
            let exists = listrak_worker::edges::broker::queue_counts(&probe, &classic)
                .await
                .is_ok();
            let _ = probe.close(200, "checked".into()).await;
            !exists
        },
    )
    .await;
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}
