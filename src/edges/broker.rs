//! The broker: connection, queue topology, publishing with confirms, and message headers.

use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpSettings;
use crate::edges::listrak::install_crypto_provider;
use crate::edges::telemetry::{Metrics, QueueRole};
use crate::edges::tls::BrokerTls;

pub use crate::config::CONFIRM_TIMEOUT;
pub use crate::stages::headers::*;

/// The safety net against a message that crashes the worker every time it is delivered.
pub const DELIVERY_LIMIT: i64 = 20;

impl Topology {
    /// Declares everything; declaring again with the same arguments changes nothing.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
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

        let queue_options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), string("quorum"));
        channel
            .queue_declare(self.dead.as_str().into(), queue_options, dead_args)
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
            .queue_declare(self.queue.as_str().into(), queue_options, main_args)
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

        let mut applied_args = FieldTable::default();
        applied_args.insert("x-queue-type".into(), string("stream"));
        applied_args.insert(
            "x-max-age".into(),
            string(&format!("{}s", self.applied_max_age.as_secs().max(1))),
        );
        applied_args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.applied_max_bytes).unwrap_or(i64::MAX)),
        );
        channel
            .queue_declare(self.applied.as_str().into(), queue_options, applied_args)
            .await?;

        for (name, delay) in &self.retries {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            // Expired messages go straight back to the main queue through the default exchange.
            args.insert("x-dead-letter-exchange".into(), string(""));
            args.insert("x-dead-letter-routing-key".into(), string(&self.queue));
            channel
                .queue_declare(name.as_str().into(), queue_options, args)
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange (for the demo and tests, never for a deployment).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let mut queues = vec![self.queue.clone(), self.dead.clone(), self.applied.clone()];
        queues.extend(self.retries.iter().map(|(name, _)| name.clone()));
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

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Opens a connection to the configured broker, with its TLS settings for `amqps://`, named
/// so operators can tell it apart in RabbitMQ.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    install_crypto_provider();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = amqp
        .tls
        .as_ref()
        .map(BrokerTls::lapin_config)
        .unwrap_or_default();
    Connection::connect_with_config(
        amqp.url.expose(),
        properties,
        tls,
        lapin::runtime::default_runtime()?,
    )
    .await
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
        tokio::time::sleep(QUEUE_POLL).await;
    }
}
