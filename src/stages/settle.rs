//! Settling: follows each message until every update it produced has a verdict, decides how
//! it is acknowledged, and folds acknowledgements into as few `multiple` acks as possible.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use crate::stages::model::{AckOutcome, Rejection, Verdict};

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

struct Pending<T> {
    original: T,
    remaining: u32,
    /// All of the message's updates were handed to the batcher: only now can it settle.
    sealed: bool,
    /// Its fields are being resolved (a catalogue read, a field to create): its updates are
    /// not in the batcher yet, and it cannot settle until the resolution ends.
    resolving: bool,
    worst: Option<Worst>,
}

/// The worst verdict of a message's parts so far, with a rejection out of line: the ledger
/// holds a window of messages and almost none of them is rejected, so an inline `Verdict`
/// would cost every one of them its rejection's size.
enum Worst {
    Superseded,
    Applied,
    DeadLetter(Box<Rejection>),
    Retry,
    Abandoned,
}

impl Worst {
    fn of(verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Superseded => Self::Superseded,
            Verdict::Applied => Self::Applied,
            Verdict::DeadLetter(rejection) => Self::DeadLetter(Box::new(rejection.clone())),
            Verdict::Retry => Self::Retry,
            Verdict::Abandoned => Self::Abandoned,
        }
    }

    /// How bad a verdict is for the message as a whole; the worst part decides. A retry beats
    /// a dead letter, so the parts that failed only for systemic reasons are not lost with it.
    fn rank(&self) -> u8 {
        match self {
            Self::Superseded => 0,
            Self::Applied => 1,
            Self::DeadLetter(_) => 2,
            Self::Retry => 3,
            Self::Abandoned => 4,
        }
    }
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
                resolving: false,
                worst: None,
            },
        );
    }

    /// The message held for `tag`, if it is still on its way.
    pub fn get(&self, tag: u64) -> Option<&T> {
        self.pending.get(&tag).map(|pending| &pending.original)
    }

    /// One more contact entry carries an update of this message.
    pub fn add_part(&mut self, tag: u64) {
        if let Some(pending) = self.pending.get_mut(&tag) {
            pending.remaining += 1;
        }
    }

    /// The message's fields are being resolved before its updates can be added.
    pub fn resolving(&mut self, tag: u64) {
        if let Some(pending) = self.pending.get_mut(&tag) {
            pending.resolving = true;
        }
    }

    /// Its fields are resolved: its updates are added next (`add_part`, then `seal`).
    pub fn resolved(&mut self, tag: u64) {
        if let Some(pending) = self.pending.get_mut(&tag) {
            pending.resolving = false;
        }
    }

    /// Its fields could not be resolved: it settles on `verdict` (no update was added).
    pub fn unresolved(&mut self, tag: u64, verdict: &Verdict) -> Option<(T, Settlement)> {
        let pending = self.pending.get_mut(&tag)?;
        pending.resolving = false;
        merge(&mut pending.worst, verdict);
        pending.sealed = true;
        self.settle_if_done(tag)
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
        if !pending.sealed || pending.resolving || pending.remaining > 0 {
            return None;
        }
        let pending = self.pending.remove(&tag)?;
        let settlement = match pending.worst {
            None | Some(Worst::Superseded) => Settlement::Ack(AckOutcome::Superseded),
            Some(Worst::Applied) => Settlement::Ack(AckOutcome::Applied),
            Some(Worst::DeadLetter(rejection)) => Settlement::DeadLetter(*rejection),
            Some(Worst::Retry) => Settlement::Retry,
            Some(Worst::Abandoned) => Settlement::Abandon,
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

fn merge(worst: &mut Option<Worst>, verdict: &Verdict) {
    let candidate = Worst::of(verdict);
    if worst.as_ref().is_none_or(|w| candidate.rank() > w.rank()) {
        *worst = Some(candidate);
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

impl AckCommand {
    fn up_to(tag: u64, counts: &[u64; AckOutcome::ALL.len()]) -> Self {
        let outcomes: Vec<(AckOutcome, u64)> = AckOutcome::ALL
            .into_iter()
            .zip(counts.iter().copied())
            .filter(|(_, n)| *n > 0)
            .collect();
        Self {
            tag,
            multiple: outcomes.iter().map(|(_, n)| n).sum::<u64>() > 1,
            outcomes,
        }
    }
}

/// Delivery tags of one channel: those not yet settled, and those settled but not yet acked.
///
/// RabbitMQ pays per ack frame: one `multiple` ack for a thousand messages costs about what a
/// single ack costs. Batches per list settle out of delivery order, so a settled tag often has
/// an unsettled one below it; such a tag is held back for a short while, in the expectation
/// that the tags below settle too and one `multiple` ack covers them all, and acked alone
/// only when the hold is over.
///
/// A channel numbers its deliveries 1, 2, 3…, so the tags in hand form one run from the
/// lowest unacked tag up: a ring of slots, not a search tree, and every step is O(1).
///
/// A `multiple` ack covers at most `chunk` messages. A quorum queue hands the freed credit
/// back only after it has settled the whole ack, and then reads every message it may now
/// deliver in one go: one ack for the 8,000 messages of a round of batches stalled its
/// deliveries for 50–200 ms, while the same ack in chunks of 500 lets it deliver the first
/// chunk's worth while it settles the next.
pub struct Acks {
    /// From `base` up, one slot per delivered tag, until the lowest slot is acked.
    slots: VecDeque<Slot>,
    /// The tag of `slots[0]`.
    base: u64,
    /// Settled tags in the order they settled, to ack alone once their hold is over.
    held: VecDeque<(Instant, u64)>,
    outstanding: usize,
    ready: usize,
    hold: Duration,
    chunk: u64,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Delivered and not ready to ack (in flight, or abandoned): a `multiple` ack must never
    /// reach up to one of these.
    Outstanding,
    Ready(AckOutcome),
    /// Acked alone after its hold, or a tag this channel never delivered to us.
    Done,
}

impl Acks {
    pub fn new(hold: Duration, chunk: u64) -> Self {
        Self {
            slots: VecDeque::new(),
            base: 0,
            held: VecDeque::new(),
            outstanding: 0,
            ready: 0,
            hold,
            chunk: chunk.max(1),
        }
    }

    /// From now on, a settled tag waits this long for those below it (tags already held
    /// included).
    pub fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    pub fn delivered(&mut self, tag: u64) {
        if self.slots.is_empty() {
            self.base = tag;
        }
        let next = self.base + self.slots.len() as u64;
        if tag < next {
            debug_assert!(false, "delivery tag {tag} came after {next}");
            return;
        }
        for _ in next..tag {
            self.slots.push_back(Slot::Done);
        }
        self.slots.push_back(Slot::Outstanding);
        self.outstanding += 1;
    }

    pub fn ready(&mut self, tag: u64, outcome: AckOutcome, now: Instant) {
        let Some(slot) = tag
            .checked_sub(self.base)
            .and_then(|index| self.slots.get_mut(index as usize))
        else {
            return;
        };
        if let Slot::Outstanding = slot {
            *slot = Slot::Ready(outcome);
            self.outstanding -= 1;
            self.ready += 1;
            self.held.push_back((now, tag));
        }
    }

    pub fn pending_acks(&self) -> usize {
        self.ready
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The lowest tag delivered and not ready to ack: no `multiple` ack passes it.
    pub fn lowest_outstanding(&self) -> Option<u64> {
        if self.outstanding == 0 {
            return None;
        }
        let index = self
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Outstanding))?;
        Some(self.base + index as u64)
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
        let mut commands = Vec::new();
        let mut counts = [0u64; AckOutcome::ALL.len()];
        let mut counted = 0;
        let mut highest = 0;
        while let Some(slot) = self.slots.front() {
            match *slot {
                Slot::Outstanding => break,
                Slot::Ready(outcome) => {
                    counts[outcome as usize] += 1;
                    counted += 1;
                    highest = self.base;
                    self.ready -= 1;
                }
                Slot::Done => {}
            }
            self.slots.pop_front();
            self.base += 1;
            // Named by a ready tag: one acked alone before must not be named again.
            if counted == self.chunk {
                commands.push(AckCommand::up_to(highest, &counts));
                counts = [0; AckOutcome::ALL.len()];
                counted = 0;
            }
        }
        if counted > 0 {
            commands.push(AckCommand::up_to(highest, &counts));
        }
        while let Some(&(at, tag)) = self.held.front() {
            // Below `base`: covered by the `multiple` ack above, or by an earlier one. Most
            // tags are, and leave at once rather than linger for the hold.
            let covered = tag < self.base;
            if !covered && ready_before.is_some_and(|limit| at > limit) {
                break;
            }
            self.held.pop_front();
            let Some(slot) = tag
                .checked_sub(self.base)
                .and_then(|index| self.slots.get_mut(index as usize))
            else {
                continue;
            };
            if let Slot::Ready(outcome) = *slot {
                *slot = Slot::Done;
                self.ready -= 1;
                commands.push(AckCommand {
                    tag,
                    multiple: false,
                    outcomes: vec![(outcome, 1)],
                });
            }
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::model::DeadLetterReason;
    use proptest::prelude::*;

    #[test]
    fn a_message_in_hand_carries_no_rejection_inline() {
        assert!(std::mem::size_of::<Option<Worst>>() <= 16);
    }

    fn rejected() -> Rejection {
        Rejection {
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: Some("ERROR_INVALID_PARAMETER".into()),
            message: Some("bad".into()),
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
    fn the_lowest_outstanding_tag_skips_the_ready_and_the_acked() {
        let now = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100), 1000);
        assert_eq!(acks.lowest_outstanding(), None);
        for tag in [3, 4, 5, 7] {
            acks.delivered(tag);
        }
        assert_eq!(acks.lowest_outstanding(), Some(3));
        acks.ready(3, AckOutcome::Applied, now);
        acks.ready(5, AckOutcome::Applied, now);
        assert_eq!(acks.lowest_outstanding(), Some(4));
        acks.ready(4, AckOutcome::Applied, now);
        acks.take(now);
        assert_eq!(acks.lowest_outstanding(), Some(7), "6 was never delivered");
        acks.ready(7, AckOutcome::Applied, now);
        assert_eq!(acks.lowest_outstanding(), None);
    }

    #[test]
    fn acks_below_the_lowest_unsettled_tag_are_folded_into_one_multiple_ack() {
        let now = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100), 1000);
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
    fn a_long_run_of_settled_tags_is_acked_in_chunks_each_named_by_a_tag_not_yet_acked() {
        let start = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100), 3);
        for tag in 1..=9 {
            acks.delivered(tag);
        }
        acks.ready(4, AckOutcome::Applied, start);
        let later = start + Duration::from_millis(100);
        assert_eq!(acks.take(later).len(), 1, "4 acked alone after its hold");
        for tag in [1, 2, 3, 5, 6, 7, 8] {
            acks.ready(tag, AckOutcome::Applied, later);
        }
        let named: Vec<(u64, bool, u64)> = acks
            .take(later)
            .iter()
            .map(|c| (c.tag, c.multiple, c.outcomes.iter().map(|(_, n)| n).sum()))
            .collect();
        assert_eq!(named, [(3, true, 3), (7, true, 3), (8, false, 1)]);
    }

    #[test]
    fn a_tag_held_behind_an_unsettled_one_is_acked_alone_once_the_hold_is_over() {
        let start = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100), 1000);
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
    fn a_longer_hold_keeps_a_tag_already_held_for_a_multiple_ack() {
        let start = Instant::now();
        let mut acks = Acks::new(Duration::from_millis(100), 1000);
        acks.delivered(1);
        acks.delivered(2);
        acks.ready(2, AckOutcome::Applied, start);
        acks.set_hold(Duration::from_millis(300));
        assert!(acks.take(start + Duration::from_millis(299)).is_empty());
        acks.ready(1, AckOutcome::Applied, start + Duration::from_millis(299));
        let commands = acks.take(start + Duration::from_millis(299));
        assert_eq!(commands.len(), 1);
        assert_eq!((commands[0].tag, commands[0].multiple), (2, true));
    }

    proptest! {
        /// Whatever order tags settle in and whenever acks are taken: every settled tag is
        /// acked exactly once, and no `multiple` ack reaches an unsettled tag.
        #[test]
        fn every_settled_tag_is_acked_once_and_no_ack_covers_an_unsettled_one(
            settle_order in proptest::sample::subsequence((1u64..=60).collect::<Vec<_>>(), 0..=60)
                .prop_shuffle(),
            takes in proptest::collection::vec(0usize..60, 0..8),
            held_ms in 0u64..3,
            chunk in 1u64..8,
        ) {
            let start = Instant::now();
            let mut acks = Acks::new(Duration::from_millis(1), chunk);
            for tag in 1..=60 {
                acks.delivered(tag);
            }
            let mut acked: Vec<u64> = Vec::new();
            let apply = |commands: Vec<AckCommand>, acked: &mut Vec<u64>, settled: &[u64]| {
                for command in commands {
                    prop_assert!(!acked.contains(&command.tag), "names tag {} acked \
                         before", command.tag);
                    let covered: Vec<u64> = if command.multiple {
                        (1..=command.tag).filter(|t| !acked.contains(t)).collect()
                    } else {
                        vec![command.tag]
                    };
                    for tag in &covered {
                        prop_assert!(settled.contains(tag), "ack of unsettled tag {tag}");
                        prop_assert!(!acked.contains(tag), "tag {tag} acked twice");
                    }
                    let counted: u64 = command.outcomes.iter().map(|(_, n)| n).sum();
                    prop_assert_eq!(counted, covered.len() as u64);
                    prop_assert!(counted <= chunk);
                    acked.extend(covered);
                }
                Ok(())
            };
            for (index, tag) in settle_order.iter().enumerate() {
                acks.ready(*tag, AckOutcome::Applied, start);
                if takes.contains(&index) {
                    let now = start + Duration::from_millis(held_ms);
                    apply(acks.take(now), &mut acked, &settle_order[..=index])?;
                }
            }
            apply(acks.take_all(), &mut acked, &settle_order)?;
            acked.sort_unstable();
            let mut settled = settle_order.clone();
            settled.sort_unstable();
            prop_assert_eq!(acked, settled);
            prop_assert_eq!(acks.pending_acks(), 0);
            prop_assert_eq!(acks.outstanding(), 60 - settle_order.len());
        }
    }

    #[test]
    fn at_shutdown_every_ready_tag_is_acked_without_waiting() {
        let now = Instant::now();
        let mut acks = Acks::new(Duration::from_secs(60), 1000);
        acks.delivered(1);
        acks.delivered(2);
        acks.ready(2, AckOutcome::Applied, now);
        assert_eq!(acks.take_all().len(), 1);
        assert_eq!(acks.pending_acks(), 0);
    }

    #[test]
    fn a_message_waiting_for_its_fields_settles_on_its_updates_or_on_the_failed_resolution() {
        let mut ledger = Ledger::default();
        ledger.open(1, "resolved");
        ledger.resolving(1);
        assert!(ledger.seal(1).is_none(), "still resolving");
        ledger.resolved(1);
        ledger.add_part(1);
        assert!(ledger.seal(1).is_none(), "its update is on its way");
        let (_, settlement) = ledger.settle_part(1, &Verdict::Applied).unwrap();
        assert_eq!(settlement, Settlement::Ack(AckOutcome::Applied));

        ledger.open(2, "unresolved");
        ledger.resolving(2);
        let (_, settlement) = ledger.unresolved(2, &Verdict::Retry).unwrap();
        assert_eq!(settlement, Settlement::Retry);
        assert!(ledger.is_empty());
    }
}
