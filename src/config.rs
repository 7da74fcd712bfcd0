//! Configuration: the TOML file and the environment, read once into validated settings.
//!
//! Everything is checked here, at start, so that nothing downstream re-checks or re-parses
//! it: durations are `Duration`s, counts that must not be zero are `NonZero`, ids are the
//! model's newtypes, JSON paths are parsed. Every refusal names the key it is about.
//!
//! The file is walked by hand (as a `toml::Table`) rather than deserialized with serde:
//! that is what lets every error name the full key path (`mappings[2].profile_fields."abc"`),
//! including unknown keys, and keep secrets out of error messages.
//!
//! The parts:
//! - `defaults`: every default value and limit.
//! - `document`: the walk over the table, which names every key and type it refuses.
//! - `environment`: the variables that override the file.
//! - `secret`: values that are never printed; `urls`: what a URL setting must look like.
//! - `sections`: one reader per table; `broker_urls` for `amqp.url` (one node or several),
//!   `broker_tls` for `[amqp.tls]` and `broker_tls_files` for the files it names.
//! - `mappings`: `[[mappings]]`, into the rules [`crate::stages::mapping`] defines.
//! - `print`: the effective configuration as TOML, secrets redacted (what `check` shows).

mod broker_tls;
mod broker_tls_files;
mod broker_urls;
mod defaults;
mod document;
mod environment;
mod mappings;
mod print;
mod secret;
mod sections;
#[cfg(test)]
mod tests;
mod urls;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::stages::mapping::Mapping;
pub use defaults::CONFIRM_TIMEOUT;
use defaults::MAX_IN_PROCESS;
use document::Node;
use mappings::mappings;
use sections::{
    amqp_settings, applied_log_settings, batch_settings, http_settings, ingest_settings,
    listrak_settings, reconcile_settings, retry_settings, shutdown_settings, superseded_settings,
};

pub use broker_tls_files::{BrokerTls, ClientIdentity, IdentityError, PemFile};
pub use broker_urls::BrokerUrls;
pub use defaults::{DEFAULT_AMQP_URL, DEFAULT_RECONCILE_AFTER, HELD_MESSAGE_BYTES};
pub use environment::{
    ENV_AMQP_URL, ENV_API_URL, ENV_AUTH_URL, ENV_CLIENT_ID, ENV_CLIENT_SECRET, ENV_INGEST_SECRET,
    ENV_INGEST_TOKEN,
};
pub(crate) use print::toml_str;
pub use secret::Secret;

use crate::stages::headers::{ReadBackQueues, Topology};

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub listrak: ListrakSettings,
    pub batch: BatchSettings,
    pub retry: RetrySettings,
    pub http: HttpSettings,
    pub shutdown: ShutdownSettings,
    pub superseded: SupersededSettings,
    pub applied_log: AppliedLogSettings,
    pub ingest: IngestSettings,
    pub reconcile: ReconcileSettings,
    /// In file order; every one that matches an event produces an update.
    pub mappings: Vec<Mapping>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpSettings {
    /// The broker, or several nodes of one cluster tried in turn; secrets, because they
    /// usually carry the broker password.
    pub urls: BrokerUrls,
    pub exchange: String,
    /// The main queue; the retry and dead-letter queues are named after it.
    pub queue: String,
    /// An explicit window of unacknowledged messages; at least `batch.max_contacts`, so
    /// that a full batch can be in hand at once. Without it the window follows
    /// `memory_budget` (see `window`).
    pub prefetch: Option<u16>,
    /// Bytes the messages in hand may take, which sizes the window when `prefetch` is not
    /// set. Defaults to fit a 128 MiB container (or the container's own memory limit).
    pub memory_budget: u64,
    /// Declares the main queue with `x-single-active-consumer`: one replica consumes at a
    /// time, the others stand by, and updates reach Listrak in the order of one worker.
    pub single_active_consumer: bool,
    /// `[amqp.tls]`, only with an `amqps://` URL; without it `amqps://` verifies the broker
    /// against the system roots and presents no client certificate.
    pub tls: Option<BrokerTls>,
}

impl AmqpSettings {
    /// The window of unacknowledged messages (`basic.qos`): `prefetch` if set, else as many
    /// messages as the memory budget holds, never fewer than one full batch.
    pub fn window(&self, max_contacts: usize) -> u16 {
        if let Some(prefetch) = self.prefetch {
            return prefetch;
        }
        let fits = self.memory_budget / HELD_MESSAGE_BYTES;
        let floor = u64::try_from(max_contacts).unwrap_or(u64::MAX);
        u16::try_from(fits.max(floor)).unwrap_or(u16::MAX)
    }

    /// The broker URLs with their passwords replaced, separated by commas, for logs.
    pub fn redacted_url(&self) -> String {
        self.urls.redacted().join(",")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListrakSettings {
    pub client_id: String,
    pub client_secret: Secret,
    /// Without a trailing slash, so that paths are appended as `{api_url}/List/...`.
    pub api_url: String,
    pub auth_url: String,
    pub request_timeout: Duration,
    /// The ceiling of the adaptive request concurrency.
    pub max_concurrency: NonZeroUsize,
    /// Check every mapping against the account's lists and fields before consuming, and
    /// refuse to start on a problem (as `check --listrak` does).
    pub verify_at_start: bool,
    /// The most profile fields `create = true` creates per list in 24 hours.
    pub field_creation_budget: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_contacts: NonZeroUsize,
    /// The JSON body size of one request; at least 1024.
    pub max_bytes: NonZeroUsize,
    /// How long a partial batch lingers before it is sent.
    pub max_wait: Duration,
    /// How far ahead of this worker's clock an event time is still trusted for last write
    /// wins; a later one is replaced by the time the message arrived.
    pub clock_skew: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// One delayed retry queue per step; never empty, no step is zero.
    pub schedule: Vec<Duration>,
    /// Past this age (since the first failure) a message is dead-lettered as exhausted.
    pub max_age: Duration,
    /// How long a batch is retried in process before its messages move to the retry
    /// queues; below 25 minutes because RabbitMQ's consumer timeout is 30. Zero sends
    /// them to the retry queues at the first systemic failure.
    pub in_process: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
}

/// `[ingest]`: `listrak-worker ingest`, the endpoint Segment's Webhooks destination posts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    /// Larger bodies are refused with 413.
    pub max_body: usize,
    /// Segment's shared secret (`LISTRAK_INGEST_SECRET`): when set, every request must carry
    /// the body's HMAC-SHA1 in `X-Signature`.
    pub shared_secret: Option<Secret>,
    /// `LISTRAK_INGEST_TOKEN`: when set, every request must carry `Authorization: Bearer`.
    pub bearer_token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownSettings {
    /// How long shutdown waits for batched updates to be answered.
    pub grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupersededSettings {
    /// How many (list, contact, field) newest-applied times are remembered; 0 remembers none.
    pub capacity: usize,
}

/// The applied log: a RabbitMQ stream of what Listrak accepted, that every worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLogSettings {
    /// The stream's `x-max-age`: how far back the log, and so the guard, reaches.
    pub max_age: Duration,
    /// The stream's `x-max-length-bytes`.
    pub max_bytes: u64,
    /// How many keys with an older copy outstanding the guard watches at most.
    pub watch_capacity: usize,
}

/// Read-backs: keys updated more than once within `window` are read back from Listrak
/// `after` their last update and repaired when Listrak holds an older value.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileSettings {
    pub enabled: bool,
    /// How long after a key's last update it is read back: time for Listrak's imports to
    /// complete.
    pub after: Duration,
    /// Two updates of a key applied within this long of each other put it at risk.
    pub window: Duration,
    /// The most contacts one worker reads back per second.
    pub max_read_rate: f64,
}

/// Why the configuration was refused. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Only the position and toml's description: the offending line is not quoted, since
    /// it may be the one holding the client secret.
    #[error("the configuration is not valid TOML: {message}")]
    Syntax { message: String },
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Settings {
    /// Reads and validates the file at `path` (or only the defaults and the environment
    /// when there is none), with `env` looking up the override variables.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        Self::from_toml(&read(path)?, env)
    }

    /// As [`Settings::load`], but a file without `[[mappings]]` is accepted: the `listrak`
    /// commands only need the credentials, and help write the first mappings.
    pub fn load_without_mappings(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        Self::parse(&read(path)?, env, MappingsNeeded::Optional)
    }

    /// As [`Settings::load`], for the commands that only talk to the broker (`ingest`):
    /// neither `[[mappings]]` nor the Listrak credentials are needed.
    pub fn load_for_broker(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        Self::parse(&read(path)?, env, MappingsNeeded::Neither)
    }

    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        Self::parse(text, env, MappingsNeeded::Required)
    }

    fn parse(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        needed: MappingsNeeded,
    ) -> Result<Settings, ConfigError> {
        let table: toml::Table = text.parse().map_err(|error| syntax_error(text, &error))?;
        // Surrounding whitespace in an environment value is an accident (a trailing
        // newline from a secret file), and an empty value means "not set".
        let env = |name: &str| {
            env(name)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        let root = Node::root(&table);
        root.only(&[
            "amqp",
            "listrak",
            "batch",
            "retry",
            "http",
            "shutdown",
            "superseded",
            "applied_log",
            "ingest",
            "reconcile",
            "mappings",
        ])?;
        let amqp_node = root.table("amqp")?;
        let amqp = amqp_settings(&amqp_node, &env)?;
        let credentials = !matches!(needed, MappingsNeeded::Neither);
        let listrak = listrak_settings(&root.table("listrak")?, &env, credentials)?;
        let batch_node = root.table("batch")?;
        let batch = batch_settings(&batch_node)?;
        let retry = retry_settings(&root.table("retry")?)?;
        let http = http_settings(&root.table("http")?)?;
        let shutdown = shutdown_settings(&root.table("shutdown")?)?;
        let superseded = superseded_settings(&root.table("superseded")?)?;
        let applied_log = applied_log_settings(&root.table("applied_log")?)?;
        let ingest = ingest_settings(&root.table("ingest")?, &env)?;
        let reconcile = reconcile_settings(&root.table("reconcile")?)?;
        let mappings = match (needed, root.get("mappings")) {
            (MappingsNeeded::Optional | MappingsNeeded::Neither, None) => Vec::new(),
            _ => mappings(&root)?,
        };

        // A message waits for its batch, then for in-process retries, then for the answer
        // of the last request it started, and for a publisher confirm, all before its ack.
        let hold = batch.max_wait + retry.in_process + listrak.request_timeout + CONFIRM_TIMEOUT;
        if hold >= MAX_IN_PROCESS {
            let parts = [
                ("batch.max_wait", batch.max_wait),
                ("retry.in_process", retry.in_process),
                ("listrak.request_timeout", listrak.request_timeout),
            ];
            let (largest, _) = parts
                .iter()
                .max_by_key(|(_, duration)| *duration)
                .expect("three parts");
            let listed: Vec<String> = parts
                .iter()
                .map(|(key, duration)| format!("{key} = {}", humantime::format_duration(*duration)))
                .collect();
            return Err(invalid(
                (*largest).to_owned(),
                format!(
                    "makes a message's hold time too long: {} and a publisher confirm ({}s) add \
                     up to {}, and they must stay under 25m, since RabbitMQ gives up on a \
                     consumer that holds a message for 30m; shorten one of them",
                    listed.join(", "),
                    CONFIRM_TIMEOUT.as_secs(),
                    humantime::format_duration(hold)
                ),
            ));
        }
        if let Some(prefetch) = amqp.prefetch {
            if usize::from(prefetch) < batch.max_contacts.get() {
                return Err(invalid(
                    amqp_node.key("prefetch"),
                    format!(
                        "is {prefetch}, smaller than batch.max_contacts ({}): the prefetch must \
                         hold at least one full batch",
                        batch.max_contacts
                    ),
                ));
            }
        }

        Ok(Settings {
            amqp,
            listrak,
            batch,
            retry,
            http,
            shutdown,
            superseded,
            applied_log,
            ingest,
            reconcile,
            mappings,
        })
    }
}

/// The topology of a configuration is built here, where the settings are known, so that the
/// stages need not know the configuration.
impl Topology {
    /// The topology `settings` describe: names, retry steps, and whether the main queue has
    /// a single active consumer.
    pub fn of(settings: &Settings) -> Self {
        Self {
            single_active_consumer: settings.amqp.single_active_consumer,
            applied_max_age: settings.applied_log.max_age,
            applied_max_bytes: settings.applied_log.max_bytes,
            readback: settings
                .reconcile
                .enabled
                .then(|| ReadBackQueues::of(&settings.amqp.queue, settings.reconcile.after)),
            ..Self::new(
                &settings.amqp.exchange,
                &settings.amqp.queue,
                &settings.retry.schedule,
            )
        }
    }
}

/// Whether a configuration without `[[mappings]]` is complete.
#[derive(Clone, Copy)]
enum MappingsNeeded {
    Required,
    Optional,
    /// Neither mappings nor the Listrak credentials: a command that only publishes.
    Neither,
}

fn read(path: Option<&Path>) -> Result<String, ConfigError> {
    match path {
        Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
        None => Ok(String::new()),
    }
}

fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let description = error.message().trim_end();
    let message = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {description}")
        }
        None => description.to_owned(),
    };
    ConfigError::Syntax { message }
}
