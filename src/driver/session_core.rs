//! The session's core: every decision of a broker session (what to batch, when a batch leaves,
//! when a message settles, which acks go out, when the session is over) as a state machine
//! without I/O. It takes inputs (a delivery, Listrak's answer, an applied-log confirm, a
//! resolution, a publish confirm, a tick of time, shutdown), each with the time as a value, and
//! answers with commands for the driver to carry out (`session` against RabbitMQ and Listrak,
//! the simulation in its tests against memory).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stages::batch::{ArrivalPace, Batch, BatchLimits, Batcher};
use crate::stages::mapping::Plan;
use crate::stages::model::{AckOutcome, Delivered, ListId, Rejection, Update, Verdict};
use crate::stages::settle::{AckCommand, Acks, Ledger, Settlement};

/// Acks are sent at every tick: often enough for latency, rarely enough to fold many.
pub const ACK_TICK: Duration = Duration::from_millis(20);
/// How long a settled message may wait for the ones delivered before it, so one `multiple`
/// ack covers them all (see `settle::Acks`): a few of Listrak's round trips, as an update
/// that waited for its contact's earlier request settles about two round trips after the
/// messages delivered beside it, and a message acked alone costs a quorum queue far more than
/// its share of a `multiple` ack (a drain whose acks went out alone spent four to twenty
/// times the broker's CPU per message, and slowed to a fraction of its pace).
pub const ACK_HOLD: AckHold = AckHold {
    round_trips: 4,
    least: Duration::from_millis(500),
    most: Duration::from_secs(3),
};
/// The most messages one `multiple` ack covers (see `settle::Acks` for why there is a most).
const ACK_CHUNK: u64 = 500;

/// What a session's core is set up with.
pub struct CoreSettings {
    /// Messages the broker may have delivered and not yet acknowledged (`basic.qos`).
    pub window: u16,
    pub limits: BatchLimits,
    /// How long after its arrival a message's batch may still start a request (see
    /// `Deliverer::hold_budget`): a message whose fields take longer is retried later.
    pub hold_budget: Duration,
    /// Bound on the drain at shutdown.
    pub grace: Duration,
    /// The body size each list's batches stay under (learnt from Listrak's size-404s).
    pub ceiling: Arc<dyn Fn(ListId) -> Option<usize> + Send + Sync>,
    /// How long a settled message waits for those below it before it is acked alone
    /// (`ACK_HOLD` in production; the simulation measures what other holds cost).
    pub ack_hold: AckHold,
}

/// How long a settled message waits for those below it: `round_trips` times Listrak's
/// smoothed round trip, within `least` and `most`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckHold {
    pub round_trips: u32,
    pub least: Duration,
    pub most: Duration,
}

impl AckHold {
    fn for_round_trip(&self, round_trip: Option<Duration>) -> Duration {
        let hold = round_trip.map_or(self.least, |rtt| rtt * self.round_trips);
        hold.clamp(self.least, self.most)
    }
}

/// The weight of the newest round trip in the smoothed one.
const ROUND_TRIP_SMOOTHING: f64 = 0.2;

/// A delivery as the driver prepared it (decoded, mapped, its fields looked up).
pub enum Arrival<O> {
    /// It cannot be applied: dead-lettered with this rejection.
    Poison(O, Rejection),
    /// No mapping applies to it: acked at once.
    Ignored,
    /// Its updates, ready to batch.
    Updates(O, Vec<Update>),
    /// Some of its fields are not known yet: resolved first.
    Unresolved(O, Plan),
}

/// What the driver carries out, in order.
pub enum Command<O> {
    /// Send this batch to Listrak; answer with `Core::answered`.
    Send(Batch),
    /// Append what this batch applied to the applied log; answer with `Core::appended` once
    /// the broker confirmed it (or at once when there is nothing to record).
    Append { batch: Batch, delivered: Delivered },
    /// Publish a copy of this message as the settlement says (a retry queue, the dead-letter
    /// queue); answer with `Core::copied`.
    Copy {
        tag: u64,
        original: O,
        settlement: Settlement,
    },
    /// Resolve the fields of this message's plan by `deadline`; answer with `Core::resolved`.
    Resolve {
        tag: u64,
        plan: Plan,
        arrived: Instant,
        deadline: Instant,
    },
    /// Send these acks, in order.
    Ack(Vec<AckCommand>),
    /// Ask whether the queue has a ready message; answer with `Core::queue_counted`.
    AskQueue,
    /// Stop the consumer: shutdown has begun.
    StopConsuming,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Shutdown, and everything batched was settled.
    Drained,
    /// Shutdown, and the grace period ran out: unsettled messages stay in the queue.
    GraceOver { unsettled: usize },
}

pub struct Core<O> {
    settings: CoreSettings,
    batcher: Batcher,
    pace: ArrivalPace,
    ledger: Ledger<O>,
    acks: Acks,
    /// Listrak's round trip per batch, smoothed: what the ack hold follows.
    round_trip: Option<Duration>,
    commands: VecDeque<Command<O>>,
    /// Batches sent and not yet settled (their answer or their record still to come).
    delivering: usize,
    /// Copies on their way to a retry or the dead-letter queue.
    copying: usize,
    /// A question to the broker whether the queue is empty, not answered yet.
    asking: bool,
    next_ack_at: Option<Instant>,
    draining_until: Option<Instant>,
    ended: Option<Ending>,
}

impl<O> Core<O> {
    pub fn new(settings: CoreSettings) -> Self {
        Self {
            batcher: Batcher::new(settings.limits),
            pace: ArrivalPace::default(),
            ledger: Ledger::default(),
            acks: Acks::new(settings.ack_hold.for_round_trip(None), ACK_CHUNK),
            round_trip: None,
            commands: VecDeque::new(),
            delivering: 0,
            copying: 0,
            asking: false,
            next_ack_at: None,
            draining_until: None,
            ended: None,
            settings,
        }
    }

    /// The next command to carry out.
    pub fn next_command(&mut self) -> Option<Command<O>> {
        self.commands.pop_front()
    }

    /// When the core wants a `tick`, if nothing else comes first.
    pub fn wake_at(&self) -> Option<Instant> {
        [
            self.batcher.next_deadline(),
            self.quiet_at(),
            self.next_ack_at,
            self.draining_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// How the session ended, once it has: the driver closes it then.
    pub fn ended(&self) -> Option<Ending> {
        self.ended
    }

    /// Shutdown has begun: no more deliveries are taken.
    pub fn draining(&self) -> bool {
        self.draining_until.is_some()
    }

    /// The message held for `tag`, while it is unsettled.
    pub fn original(&self, tag: u64) -> Option<&O> {
        self.ledger.get(tag)
    }

    pub fn delivered(&mut self, tag: u64, arrival: Arrival<O>, now: Instant) {
        self.pace.arrived(now);
        self.acks.delivered(tag);
        match arrival {
            Arrival::Poison(original, rejection) => {
                self.settle(tag, original, Settlement::DeadLetter(rejection), now);
            }
            Arrival::Ignored => self.ack_ready(tag, AckOutcome::Ignored, now),
            Arrival::Updates(original, updates) => {
                self.ledger.open(tag, original);
                self.add_updates(tag, updates, now);
            }
            Arrival::Unresolved(original, plan) => {
                self.ledger.open(tag, original);
                // The ledger knows it as resolving: it cannot settle, and the drain waits for
                // it. Past the moment its batch could still start a request, waiting is
                // pointless: the message goes to the retry queues instead.
                self.ledger.resolving(tag);
                self.commands.push_back(Command::Resolve {
                    tag,
                    plan,
                    arrived: now,
                    deadline: now + self.settings.hold_budget,
                });
            }
        }
        self.release_window();
    }

    /// The fields of a held message were resolved (its updates, keeping their arrival time
    /// for their hold budget), or could not be (the verdict its message settles on).
    pub fn resolved(
        &mut self,
        tag: u64,
        arrived: Instant,
        resolved: Result<Vec<Update>, Verdict>,
        now: Instant,
    ) {
        match resolved {
            Ok(updates) => {
                self.ledger.resolved(tag);
                self.add_updates(tag, updates, arrived);
                if self.draining() {
                    self.flush_all();
                }
            }
            Err(verdict) => {
                if let Some((original, settlement)) = self.ledger.unresolved(tag, &verdict) {
                    self.settle(tag, original, settlement, now);
                }
            }
        }
        self.check_drained();
    }

    /// Listrak answered every contact of a batch (sent at `sent`): the contacts that waited
    /// for this request may go now; its messages settle once its record is in the applied
    /// log.
    pub fn answered(&mut self, batch: Batch, delivered: Delivered, sent: Instant, now: Instant) {
        self.learn_round_trip(now.saturating_duration_since(sent));
        let ceiling = self.ceiling(batch.list_id);
        for ready in self.batcher.answered(&batch, now, ceiling) {
            self.send(ready);
        }
        if self.draining() {
            // Updates that waited for this answer leave at once.
            self.flush_all();
        }
        self.commands
            .push_back(Command::Append { batch, delivered });
        self.release_window();
    }

    /// A batch's record is in the applied log (or it needed none): its verdicts stand.
    pub fn appended(&mut self, batch: &Batch, verdicts: &[Verdict], now: Instant) {
        self.delivering -= 1;
        for (contact, verdict) in batch.contacts.iter().zip(verdicts) {
            for &tag in &contact.messages {
                if let Some((original, settlement)) = self.ledger.settle_part(tag, verdict) {
                    self.settle(tag, original, settlement, now);
                }
            }
        }
        // The batch freed a share of the prefetch window: hand it back to the broker now
        // rather than at the next tick.
        self.send_acks(now);
        self.release_window();
        self.check_drained();
    }

    /// A copy was confirmed (the message is acked with `outcome`), or the driver decided
    /// none was needed (`None`: the message stays unacknowledged for the broker to deliver
    /// again).
    pub fn copied(&mut self, tag: u64, outcome: Option<AckOutcome>, now: Instant) {
        self.copying -= 1;
        if let Some(outcome) = outcome {
            self.ack_ready(tag, outcome, now);
        }
        self.check_drained();
    }

    /// The broker's answer to `AskQueue`: whether no message is ready in the queue, or `None`
    /// when the broker could not say. Not knowing counts as empty: what is open leaves now
    /// rather than waiting out `max_wait` on a question nobody answers.
    pub fn queue_counted(&mut self, empty: Option<bool>, now: Instant) {
        self.asking = false;
        if empty.unwrap_or(true) {
            self.flush_idle();
        } else {
            self.pace.not_quiet_yet(now);
        }
    }

    /// Shutdown: stop consuming, send what is batched, and settle what can be within `grace`.
    pub fn shut_down(&mut self, now: Instant) {
        if self.draining() {
            return;
        }
        self.commands.push_back(Command::StopConsuming);
        self.flush_all();
        self.draining_until = Some(now + self.settings.grace);
        self.check_drained();
    }

    /// Time passed: batches whose `max_wait` is over leave, a quiet input flushes what is
    /// open, acks that are due go out, and a grace period that ran out ends the session.
    pub fn tick(&mut self, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        if self.draining_until.is_some_and(|until| now >= until) {
            self.send_all_acks();
            self.ended = Some(Ending::GraceOver {
                unsettled: self.ledger.len(),
            });
            return;
        }
        for batch in self.batcher.flush_due(now) {
            self.send(batch);
        }
        if self.quiet_at().is_some_and(|at| now >= at) {
            self.quiet(now);
        }
        if self.next_ack_at.is_some_and(|at| now >= at) {
            self.send_acks(now);
        }
        self.release_window();
    }

    /// With the prefetch window full, a pause says nothing about the input while an answer
    /// is still to come: the answer frees part of the window. With room in the window, it
    /// does (the queue is asked), whatever is on its way to Listrak. Contacts waiting for an
    /// answer join the open batches when it comes: the input is not over until they have.
    fn quiet_at(&self) -> Option<Instant> {
        if self.asking || self.draining() || self.batcher.any_parked() {
            return None;
        }
        self.batcher.next_deadline()?;
        if self.delivering > 0 && self.window_full() {
            return None;
        }
        self.pace.quiet_at(self.settings.limits.max_wait)
    }

    /// Whether the broker has nothing more for this consumer now: the prefetch window is
    /// full of unsettled messages (nothing comes until an ack), or the queue holds no ready
    /// message (which the broker is asked). A pause in deliveries with messages still queued
    /// is the broker being busy, not the input ending.
    fn quiet(&mut self, now: Instant) {
        if self.window_full() {
            if self.delivering == 0 {
                self.flush_idle();
            } else {
                self.pace.not_quiet_yet(now);
            }
        } else {
            self.asking = true;
            self.commands.push_back(Command::AskQueue);
        }
    }

    /// With the window full, nothing is delivered until an ack, and acks are cumulative: while
    /// the lowest unacknowledged message waits in an open batch, that batch cannot fill (no
    /// delivery comes) and no other answer moves the ack past it, so the consumer stalls until
    /// `max_wait` or the ack hold. That happens when the window fills before the first answers
    /// (a backlog the broker delivers faster than a round trip) and the lowest message's
    /// contact was parked behind the first request: its batches leave now, however full.
    fn release_window(&mut self) {
        if !self.window_full() || self.draining() {
            return;
        }
        let Some(lowest) = self.acks.lowest_outstanding() else {
            return;
        };
        for batch in self.batcher.flush_holding(lowest) {
            self.send(batch);
        }
    }

    fn learn_round_trip(&mut self, round_trip: Duration) {
        let smoothed = match self.round_trip {
            None => round_trip,
            Some(before) => {
                before.mul_f64(1.0 - ROUND_TRIP_SMOOTHING)
                    + round_trip.mul_f64(ROUND_TRIP_SMOOTHING)
            }
        };
        self.round_trip = Some(smoothed);
        self.acks
            .set_hold(self.settings.ack_hold.for_round_trip(Some(smoothed)));
    }

    /// Every message the prefetch allows is delivered and not yet acked.
    fn window_full(&self) -> bool {
        self.acks.outstanding() + self.acks.pending_acks() >= usize::from(self.settings.window)
    }

    fn ceiling(&self, list: ListId) -> usize {
        (self.settings.ceiling)(list).unwrap_or(usize::MAX)
    }

    /// Hands a message's updates to the batcher; the message settles when each has a verdict.
    /// Updates older than what was applied are recognised when their batch is sent (the
    /// guard is consulted there anyway, as a newer value may be applied meanwhile).
    fn add_updates(&mut self, tag: u64, updates: Vec<Update>, arrived: Instant) {
        for update in updates {
            let ceiling = self.ceiling(update.list_id);
            let added = self.batcher.add_with_ceiling(tag, update, arrived, ceiling);
            if added.new_part {
                self.ledger.add_part(tag);
            }
            for batch in added.flushed {
                self.send(batch);
            }
        }
        if let Some((original, settlement)) = self.ledger.seal(tag) {
            self.settle(tag, original, settlement, arrived);
        }
    }

    fn flush_all(&mut self) {
        for batch in self.batcher.flush_all() {
            self.send(batch);
        }
    }

    fn flush_idle(&mut self) {
        for batch in self.batcher.flush_idle() {
            self.send(batch);
        }
    }

    /// The batcher never lets a batch out with a contact that is already in flight, so
    /// batches of one list may go out side by side.
    fn send(&mut self, batch: Batch) {
        self.delivering += 1;
        self.commands.push_back(Command::Send(batch));
    }

    fn settle(&mut self, tag: u64, original: O, settlement: Settlement, now: Instant) {
        match settlement {
            Settlement::Ack(outcome) => self.ack_ready(tag, outcome, now),
            // Left unacknowledged: the broker delivers it again after the session.
            Settlement::Abandon => {}
            settlement => {
                self.copying += 1;
                self.commands.push_back(Command::Copy {
                    tag,
                    original,
                    settlement,
                });
            }
        }
    }

    fn ack_ready(&mut self, tag: u64, outcome: AckOutcome, now: Instant) {
        self.acks.ready(tag, outcome, now);
        if self.next_ack_at.is_none() {
            self.next_ack_at = Some(now + ACK_TICK);
        }
    }

    fn send_acks(&mut self, now: Instant) {
        let due = self.acks.take(now);
        if !due.is_empty() {
            self.commands.push_back(Command::Ack(due));
        }
        self.next_ack_at = (self.acks.pending_acks() > 0).then(|| now + ACK_TICK);
    }

    fn send_all_acks(&mut self) {
        let all = self.acks.take_all();
        if !all.is_empty() {
            self.commands.push_back(Command::Ack(all));
        }
        self.next_ack_at = None;
    }

    fn check_drained(&mut self) {
        if self.ended.is_none()
            && self.draining()
            && self.ledger.is_empty()
            && self.copying == 0
            && self.delivering == 0
        {
            self.send_all_acks();
            self.ended = Some(Ending::Drained);
        }
    }
}

#[cfg(test)]
mod tests;
