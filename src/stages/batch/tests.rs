use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;

const LIST_A: u32 = 100;
const LIST_B: u32 = 200;
const LIST_C: u32 = 300;
const FIELD: u32 = 456;

fn limits(max_contacts: usize, max_bytes: usize) -> BatchLimits {
    BatchLimits {
        max_contacts,
        max_bytes,
        max_wait: Duration::from_secs(1),
    }
}

fn update(list: u32, email: &str, field: u32, value: &str, micros: i64) -> Update {
    Update {
        list_id: ListId::new(list.into()).unwrap(),
        email: email.to_string(),
        fields: vec![(FieldId::new(field.into()).unwrap(), value.to_string())],
        timestamp: EventTime(micros),
    }
}

/// The body `deliver` sends for these contacts when none of their fields is superseded.
fn encoded(contacts: &[Contact]) -> Vec<u8> {
    let mut body = RequestBody::with_capacity(body_len(contacts));
    for contact in contacts {
        body.push(&contact.email, &contact.fields);
    }
    body.finish()
}

fn values(batch: &Batch) -> Vec<(String, u32, String)> {
    batch
        .contacts
        .iter()
        .flat_map(|c| {
            c.fields
                .iter()
                .map(|f| (c.email.clone(), f.field.get(), f.value.clone()))
        })
        .collect()
}

#[test]
fn exited_after_entered_in_one_batch_ends_off() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    batcher.add(2, update(LIST_A, "a@x.io", FIELD, "off", 20), now);
    let batches = batcher.flush_all();
    assert_eq!(batches.len(), 1);
    assert_eq!(
        values(&batches[0]),
        [("a@x.io".into(), FIELD, "off".into())]
    );
    assert_eq!(batches[0].contacts[0].messages, [1, 2]);
}

#[test]
fn older_event_delivered_later_does_not_overwrite_newer_one() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "off", 20), now);
    batcher.add(2, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    let batches = batcher.flush_all();
    assert_eq!(
        values(&batches[0]),
        [("a@x.io".into(), FIELD, "off".into())]
    );
    assert_eq!(
        batches[0].contacts[0].messages,
        [1, 2],
        "both settle with it"
    );
}

#[test]
fn equal_timestamps_are_won_by_the_later_delivery() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    batcher.add(2, update(LIST_A, "a@x.io", FIELD, "off", 10), now);
    assert_eq!(
        values(&batcher.flush_all()[0]),
        [("a@x.io".into(), FIELD, "off".into())]
    );
}

#[test]
fn one_contact_carries_all_of_its_fields() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", 9, "on", 10), now);
    batcher.add(2, update(LIST_A, "a@x.io", 3, "gold", 10), now);
    let batches = batcher.flush_all();
    assert_eq!(batches[0].contacts.len(), 1);
    assert_eq!(
        values(&batches[0]),
        [
            ("a@x.io".into(), 3, "gold".into()),
            ("a@x.io".into(), 9, "on".into())
        ]
    );
}

#[test]
fn lists_are_batched_apart() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    let first = batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    let second = batcher.add(1, update(LIST_B, "a@x.io", FIELD, "on", 10), now);
    assert!(first.new_part && second.new_part, "a fan-out is two parts");
    let mut lists: Vec<u32> = batcher
        .flush_all()
        .iter()
        .map(|b| b.list_id.get())
        .collect();
    lists.sort();
    assert_eq!(lists, [LIST_A, LIST_B]);
}

#[test]
fn the_batches_holding_a_message_leave_together_and_the_others_stay() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    batcher.add(1, update(LIST_B, "a@x.io", FIELD, "on", 10), now);
    batcher.add(2, update(LIST_B, "b@x.io", FIELD, "on", 10), now);
    batcher.add(3, update(LIST_C, "c@x.io", FIELD, "on", 10), now);
    let mut held: Vec<(u32, FlushTrigger)> = batcher
        .flush_holding(1)
        .iter()
        .map(|b| (b.list_id.get(), b.trigger))
        .collect();
    held.sort_by_key(|(list, _)| *list);
    assert_eq!(
        held,
        [(LIST_A, FlushTrigger::Idle), (LIST_B, FlushTrigger::Idle)]
    );
    assert!(batcher.flush_holding(1).is_empty());
    let rest: Vec<u32> = batcher
        .flush_all()
        .iter()
        .map(|b| b.list_id.get())
        .collect();
    assert_eq!(rest, [LIST_C]);
}

#[test]
fn the_same_message_twice_on_one_contact_is_one_part() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    assert!(
        batcher
            .add(7, update(LIST_A, "a@x.io", 1, "on", 10), now)
            .new_part
    );
    assert!(
        !batcher
            .add(7, update(LIST_A, "a@x.io", 2, "on", 10), now)
            .new_part
    );
}

#[test]
fn a_batch_leaves_when_it_reaches_max_contacts() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(3, 10_000));
    assert!(batcher
        .add(1, update(LIST_A, "a@x.io", FIELD, "on", 1), now)
        .flushed
        .is_empty());
    assert!(batcher
        .add(2, update(LIST_A, "b@x.io", FIELD, "on", 1), now)
        .flushed
        .is_empty());
    let flushed = batcher
        .add(3, update(LIST_A, "c@x.io", FIELD, "on", 1), now)
        .flushed;
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].contacts.len(), 3);
    assert_eq!(flushed[0].trigger, FlushTrigger::Size);
    assert!(batcher.is_empty());
}

#[test]
fn a_batch_never_exceeds_max_bytes() {
    let now = Instant::now();
    let one = encoded(&[Contact {
        email: "a0@x.io".into(),
        fields: vec![FieldValue {
            field: FieldId::new(FIELD.into()).unwrap(),
            value: "on".into(),
            timestamp: EventTime(1),
        }],
        messages: vec![],
        since: now,
    }])
    .len();
    // Room for two contacts and a bit, not three.
    let max_bytes = 2 * one + one / 2;
    let mut batcher = Batcher::new(limits(100, max_bytes));
    let mut flushed = Vec::new();
    for i in 0..7 {
        flushed.extend(
            batcher
                .add(
                    i,
                    update(LIST_A, &format!("a{i}@x.io"), FIELD, "on", 1),
                    now,
                )
                .flushed,
        );
    }
    flushed.extend(batcher.flush_all());
    assert_eq!(
        flushed.iter().map(|b| b.contacts.len()).collect::<Vec<_>>(),
        [2, 2, 2, 1]
    );
    for batch in &flushed {
        assert!(encoded(&batch.contacts).len() <= max_bytes);
    }
    assert_eq!(flushed[0].trigger, FlushTrigger::Bytes);
}

#[test]
fn a_partial_batch_leaves_after_max_wait() {
    let start = Instant::now();
    let mut batcher = Batcher::new(limits(10, 10_000));
    assert_eq!(batcher.next_deadline(), None);
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 1), start);
    assert_eq!(
        batcher.next_deadline(),
        Some(start + Duration::from_secs(1))
    );
    assert!(batcher
        .flush_due(start + Duration::from_millis(999))
        .is_empty());
    let due = batcher.flush_due(start + Duration::from_secs(1));
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].trigger, FlushTrigger::Time);
    assert_eq!(batcher.next_deadline(), None);
}

#[test]
fn a_batch_opened_after_a_flush_waits_its_own_max_wait() {
    let start = Instant::now();
    let later = start + Duration::from_millis(900);
    let mut batcher = Batcher::new(limits(2, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 1), start);
    let full = batcher.add(2, update(LIST_A, "b@x.io", FIELD, "on", 1), start);
    assert_eq!(full.flushed.len(), 1);
    batcher.add(3, update(LIST_A, "c@x.io", FIELD, "on", 1), later);
    assert_eq!(
        batcher.next_deadline(),
        Some(later + Duration::from_secs(1)),
        "the batch opened by c counts from c's arrival, not from the flush before it"
    );
}

#[test]
fn the_encoded_body_is_the_json_listrak_expects() {
    let contacts = vec![Contact {
        email: "q\"uote@x.io".into(),
        fields: vec![
            FieldValue {
                field: FieldId::new(1).unwrap(),
                value: "line\nbreak\u{1}é".into(),
                timestamp: EventTime(1),
            },
            FieldValue {
                field: FieldId::new(22).unwrap(),
                value: "on".into(),
                timestamp: EventTime(1),
            },
        ],
        messages: vec![1],
        since: Instant::now(),
    }];
    let body = encoded(&contacts);
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        parsed,
        serde_json::json!([{
            "emailAddress": "q\"uote@x.io",
            "segmentationFieldValues": [
                {"segmentationFieldId": 1, "value": "line\nbreak\u{1}é"},
                {"segmentationFieldId": 22, "value": "on"}
            ]
        }])
    );
    assert_eq!(body.len(), body_len(&contacts));
}

/// Sends and answers batches one at a time in the order they leave; what the answers let
/// out of the parking joins the line.
fn answer_in_order(
    batcher: &mut Batcher,
    leaving: Vec<Batch>,
    now: Instant,
    sent: &mut Vec<Batch>,
) {
    let mut line = std::collections::VecDeque::from(leaving);
    while let Some(batch) = line.pop_front() {
        line.extend(batcher.answered(&batch, now, usize::MAX));
        sent.push(batch);
    }
}

#[test]
fn a_contact_in_flight_waits_for_its_answer_and_others_go_ahead() {
    let now = Instant::now();
    let mut batcher = Batcher::new(limits(2, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), now);
    let first = batcher.add(2, update(LIST_A, "b@x.io", FIELD, "on", 10), now);
    assert_eq!(first.flushed.len(), 1, "a and b are in flight");

    let parked = batcher.add(3, update(LIST_A, "a@x.io", FIELD, "off", 20), now);
    assert!(parked.new_part && parked.flushed.is_empty());
    assert_eq!(batcher.parked(), 1);
    batcher.add(4, update(LIST_A, "c@x.io", FIELD, "on", 10), now);
    let second = batcher.add(5, update(LIST_A, "d@x.io", FIELD, "on", 10), now);
    assert_eq!(
        second.flushed[0]
            .contacts
            .iter()
            .map(|c| c.email.as_str())
            .collect::<Vec<_>>(),
        ["c@x.io", "d@x.io"],
        "a second request of the same list leaves while the first is unanswered"
    );

    let released = batcher.answered(&first.flushed[0], now, usize::MAX);
    assert!(released.is_empty());
    assert_eq!(batcher.parked(), 0);
    let last = batcher.flush_all();
    assert_eq!(values(&last[0]), [("a@x.io".into(), FIELD, "off".into())]);
    assert_eq!(last[0].contacts[0].messages, [3]);
}

#[test]
fn a_parked_contact_brings_its_age_to_the_open_batch() {
    let start = Instant::now();
    let later = start + Duration::from_millis(900);
    let mut batcher = Batcher::new(limits(2, 10_000));
    batcher.add(1, update(LIST_A, "a@x.io", FIELD, "on", 10), start);
    let first = batcher.add(2, update(LIST_A, "b@x.io", FIELD, "on", 10), start);
    batcher.add(3, update(LIST_A, "a@x.io", FIELD, "off", 20), start);
    assert_eq!(batcher.next_deadline(), None, "nothing open: a is parked");
    batcher.answered(&first.flushed[0], later, usize::MAX);
    assert_eq!(
        batcher.next_deadline(),
        Some(start + Duration::from_secs(1)),
        "due by the parked message's max_wait, not the answer's"
    );
}

/// One step of a session, as the property test below plays it.
#[derive(Debug, Clone)]
enum Step {
    /// An update arrives: list, person, field, time, value.
    Arrive(u32, usize, u32, i64, bool),
    /// The request at this position among those unanswered is answered: applied, or failed
    /// for good in process, so its messages come back through the retry queues.
    Answer(usize, bool),
    /// Partial batches leave (max_wait or idle).
    Flush,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u32..2, 0usize..5, 1u32..3, 0i64..30, any::<bool>())
            .prop_map(|(l, w, f, t, on)| Step::Arrive(l, w, f, t, on)),
        3 => (0usize..8, prop::bool::weighted(0.8)).prop_map(|(i, ok)| Step::Answer(i, ok)),
        1 => Just(Step::Flush),
    ]
}

/// What the worker keeps between sending a batch and its answer, in the model below.
struct InFlight {
    batch: Batch,
    /// Fields not superseded when the request was built (the guard is asked then).
    sent: Vec<(u32, String, u32, i64, String)>,
}

proptest! {
    /// Requests of one list are answered in any order, and some fail and come back later
    /// through the retry queues: still no (list, contact, field) ever has an older value
    /// applied after a newer one, every message settles exactly once, and the end state is
    /// last-write-wins over every update.
    #[test]
    fn answers_in_any_order_never_apply_an_older_value_after_a_newer_one(
        steps in prop::collection::vec(step(), 1..300),
        max_contacts in 1usize..5,
    ) {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(max_contacts, 100_000));
        let mut originals: Vec<Update> = Vec::new();
        let mut parts: Vec<usize> = Vec::new();
        let mut settled: Vec<usize> = Vec::new();
        let mut in_flight: Vec<InFlight> = Vec::new();
        // What Listrak holds, and the superseded guard's memory of it.
        let mut applied: BTreeMap<(u32, String, u32), (i64, String)> = BTreeMap::new();
        let mut newest: BTreeMap<(u32, String, u32), (i64, String)> = BTreeMap::new();

        fn send(
            batches: Vec<Batch>,
            in_flight: &mut Vec<InFlight>,
            applied: &BTreeMap<(u32, String, u32), (i64, String)>,
        ) {
            for batch in batches {
                let mut sent = Vec::new();
                for contact in &batch.contacts {
                    for f in &contact.fields {
                        let key = (batch.list_id.get(), contact.email.clone(), f.field.get());
                        if applied.get(&key).is_none_or(|(t, _)| *t <= f.timestamp.0) {
                            sent.push((key.0, key.1, key.2, f.timestamp.0, f.value.clone()));
                        }
                    }
                }
                in_flight.push(InFlight { batch, sent });
            }
        }

        let arrive = |batcher: &mut Batcher,
                      update: Update,
                      originals: &mut Vec<Update>,
                      parts: &mut Vec<usize>,
                      settled: &mut Vec<usize>| {
            let key = originals.len() as u64;
            originals.push(update.clone());
            parts.push(0);
            settled.push(0);
            let added = batcher.add(key, update, now);
            parts[key as usize] += usize::from(added.new_part);
            added.flushed
        };

        let mut steps = steps.into_iter().collect::<std::collections::VecDeque<_>>();
        let mut retried: Vec<Update> = Vec::new();
        let mut draining = false;
        loop {
            let step = match steps.pop_front() {
                Some(step) => step,
                None if !retried.is_empty() => {
                    let update = retried.remove(0);
                    let flushed =
                        arrive(&mut batcher, update, &mut originals, &mut parts, &mut settled);
                    send(flushed, &mut in_flight, &applied);
                    continue;
                }
                None if !in_flight.is_empty() => Step::Answer(0, true),
                None if !batcher.is_empty() || batcher.parked() > 0 => Step::Flush,
                None => break,
            };
            if steps.is_empty() {
                draining = true;
            }
            match step {
                Step::Arrive(list, who, field, micros, on) => {
                    // Unique times: which of two equal times wins is another test's subject.
                    let at = micros * 1000 + originals.len() as i64;
                    let value = if on { "on" } else { "off" };
                    let update = update(list + 1, &format!("p{who}@x.io"), field, value, at);
                    let key = (list + 1, update.email.clone(), field);
                    if newest.get(&key).is_none_or(|(t, _)| *t < at) {
                        newest.insert(key, (at, update.fields[0].1.clone()));
                    }
                    let flushed =
                        arrive(&mut batcher, update, &mut originals, &mut parts, &mut settled);
                    send(flushed, &mut in_flight, &applied);
                }
                Step::Flush => {
                    let flushed = batcher.flush_all();
                    send(flushed, &mut in_flight, &applied);
                }
                Step::Answer(_, _) if in_flight.is_empty() => {}
                Step::Answer(at, ok) => {
                    let ok = ok || draining;
                    let InFlight { batch, sent } = in_flight.remove(at % in_flight.len());
                    let mut emails = HashSet::new();
                    for other in &in_flight {
                        for contact in &other.batch.contacts {
                            emails.insert((other.batch.list_id, contact.email.clone()));
                        }
                    }
                    for contact in &batch.contacts {
                        prop_assert!(!emails.contains(&(batch.list_id, contact.email.clone())), "a \
                             contact was in two requests at once");
                        for &message in &contact.messages {
                            prop_assert!(parts[message as usize] > 0, "message {} settled more \
                                 often than it has parts", message);
                            parts[message as usize] -= 1;
                            if parts[message as usize] == 0 {
                                settled[message as usize] += 1;
                                if !ok {
                                    retried.push(originals[message as usize].clone());
                                }
                            }
                        }
                    }
                    if ok {
                        for (list, email, field, time, value) in sent {
                            let key = (list, email, field);
                            let older = applied.get(&key).is_some_and(|(t, _)| *t > time);
                            prop_assert!(!older, "{:?} at {} applied after a newer \
                                                  value", key, time);
                            applied.insert(key, (time, value));
                        }
                    }
                    let released = batcher.answered(&batch, now, usize::MAX);
                    send(released, &mut in_flight, &applied);
                }
            }
        }
        prop_assert!(settled.iter().all(|&n| n == 1), "every message settles exactly once");
        prop_assert_eq!(applied, newest);
    }
}

proptest! {
    /// For any sequence of updates, every message lands in the batches exactly as often as
    /// the batcher said, and applying the batches in order while keeping the newer timestamp
    /// per field (what the superseded guard does) gives last-write-wins over all updates.
    #[test]
    fn grouping_loses_nothing_and_sends_last_write_wins(
        updates in prop::collection::vec(
            (0u32..3, 0usize..6, 1u32..4, 0i64..20, any::<bool>()),
            1..200,
        ),
        max_contacts in 1usize..8,
        max_bytes in 120usize..600,
    ) {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(max_contacts, max_bytes));
        let mut batches = Vec::new();
        let mut parts = 0usize;
        let mut expected: BTreeMap<(u32, String, u32), (i64, usize, String)> = BTreeMap::new();
        for (seq, (list, who, field, micros, on)) in updates.iter().enumerate() {
            let email = format!("p{who}@x.io");
            let value = if *on { "on" } else { "off" };
            let update = update(list + 1, &email, *field, value, *micros);
            let added = batcher.add(seq as u64, update, now);
            parts += usize::from(added.new_part);
            answer_in_order(&mut batcher, added.flushed, now, &mut batches);
            let entry = expected
                .entry((list + 1, email, *field))
                .or_insert((i64::MIN, 0, String::new()));
            if (*micros, seq) >= (entry.0, entry.1) {
                *entry = (*micros, seq, value.to_string());
            }
        }
        while !batcher.is_empty() {
            let last = batcher.flush_all();
            answer_in_order(&mut batcher, last, now, &mut batches);
        }
        prop_assert_eq!(batcher.parked(), 0);

        let mut seen = HashSet::new();
        let mut occurrences = 0;
        let mut applied: BTreeMap<(u32, String, u32), (i64, String)> = BTreeMap::new();
        for batch in &batches {
            prop_assert!(batch.contacts.len() <= max_contacts);
            let body = encoded(&batch.contacts);
            prop_assert_eq!(body.len(), body_len(&batch.contacts));
            prop_assert!(body.len() <= max_bytes || batch.contacts.len() == 1);
            for contact in &batch.contacts {
                occurrences += contact.messages.len();
                seen.extend(contact.messages.iter().copied());
                for f in &contact.fields {
                    let key = (batch.list_id.get(), contact.email.clone(), f.field.get());
                    let keep_old = applied.get(&key).is_some_and(|(t, _)| *t > f.timestamp.0);
                    if !keep_old {
                        applied.insert(key, (f.timestamp.0, f.value.clone()));
                    }
                }
            }
        }
        prop_assert_eq!(occurrences, parts);
        prop_assert_eq!(seen.len(), updates.len());
        let expected: BTreeMap<_, _> =
            expected.into_iter().map(|(k, (t, _, v))| (k, (t, v))).collect();
        prop_assert_eq!(applied, expected);
    }
}

fn paced(gap: Duration, arrivals: usize) -> (ArrivalPace, Instant) {
    let mut pace = ArrivalPace::default();
    let mut now = Instant::now();
    for _ in 0..arrivals {
        now += gap;
        pace.arrived(now);
    }
    (pace, now)
}

#[test]
fn the_end_of_a_fast_burst_is_quiet_within_milliseconds() {
    let max_wait = Duration::from_secs(1);
    let (pace, last) = paced(Duration::from_micros(20), 10_000);
    assert_eq!(pace.quiet_at(max_wait), Some(last + QUIET_AT_LEAST));
}

#[test]
fn a_steady_trickle_is_not_quiet_between_two_arrivals() {
    let max_wait = Duration::from_secs(1);
    let (pace, last) = paced(Duration::from_millis(2), 1_000);
    let quiet = pace.quiet_at(max_wait).unwrap() - last;
    assert!(
        quiet >= Duration::from_millis(60) && quiet < Duration::from_millis(70),
        "{quiet:?}"
    );
    let (pace, last) = paced(Duration::from_millis(50), 100);
    assert_eq!(
        pace.quiet_at(max_wait),
        Some(last + max_wait),
        "at 20 a second, batches fill for max_wait"
    );
}

#[test]
fn one_long_pause_in_a_burst_does_not_make_every_later_gap_quiet() {
    let max_wait = Duration::from_secs(1);
    let (mut pace, mut now) = paced(Duration::from_micros(20), 1_000);
    now += Duration::from_millis(100);
    pace.arrived(now);
    let after_pause = pace.quiet_at(max_wait).unwrap() - now;
    assert!(after_pause > QUIET_AT_LEAST, "{after_pause:?}");
    for _ in 0..200 {
        now += Duration::from_micros(20);
        pace.arrived(now);
    }
    assert_eq!(pace.quiet_at(max_wait), Some(now + QUIET_AT_LEAST));
}

#[test]
fn no_pace_is_known_from_a_single_arrival() {
    let (pace, _) = paced(Duration::from_millis(1), 1);
    assert_eq!(pace.quiet_at(Duration::from_secs(1)), None);
    assert_eq!(
        ArrivalPace::default().quiet_at(Duration::from_secs(1)),
        None
    );
}
