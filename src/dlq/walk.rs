//! Walking the dead-letter queue: each message present at the start, once, in queue order,
//! and none lost whatever happens to the process.
//!
//! How it works, and why:
//!
//! - The walk counts the messages ready at the start (a passive declare) and hands out at
//!   most that many. The queue is first in, first out, so those are exactly the messages that
//!   were there when it started; dead letters that arrive meanwhile (a replayed message that
//!   fails again) queue behind them and are never reached. A replay cannot loop.
//! - It consumes with manual acknowledgements. A message the command removes is acked (after
//!   its publish was confirmed, for a replay). A message it leaves in place is *held*:
//!   neither acked nor returned until the walk ends. Returning it at once (`basic.nack` with
//!   requeue) would not do: a quorum queue puts returned messages at its head, so the walk
//!   would be handed the same message again and again. At the end the walk cancels its
//!   consumers and returns the held messages one by one in queue order; returned messages go
//!   ahead of the rest, so the queue keeps its order. (Closing the channel would return them
//!   too, but grouped by consumer, which shuffles them.) It then waits until the queue counts
//!   them as ready again, so a command run right after sees them all.
//!   Each return counts as a delivery in `x-delivery-count`; the dead-letter queue has no
//!   delivery limit, so that changes nothing else.
//! - Held messages use up the consumer's prefetch, and a consumer's prefetch cannot be raised
//!   once it consumes. So when held messages take most of it, the walk adds another consumer
//!   (on the same channel) with room for as many again. Delivery tags count deliveries on a
//!   channel, so the walk hands messages out in tag order, which is queue order, whichever
//!   consumer received them. (Cancelling a full consumer instead would not do: the client
//!   drops deliveries that cross the cancel, which would leave gaps.)
//! - A crash or a lost connection returns every unacked message to the queue; a message is
//!   only ever gone after its ack.
//! - RabbitMQ closes a channel whose oldest unacked delivery is older than its
//!   `consumer_timeout` (30 minutes by default), so a walk that holds messages must end
//!   within that time.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::stream::{BoxStream, SelectAll, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::DlqError;

/// The most a consumer added for held messages may be sent at once.
const MAX_PREFETCH: u16 = 16_384;

/// After this long without a delivery, the walk asks whether the queue still has messages.
const IDLE: Duration = Duration::from_secs(1);

/// How long the end of a walk waits for the broker to count returned messages as ready.
const RETURN_WAIT: Duration = Duration::from_secs(10);

pub struct Walk {
    channel: Channel,
    queue: String,
    /// Every consumer's deliveries, each with the consumer's index.
    deliveries: SelectAll<BoxStream<'static, (u16, lapin::Result<Delivery>)>>,
    /// Deliveries received ahead of their turn (from another consumer of the walk).
    early: BTreeMap<u64, Delivery>,
    /// The consumer each delivery tag went to (index `tag - 1`).
    owners: Vec<u16>,
    /// The delivery tag to hand out next: tags on a fresh channel run 1, 2, 3...
    next_tag: u64,
    /// Messages ready when the walk started: the most it hands out.
    bound: u64,
    taken: u64,
    /// Delivery tags of the messages left in place, in the order they were handed out.
    held: Vec<u64>,
    /// Sum of the prefetch of the walk's consumers.
    room: u64,
    /// Room kept free for messages in flight; the first consumer's prefetch.
    prefetch: u16,
    consumer_tags: Vec<String>,
}

impl Walk {
    /// Starts walking `queue`, which must exist. `prefetch` bounds the messages in hand that
    /// are not held (read ahead, or being replayed).
    pub async fn start(
        connection: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self, DlqError> {
        let channel = connection.create_channel().await?;
        let (ready, consumers) = super::queue_depth(&channel, queue).await?;
        if consumers > 0 {
            tracing::warn!(
                queue,
                consumers,
                "other consumers are attached to the queue; the messages they take are not part of this walk"
            );
        }
        let mut walk = Self {
            channel,
            queue: queue.to_string(),
            deliveries: SelectAll::new(),
            early: BTreeMap::new(),
            owners: Vec::new(),
            next_tag: 1,
            bound: u64::from(ready),
            taken: 0,
            held: Vec::new(),
            room: 0,
            prefetch: prefetch.max(1),
            consumer_tags: Vec::new(),
        };
        if walk.bound > 0 {
            walk.add_consumer(walk.prefetch).await?;
        }
        Ok(walk)
    }

    /// The messages the queue held at the start: the most this walk will hand out.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// The next message, or `None` once every message present at the start was handed out
    /// (or the queue ran out early, because something else consumed from it).
    pub async fn next(&mut self) -> Result<Option<Delivery>, DlqError> {
        loop {
            if self.taken >= self.bound {
                return Ok(None);
            }
            if let Some(delivery) = self.early.remove(&self.next_tag) {
                self.next_tag += 1;
                self.taken += 1;
                return Ok(Some(delivery));
            }
            match tokio::time::timeout(IDLE, self.deliveries.next()).await {
                Ok(Some((consumer, Ok(delivery)))) => self.receive(consumer, delivery),
                Ok(Some((_, Err(error)))) => return Err(DlqError::walk(&self.queue, error)),
                Ok(None) => {
                    return Err(DlqError::Cancelled {
                        queue: self.queue.clone(),
                    })
                }
                Err(_idle) => self.on_idle().await?,
            }
        }
    }

    fn receive(&mut self, consumer: u16, delivery: Delivery) {
        let index = (delivery.delivery_tag as usize).saturating_sub(1);
        if self.owners.len() <= index {
            self.owners.resize(index + 1, consumer);
        }
        self.owners[index] = consumer;
        self.early.insert(delivery.delivery_tag, delivery);
    }

    fn owner(&self, delivery_tag: u64) -> u16 {
        let index = (delivery_tag as usize).saturating_sub(1);
        self.owners.get(index).copied().unwrap_or_default()
    }

    async fn on_idle(&mut self) -> Result<(), DlqError> {
        if let Some(&first) = self.early.keys().next() {
            // A tag never arrived; its message stays unacked and returns at the end.
            tracing::warn!(
                missing = self.next_tag,
                next = first,
                "a delivery went missing"
            );
            self.next_tag = first;
            return Ok(());
        }
        let (ready, _) = super::queue_depth(&self.channel, &self.queue).await?;
        if ready == 0 {
            tracing::warn!(
                queue = self.queue,
                expected = self.bound,
                walked = self.taken,
                "the queue ran out before the walk reached the messages counted at its start; something else consumed from it"
            );
            self.bound = self.taken;
        }
        Ok(())
    }

    /// Leaves a message handed out in the queue (it returns when the walk ends).
    pub async fn hold(&mut self, delivery_tag: u64) -> Result<(), DlqError> {
        self.held.push(delivery_tag);
        let held = self.held.len() as u64;
        let left = self.bound - self.taken;
        let needed = left.min(u64::from(self.prefetch));
        if self.room.saturating_sub(held) < needed {
            // Room for as many again as are held, so consumers grow in number only slowly.
            let more = held
                .clamp(u64::from(self.prefetch), u64::from(MAX_PREFETCH))
                .min(left);
            self.add_consumer(more as u16).await?;
        }
        Ok(())
    }

    /// Removes a message from the queue.
    pub async fn ack(&self, delivery_tag: u64) -> Result<(), DlqError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions::default())
            .await
            .map_err(|error| DlqError::walk(&self.queue, error))
    }

    /// Removes messages that were held (exported ones, once the file is on disk); stops at
    /// the first failure. Returns how many were removed.
    pub async fn ack_held(&mut self, tags: &[u64]) -> (u64, Option<DlqError>) {
        let mut removed = std::collections::BTreeSet::new();
        let mut failure = None;
        for &tag in tags {
            if let Err(error) = self.ack(tag).await {
                failure = Some(error);
                break;
            }
            removed.insert(tag);
        }
        self.held.retain(|tag| !removed.contains(tag));
        (removed.len() as u64, failure)
    }

    /// Ends the walk: every held message goes back to the queue, in order.
    pub async fn finish(mut self) -> Result<(), DlqError> {
        if !self.channel.status().connected() {
            // The broker returns everything unacked of a closed channel by itself.
            return Ok(());
        }
        let queue = self.queue.clone();
        let broken = |error| DlqError::walk(&queue, error);
        for tag in &self.consumer_tags {
            self.channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(broken)?;
        }
        // Deliveries that crossed the cancels; the streams end once the cancels are done.
        while let Ok(Some((consumer, Ok(delivery)))) =
            tokio::time::timeout(IDLE, self.deliveries.next()).await
        {
            self.receive(consumer, delivery);
        }
        let mut tags = std::mem::take(&mut self.held);
        tags.extend(self.early.keys());
        tags.sort_unstable();
        // The broker batches returns per consumer when many are outstanding, which would
        // shuffle the messages of different consumers; so before returning messages of
        // another consumer, wait until those returned so far are back in the queue.
        let (ready_before, _) = super::queue_depth(&self.channel, &self.queue).await?;
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        let mut returned = 0u64;
        let mut previous = None;
        for &tag in &tags {
            let owner = self.owner(tag);
            if previous.is_some_and(|previous| previous != owner) {
                self.wait_ready(u64::from(ready_before) + returned, deadline)
                    .await?;
            }
            previous = Some(owner);
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .map_err(broken)?;
            returned += 1;
        }
        self.wait_ready(u64::from(ready_before) + returned, deadline)
            .await?;
        self.channel
            .close(200, "walk done".into())
            .await
            .map_err(broken)
    }

    /// Waits until the queue has `expected` messages ready, or the deadline passed (when
    /// something else consumes from it, it may never have).
    async fn wait_ready(
        &self,
        expected: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), DlqError> {
        while tokio::time::Instant::now() < deadline {
            let (ready, _) = super::queue_depth(&self.channel, &self.queue).await?;
            if u64::from(ready) >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    async fn add_consumer(&mut self, prefetch: u16) -> Result<(), DlqError> {
        let prefetch = prefetch.max(1);
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("listrak-worker-dlq-{}", self.consumer_tags.len()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let index = self.consumer_tags.len() as u16;
        self.consumer_tags.push(consumer.tag().to_string());
        self.room += u64::from(prefetch);
        self.deliveries
            .push(consumer.map(move |delivery| (index, delivery)).boxed());
        Ok(())
    }
}

/// Options for a passive declare: asks about a queue without creating it.
pub(super) const PASSIVE: QueueDeclareOptions = QueueDeclareOptions {
    passive: true,
    durable: false,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};
