//! Settling walked messages one by one, in walk order: replay to the main queue, move to the
//! back of the dead-letter queue, or delete.
//!
//! The commands that change the queue (`replay`, `purge --yes`, `export --remove`) settle
//! every message they walk instead of holding the ones they leave: a message that stays is
//! published again, unchanged, to the back of the dead-letter queue. Why:
//!
//! - Every ack is then of the oldest message the channel has unacked. RabbitMQ finds an
//!   acknowledged delivery by a linear search among the channel's unacked ones, so acking
//!   behind many held messages costs in proportion to their number, every time (a filtered
//!   replay of 100,000 dead letters took minutes that way). In walk order, a run of settled
//!   messages takes one ack with `multiple`.
//! - Nothing stays unacked for the whole command, so RabbitMQ's `consumer_timeout` cannot end
//!   a long `--rate` replay.
//! - A message is acked only once its copy is confirmed where it went (or, for `export`,
//!   once its line is synced to disk): a crash at any moment leaves it in one place or the
//!   other, at worst in both, never in neither.
//! - Acks are coarse: one ack with `multiple` for a run of settled messages, sent when the
//!   run is long or nothing else is in flight. RabbitMQ 3.10 holds back settlements when many
//!   are outstanding and forgets those it still holds when the channel closes
//!   (rabbitmq/rabbitmq-server#10327): such a message would stay as if never acked. With few
//!   acks outstanding it never holds any back.
//!
//! The cost: the messages left in place keep their order among themselves, but move behind
//! the dead letters that arrived during the command.

use std::future::Future;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::message::Delivery;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

use crate::edges::broker::{wait_confirm, Publisher};

use super::letter;
use super::walk::{Ticket, Walk};
use super::DlqError;

/// What happens to a message walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Published to the main queue with a fresh retry budget, then acked.
    Replay,
    /// Published unchanged to the back of the dead-letter queue, then acked.
    Back,
    /// Acked.
    Delete,
}

type Settlement = (Ticket, Fate, Result<(), DlqError>);

/// What a [`Mover`] did.
#[derive(Debug, Default)]
pub struct Moved {
    pub replayed: u64,
    pub moved_back: u64,
    pub deleted: u64,
    /// Why it stopped early: what it did until then stays done.
    pub stopped: Option<DlqError>,
}

pub struct Mover<'c> {
    pub(super) walk: Walk<'c>,
    publisher: Publisher,
    main: String,
    dead: String,
    /// Messages on their way, in walk order, each resolving once it may be acked.
    pub(super) pending: FuturesOrdered<BoxFuture<'static, Settlement>>,
    /// Settled messages not acked yet: the last one, and what they were.
    run: Option<(Ticket, Moved)>,
    /// A run this long is acked even while more messages are in flight.
    ack_every: u64,
    pub(super) moved: Moved,
}

impl<'c> Mover<'c> {
    /// `ack_every` must stay well below the walk's prefetch: unacked settled messages keep
    /// using it.
    pub async fn new(
        walk: Walk<'c>,
        connection: &Connection,
        main: &str,
        dead: &str,
        ack_every: u64,
    ) -> Result<Self, DlqError> {
        Ok(Self {
            walk,
            publisher: Publisher::new(connection).await?,
            main: main.to_string(),
            dead: dead.to_string(),
            pending: FuturesOrdered::new(),
            run: None,
            ack_every: ack_every.max(1),
            moved: Moved::default(),
        })
    }

    pub fn stopped(&self) -> bool {
        self.moved.stopped.is_some()
    }

    pub fn stop(&mut self, error: DlqError) {
        self.moved.stopped.get_or_insert(error);
    }

    /// Messages published or waiting, not yet acked.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Publishes a dead letter to the main queue with a fresh retry budget.
    pub async fn replay(&mut self, ticket: Ticket, delivery: Delivery) {
        let properties = letter::replay_properties(&delivery.properties);
        self.publish(ticket, &delivery.data, Fate::Replay, properties)
            .await;
    }

    /// Publishes a dead letter unchanged to the back of the dead-letter queue (without the
    /// queue's own delivery count).
    pub async fn move_back(&mut self, ticket: Ticket, delivery: Delivery) {
        let headers = letter::message_headers(&delivery.properties);
        let properties = delivery.properties.with_headers(FieldTable::from(headers));
        self.publish(ticket, &delivery.data, Fate::Back, properties)
            .await;
    }

    /// Deletes a message once `ready` completes with `Ok` (at once for a ready future);
    /// with an error, the message stays and the command stops.
    pub fn delete_when(
        &mut self,
        ticket: Ticket,
        ready: impl Future<Output = Result<(), DlqError>> + Send + 'static,
    ) {
        self.pending
            .push_back(Box::pin(async move { (ticket, Fate::Delete, ready.await) }));
    }

    /// Leaves a message where it is, held until the walk ends.
    pub fn hold(&mut self, ticket: Ticket) {
        self.walk.hold(ticket);
    }

    async fn publish(
        &mut self,
        ticket: Ticket,
        body: &[u8],
        fate: Fate,
        properties: BasicProperties,
    ) {
        let queue = match fate {
            Fate::Replay => self.main.clone(),
            _ => self.dead.clone(),
        };
        match self.publisher.start("", &queue, body, properties).await {
            Ok(confirm) => self.pending.push_back(Box::pin(async move {
                let confirmed = wait_confirm(confirm)
                    .await
                    .map_err(|source| DlqError::Publish { queue, source });
                (ticket, fate, confirmed)
            })),
            Err(source) => self.failed(ticket, DlqError::Publish { queue, source }),
        }
    }

    /// The next dead letter to decide on, once fewer than `window` are in flight; `None` at
    /// the end of the walk, or after a failure (which stops the mover).
    pub async fn next_within(&mut self, window: usize) -> Option<(Ticket, Delivery)> {
        while self.in_flight() >= window {
            self.settle_next().await;
        }
        match self.walk.next().await {
            Ok(next) => next,
            Err(error) => {
                self.stop(error);
                None
            }
        }
    }

    /// Waits for the oldest message in flight, then settles it and every one after it that
    /// is ready too.
    pub async fn settle_next(&mut self) {
        if let Some(first) = self.pending.next().await {
            self.settle(first).await;
        }
    }

    /// Settles `first` and every message after it already ready. Settled messages join the
    /// run acked with one `multiple` ack, unless the walk holds a message before them (a
    /// publish failed), which `multiple` would take too: then each is acked alone.
    pub(super) async fn settle(&mut self, first: Settlement) {
        let mut ready = vec![first];
        while let Some(Some(next)) = self.pending.next().now_or_never() {
            ready.push(next);
        }
        for (ticket, fate, result) in ready {
            match result {
                Ok(()) if self.walk.holds_nothing(ticket) => {
                    let mut counts = self.run.take().map(|(_, c)| c).unwrap_or_default();
                    counts.count(fate);
                    self.run = Some((ticket, counts));
                }
                Ok(()) => {
                    self.ack_run().await;
                    let mut counts = Moved::default();
                    counts.count(fate);
                    self.ack(ticket, false, counts).await;
                }
                Err(error) => {
                    self.ack_run().await;
                    self.failed(ticket, error);
                }
            }
        }
        let long = self
            .run
            .as_ref()
            .is_some_and(|(_, c)| c.total() >= self.ack_every);
        if long || self.pending.is_empty() {
            self.ack_run().await;
        }
    }

    async fn ack_run(&mut self) {
        if let Some((last, counts)) = self.run.take() {
            self.ack(last, true, counts).await;
        }
    }

    async fn ack(&mut self, ticket: Ticket, through: bool, counts: Moved) {
        match self.walk.ack(ticket, through).await {
            Ok(()) => {
                self.moved.replayed += counts.replayed;
                self.moved.moved_back += counts.moved_back;
                self.moved.deleted += counts.deleted;
            }
            Err(error) => self.stop(error),
        }
    }

    /// Not settled: the message stays where it is, and the command stops.
    fn failed(&mut self, ticket: Ticket, error: DlqError) {
        self.stop(error);
        self.walk.hold(ticket);
    }

    /// Settles what is in flight, gives back what is held, and says what was done.
    pub async fn finish(mut self) -> Moved {
        while !self.pending.is_empty() {
            self.settle_next().await;
        }
        self.ack_run().await;
        let _ = self.publisher.channel().close(200, "settled".into()).await;
        if let Err(error) = self.walk.finish().await {
            self.moved.stopped.get_or_insert(error);
        }
        self.moved
    }
}

impl Moved {
    fn total(&self) -> u64 {
        self.replayed + self.moved_back + self.deleted
    }

    fn count(&mut self, fate: Fate) {
        match fate {
            Fate::Replay => self.replayed += 1,
            Fate::Back => self.moved_back += 1,
            Fate::Delete => self.deleted += 1,
        }
    }
}
