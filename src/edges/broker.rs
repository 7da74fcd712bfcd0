//! The broker: connection, queue topology, publishing with confirms, and message headers.

use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpSettings;
use crate::config::BrokerTls;
use crate::edges::listrak::install_crypto_provider;
use crate::edges::telemetry::{Metrics, QueueRole};

pub use crate::config::CONFIRM_TIMEOUT;
pub use crate::stages::headers::*;

/// The safety net against a message that crashes the worker every time it is delivered.
pub const DELIVERY_LIMIT: i64 = 20;

impl Topology {
    /// Declares everything on channels of its own; declaring again with the same arguments
    /// changes nothing. What the worker consumes from and settles to (the exchanges, the main
    /// and dead-letter queues) must be declared, and a refusal of their arguments is an error
    /// ([`TopologyMismatch::from_declare`] reads it). A retry queue the broker cannot declare
    /// now (its node is down, say) is only logged: the main queue is still consumed on the
    /// nodes that are up, and a copy the retry queue cannot take is published again later.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        self.declare_core(&channel).await?;
        let mut channel = self.declare_applied_log(connection, channel).await?;
        for (name, delay) in &self.retries {
            match declare_retry_queue(&channel, name, &self.queue, *delay).await {
                Ok(()) => {}
                Err(error) if refused_arguments(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(queue = %name, %error, "cannot declare this retry queue now; \
                        consuming goes on, and copies for it are published again later");
                    channel = connection.create_channel().await?;
                }
            }
        }
        if let Some(readback) = &self.readback {
            let declared = async {
                let mut due_args = FieldTable::default();
                due_args.insert("x-queue-type".into(), string("quorum"));
                channel
                    .queue_declare(readback.due.as_str().into(), DURABLE, due_args)
                    .await?;
                declare_retry_queue(&channel, &readback.waiting, &readback.due, readback.after)
                    .await
            };
            match declared.await {
                Ok(()) => {}
                Err(error) if refused_arguments(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(queue = %readback.waiting, %error, "cannot declare the \
                        read-back queues now; read-backs wait in memory until they can");
                    channel = connection.create_channel().await?;
                }
            }
        }
        bounded(channel.close(200, "declared".into())).await;
        Ok(())
    }

    async fn declare_core(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;

        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), string("quorum"));
        channel
            .queue_declare(self.dead.as_str().into(), DURABLE, dead_args)
            .await?;
        channel
            .queue_bind(
                self.dead.as_str().into(),
                self.dead.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut main_args = FieldTable::default();
        main_args.insert("x-queue-type".into(), string("quorum"));
        main_args.insert("x-dead-letter-exchange".into(), string(&self.dead));
        main_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        main_args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        main_args.insert("x-overflow".into(), string("reject-publish"));
        if self.single_active_consumer {
            main_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        channel
            .queue_declare(self.queue.as_str().into(), DURABLE, main_args)
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// The applied log, replicated to up to [`APPLIED_LOG_REPLICAS`] nodes. RabbitMQ counts
    /// `x-initial-cluster-size` among the arguments a declaration must repeat, and a stream
    /// declared by an earlier release has none: that one is declared as it is (its replicas
    /// are the operator's to add), on a new channel, since the refusal closed the first.
    async fn declare_applied_log(
        &self,
        connection: &Connection,
        channel: Channel,
    ) -> lapin::Result<Channel> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("stream"));
        args.insert(
            "x-max-age".into(),
            string(&format!("{}s", self.applied_max_age.as_secs().max(1))),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.applied_max_bytes).unwrap_or(i64::MAX)),
        );
        let mut replicated = args.clone();
        replicated.insert(
            "x-initial-cluster-size".into(),
            AMQPValue::LongLongInt(APPLIED_LOG_REPLICAS),
        );
        let refusal = match channel
            .queue_declare(self.applied.as_str().into(), DURABLE, replicated)
            .await
        {
            Ok(_) => return Ok(channel),
            Err(error) => error,
        };
        let declared_without_replicas =
            refused_arguments(&refusal) && refusal.to_string().contains("x-initial-cluster-size");
        if !declared_without_replicas {
            return Err(refusal);
        }
        tracing::info!(
            stream = %self.applied,
            "the applied log was declared by an earlier release without a replica count; \
             keeping it as it is (see deploy/README.md to replicate it)"
        );
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(self.applied.as_str().into(), DURABLE, args)
            .await?;
        Ok(channel)
    }

    /// Deletes every queue and exchange (for the demo and tests, never for a deployment).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        use lapin::options::ExchangeDeleteOptions;
        let mut queues = vec![self.queue.clone(), self.dead.clone(), self.applied.clone()];
        queues.extend(self.retries.iter().map(|(name, _)| name.clone()));
        if let Some(readback) = &self.readback {
            queues.extend([readback.waiting.clone(), readback.due.clone()]);
        }
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [&self.exchange, &self.dead] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// How many nodes the applied log is replicated to, at most (RabbitMQ takes fewer on a
/// smaller cluster): a stream survives the loss of a minority of its replicas.
const APPLIED_LOG_REPLICAS: i64 = 3;

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// A retry queue: a quorum queue (replicated, so what waits in it survives a node's loss)
/// whose messages expire after `delay` straight back into the main queue, through the
/// default exchange. At least once: RabbitMQ moves an expired message only once the main
/// queue confirmed it, which needs `x-overflow` reject-publish.
async fn declare_retry_queue(
    channel: &Channel,
    name: &str,
    main: &str,
    delay: Duration,
) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
    );
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(main));
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
    channel
        .queue_declare(name.into(), DURABLE, args)
        .await
        .map(|_| ())
}

/// RabbitMQ refused a declaration's arguments (PRECONDITION_FAILED).
fn refused_arguments(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(refusal) if refusal.get_id() == PRECONDITION_FAILED
    )
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Opens a connection to the first of the configured nodes that answers (see
/// [`connect_from`]), for the commands: the node it reached does not matter to them.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    connect_from(amqp, name, 0)
        .await
        .map(|(connection, _)| connection)
}

/// Opens a connection to one of the configured nodes, with the TLS settings for `amqps://`,
/// named so operators can tell it apart in RabbitMQ: the node at `start` first, then the
/// others in turn, each once. Answers the connection and the index of the node it reached;
/// when none answers, the last node's error. Each attempt is bounded by
/// [`BROKER_CALL_TIMEOUT`], so a node that does not answer at all cannot keep the others from
/// being tried.
pub async fn connect_from(
    amqp: &AmqpSettings,
    name: &str,
    start: usize,
) -> lapin::Result<(Connection, usize)> {
    install_crypto_provider();
    let urls = amqp.urls.all();
    let mut last_error = None;
    for step in 0..urls.len() {
        let index = (start + step) % urls.len();
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let tls = amqp
            .tls
            .as_ref()
            .map(BrokerTls::lapin_config)
            .unwrap_or_default();
        let attempt = Connection::connect_with_config(
            urls[index].expose(),
            properties,
            tls,
            lapin::runtime::default_runtime()?,
        );
        let outcome = match tokio::time::timeout(BROKER_CALL_TIMEOUT, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {BROKER_CALL_TIMEOUT:?}"),
            )
            .into()),
        };
        match outcome {
            Ok(connection) => return Ok((connection, index)),
            Err(error) => {
                if urls.len() > 1 {
                    let node = amqp.urls.node(index);
                    tracing::warn!(%node, %error, "cannot reach this broker node; trying the next");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one broker URL"))
}

/// Opens a connection from a URL alone (system roots for `amqps://`), for tools that take
/// no configuration file.
pub async fn connect_url(url: &str, name: &str) -> lapin::Result<Connection> {
    install_crypto_provider();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_with_config(
        url,
        properties,
        Default::default(),
        lapin::runtime::default_runtime()?,
    )
    .await
}

/// The broker holds a queue or exchange of ours declared with other arguments than the
/// configuration asks for (RabbitMQ's PRECONDITION_FAILED). RabbitMQ never changes the
/// arguments of an existing queue, so trying again cannot help: say what to do instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TopologyMismatch(String);

impl TopologyMismatch {
    /// Reads a failed [`Topology::declare`]: `Some` when the broker refused the arguments.
    pub fn from_declare(error: &lapin::Error, topology: &Topology) -> Option<Self> {
        let lapin::ErrorKind::ProtocolError(refusal) = error.kind() else {
            return None;
        };
        if refusal.get_id() != PRECONDITION_FAILED {
            return None;
        }
        let said = refusal.get_message().as_str();
        let message = if said.contains("x-max-age") || said.contains("x-max-length-bytes") {
            format!(
                "the applied log {:?} exists with another retention than applied_log.max_age \
                 and applied_log.max_bytes ask for, and RabbitMQ cannot change the arguments of \
                 an existing stream: set applied_log.max_age and applied_log.max_bytes to the \
                 stream's, or delete the stream (the guard then starts empty) (RabbitMQ: {said})",
                topology.applied,
            )
        } else if said.contains("x-single-active-consumer") {
            let wanted = topology.single_active_consumer;
            format!(
                "the queue {:?} exists {} a single active consumer, but \
                 amqp.single_active_consumer = {wanted}, and RabbitMQ cannot change the arguments \
                 of an existing queue: set amqp.single_active_consumer = {} to match the queue, or \
                 recreate the queue (move its messages elsewhere, delete it, and start the worker, \
                 which declares it again) (RabbitMQ: {said})",
                topology.queue,
                if wanted { "without" } else { "with" },
                !wanted,
            )
        } else {
            format!(
                "a queue or exchange named after amqp.queue or amqp.exchange exists with other \
                 arguments than the worker declares, and RabbitMQ cannot change them: recreate it \
                 (move its messages elsewhere first) or choose other names (RabbitMQ: {said})"
            )
        };
        Some(Self(message))
    }
}

/// The AMQP reply code for "declared with other arguments than the existing one".
const PRECONDITION_FAILED: u16 = 406;

/// Why a publish did not reach a durable queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    #[error("the message was unroutable: no queue is bound for it")]
    Unroutable,
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

/// A channel in confirm mode: a publish returns only once the broker holds the message.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn new(connection: &Connection) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's confirm (bounded by [`CONFIRM_TIMEOUT`]).
    /// `mandatory` so that a message no queue takes is reported, not silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self.start(exchange, routing_key, body, properties).await?;
        wait_confirm(confirm).await
    }

    /// Sends without waiting; await the returned confirm with [`wait_confirm`].
    pub async fn start(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, PublishError> {
        Ok(self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?)
    }
}

/// A queue's ready messages and its consumers, asked with a passive declare: the queue must
/// exist (RabbitMQ closes the channel with 404 otherwise), and nothing is created.
pub async fn queue_counts(channel: &Channel, queue: &str) -> lapin::Result<(u32, u32)> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}

pub async fn wait_confirm(confirm: lapin::PublisherConfirm) -> Result<(), PublishError> {
    let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))??;
    if confirmation.is_nack() {
        return Err(PublishError::Nacked);
    }
    if confirmation.take_message().is_some() {
        return Err(PublishError::Unroutable);
    }
    Ok(())
}

/// Bound on one connect, cancel or close, so a broker that stopped answering cannot hold up
/// a reconnection or a shutdown.
pub const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn bounded<T>(call: impl Future<Output = lapin::Result<T>>) {
    match tokio::time::timeout(BROKER_CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::debug!(%error, "broker call failed while closing"),
        Err(_) => {
            tracing::warn!("the broker did not answer within {BROKER_CALL_TIMEOUT:?}; going on")
        }
    }
}

/// Deletes the classic retry queues an earlier release declared (see
/// [`classic_retry_queue_name`]) once they are empty. What waits in them still expires into
/// the main queue by itself, so a queue that holds messages is left alone: RabbitMQ refuses
/// the deletion atomically (`if-empty`). Deleting a queue that does not exist succeeds, so
/// the usual case (no such queue) costs one round trip per step and logs nothing. Each is
/// asked on a channel of its own, since a refusal closes the channel that asked. Bounded by
/// [`BROKER_CALL_TIMEOUT`] in all; a failure is only logged, and tried again next session.
pub async fn retire_classic_retry_queues(connection: &Connection, topology: &Topology) {
    let retire = async {
        for (_, delay) in &topology.retries {
            let name = classic_retry_queue_name(&topology.queue, *delay);
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            let if_empty = QueueDeleteOptions {
                if_empty: true,
                if_unused: true,
                ..QueueDeleteOptions::default()
            };
            match channel.queue_delete(name.as_str().into(), if_empty).await {
                Ok(_) => {
                    tracing::debug!(queue = %name, "no classic retry queue of an earlier release");
                    bounded(channel.close(200, "checked".into())).await;
                }
                Err(error) if refused_arguments(&error) => tracing::info!(
                    queue = %name,
                    "a classic retry queue of an earlier release still holds messages: they \
                     return to the main queue as their delay expires, and the queue is deleted \
                     at a later start once empty"
                ),
                Err(error) => tracing::warn!(queue = %name, %error,
                    "cannot delete a classic retry queue of an earlier release; its messages \
                     return to the main queue once its node is back"),
            }
        }
    };
    if tokio::time::timeout(BROKER_CALL_TIMEOUT, retire)
        .await
        .is_err()
    {
        tracing::debug!("looking for classic retry queues took too long; trying next session");
    }
}

/// How often the queue depths are read.
const QUEUE_POLL: Duration = Duration::from_secs(10);

/// Polls the depth of the main, retry and dead-letter queues into `listrak_queue_messages`.
pub async fn poll_queue_depths(channel: Channel, topology: Topology, metrics: Metrics) {
    let depth = |name: &str| {
        let channel = channel.clone();
        let name = name.to_owned();
        async move { queue_counts(&channel, &name).await.map(|(ready, _)| ready) }
    };
    loop {
        if let Ok(main) = depth(&topology.queue).await {
            metrics.queue_depth(QueueRole::Main, main);
        }
        if let Ok(dead) = depth(&topology.dead).await {
            metrics.queue_depth(QueueRole::Dead, dead);
        }
        let mut retry = 0;
        for (name, _) in &topology.retries {
            retry += depth(name).await.unwrap_or(0);
        }
        metrics.queue_depth(QueueRole::Retry, retry);
        if let Some(readback) = &topology.readback {
            let waiting = depth(&readback.waiting).await.unwrap_or(0);
            let due = depth(&readback.due).await.unwrap_or(0);
            metrics.reconcile_pending(waiting + due);
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
}
