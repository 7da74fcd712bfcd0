//! Walking the dead-letter queue: each message present at the start, once, in queue order,
//! and none lost whatever happens to the process.
//!
//! How it works, and why (RabbitMQ 3.10 quorum queues, as measured):
//!
//! - The walk counts the messages ready at the start (a passive declare) and hands out at
//!   most that many. The queue is first in, first out, so those are exactly the messages that
//!   were there when it started; dead letters that arrive meanwhile (a replayed message that
//!   fails again) queue behind them and are never reached. A command cannot loop.
//! - It consumes with manual acknowledgements; a message is only ever gone after its ack, and
//!   a crash or a lost connection gives every unacked message back to the queue.
//! - A command either settles each message in walk order as it goes (see [`super::mover`]) or
//!   *holds* it: neither acks nor returns it until the walk ends. Returning it at once with
//!   `basic.nack` would not do: depending on the broker's version it goes back to the head
//!   of the queue (and the walk is handed it again) or to its back (behind messages the walk
//!   has not reached, where the count would no longer describe what was there).
//! - Held messages use up the consumer's prefetch, and a consumer's prefetch cannot be raised
//!   once it consumes. So when the messages held take all of it, the walk opens another
//!   channel with a consumer that has room for as many again: a *segment*. Its consumer
//!   starts only once the one before cannot be sent more, so each segment holds the stretch
//!   of the queue that follows the stretch of the one before.
//! - At the end the walk closes its segments in order, and lets the broker take each stretch
//!   back before it closes the next. A closed channel's unacked messages go back in their
//!   order, and a quorum queue delivers given-back messages before the others, so held
//!   messages keep their order and stay ahead of those that arrived meanwhile. (A walk that
//!   stops early, `peek --limit`, gives its stretch back behind messages an earlier command
//!   gave back and nothing has taken since.)
//! - It never cancels a consumer: deliveries that cross a `basic.cancel` are requeued by the
//!   broker itself, at the back of the queue.
//! - After closing a channel it waits until the queue no longer counts the channel's
//!   consumer: the broker removes it and takes its messages back in one step. So the
//!   stretches go back in order, and a command run right after sees them all. Each return
//!   counts as a delivery in `x-delivery-count`; the dead-letter queue has no delivery limit,
//!   so that changes nothing else.
//! - RabbitMQ closes a channel whose oldest unacked delivery is older than its
//!   `consumer_timeout` (30 minutes by default), so a walk that holds messages must end
//!   within that time.

use std::time::Duration;

use futures_util::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::DlqError;

/// The most a segment's consumer may be sent at once.
const MAX_PREFETCH: u16 = 16_384;

/// After this long without a delivery, the walk asks whether the queue still has messages.
const IDLE: Duration = Duration::from_secs(1);

/// How long a walk waits for messages it counted at the start when the queue has none ready
/// (the broker may still be sending them) before it concludes something else took them.
const STARVED: Duration = Duration::from_secs(30);

/// How long the end of a walk waits for the broker to take given-back messages back.
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// A message handed out by the walk: which segment it came from, and its delivery tag there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    segment: usize,
    tag: u64,
}

/// One channel and its consumer: a stretch of the queue.
struct Segment {
    channel: Channel,
    consumer: Consumer,
    prefetch: u64,
    /// Messages held.
    held: u64,
}

pub struct Walk<'c> {
    connection: &'c Connection,
    queue: String,
    /// The last one is the one being read.
    segments: Vec<Segment>,
    /// Messages ready when the walk started: the most it hands out.
    bound: u64,
    taken: u64,
    /// Messages held in all segments.
    held: u64,
    /// The first segment's prefetch: messages read ahead, or being settled.
    prefetch: u16,
}

impl<'c> Walk<'c> {
    /// Starts walking `queue`, which must exist. `prefetch` bounds the messages in hand that
    /// are not held (read ahead, or being settled).
    pub async fn start(
        connection: &'c Connection,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self, DlqError> {
        let channel = connection.create_channel().await?;
        let (ready, consumers) = super::queue_depth(&channel, queue).await?;
        let _ = channel.close(200, "counted".into()).await;
        if consumers > 0 {
            tracing::warn!(
                queue,
                consumers,
                "other consumers are attached to the queue; the messages they take are not part of \
                 this walk"
            );
        }
        let mut walk = Self {
            connection,
            queue: queue.to_string(),
            segments: Vec::new(),
            bound: u64::from(ready),
            taken: 0,
            held: 0,
            prefetch: prefetch.max(1),
        };
        if walk.bound > 0 {
            walk.open_segment(walk.prefetch.into()).await?;
        }
        Ok(walk)
    }

    /// The messages the queue held at the start: the most this walk will hand out.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// The next message, or `None` once every message present at the start was handed out
    /// (or the queue ran out early, because something else consumed from it).
    pub async fn next(&mut self) -> Result<Option<(Ticket, Delivery)>, DlqError> {
        let mut starved_since = None;
        loop {
            if self.taken >= self.bound {
                return Ok(None);
            }
            let segment = self.segments.len() - 1;
            let current = &self.segments[segment];
            if current.held >= current.prefetch {
                // Its consumer cannot be sent more: the rest comes to a new segment.
                let more = self
                    .held
                    .clamp(u64::from(self.prefetch), u64::from(MAX_PREFETCH))
                    .min(self.bound - self.taken);
                self.open_segment(more).await?;
                continue;
            }
            let current = &mut self.segments[segment];
            match tokio::time::timeout(IDLE, current.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    self.taken += 1;
                    let ticket = Ticket {
                        segment,
                        tag: delivery.delivery_tag,
                    };
                    return Ok(Some((ticket, delivery)));
                }
                Ok(Some(Err(error))) => return Err(DlqError::walk(&self.queue, error)),
                Ok(None) => {
                    return Err(DlqError::Cancelled {
                        queue: self.queue.clone(),
                    })
                }
                Err(_idle) => {
                    let (ready, consumers) =
                        super::queue_depth(&self.segments[segment].channel, &self.queue).await?;
                    if ready > 0 {
                        starved_since = None;
                        continue;
                    }
                    // None ready: the rest is on its way to this walk, unless another
                    // consumer took it.
                    let since = *starved_since.get_or_insert_with(tokio::time::Instant::now);
                    let others = consumers as usize > self.segments.len();
                    if others || since.elapsed() >= STARVED {
                        tracing::warn!(
                            queue = self.queue,
                            expected = self.bound,
                            walked = self.taken,
                            "the queue ran out before the walk reached the messages counted at its \
                             start; something else consumed from it"
                        );
                        self.bound = self.taken;
                    }
                }
            }
        }
    }

    /// Leaves a message in the queue: it goes back when the walk ends.
    pub fn hold(&mut self, ticket: Ticket) {
        self.segments[ticket.segment].held += 1;
        self.held += 1;
    }

    /// Removes a message. With `through`, also every message before it on its channel that
    /// is still unacked: one command for many, for a caller that settles in walk order and
    /// holds nothing (see [`Walk::holds_nothing`]).
    pub async fn ack(&mut self, ticket: Ticket, through: bool) -> Result<(), DlqError> {
        self.segments[ticket.segment]
            .channel
            .basic_ack(ticket.tag, BasicAckOptions { multiple: through })
            .await
            .map_err(|error| DlqError::walk(&self.queue, error))
    }

    /// True when the walk holds no message of the ticket's segment.
    pub fn holds_nothing(&self, ticket: Ticket) -> bool {
        self.segments[ticket.segment].held == 0
    }

    /// Ends the walk: the messages held go back to the queue, in order.
    pub async fn finish(mut self) -> Result<(), DlqError> {
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        let mut failure = None;
        for segment in std::mem::take(&mut self.segments) {
            if let Err(error) = self.close(segment, deadline).await {
                failure.get_or_insert(error);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    async fn close(
        &self,
        segment: Segment,
        deadline: tokio::time::Instant,
    ) -> Result<(), DlqError> {
        let channel = &segment.channel;
        if !channel.status().connected() {
            // The broker gives back everything unacked of a closed channel by itself.
            return Ok(());
        }
        let broken = |error| DlqError::walk(&self.queue, error);
        let (_, with_ours) = super::queue_depth(channel, &self.queue).await?;
        channel
            .close(200, "walk done".into())
            .await
            .map_err(broken)?;
        // The broker removes the consumer and takes its messages back in one step: once the
        // queue no longer counts it, this stretch is back, and the next may follow.
        let waiting = self.connection.create_channel().await?;
        while tokio::time::Instant::now() < deadline {
            let (_, consumers) = super::queue_depth(&waiting, &self.queue).await?;
            // Another consumer may come meanwhile: then only the deadline ends the wait.
            if consumers < with_ours {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = waiting.close(200, "waited".into()).await;
        Ok(())
    }

    async fn open_segment(&mut self, prefetch: u64) -> Result<(), DlqError> {
        let prefetch = prefetch.clamp(1, u64::from(u16::MAX)) as u16;
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("listrak-worker-dlq-{}", self.segments.len()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.segments.push(Segment {
            channel,
            consumer,
            prefetch: u64::from(prefetch),
            held: 0,
        });
        Ok(())
    }
}
