//! One `audience_field` mapping for every audience, against listrak-fake's catalogue: fields
//! found by the audience's name, created on first sight when asked, dead-lettered as
//! `unknown_field` otherwise, and replicas that race to create one field converging on it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

use listrak_worker::commands::dlq::{DeadLetters, Filter, ReplayOptions};
use listrak_worker::tools::fake::{CatalogueSeed, FakeOptions, SeedField, SeedGroup, SeedList};
use listrak_worker::tools::sample::{track, BASE_MICROS};

use crate::support::{counter_total, wait_until, Harness, Knobs, ListrakConfig, WorkerProcess};

const LIST: u32 = 1001;
const GROUP: &str = "Engage Audiences";
/// The one audience whose field exists from the start.
const GOLD_FIELD: u32 = 201;

/// List 1001 with the group "Engage Audiences" holding the Check Box of audience "gold".
fn catalogue() -> CatalogueSeed {
    CatalogueSeed {
        lists: vec![SeedList {
            list_id: LIST,
            list_name: "Customers".into(),
            groups: vec![SeedGroup {
                segmentation_field_group_id: 20,
                segmentation_field_group_name: GROUP.into(),
                fields: vec![SeedField {
                    segmentation_field_id: GOLD_FIELD,
                    segmentation_field_name: "gold".into(),
                    data_type: "CheckBox".into(),
                    max_length: 3,
                }],
            }],
        }],
    }
}

fn every_audience(create: bool) -> Knobs {
    Knobs {
        max_wait: "20ms",
        mappings: Some(format!(
            r#"
[[mappings]]
name = "every-audience"
events = ["Audience Entered", "Audience Exited"]
list_id = {LIST}
audience_field = {{ group = "{GROUP}", create = {create} }}
"#
        )),
        ..Knobs::default()
    }
}

async fn harness(test: &str, knobs: Knobs) -> Harness {
    Harness::with_fake(
        test,
        FakeOptions {
            catalogue: catalogue(),
            ..FakeOptions::default()
        },
        knobs,
    )
    .await
}

/// Every contact of `audience` enters; every third then exits. The bodies, and what each
/// contact's field must end as.
fn traffic(
    audience: &str,
    contacts: usize,
    first: usize,
) -> (Vec<Vec<u8>>, BTreeMap<String, &'static str>) {
    let mut bodies = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..contacts {
        let email = format!("{audience}-{i}@example.com");
        let index = first + 2 * i;
        bodies.push(track(
            "Audience Entered",
            audience,
            true,
            &email,
            index,
            BASE_MICROS + index as i64,
        ));
        let value = if i % 3 == 0 {
            bodies.push(track(
                "Audience Exited",
                audience,
                false,
                &email,
                index + 1,
                BASE_MICROS + index as i64 + 1,
            ));
            "off"
        } else {
            "on"
        };
        expected.insert(email, value);
    }
    (bodies, expected)
}

/// The fields named `name` in the group, as (id, data type).
fn fields_named(h: &Harness, name: &str) -> Vec<(u32, String)> {
    h.fake.catalogue().lists[0]
        .groups
        .iter()
        .filter(|group| group.segmentation_field_group_name == GROUP)
        .flat_map(|group| &group.fields)
        .filter(|field| field.segmentation_field_name == name)
        .map(|field| (field.segmentation_field_id, field.data_type.clone()))
        .collect()
}

fn field_count(h: &Harness) -> usize {
    h.fake.catalogue().lists[0]
        .groups
        .iter()
        .map(|group| group.fields.len())
        .sum()
}

/// Runs the worker binary with `args` and a configuration for the harness's fake holding
/// `mappings`.
async fn cli(h: &Harness, name: &str, mappings: &str, args: &[&str]) -> Output {
    ListrakConfig::new(&h.fake, &format!("audience-{name}"), mappings)
        .run(args)
        .await
}

fn assert_values(h: &Harness, field: u32, expected: &BTreeMap<String, &'static str>) {
    for (email, value) in expected {
        assert_eq!(
            h.fake.value(LIST, email, field).as_deref(),
            Some(*value),
            "{email} on field {field}"
        );
    }
}

#[tokio::test]
async fn missing_audience_fields_are_created_once_each_and_every_value_lands() {
    let mut h = harness("audience_create", every_audience(true)).await;
    let (mut bodies, gold) = traffic("gold", 30, 0);
    let (silver_bodies, silver) = traffic("silver", 30, 1000);
    let (bronze_bodies, bronze) = traffic("bronze", 30, 2000);
    bodies.extend(silver_bodies);
    bodies.extend(bronze_bodies);
    h.start_worker();
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(60))
        .await;
    assert_eq!(h.acked_as("applied"), bodies.len() as u64);
    h.stop_worker().await;

    assert_eq!(
        fields_named(&h, "gold"),
        vec![(GOLD_FIELD, "CheckBox".to_owned())]
    );
    let silver_field = fields_named(&h, "silver");
    let bronze_field = fields_named(&h, "bronze");
    assert_eq!(
        silver_field.len(),
        1,
        "one field for silver: {silver_field:?}"
    );
    assert_eq!(
        bronze_field.len(),
        1,
        "one field for bronze: {bronze_field:?}"
    );
    assert_eq!(silver_field[0].1, "CheckBox");
    assert_eq!(bronze_field[0].1, "CheckBox");
    assert_eq!(field_count(&h), 3, "nothing else created");

    assert_values(&h, GOLD_FIELD, &gold);
    assert_values(&h, silver_field[0].0, &silver);
    assert_values(&h, bronze_field[0].0, &bronze);

    let metrics = h.metrics.render();
    assert_eq!(counter_total(&metrics, "listrak_fields_created_total"), 2.0);
    let reads = counter_total(&metrics, "listrak_catalogue_reads_total");
    // The first read, and one after each creation; 180 events cost no more.
    println!("catalogue reads for 180 events of 3 audiences (2 created): {reads}");
    assert!((1.0..=4.0).contains(&reads), "catalogue reads: {reads}");
    h.finish().await;
}

#[tokio::test]
async fn without_create_an_unknown_audience_is_dead_lettered_and_applied_after_provision_and_replay(
) {
    let mut h = harness("audience_unknown", every_audience(false)).await;
    let (mut bodies, gold) = traffic("gold", 10, 0);
    let (platinum_bodies, platinum) = traffic("platinum", 10, 1000);
    let platinum_messages = platinum_bodies.len() as u64;
    bodies.extend(platinum_bodies);
    h.start_worker();
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(60))
        .await;
    assert_eq!(h.acked_as("dead_lettered"), platinum_messages);
    assert_values(&h, GOLD_FIELD, &gold);
    assert!(fields_named(&h, "platinum").is_empty(), "nothing created");
    assert_eq!(field_count(&h), 1);

    let dead = DeadLetters::new(h.connection(), &h.topology);
    let unknown_field = Filter {
        reasons: vec!["unknown_field".into()],
        ..Filter::default()
    };
    let (_, walked) = dead.stats(&unknown_field).await.unwrap();
    assert_eq!(
        walked.matched, platinum_messages,
        "every platinum event, as unknown_field"
    );
    assert_eq!(walked.present, platinum_messages, "and nothing else");

    // `listrak provision` creates the field, in the list and group of the configuration's
    // `audience_field` mapping; a replay then applies the dead letters.
    let mappings = every_audience(false).mappings.unwrap();
    let output = cli(
        &h,
        "provision",
        &mappings,
        &["listrak", "provision", "--audience", "platinum"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("mapping \"every-audience\" (audience_field) already writes these audiences"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no tables to paste");
    let created = fields_named(&h, "platinum");
    assert_eq!(created.len(), 1);

    let summary = dead
        .replay(
            &unknown_field,
            ReplayOptions::default(),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(summary.replayed, platinum_messages);
    let total = bodies.len() as u64 + platinum_messages;
    h.wait_for(
        "the replayed messages to be applied",
        Duration::from_secs(60),
        |h| h.acked() >= total,
    )
    .await;
    assert_eq!(
        h.acked_as("dead_lettered"),
        platinum_messages,
        "none failed again"
    );
    assert_values(&h, created[0].0, &platinum);
    h.stop_worker().await;
    let reads = counter_total(&h.metrics.render(), "listrak_catalogue_reads_total");
    println!("catalogue reads, unknown audience then replay: {reads}");
    assert!((1.0..=4.0).contains(&reads), "catalogue reads: {reads}");
    h.finish().await;
}

#[tokio::test]
async fn two_replicas_on_a_backlog_for_a_new_audience_put_every_update_on_one_field() {
    let h = harness("audience_replicas", Knobs::default()).await;
    // A small window, so the broker shares the backlog between the two from the start.
    let knobs = Knobs {
        max_contacts: 10,
        prefetch: 20,
        ..every_audience(true)
    };
    // One event per contact: two replicas do not keep one contact's events in order.
    let mut bodies = Vec::new();
    let mut diamond = BTreeMap::new();
    for i in 0..200 {
        let email = format!("diamond-{i}@example.com");
        let (event, member, value) = if i % 3 == 0 {
            ("Audience Exited", false, "off")
        } else {
            ("Audience Entered", true, "on")
        };
        bodies.push(track(
            event,
            "diamond",
            member,
            &email,
            i,
            BASE_MICROS + i as i64,
        ));
        diamond.insert(email, value);
    }
    h.publish(&bodies).await;
    let mut first = WorkerProcess::spawn(&h, "audience-a", &knobs);
    let mut second = WorkerProcess::spawn(&h, "audience-b", &knobs);
    let total = bodies.len() as u64;
    wait_until(
        "both replicas to ack the backlog",
        Duration::from_secs(90),
        async || first.acked().await + second.acked().await >= total,
    )
    .await;
    let (a, b) = (first.received().await, second.received().await);
    let created = first.counter("listrak_fields_created_total").await
        + second.counter("listrak_fields_created_total").await;
    let reads = first.counter("listrak_catalogue_reads_total").await
        + second.counter("listrak_catalogue_reads_total").await;
    first.signal("TERM");
    second.signal("TERM");
    first.wait_exit(Duration::from_secs(30)).await;
    second.wait_exit(Duration::from_secs(30)).await;
    println!("replicas received {a} and {b}; fields created {created}; catalogue reads {reads}");
    assert!(a > 0 && b > 0, "both replicas took part: {a} and {b}");

    let fields = fields_named(&h, "diamond");
    assert!(!fields.is_empty());
    assert_eq!(created as usize, fields.len(), "each creation counted");
    let lowest = fields.iter().map(|(id, _)| *id).min().unwrap();
    assert_values(&h, lowest, &diamond);
    let others: BTreeSet<u32> = fields
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| *id != lowest)
        .collect();
    for email in diamond.keys() {
        for other in &others {
            assert_eq!(
                h.fake.value(LIST, email, *other),
                None,
                "{email} on duplicate {other}"
            );
        }
    }
    assert!(reads <= 8, "catalogue reads: {reads}");

    // Duplicates left by the race are what `check --listrak` reports.
    let mappings = knobs.mappings.as_deref().unwrap();
    let check = cli(&h, "check", mappings, &["check", "--listrak"]).await;
    let stdout = String::from_utf8_lossy(&check.stdout);
    if fields.len() > 1 {
        assert_eq!(check.status.code(), Some(2), "{stdout}");
        assert!(
            stdout.contains(&format!(
                "Check Box fields named \"diamond\" in group \"{GROUP}\""
            )) && stdout.contains(&format!("the lowest, {lowest}")),
            "{stdout}"
        );
    } else {
        assert!(check.status.success(), "{stdout}");
    }
    h.finish().await;
}

#[tokio::test]
async fn messages_held_for_a_catalogue_read_are_settled_before_shutdown_ends() {
    let mut h = harness("audience_drain", every_audience(false)).await;
    h.start_worker();
    // The catalogue is read at start; a miss right after waits for the next allowed read,
    // seconds later, and the messages are held meanwhile.
    h.wait_for(
        "the catalogue read at start",
        Duration::from_secs(10),
        |h| h.metrics.sample("listrak_catalogue_reads_total", &[]) >= 1.0,
    )
    .await;
    let (bodies, _) = traffic("platinum", 10, 0);
    let count = bodies.len() as u64;
    h.publish(&bodies).await;
    h.wait_for("every message received", Duration::from_secs(10), |h| {
        h.metrics.sample("listrak_messages_received_total", &[]) >= count as f64
    })
    .await;
    // Held until the read allowed seconds after the first: the stop comes meanwhile.
    h.stop_worker().await;
    assert_eq!(
        h.acked_as("dead_lettered"),
        count,
        "settled before the worker stopped"
    );
    let letters = h.take_dead_letters().await;
    assert_eq!(letters.len() as u64, count);
    assert!(letters
        .iter()
        .all(|letter| letter.header("x-listrak-reason") == Some("unknown_field")));
    h.finish().await;
}

#[tokio::test]
async fn a_field_deleted_in_listrak_is_read_again_after_its_refusal_and_created_anew() {
    let mut h = harness("audience_deleted", every_audience(true)).await;
    h.start_worker();
    let (before, before_values) = traffic("gold", 5, 0);
    h.publish(&before).await;
    h.wait_acked(before.len() as u64, Duration::from_secs(30))
        .await;
    assert_values(&h, GOLD_FIELD, &before_values);

    // Someone deletes the field in Listrak: the worker, which holds it, is refused once.
    assert!(h.fake.delete_field(LIST, GOLD_FIELD));
    let refused = track(
        "Audience Entered",
        "gold",
        true,
        "late@example.com",
        500,
        BASE_MICROS + 500,
    );
    h.publish(std::slice::from_ref(&refused)).await;
    h.wait_acked(before.len() as u64 + 1, Duration::from_secs(30))
        .await;
    assert_eq!(h.acked_as("dead_lettered"), 1, "the refused update");

    // The refusal made the worker forget the list's fields: the next events read them
    // again, find none for "gold", and create it anew.
    let (after, after_values) = traffic("gold", 5, 1000);
    h.publish(&after).await;
    let total = before.len() + 1 + after.len();
    h.wait_acked(total as u64, Duration::from_secs(30)).await;
    h.stop_worker().await;
    let created = fields_named(&h, "gold");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_ne!(created[0].0, GOLD_FIELD);
    assert_values(&h, created[0].0, &after_values);
    assert_eq!(h.acked_as("applied"), (total - 1) as u64);
    let letters = h.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("x-listrak-reason"), Some("rejected"));
    h.finish().await;
}
