//! Settling: follows each message until every update it produced has a verdict, decides how
//! it is acknowledged, and folds acknowledgements into as few `multiple` acks as possible.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use crate::deliver::{Rejection, Verdict};
use crate::telemetry::AckOutcome;

/// What to do with a message once all of its updates have a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Ack(AckOutcome),
    /// Publish to the delayed retry queues (or dead-letter it if it is too old), then ack.
    Retry,
    /// Publish to the dead-letter queue with the rejection's headers, then ack.
    DeadLetter(Rejection),
    /// Leave unacknowledged: RabbitMQ delivers it again.
    Abandon,
}

/// How bad a verdict is for the message as a whole; the worst part decides. A retry beats a
/// dead letter, so the parts that failed only for systemic reasons are not lost with it.
fn rank(verdict: &Verdict) -> u8 {
    match verdict {
        Verdict::Superseded => 0,
        Verdict::Applied => 1,
        Verdict::DeadLetter(_) => 2,
        Verdict::Retry => 3,
        Verdict::Abandoned => 4,
    }
}

struct Pending<T> {
    original: T,
    remaining: u32,
    /// All of the message's updates were handed to the batcher: only now can it settle.
    sealed: bool,
    worst: Option<Verdict>,
}

/// Messages whose updates are still on their way to Listrak, by delivery tag.
pub struct Ledger<T> {
    pending: FxHashMap<u64, Pending<T>>,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Self {
            pending: FxHashMap::default(),
        }
    }
}

impl<T> Ledger<T> {
    pub fn open(&mut self, tag: u64, original: T) {
        self.pending.insert(
            tag,
            Pending {
                original,
                remaining: 0,
                sealed: false,
                worst: None,
            },
        );
    }

    /// One more contact entry carries an update of this message.
    pub fn add_part(&mut self, tag: u64) {
        if let Some(pending) = self.pending.get_mut(&tag) {
            pending.remaining += 1;
        }
    }

    /// Every update of the message has been added.
    pub fn seal(&mut self, tag: u64) -> Option<(T, Settlement)> {
        let pending = self.pending.get_mut(&tag)?;
        pending.sealed = true;
        self.settle_if_done(tag)
    }

    /// One part of the message got its verdict.
    pub fn settle_part(&mut self, tag: u64, verdict: &Verdict) -> Option<(T, Settlement)> {
        let pending = self.pending.get_mut(&tag)?;
        pending.remaining = pending.remaining.saturating_sub(1);
        merge(&mut pending.worst, verdict);
        self.settle_if_done(tag)
    }

    fn settle_if_done(&mut self, tag: u64) -> Option<(T, Settlement)> {
        let pending = &self.pending[&tag];
        if !pending.sealed || pending.remaining > 0 {
            return None;
        }
        let pending = self.pending.remove(&tag)?;
        let settlement = match pending.worst {
            None | Some(Verdict::Superseded) => Settlement::Ack(AckOutcome::Superseded),
            Some(Verdict::Applied) => Settlement::Ack(AckOutcome::Applied),
            Some(Verdict::DeadLetter(rejection)) => Settlement::DeadLetter(rejection),
            Some(Verdict::Retry) => Settlement::Retry,
            Some(Verdict::Abandoned) => Settlement::Abandon,
        };
        Some((pending.original, settlement))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

fn merge(worst: &mut Option<Verdict>, verdict: &Verdict) {
    if worst.as_ref().is_none_or(|w| rank(verdict) > rank(w)) {
        *worst = Some(verdict.clone());
    }
}

/// One `basic.ack` to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckCommand {
    pub tag: u64,
    pub multiple: bool,
    /// How many messages it acknowledges, by outcome, for the metrics.
    pub outcomes: Vec<(AckOutcome, u64)>,
}

/// Delivery tags of one channel: those not yet settled, and those settled but not yet acked.
///
/// RabbitMQ pays per ack frame: one `multiple` ack for a thousand messages costs about what a
/// single ack costs. Batches per list settle out of delivery order, so a settled tag often has
/// an unsettled one below it; such a tag is held back for a short while, in the expectation
/// that the tags below settle too and one `multiple` ack covers them all, and acked alone
/// only when the hold is over.
pub struct Acks {
    /// Delivered and not ready to ack (in flight, or abandoned): a `multiple` ack must never
    /// reach up to one of these.
    outstanding: BTreeSet<u64>,
    ready: BTreeMap<u64, (AckOutcome, Instant)>,
    hold: Duration,
}

impl Acks {
    pub fn new(hold: Duration) -> Self {
        Self {
            outstanding: BTreeSet::new(),
            ready: BTreeMap::new(),
            hold,
        }
    }

    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.insert(tag);
    }

    pub fn ready(&mut self, tag: u64, outcome: AckOutcome, now: Instant) {
        self.outstanding.remove(&tag);
        self.ready.insert(tag, (outcome, now));
    }

    pub fn pending_acks(&self) -> usize {
        self.ready.len()
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The acks due now: one `multiple` ack for all ready tags below the lowest outstanding
    /// one, and a single ack for each ready tag above it that has been held long enough.
    pub fn take(&mut self, now: Instant) -> Vec<AckCommand> {
        self.take_held_since(now.checked_sub(self.hold))
    }

    /// Every ready ack, held or not (for shutdown).
    pub fn take_all(&mut self) -> Vec<AckCommand> {
        self.take_held_since(None)
    }

    fn take_held_since(&mut self, ready_before: Option<Instant>) -> Vec<AckCommand> {
        let floor = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let above = self.ready.split_off(&floor);
        let below = std::mem::take(&mut self.ready);
        let mut commands = Vec::new();
        if let Some((&last, _)) = below.last_key_value() {
            let mut counts: BTreeMap<AckOutcome, u64> = BTreeMap::new();
            for (outcome, _) in below.values() {
                *counts.entry(*outcome).or_default() += 1;
            }
            commands.push(AckCommand {
                tag: last,
                multiple: below.len() > 1,
                outcomes: counts.into_iter().collect(),
            });
        }
        for (tag, (outcome, at)) in above {
            if ready_before.is_none_or(|limit| at <= limit) {
                commands.push(AckCommand {
                    tag,
                    multiple: false,
                    outcomes: vec![(outcome, 1)],
                });
            } else {
                self.ready.insert(tag, (outcome, at));
            }
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeadLetterReason;

    fn rejected() -> Rejection {
        Rejection {
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: "ERROR_INVALID_PARAMETER".into(),
            message: "bad".into(),
            list_id: None,
        }
    }

    #[test]
    fn a_message_fanned_out_to_two_lists_settles_after_both() {
        let mut ledger = Ledger::default();
        ledger.open(1, "m1");
        ledger.add_part(1);
        ledger.add_part(1);
        assert_eq!(ledger.seal(1), None);
        assert_eq!(ledger.settle_part(1, &Verdict::Applied), None);
        assert_eq!(
            ledger.settle_part(1, &Verdict::Applied),
            Some(("m1", Settlement::Ack(AckOutcome::Applied)))
        );
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_part_settled_before_the_message_is_sealed_does_not_settle_it() {
        let mut ledger = Ledger::default();
        ledger.open(1, ());
        ledger.add_part(1);
        assert_eq!(ledger.settle_part(1, &Verdict::Applied), None);
        assert_eq!(
            ledger.seal(1),
            Some(((), Settlement::Ack(AckOutcome::Applied)))
        );
    }

    #[test]
    fn the_worst_part_decides_and_a_retry_beats_a_dead_letter() {
        let table: &[(&[Verdict], Settlement)] = &[
            (
                &[Verdict::Superseded],
                Settlement::Ack(AckOutcome::Superseded),
            ),
            (
                &[Verdict::Superseded, Verdict::Applied],
                Settlement::Ack(AckOutcome::Applied),
            ),
            (
                &[Verdict::Applied, Verdict::DeadLetter(rejected())],
                Settlement::DeadLetter(rejected()),
            ),
            (
                &[Verdict::DeadLetter(rejected()), Verdict::Retry],
                Settlement::Retry,
            ),
            (&[Verdict::Retry, Verdict::Abandoned], Settlement::Abandon),
        ];
        for (verdicts, expected) in table {
            let mut ledger = Ledger::default();
            ledger.open(1, ());
            for _ in verdicts.iter() {
                ledger.add_part(1);
            }
            ledger.seal(1);
            let mut settled = None;
            for verdict in verdicts.iter() {
                settled = ledger.settle_part(1, verdict);
            }
            assert_eq!(settled, Some(((), expected.clone())), "{verdicts:?}");
        }
    }

    #[test]
    fn acks_below_the_lowest_unsettled_tag_are_folded_into_one_multiple_ack() {
        let now = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100));
        for tag in 1..=6 {
            acks.delivered(tag);
        }
        acks.ready(1, AckOutcome::Applied, now);
        acks.ready(2, AckOutcome::Ignored, now);
        acks.ready(3, AckOutcome::Applied, now);
        acks.ready(5, AckOutcome::Applied, now);
        assert_eq!(
            acks.take(now),
            [AckCommand {
                tag: 3,
                multiple: true,
                outcomes: vec![(AckOutcome::Applied, 2), (AckOutcome::Ignored, 1)],
            }],
            "5 is held: 4 below it may settle soon"
        );
        acks.ready(4, AckOutcome::Applied, now);
        acks.ready(6, AckOutcome::Applied, now);
        let commands = acks.take(now);
        assert_eq!(commands.len(), 1);
        assert_eq!((commands[0].tag, commands[0].multiple), (6, true));
        assert_eq!(commands[0].outcomes, [(AckOutcome::Applied, 3)]);
    }

    #[test]
    fn a_tag_held_behind_an_unsettled_one_is_acked_alone_once_the_hold_is_over() {
        let start = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100));
        acks.delivered(1);
        acks.delivered(2);
        acks.ready(2, AckOutcome::Applied, start);
        assert!(acks.take(start + Duration::from_millis(99)).is_empty());
        assert_eq!(
            acks.take(start + Duration::from_millis(100)),
            [AckCommand {
                tag: 2,
                multiple: false,
                outcomes: vec![(AckOutcome::Applied, 1)],
            }]
        );
        assert_eq!(acks.outstanding(), 1, "1 stays unacked");
    }

    #[test]
    fn at_shutdown_every_ready_tag_is_acked_without_waiting() {
        let now = Instant::now();
        let mut acks = Acks::new(Duration::from_secs(60));
        acks.delivered(1);
        acks.delivered(2);
        acks.ready(2, AckOutcome::Applied, now);
        assert_eq!(acks.take_all().len(), 1);
        assert_eq!(acks.pending_acks(), 0);
    }
}
