//! The field catalogue failing in every way listrak-fake can make it: a read that hangs, an
//! outage, a creation refused for good, a producer inventing audiences without end, and a
//! bug in a resolution. Each case ends with nothing lost and nothing held past its budget.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use listrak_worker::commands::dlq::{DeadLetters, Filter, ReplayOptions};
use listrak_worker::driver::fields::FieldCatalogue;
use listrak_worker::edges::listrak::{CatalogueError, ContactValues, ListrakApi, ListrakClient};
use listrak_worker::stages::catalogue::FieldGroup;
use listrak_worker::stages::classify::Outcome;
use listrak_worker::stages::model::{FieldId, ListId};
use listrak_worker::tools::fake::{CatalogueSeed, FakeOptions, Faults, SeedGroup, SeedList};
use listrak_worker::tools::sample::{track, BASE_MICROS};

use crate::support::{counter_total, Harness, Knobs};

const LIST: u32 = 1001;
const GROUP: &str = "Engage Audiences";

/// List 1001 with an empty "Engage Audiences" group.
fn catalogue() -> CatalogueSeed {
    CatalogueSeed {
        lists: vec![SeedList {
            list_id: LIST,
            list_name: "Customers".into(),
            groups: vec![SeedGroup {
                segmentation_field_group_id: 20,
                segmentation_field_group_name: GROUP.into(),
                fields: vec![],
            }],
        }],
    }
}

fn creating(knobs: Knobs) -> Knobs {
    Knobs {
        mappings: Some(format!(
            r#"
[[mappings]]
name = "every-audience"
events = ["Audience Entered", "Audience Exited"]
list_id = {LIST}
audience_field = {{ group = "{GROUP}", create = true }}
"#
        )),
        ..knobs
    }
}

async fn harness(test: &str, faults: Faults, knobs: Knobs) -> Harness {
    Harness::with_fake(
        test,
        FakeOptions {
            catalogue: catalogue(),
            faults,
            ..FakeOptions::default()
        },
        creating(knobs),
    )
    .await
}

/// `people` contacts, each entering every one of `audiences`; the bodies and each
/// (audience, email) the fake must end with "on".
fn entering(audiences: &[String], people: usize) -> (Vec<Vec<u8>>, Vec<(String, String)>) {
    let mut bodies = Vec::new();
    let mut expected = Vec::new();
    for (a, audience) in audiences.iter().enumerate() {
        for p in 0..people {
            let email = format!("person-{p}@example.com");
            let index = a * people + p;
            bodies.push(track(
                "Audience Entered",
                audience,
                true,
                &email,
                index,
                BASE_MICROS + index as i64,
            ));
            expected.push((audience.clone(), email));
        }
    }
    (bodies, expected)
}

fn audiences(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}_{i}")).collect()
}

/// The field ids of the group, by name.
fn fields(h: &Harness) -> BTreeMap<String, u32> {
    h.fake.catalogue().lists[0]
        .groups
        .iter()
        .flat_map(|group| &group.fields)
        .map(|field| {
            (
                field.segmentation_field_name.clone(),
                field.segmentation_field_id,
            )
        })
        .collect()
}

fn assert_all_on(h: &Harness, expected: &[(String, String)]) {
    let fields = fields(h);
    for (audience, email) in expected {
        let field = fields
            .get(audience)
            .unwrap_or_else(|| panic!("no field for {audience}"));
        assert_eq!(
            h.fake.value(LIST, email, *field).as_deref(),
            Some("on"),
            "{email} in {audience}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_catalogue_sends_every_held_message_to_the_retry_queues_within_its_budget() {
    let mut h = harness(
        "catalogue_hangs",
        Faults {
            catalogue_latency: Duration::from_secs(30),
            ..Faults::default()
        },
        Knobs {
            max_wait: "200ms",
            in_process: "1s",
            request_timeout: "2s",
            schedule: r#"["3s"]"#,
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    h.wait_for("the worker consuming", Duration::from_secs(10), |h| {
        h.health.is_ready()
    })
    .await;
    let (bodies, expected) = entering(&audiences("hang", 30), 10);
    let published = bodies.len() as u64;
    let started = Instant::now();
    h.publish(&bodies).await;
    // max_wait + in_process (1.2 s) is when a message's batch may last start a request: a
    // field lookup ends there. Then a confirm and an ack (folded for up to 500 ms): 1.3 s
    // here. The catalogue answers after 30 s, so a bound of 20 s still tells a budget kept
    // from a wait for the catalogue, with room for a machine loaded by the other tests.
    h.wait_for(
        "every held message handed to the retry queue",
        Duration::from_secs(20),
        |h| h.acked_as("retry_scheduled") >= published,
    )
    .await;
    println!(
        "{published} messages waiting on a hanging catalogue in the retry queue after {:?}",
        started.elapsed()
    );
    assert!(h.health.is_ready(), "/readyz stays 200");
    assert_eq!(h.acked_as("dead_lettered"), 0);

    // The catalogue answers again: the copies come back and are applied.
    h.fake
        .update_faults(|faults| faults.catalogue_latency = Duration::ZERO);
    h.wait_for(
        "every message applied once the catalogue answers",
        Duration::from_secs(60),
        |h| h.acked_as("applied") >= published,
    )
    .await;
    assert_all_on(&h, &expected);
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_catalogue_outage_reads_stay_few_and_everything_is_applied_afterwards() {
    let outage = Duration::from_secs(5);
    let mut h = harness(
        "catalogue_outage",
        Faults {
            catalogue_outage_for: Some(outage),
            ..Faults::default()
        },
        Knobs {
            max_wait: "50ms",
            in_process: "3s",
            schedule: r#"["1s", "2s"]"#,
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    let (bodies, expected) = entering(&audiences("outage", 40), 10);
    let published = bodies.len() as u64;
    h.publish(&bodies).await;
    h.wait_for(
        "every message applied after the outage",
        Duration::from_secs(60),
        |h| h.acked_as("applied") >= published,
    )
    .await;
    let reads = counter_total(&h.metrics.render(), "listrak_catalogue_reads_total");
    println!("catalogue reads for {published} messages through a {outage:?} outage: {reads}");
    // A few a second during the outage (the pause after a failure grows to 4 s), then one
    // read per creation of the 40 fields and the first.
    assert!(reads <= 5.0 * 4.0 + 2.0 * 40.0 + 10.0, "{reads} reads");
    assert_eq!(
        h.acked_as("dead_lettered"),
        0,
        "an outage dead-letters nothing"
    );
    assert_all_on(&h, &expected);
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn a_creation_listrak_refuses_dead_letters_its_events_as_unknown_field_with_its_message() {
    let mut h = harness(
        "creation_refused",
        Faults {
            refuse_creations: true,
            ..Faults::default()
        },
        Knobs::default(),
    )
    .await;
    h.start_worker();
    let (bodies, _) = entering(&audiences("refused", 2), 5);
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(30))
        .await;
    let outcomes: Vec<(&str, u64)> = ["applied", "dead_lettered", "retry_scheduled"]
        .into_iter()
        .map(|outcome| (outcome, h.acked_as(outcome)))
        .collect();
    assert_eq!(
        h.acked_as("dead_lettered"),
        bodies.len() as u64,
        "{outcomes:?}"
    );
    let dead = h.take_dead_letters().await;
    assert_eq!(dead.len(), bodies.len());
    for letter in &dead {
        assert_eq!(letter.header("x-listrak-reason"), Some("unknown_field"));
        assert_eq!(letter.header("x-listrak-status"), Some("400"));
        assert_eq!(
            letter.header("x-listrak-error"),
            Some("ERROR_INVALID_PARAMETER")
        );
        let message = letter.header("x-listrak-message").unwrap_or_default();
        assert!(message.contains("injected refusal"), "{message}");
        assert!(
            message.contains("dlq replay --reason unknown_field"),
            "{message}"
        );
    }
    assert!(fields(&h).is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_audience_keys_create_at_most_the_budget_and_the_rest_can_be_replayed() {
    const BUDGET: usize = 20;
    let mut h = harness(
        "creation_budget",
        Faults::default(),
        Knobs {
            field_creation_budget: BUDGET,
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    let mut keys = audiences("bogus", 600);
    // Keys that cannot be field names are refused without a request, budget or not.
    keys.push("x".repeat(300));
    keys.push("bad\u{1}key".into());
    let (bodies, _) = entering(&keys, 1);
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(120))
        .await;
    assert_eq!(fields(&h).len(), BUDGET, "no more fields than the budget");
    let refused = (bodies.len() - BUDGET) as u64;
    assert_eq!(h.acked_as("dead_lettered"), refused);
    assert_eq!(
        h.metrics
            .sample("listrak_fields_not_created_total", &[("reason", "budget")]),
        (refused - 2) as f64
    );
    assert_eq!(
        h.metrics.sample(
            "listrak_fields_not_created_total",
            &[("reason", "invalid_name")]
        ),
        2.0
    );
    let (mut peeked, _) = DeadLetters::new(h.connection(), &h.topology)
        .peek(&Filter::default(), 1)
        .await
        .unwrap();
    let peeked = peeked.pop().expect("a dead letter");
    let message = peeked.facts.message.unwrap_or_default();
    assert!(
        message.contains("listrak.field_creation_budget"),
        "{message}"
    );

    // The operator raises the budget, restarts and replays: the real audiences apply.
    h.stop_worker().await;
    h.settings.listrak.field_creation_budget = 1000;
    h.start_worker();
    let unknown_field = Filter {
        reasons: vec!["unknown_field".into()],
        ..Filter::default()
    };
    let summary = DeadLetters::new(h.connection(), &h.topology)
        .replay(
            &unknown_field,
            ReplayOptions::default(),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(summary.replayed, refused);
    // The metrics run on across the restart.
    let total = bodies.len() as u64 + refused;
    h.wait_for(
        "the replayed audiences applied",
        Duration::from_secs(120),
        |h| h.acked() >= total,
    )
    .await;
    assert_eq!(fields(&h).len(), 600);
    assert_eq!(
        h.acked_as("dead_lettered"),
        refused + 2,
        "only the two invalid names again"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_new_audiences_at_once_converge_well_within_a_minute() {
    // Listrak's answers take a while; the budget lets a whole Engage space in at once.
    let mut h = harness(
        "many_new_audiences",
        Faults {
            latency: Duration::from_millis(50),
            catalogue_latency: Duration::from_millis(50),
            ..Faults::default()
        },
        Knobs {
            field_creation_budget: 200,
            in_process: "2m",
            ..Knobs::default()
        },
    )
    .await;
    h.start_worker();
    let (bodies, expected) = entering(&audiences("engage", 125), 4);
    let started = Instant::now();
    h.publish(&bodies).await;
    h.wait_acked(bodies.len() as u64, Duration::from_secs(60))
        .await;
    println!(
        "{} events for 125 new audiences applied in {:?}",
        bodies.len(),
        started.elapsed()
    );
    let outcomes: Vec<(&str, u64)> = [
        "applied",
        "superseded",
        "ignored",
        "dead_lettered",
        "retry_scheduled",
    ]
    .into_iter()
    .map(|outcome| (outcome, h.acked_as(outcome)))
    .collect();
    assert_eq!(h.acked_as("applied"), bodies.len() as u64, "{outcomes:?}");
    assert_eq!(fields(&h).len(), 125);
    assert_all_on(&h, &expected);
    h.finish().await;
}

/// The Listrak client, with a bug in its first catalogue reads: they panic.
struct PanickingReads {
    client: ListrakClient,
    panics_left: AtomicU32,
}

impl FieldCatalogue for PanickingReads {
    fn field_groups(
        &self,
        list: ListId,
    ) -> impl Future<Output = Result<Vec<FieldGroup>, CatalogueError>> + Send {
        let panic = self
            .panics_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        async move {
            assert!(!panic, "a bug in a catalogue read");
            FieldCatalogue::field_groups(&self.client, list).await
        }
    }

    fn create_field_group(
        &self,
        list: ListId,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<u32, CatalogueError>> + Send {
        FieldCatalogue::create_field_group(&self.client, list, name, position)
    }

    fn create_check_box(
        &self,
        list: ListId,
        group: u32,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<FieldId, CatalogueError>> + Send {
        FieldCatalogue::create_check_box(&self.client, list, group, name, position)
    }
}

impl ListrakApi for PanickingReads {
    fn post_contacts(
        &self,
        list: ListId,
        body: Bytes,
        contacts: usize,
    ) -> impl Future<Output = Outcome> + Send {
        self.client.post_contacts(list, body, contacts)
    }

    fn contact(
        &self,
        list: ListId,
        email: &str,
        fields: &[u32],
    ) -> impl Future<Output = Result<Option<ContactValues>, CatalogueError>> + Send {
        ListrakApi::contact(&self.client, list, email, fields)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_that_panics_retries_its_messages_and_the_stream_flows_on() {
    let mut h = harness(
        "resolution_panics",
        Faults::default(),
        Knobs {
            schedule: r#"["1s"]"#,
            ..Knobs::default()
        },
    )
    .await;
    let api = Arc::new(PanickingReads {
        client: ListrakClient::new(&h.settings.listrak, h.metrics.clone()).unwrap(),
        // The preload's read, then the first miss's.
        panics_left: AtomicU32::new(2),
    });
    h.start_worker_with(api);
    let (bodies, expected) = entering(&audiences("panic", 3), 20);
    h.publish(&bodies).await;
    h.wait_for(
        "every message applied despite the panics",
        Duration::from_secs(60),
        |h| h.acked_as("applied") >= bodies.len() as u64,
    )
    .await;
    assert!(
        h.metrics
            .sample("listrak_task_panics_total", &[("task", "resolve")])
            >= 1.0
    );
    assert!(
        h.acked_as("retry_scheduled") >= 1,
        "the held ones were retried"
    );
    assert_all_on(&h, &expected);
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}
