use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;

const LIST_A: u32 = 100;
const LIST_B: u32 = 200;
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
    let one = Batch::encode(&[Contact {
        email: "a0@x.io".into(),
        fields: vec![FieldValue {
            field: FieldId::new(FIELD.into()).unwrap(),
            value: "on".into(),
            timestamp: EventTime(1),
        }],
        messages: vec![],
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
        assert!(Batch::encode(&batch.contacts).len() <= max_bytes);
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
    }];
    let body = Batch::encode(&contacts);
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

proptest! {
    /// For any sequence of updates, every message lands in the batches exactly as often as
    /// the batcher said, and applying the batches in order while keeping the newer timestamp
    /// per field (what the superseded guard does) gives last-write-wins over all updates.
    #[test]
    fn grouping_loses_nothing_and_sends_last_write_wins(
        updates in prop::collection::vec((0u32..3, 0usize..6, 1u32..4, 0i64..20, any::<bool>()), 1..200),
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
            let added = batcher.add(seq as u64, update(list + 1, &email, *field, value, *micros), now);
            parts += usize::from(added.new_part);
            batches.extend(added.flushed);
            let entry = expected.entry((list + 1, email, *field)).or_insert((i64::MIN, 0, String::new()));
            if (*micros, seq) >= (entry.0, entry.1) {
                *entry = (*micros, seq, value.to_string());
            }
        }
        batches.extend(batcher.flush_all());

        let mut seen = HashSet::new();
        let mut occurrences = 0;
        let mut applied: BTreeMap<(u32, String, u32), (i64, String)> = BTreeMap::new();
        for batch in &batches {
            prop_assert!(batch.contacts.len() <= max_contacts);
            prop_assert!(batch.encoded_len() <= max_bytes || batch.contacts.len() == 1);
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
        let expected: BTreeMap<_, _> = expected.into_iter().map(|(k, (t, _, v))| (k, (t, v))).collect();
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
