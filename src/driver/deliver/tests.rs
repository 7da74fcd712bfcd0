use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::stages::batch::{FieldValue, FlushTrigger};
use crate::stages::model::FieldId;

/// Listrak in memory: refuses what it is told to, the way the real one does.
#[derive(Default)]
struct MemoryListrak {
    rejected: BTreeSet<String>,
    name_rejected_email: bool,
    unknown_lists: BTreeSet<u32>,
    max_body: Option<usize>,
    systemic_failures_left: AtomicUsize,
    /// A bug in the request path: the delivery task panics.
    panics: bool,
    requests: Mutex<Vec<(u32, usize, u16)>>,
}

impl crate::driver::fields::WithoutCatalogue for MemoryListrak {}

impl ListrakApi for MemoryListrak {
    async fn contact(
        &self,
        _: ListId,
        _: &str,
        _: &[u32],
    ) -> Result<Option<crate::edges::listrak::ContactValues>, crate::edges::listrak::CatalogueError>
    {
        unreachable!("delivering a batch reads nothing back")
    }

    async fn post_contacts(&self, list: ListId, body: Bytes, contacts: usize) -> Outcome {
        assert!(!self.panics, "a bug in the request path");
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let emails: Vec<String> = parsed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["emailAddress"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(emails.len(), contacts);
        let answer = |status: u16, message: String| Outcome::Answered {
            status,
            retry_after: None,
            resource_id: None,
            error: (status >= 400).then(|| ListrakError {
                status,
                error: "ERROR".into(),
                message,
            }),
        };
        let outcome = if self
            .systemic_failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            answer(503, "unavailable".into())
        } else if self.unknown_lists.contains(&list.get())
            || self.max_body.is_some_and(|max| body.len() > max)
        {
            answer(
                404,
                "Unable to locate a resource associated with the listId supplied.".into(),
            )
        } else if let Some(bad) = emails.iter().find(|e| self.rejected.contains(*e)) {
            let message = if self.name_rejected_email {
                format!("The email address {bad} is invalid.")
            } else {
                "An invalid value was supplied.".into()
            };
            answer(400, message)
        } else {
            answer(201, String::new())
        };
        let status = match &outcome {
            Outcome::Answered { status, .. } => *status,
            _ => 0,
        };
        self.requests.lock().push((list.get(), contacts, status));
        outcome
    }
}

fn batch(list: u32, people: usize) -> Batch {
    Batch {
        list_id: ListId::new(list.into()).unwrap(),
        contacts: (0..people)
            .map(|i| Contact {
                email: format!("p{i}@x.io"),
                fields: vec![FieldValue {
                    field: FieldId::new(7).unwrap(),
                    value: "on".into(),
                    timestamp: EventTime(1_000),
                }],
                messages: vec![i as u64],
                since: Instant::now(),
            })
            .collect(),
        trigger: FlushTrigger::Size,
    }
}

fn deliverer(api: MemoryListrak, hold_budget: Duration) -> Deliverer<MemoryListrak> {
    let metrics = Metrics::new(1000);
    Deliverer {
        api: Arc::new(api),
        concurrency: AdaptiveConcurrency::new(4, |_| {}),
        guard: Arc::new(SupersededGuard::new(10_000)),
        ceilings: Arc::new(SizeCeilings::default()),
        metrics,
        hold_budget,
        request_timeout: Duration::from_secs(30),
        shutdown: CancellationToken::new(),
        reconciler: None,
    }
}

fn dead_lettered(verdicts: &[Verdict]) -> Vec<usize> {
    verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| matches!(v, Verdict::DeadLetter(_)))
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn a_delivery_that_panics_sends_its_whole_batch_to_the_retry_queues() {
    let api = MemoryListrak {
        panics: true,
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(1));
    let verdicts = d.deliver_or_retry(&batch(1, 20)).await.verdicts;
    assert_eq!(verdicts, vec![Verdict::Retry; 20]);
    assert_eq!(
        d.metrics
            .sample("listrak_task_panics_total", &[("task", "delivery")]),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn the_hold_budget_counts_from_the_oldest_arrival_not_from_the_first_request() {
    let api = MemoryListrak {
        systemic_failures_left: AtomicUsize::new(usize::MAX),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(2));
    let mut waited = batch(1, 10);
    // The batch waited behind a failing one for most of its budget.
    let arrived = clock::now() - Duration::from_millis(1900);
    waited.contacts[3].since = arrived;
    let started = clock::now();
    let verdicts = d.deliver(&waited).await;
    assert_eq!(verdicts, vec![Verdict::Retry; 10]);
    assert!(
        clock::now() - started <= Duration::from_millis(100),
        "gave up {:?} after it started, past the budget's end",
        clock::now() - started
    );

    let spent = batch(1, 10);
    let mut late = spent.clone();
    late.contacts[0].since = clock::now() - Duration::from_secs(3);
    let before = d.api.requests.lock().len();
    assert_eq!(d.deliver(&late).await, vec![Verdict::Retry; 10]);
    assert_eq!(
        d.api.requests.lock().len(),
        before,
        "a batch whose budget is spent is not sent"
    );
}

#[tokio::test]
async fn an_accepted_batch_applies_every_contact_in_one_request() {
    let d = deliverer(MemoryListrak::default(), Duration::from_secs(1));
    let verdicts = d.deliver(&batch(1, 50)).await;
    assert!(verdicts.iter().all(|v| *v == Verdict::Applied));
    assert_eq!(d.api.requests.lock().len(), 1);
}

#[tokio::test]
async fn bisection_dead_letters_only_the_rejected_contacts() {
    let api = MemoryListrak {
        rejected: ["p3@x.io", "p500@x.io", "p998@x.io"]
            .map(String::from)
            .into(),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(1));
    let verdicts = d.deliver(&batch(1, 1000)).await;
    assert_eq!(dead_lettered(&verdicts), [3, 500, 998]);
    let Verdict::DeadLetter(rejection) = &verdicts[500] else {
        unreachable!()
    };
    assert_eq!(rejection.reason, DeadLetterReason::Rejected);
    assert_eq!(rejection.status, Some(400));
    assert_eq!(
        verdicts.iter().filter(|v| **v == Verdict::Applied).count(),
        997
    );
    let requests = d.api.requests.lock().len();
    assert!(requests <= 70, "{requests} requests");
}

#[tokio::test]
async fn a_rejection_that_names_the_contact_costs_one_request_per_bad_contact() {
    let api = MemoryListrak {
        rejected: ["p3@x.io", "p500@x.io", "p998@x.io"]
            .map(String::from)
            .into(),
        name_rejected_email: true,
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(1));
    let verdicts = d.deliver(&batch(1, 1000)).await;
    assert_eq!(dead_lettered(&verdicts), [3, 500, 998]);
    assert_eq!(d.api.requests.lock().len(), 4);
}

#[tokio::test]
async fn an_unknown_list_is_told_from_a_size_limit_with_one_probe() {
    let api = MemoryListrak {
        unknown_lists: [9].into(),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(1));
    let verdicts = d.deliver(&batch(9, 100)).await;
    assert_eq!(dead_lettered(&verdicts).len(), 100);
    assert!(verdicts.iter().all(|v| matches!(
        v,
        Verdict::DeadLetter(r)
            if r.reason == DeadLetterReason::ListNotFound && r.list_id == ListId::new(9)
    )));
    assert_eq!(d.api.requests.lock().len(), 2);
}

#[tokio::test]
async fn a_size_limit_is_learned_and_everything_is_applied() {
    let api = MemoryListrak {
        max_body: Some(3_000),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(1));
    let big = batch(1, 200);
    let verdicts = d.deliver(&big).await;
    assert!(verdicts.iter().all(|v| *v == Verdict::Applied));
    let ceiling = d.ceilings.get(big.list_id).expect("a ceiling was learned");
    assert!(ceiling <= 3_000, "{ceiling}");
}

#[tokio::test]
async fn systemic_failures_are_retried_in_process_then_handed_to_the_retry_queues() {
    let api = MemoryListrak {
        systemic_failures_left: AtomicUsize::new(2),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_secs(30));
    assert!(d
        .deliver(&batch(1, 5))
        .await
        .iter()
        .all(|v| *v == Verdict::Applied));
    assert_eq!(d.api.requests.lock().len(), 3);
    let retried = |d: &Deliverer<MemoryListrak>| {
        d.metrics
            .sample("listrak_retries_total", &[("class", "systemic")])
    };
    assert_eq!(retried(&d), 2.0, "each failed request is counted once");

    let api = MemoryListrak {
        systemic_failures_left: AtomicUsize::new(usize::MAX),
        ..Default::default()
    };
    let d = deliverer(api, Duration::from_millis(300));
    let verdicts = d.deliver(&batch(1, 5)).await;
    assert!(
        verdicts.iter().all(|v| *v == Verdict::Retry),
        "{verdicts:?}"
    );
    assert!(dead_lettered(&verdicts).is_empty());
    let failed = d.api.requests.lock().len();
    assert!(failed > 1, "retried in process first ({failed} requests)");
    assert_eq!(
        retried(&d),
        failed as f64,
        "the last failure is counted too: the retry queues send it again"
    );
}

#[tokio::test]
async fn a_contact_superseded_by_an_applied_newer_value_is_not_sent() {
    let d = deliverer(MemoryListrak::default(), Duration::from_secs(1));
    let b = batch(1, 3);
    d.guard.record(
        b.list_id,
        "p1@x.io",
        FieldId::new(7).unwrap(),
        EventTime(2_000),
    );
    let verdicts = d.deliver(&b).await;
    assert_eq!(
        verdicts,
        [Verdict::Applied, Verdict::Superseded, Verdict::Applied]
    );
    assert_eq!(d.api.requests.lock()[0].1, 2);
}

proptest::proptest! {
    /// The size check runs on the encoder that builds real requests: every batch the
    /// batcher lets out, encoded as `deliver` sends it, is valid JSON of its contacts and
    /// stays under `max_bytes` (a lone contact larger than that is sent alone).
    #[test]
    fn every_request_body_is_the_json_of_its_batch_and_fits_max_bytes(
        updates in proptest::collection::vec(
            (0u8..12, 1u32..2_000_000, "(?s).{0,40}", proptest::num::i64::ANY),
            1..120,
        ),
        max_bytes in 200usize..4_000,
    ) {
        let now = Instant::now();
        let mut batcher = crate::stages::batch::Batcher::new(crate::stages::batch::BatchLimits {
            max_contacts: 25,
            max_bytes,
            max_wait: Duration::from_secs(1),
        });
        let deliverer = deliverer(MemoryListrak::default(), Duration::from_secs(1));
        let mut in_flight = std::collections::VecDeque::new();
        for (seq, (who, field, value, micros)) in updates.into_iter().enumerate() {
            let update = crate::stages::model::Update {
                list_id: ListId::new(9).unwrap(),
                email: format!("\"p{who}\"\u{e9}@x.io"),
                fields: vec![(FieldId::new(field.into()).unwrap(), value)],
                timestamp: EventTime(micros),
            };
            in_flight.extend(batcher.add(seq as u64, update, now).flushed);
            // Two requests stay unanswered, so that contacts park behind them meanwhile.
            while in_flight.len() > 2 {
                let batch = in_flight.pop_front().expect("more than two");
                check_body(&deliverer, &batch, max_bytes)?;
                in_flight.extend(batcher.answered(&batch, now, max_bytes));
            }
        }
        loop {
            in_flight.extend(batcher.flush_all());
            let Some(batch) = in_flight.pop_front() else {
                break;
            };
            check_body(&deliverer, &batch, max_bytes)?;
            in_flight.extend(batcher.answered(&batch, now, max_bytes));
        }
    }
}

fn check_body(
    deliverer: &Deliverer<MemoryListrak>,
    batch: &Batch,
    max_bytes: usize,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let attempt = Attempt {
        list: batch.list_id,
        contacts: &batch.contacts,
        deadline: Instant::now(),
        answer_deadline: Instant::now(),
        resource_ids: Mutex::new(Vec::new()),
    };
    let mut indexes: Vec<usize> = (0..batch.contacts.len()).collect();
    let (body, sent) = deliverer.encode_current(&attempt, &mut indexes, &mut Vec::new());
    proptest::prop_assert_eq!(sent.len(), batch.contacts.len());
    proptest::prop_assert!(body.len() <= max_bytes || batch.contacts.len() == 1);
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let expected: Vec<serde_json::Value> = batch
        .contacts
        .iter()
        .map(|contact| {
            let fields: Vec<serde_json::Value> = contact
                .fields
                .iter()
                .map(
                    |f| serde_json::json!({"segmentationFieldId": f.field.get(), "value": f.value}),
                )
                .collect();
            serde_json::json!({"emailAddress": contact.email, "segmentationFieldValues": fields})
        })
        .collect();
    proptest::prop_assert_eq!(parsed, serde_json::Value::Array(expected));
    Ok(())
}

#[test]
fn every_contact_gets_exactly_one_verdict() {
    let mut verdicts = Verdicts::new(2);
    verdicts.give(1, Verdict::Applied);
    verdicts.give(0, Verdict::Retry);
    assert_eq!(verdicts.into_vec(), [Verdict::Retry, Verdict::Applied]);

    let missing = std::panic::catch_unwind(|| {
        let mut verdicts = Verdicts::new(2);
        verdicts.give(0, Verdict::Applied);
        verdicts.into_vec()
    });
    assert!(missing.is_err(), "a contact without a verdict is a bug");
    let twice = std::panic::catch_unwind(|| {
        let mut verdicts = Verdicts::new(1);
        verdicts.give(0, Verdict::Applied);
        verdicts.give(0, Verdict::Superseded);
    });
    assert!(twice.is_err(), "a second verdict is a bug");
}
