//! Configuration: the TOML file and the environment, read once into validated settings.
//!
//! Everything is checked here, at start, so that nothing downstream re-checks or re-parses
//! it: durations are `Duration`s, counts that must not be zero are `NonZero`, ids are the
//! model's newtypes, JSON paths are parsed. Every refusal names the key it is about.
//!
//! The file is walked by hand (as a `toml::Table`) rather than deserialized with serde:
//! that is what lets every error name the full key path (`mappings[2].profile_fields."abc"`),
//! including unknown keys, and keep secrets out of error messages.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mapping::{
    default_email_paths, AudienceField, FieldRule, JsonPath, ListSource, Mapping, SegmentType,
};
use crate::model::{FieldId, ListId};
use crate::tls::{self, BrokerTls, IdentityError};

/// The broker a fresh RabbitMQ install answers on; the demo, the benchmark and the tests
/// use it too.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_EXCHANGE: &str = "listrak.audience";
const DEFAULT_QUEUE: &str = "listrak.audience";
/// What the held messages may take when no `amqp.memory_budget` is set: the worker then
/// peaks at about 83 MiB, inside a 128 MiB container. In a container with a smaller memory
/// limit, the limit less `PROCESS_HEADROOM`.
const DEFAULT_MEMORY_BUDGET: u64 = 72 << 20;
/// What the process takes besides its messages in hand (measured at about 11 MiB), with
/// room for the allocator and the broker client's buffers.
const PROCESS_HEADROOM: u64 = 48 << 20;
const MIN_MEMORY_BUDGET: i64 = 4 << 20;
const MAX_MEMORY_BUDGET: i64 = 1 << 40;
/// What one message in hand costs, measured with Engage events of about 400 bytes (peak RSS
/// over window sizes): its body, its packed properties, its ledger and ack entries, its
/// contact entry in a batch, and the broker client's buffers while a burst is read.
pub const HELD_MESSAGE_BYTES: u64 = 1536;
const DEFAULT_API_URL: &str = "https://api.listrak.com/email/v1";
const DEFAULT_AUTH_URL: &str = "https://auth.listrak.com/OAuth2/Token";
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONCURRENCY: i64 = 32;
const DEFAULT_MAX_CONTACTS: i64 = 1000;
const DEFAULT_MAX_BYTES: i64 = 1_000_000;
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
const DEFAULT_SCHEDULE: [Duration; 5] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
    Duration::from_secs(4 * 3600),
];
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_IN_PROCESS: Duration = Duration::from_secs(120);
const DEFAULT_LISTEN: &str = "0.0.0.0:9464";
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_SUPERSEDED_CAPACITY: i64 = 200_000;
const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The longest duration any key takes.
const MAX_ANY_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// A retry queue's `x-message-ttl` is a 32-bit count of milliseconds in RabbitMQ.
const MAX_RETRY_STEP: Duration = Duration::from_millis(u32::MAX as u64);
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_GRACE: Duration = Duration::from_secs(3600);
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(7 * 24 * 3600);

/// RabbitMQ cancels a consumer that holds a delivery unacknowledged for 30 minutes (its
/// `consumer_timeout`); retrying in process must end well before that.
const MAX_IN_PROCESS: Duration = Duration::from_secs(25 * 60);
/// A request body must hold at least one contact with a few fields.
const MIN_MAX_BYTES: i64 = 1024;
/// AMQP short strings are at most 255 bytes; the retry and dead queues append to the name.
const MAX_QUEUE_NAME_BYTES: usize = 200;

/// The environment variables that override the file.
pub const ENV_AMQP_URL: &str = "AMQP_URL";
pub const ENV_CLIENT_ID: &str = "LISTRAK_CLIENT_ID";
pub const ENV_CLIENT_SECRET: &str = "LISTRAK_CLIENT_SECRET";
pub const ENV_API_URL: &str = "LISTRAK_API_URL";
pub const ENV_AUTH_URL: &str = "LISTRAK_AUTH_URL";

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub listrak: ListrakSettings,
    pub batch: BatchSettings,
    pub retry: RetrySettings,
    pub http: HttpSettings,
    pub shutdown: ShutdownSettings,
    pub superseded: SupersededSettings,
    /// In file order; every one that matches an event produces an update.
    pub mappings: Vec<Mapping>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpSettings {
    /// A secret because it usually carries the broker password.
    pub url: Secret,
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

    /// The broker URL with its password replaced, for logs and `check`.
    pub fn redacted_url(&self) -> String {
        redact_url_password(self.url.expose())
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

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to the value; call it where the value is sent, nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

const REDACTED: &str = "[redacted]";

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
            "mappings",
        ])?;
        let amqp_node = root.table("amqp")?;
        let amqp = amqp_settings(&amqp_node, &env)?;
        let listrak = listrak_settings(&root.table("listrak")?, &env)?;
        let batch_node = root.table("batch")?;
        let batch = batch_settings(&batch_node)?;
        let retry = retry_settings(&root.table("retry")?)?;
        let http = http_settings(&root.table("http")?)?;
        let shutdown = shutdown_settings(&root.table("shutdown")?)?;
        let superseded = superseded_settings(&root.table("superseded")?)?;
        let mappings = match (needed, root.get("mappings")) {
            (MappingsNeeded::Optional, None) => Vec::new(),
            _ => mappings(&root)?,
        };

        // A message waits for its batch, then for in-process retries, all before its ack.
        if batch.max_wait + retry.in_process >= MAX_IN_PROCESS {
            return Err(invalid(
                batch_node.key("max_wait"),
                format!(
                    "is {}; with retry.in_process ({}) it must stay under 25m, since RabbitMQ gives up on a consumer that holds a message for 30m",
                    humantime::format_duration(batch.max_wait),
                    humantime::format_duration(retry.in_process)
                ),
            ));
        }
        if let Some(prefetch) = amqp.prefetch {
            if usize::from(prefetch) < batch.max_contacts.get() {
                return Err(invalid(
                    amqp_node.key("prefetch"),
                    format!(
                        "is {prefetch}, smaller than batch.max_contacts ({}): the prefetch must hold at least one full batch",
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
            mappings,
        })
    }

    /// The effective configuration as TOML (what `check` prints), with the client secret
    /// and the broker password replaced by `[redacted]`. It loads back as the same settings.
    pub fn redacted_toml(&self) -> String {
        let mut out = String::new();
        let amqp = &self.amqp;
        let _ = writeln!(out, "[amqp]");
        let _ = writeln!(out, "url = {}", toml_str(&amqp.redacted_url()));
        let _ = writeln!(out, "exchange = {}", toml_str(&amqp.exchange));
        let _ = writeln!(out, "queue = {}", toml_str(&amqp.queue));
        if let Some(prefetch) = amqp.prefetch {
            let _ = writeln!(out, "prefetch = {prefetch}");
        }
        let _ = writeln!(out, "memory_budget = {}", amqp.memory_budget);
        let _ = writeln!(
            out,
            "single_active_consumer = {}",
            amqp.single_active_consumer
        );
        if let Some(tls) = &amqp.tls {
            let path = |path: &Path| toml_str(&path.to_string_lossy());
            let _ = writeln!(out, "\n[amqp.tls]");
            if let Some(ca) = &tls.ca {
                let _ = writeln!(out, "ca_file = {}", path(&ca.path));
            }
            if let Some(client) = &tls.client {
                let _ = writeln!(out, "client_cert_file = {}", path(&client.cert_file.path));
                let _ = writeln!(out, "client_key_file = {}", path(&client.key_file));
            }
        }

        let listrak = &self.listrak;
        let _ = writeln!(out, "\n[listrak]");
        let _ = writeln!(out, "client_id = {}", toml_str(&listrak.client_id));
        let _ = writeln!(out, "client_secret = {}", toml_str(REDACTED));
        let _ = writeln!(out, "api_url = {}", toml_str(&listrak.api_url));
        let _ = writeln!(out, "auth_url = {}", toml_str(&listrak.auth_url));
        let _ = writeln!(
            out,
            "request_timeout = {}",
            toml_duration(listrak.request_timeout)
        );
        let _ = writeln!(out, "max_concurrency = {}", listrak.max_concurrency);
        let _ = writeln!(out, "verify_at_start = {}", listrak.verify_at_start);

        let batch = &self.batch;
        let _ = writeln!(out, "\n[batch]");
        let _ = writeln!(out, "max_contacts = {}", batch.max_contacts);
        let _ = writeln!(out, "max_bytes = {}", batch.max_bytes);
        let _ = writeln!(out, "max_wait = {}", toml_duration(batch.max_wait));
        let _ = writeln!(out, "clock_skew = {}", toml_duration(batch.clock_skew));

        let retry = &self.retry;
        let _ = writeln!(out, "\n[retry]");
        let schedule: Vec<String> = retry.schedule.iter().map(|d| toml_duration(*d)).collect();
        let _ = writeln!(out, "schedule = [{}]", schedule.join(", "));
        let _ = writeln!(out, "max_age = {}", toml_duration(retry.max_age));
        let _ = writeln!(out, "in_process = {}", toml_duration(retry.in_process));

        let _ = writeln!(out, "\n[http]");
        let _ = writeln!(out, "listen = {}", toml_str(&self.http.listen.to_string()));

        let _ = writeln!(out, "\n[shutdown]");
        let _ = writeln!(out, "grace = {}", toml_duration(self.shutdown.grace));

        let _ = writeln!(out, "\n[superseded]");
        let _ = writeln!(out, "capacity = {}", self.superseded.capacity);

        for mapping in &self.mappings {
            let _ = writeln!(out, "\n[[mappings]]");
            let _ = writeln!(out, "name = {}", toml_str(&mapping.name));
            if !mapping.events.is_empty() {
                let _ = writeln!(out, "events = {}", toml_array(&mapping.events));
            }
            if !mapping.types.is_empty() {
                let types: Vec<&str> = mapping.types.iter().map(|t| t.as_str()).collect();
                let _ = writeln!(out, "types = {}", toml_array(&types));
            }
            if let Some(key) = &mapping.audience_key {
                let _ = writeln!(out, "audience_key = {}", toml_str(key));
            }
            match &mapping.list {
                ListSource::Id(id) => {
                    let _ = writeln!(out, "list_id = {id}");
                }
                ListSource::Path(path) => {
                    let _ = writeln!(out, "list_id_path = {}", toml_str(path.as_str()));
                }
            }
            let paths: Vec<&str> = mapping.email_paths.iter().map(JsonPath::as_str).collect();
            let _ = writeln!(out, "email_path = {}", toml_array(&paths));
            if let Some(audience) = &mapping.audience_field {
                let _ = writeln!(
                    out,
                    "audience_field = {{ group = {}, create = {} }}",
                    toml_str(&audience.group),
                    audience.create
                );
            } else {
                let fields: Vec<String> = mapping
                    .profile_fields
                    .iter()
                    .map(|(id, rule)| format!("\"{id}\" = {}", toml_str(rule.as_str())))
                    .collect();
                let _ = writeln!(out, "profile_fields = {{ {} }}", fields.join(", "));
            }
        }
        out
    }
}

/// Whether a configuration without `[[mappings]]` is complete.
#[derive(Clone, Copy)]
enum MappingsNeeded {
    Required,
    Optional,
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

/// A table of the file with the key path that leads to it; an absent table reads as empty,
/// so that every key takes its default.
struct Node<'t> {
    path: String,
    table: Option<&'t toml::Table>,
}

impl<'t> Node<'t> {
    fn root(table: &'t toml::Table) -> Self {
        Node {
            path: String::new(),
            table: Some(table),
        }
    }

    /// The full key path of `name` in this table, as it is spelled in error messages.
    fn key(&self, name: &str) -> String {
        let name = if is_bare_key(name) {
            name.to_owned()
        } else {
            toml_str(name)
        };
        self.child_path(&name)
    }

    fn child_path(&self, spelled: &str) -> String {
        if self.path.is_empty() {
            spelled.to_owned()
        } else {
            format!("{}.{spelled}", self.path)
        }
    }

    fn get(&self, name: &str) -> Option<&'t toml::Value> {
        self.table.and_then(|table| table.get(name))
    }

    /// Refuses the first key that is not one of `known` (a typo would otherwise be a
    /// silently ignored setting).
    fn only(&self, known: &[&str]) -> Result<(), ConfigError> {
        let Some(table) = self.table else {
            return Ok(());
        };
        match table.keys().find(|key| !known.contains(&key.as_str())) {
            Some(unknown) => Err(invalid(
                self.key(unknown),
                format!("is not a known key; the keys here are {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn table(&self, name: &str) -> Result<Node<'t>, ConfigError> {
        let table = match self.get(name) {
            None => None,
            Some(toml::Value::Table(table)) => Some(table),
            Some(other) => return Err(wrong_type(self.key(name), "a table", other)),
        };
        Ok(Node {
            path: self.key(name),
            table,
        })
    }

    fn string(&self, name: &str) -> Result<Option<&'t str>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(wrong_type(self.key(name), "a string", other)),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Boolean(value)) => Ok(Some(*value)),
            Some(other) => Err(wrong_type(self.key(name), "true or false", other)),
        }
    }

    /// A file path: a string that is not empty.
    fn path(&self, name: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(name)? {
            Some(text) if text.trim().is_empty() => Err(invalid(
                self.key(name),
                "is empty; leave it out or name a file",
            )),
            other => Ok(other.map(PathBuf::from)),
        }
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Integer(number)) => Ok(Some(*number)),
            Some(other) => Err(wrong_type(self.key(name), "an integer", other)),
        }
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        self.get(name)
            .map(|value| parse_duration(&self.key(name), value))
            .transpose()
    }

    /// A duration that must be longer than zero.
    fn positive_duration(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        let duration = self.duration(name)?.unwrap_or(default);
        if duration.is_zero() {
            return Err(invalid(self.key(name), "must be longer than zero"));
        }
        Ok(duration)
    }

    /// An integer in `min..=max`, or the default.
    fn bounded(&self, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let number = self.integer(name)?.unwrap_or(default);
        if number < min {
            return Err(invalid(
                self.key(name),
                format!("is {number}; it must be at least {min}"),
            ));
        }
        if number > max {
            return Err(invalid(
                self.key(name),
                format!("is {number}; it must be at most {max}"),
            ));
        }
        Ok(number)
    }

    fn array(&self, name: &str) -> Result<Option<&'t Vec<toml::Value>>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(self.key(name), "an array", other)),
        }
    }

    /// An array of strings; each bad element is named by its index.
    fn strings(&self, name: &str) -> Result<Option<Vec<&'t str>>, ConfigError> {
        let Some(items) = self.array(name)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                toml::Value::String(text) => Ok(text.as_str()),
                other => Err(wrong_type(
                    format!("{}[{index}]", self.key(name)),
                    "a string",
                    other,
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Names the expected and the found type, never the value (it may be a secret).
fn wrong_type(key: String, expected: &str, found: &toml::Value) -> ConfigError {
    invalid(
        key,
        format!("expected {expected}, found {}", type_name(found)),
    )
}

fn parse_duration(key: &str, value: &toml::Value) -> Result<Duration, ConfigError> {
    let toml::Value::String(text) = value else {
        return Err(invalid(
            key,
            format!(
                "expected a duration string such as \"30s\", found {}",
                type_name(value)
            ),
        ));
    };
    let duration = humantime::parse_duration(text.trim()).map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not a duration (e.g. \"1s\", \"500ms\")"),
        )
    })?;
    // Every duration is added to a clock somewhere: none may be near what overflows it.
    at_most(key, duration, MAX_ANY_DURATION)
}

/// Refuses a duration longer than `max`, naming the key.
fn at_most(key: &str, duration: Duration, max: Duration) -> Result<Duration, ConfigError> {
    if duration > max {
        return Err(invalid(
            key,
            format!(
                "is {}; it must be at most {}",
                humantime::format_duration(duration),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(duration)
}

/// A value the environment may override: the variable wins over the file.
struct Sourced {
    value: Option<String>,
    variable: &'static str,
    from_env: bool,
}

impl Sourced {
    fn read(
        node: &Node<'_>,
        name: &str,
        variable: &'static str,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Ok(match env(variable) {
            Some(value) => Sourced {
                value: Some(value),
                variable,
                from_env: true,
            },
            None => Sourced {
                value: node.string(name)?.map(str::to_owned),
                variable,
                from_env: false,
            },
        })
    }

    /// Says where a refused value came from, so the operator looks in the right place.
    fn reason(&self, why: &str) -> String {
        if self.from_env {
            format!(
                "{why} (the value comes from the {} environment variable)",
                self.variable
            )
        } else {
            why.to_owned()
        }
    }

    /// A value that has no default: missing or empty is refused, naming both places.
    fn required(self, node: &Node<'_>, name: &str) -> Result<String, ConfigError> {
        match self.value {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(invalid(
                node.key(name),
                format!(
                    "is missing or empty; set it here or in the {} environment variable",
                    self.variable
                ),
            )),
        }
    }

    fn url(
        self,
        node: &Node<'_>,
        name: &str,
        default: &str,
        rule: &UrlRule,
    ) -> Result<String, ConfigError> {
        let url = self.value.clone().unwrap_or_else(|| default.to_owned());
        check_url(&url, rule).map_err(|why| invalid(node.key(name), self.reason(&why)))?;
        Ok(url)
    }
}

/// What a URL setting must look like.
struct UrlRule {
    schemes: &'static [&'static str],
    /// Request paths are appended to it, so it cannot have a query or a fragment.
    base: bool,
}

const AMQP_URL: UrlRule = UrlRule {
    schemes: &["amqp", "amqps"],
    base: false,
};
const ENDPOINT_URL: UrlRule = UrlRule {
    schemes: &["http", "https"],
    base: false,
};
const BASE_URL: UrlRule = UrlRule {
    schemes: &["http", "https"],
    base: true,
};

/// The minimal check the worker needs: a known scheme, a host, a valid port, nothing
/// that cannot be in a URL. The value is not quoted in the reason: it may hold a password.
fn check_url(url: &str, rule: &UrlRule) -> Result<(), String> {
    let schemes = rule.schemes;
    let expected = schemes
        .iter()
        .map(|scheme| format!("{scheme}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("is not a URL: it must start with {expected}"));
    };
    if !schemes
        .iter()
        .any(|known| known.eq_ignore_ascii_case(scheme))
    {
        return Err(format!("must start with {expected}"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed `[` in its host")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or("has junk after its host")?),
            ),
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    if let Some(port) = port {
        if !port.is_empty() && port.parse::<u16>().is_err() {
            return Err("has a port that is not a number from 0 to 65535".to_owned());
        }
    }
    if rule.base && url.contains(['?', '#']) {
        return Err(
            "must not have a query or a fragment: request paths are appended to it".to_owned(),
        );
    }
    Ok(())
}

/// Replaces the password of `scheme://user:password@host/...` with `[redacted]`.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:{REDACTED}@{host}{path}"),
        None => url.to_owned(),
    }
}

fn amqp_settings(
    node: &Node<'_>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<AmqpSettings, ConfigError> {
    node.only(&[
        "url",
        "exchange",
        "queue",
        "prefetch",
        "memory_budget",
        "single_active_consumer",
        "tls",
    ])?;
    let url = Sourced::read(node, "url", ENV_AMQP_URL, env)?;
    let url_from_env = url.from_env;
    let url = url.url(node, "url", DEFAULT_AMQP_URL, &AMQP_URL)?;
    let exchange = amqp_name(node, "exchange", DEFAULT_EXCHANGE)?;
    let queue = amqp_name(node, "queue", DEFAULT_QUEUE)?;
    let prefetch = match node.integer("prefetch")? {
        None => None,
        Some(_) => Some(node.bounded("prefetch", 0, 1, i64::from(u16::MAX))?),
    };
    let memory_budget = match node.integer("memory_budget")? {
        None => default_memory_budget(),
        Some(_) => node.bounded("memory_budget", 0, MIN_MEMORY_BUDGET, MAX_MEMORY_BUDGET)? as u64,
    };
    let single_active_consumer = node.boolean("single_active_consumer")?.unwrap_or(false);
    let tls = broker_tls(&node.table("tls")?, &url, url_from_env)?;
    Ok(AmqpSettings {
        url: Secret(url),
        exchange,
        queue,
        prefetch: prefetch.map(|p| u16::try_from(p).expect("bounded to u16")),
        memory_budget,
        single_active_consumer,
        tls,
    })
}

/// The default budget, or less in a container whose memory limit leaves less room.
fn default_memory_budget() -> u64 {
    match container_memory_limit() {
        Some(limit) => limit
            .saturating_sub(PROCESS_HEADROOM)
            .clamp(MIN_MEMORY_BUDGET as u64, DEFAULT_MEMORY_BUDGET),
        None => DEFAULT_MEMORY_BUDGET,
    }
}

/// The cgroup's memory limit (v2, then v1), if one is set.
fn container_memory_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit.
    .and_then(|text| text.trim().parse::<u64>().ok())
    .filter(|&limit| limit < 1 << 50)
}

/// `[amqp.tls]`: refused with an `amqp://` URL, where it would be ignored and leave the
/// operator believing the connection encrypted. Every file is read and checked now.
fn broker_tls(
    node: &Node<'_>,
    url: &str,
    url_from_env: bool,
) -> Result<Option<BrokerTls>, ConfigError> {
    if node.table.is_none() {
        return Ok(None);
    }
    node.only(&["ca_file", "client_cert_file", "client_key_file"])?;
    let encrypted = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("amqps"));
    if !encrypted {
        let from = if url_from_env {
            format!(" (from the {ENV_AMQP_URL} environment variable)")
        } else {
            String::new()
        };
        return Err(invalid(
            node.path.clone(),
            format!(
                "is set, but amqp.url{from} is amqp://, which is not encrypted: use amqps:// (RabbitMQ listens for TLS on 5671 by default), or remove [amqp.tls]"
            ),
        ));
    }
    let ca = node
        .path("ca_file")?
        .map(|path| tls::read_ca_file(&path).map_err(|why| invalid(node.key("ca_file"), why)))
        .transpose()?;
    let client = match (
        node.path("client_cert_file")?,
        node.path("client_key_file")?,
    ) {
        (Some(cert), Some(key)) => Some(tls::read_client_identity(&cert, &key).map_err(
            |error| match error {
                IdentityError::Cert(why) => invalid(node.key("client_cert_file"), why),
                IdentityError::Key(why) => invalid(node.key("client_key_file"), why),
            },
        )?),
        (Some(_), None) => {
            return Err(invalid(
                node.key("client_key_file"),
                "is missing: client_cert_file needs the private key that goes with it",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                node.key("client_cert_file"),
                "is missing: client_key_file needs the certificate that goes with it",
            ))
        }
        (None, None) => None,
    };
    Ok(Some(BrokerTls { ca, client }))
}

/// An exchange or queue name: not empty (that is the default exchange, or a server-named
/// queue), not in the broker's reserved `amq.` namespace, short enough for the suffixes.
fn amqp_name(node: &Node<'_>, name: &str, default: &str) -> Result<String, ConfigError> {
    let value = node.string(name)?.unwrap_or(default);
    let why = if value.trim().is_empty() {
        Some("must not be empty".to_owned())
    } else if value.starts_with("amq.") {
        Some(format!(
            "{value:?} is in the broker's reserved `amq.` namespace"
        ))
    } else if value.len() > MAX_QUEUE_NAME_BYTES {
        Some(format!(
            "is {} bytes long; at most {MAX_QUEUE_NAME_BYTES}, so that the retry and dead-letter names fit AMQP's 255",
            value.len()
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(node.key(name), why)),
        None => Ok(value.to_owned()),
    }
}

fn listrak_settings(
    node: &Node<'_>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<ListrakSettings, ConfigError> {
    node.only(&[
        "client_id",
        "client_secret",
        "api_url",
        "auth_url",
        "request_timeout",
        "max_concurrency",
        "verify_at_start",
    ])?;
    let client_id =
        Sourced::read(node, "client_id", ENV_CLIENT_ID, env)?.required(node, "client_id")?;
    let client_secret = Sourced::read(node, "client_secret", ENV_CLIENT_SECRET, env)?
        .required(node, "client_secret")?;
    let api_url = Sourced::read(node, "api_url", ENV_API_URL, env)?
        .url(node, "api_url", DEFAULT_API_URL, &BASE_URL)?
        .trim_end_matches('/')
        .to_owned();
    let auth_url = Sourced::read(node, "auth_url", ENV_AUTH_URL, env)?.url(
        node,
        "auth_url",
        DEFAULT_AUTH_URL,
        &ENDPOINT_URL,
    )?;
    let request_timeout = at_most(
        &node.key("request_timeout"),
        node.positive_duration("request_timeout", DEFAULT_REQUEST_TIMEOUT)?,
        MAX_REQUEST_TIMEOUT,
    )?;
    let max_concurrency = node.bounded(
        "max_concurrency",
        DEFAULT_MAX_CONCURRENCY,
        1,
        i64::from(u32::MAX),
    )?;
    let verify_at_start = node.boolean("verify_at_start")?.unwrap_or(false);
    Ok(ListrakSettings {
        client_id,
        client_secret: Secret(client_secret),
        api_url,
        auth_url,
        request_timeout,
        max_concurrency: nonzero(max_concurrency),
        verify_at_start,
    })
}

fn nonzero(number: i64) -> NonZeroUsize {
    usize::try_from(number)
        .ok()
        .and_then(NonZeroUsize::new)
        .expect("bounded to be positive")
}

fn batch_settings(node: &Node<'_>) -> Result<BatchSettings, ConfigError> {
    node.only(&["max_contacts", "max_bytes", "max_wait", "clock_skew"])?;
    let max_contacts =
        node.bounded("max_contacts", DEFAULT_MAX_CONTACTS, 1, i64::from(u16::MAX))?;
    let max_bytes = node.bounded(
        "max_bytes",
        DEFAULT_MAX_BYTES,
        MIN_MAX_BYTES,
        i64::from(u32::MAX),
    )?;
    let max_wait = node.positive_duration("max_wait", DEFAULT_MAX_WAIT)?;
    let clock_skew = node.duration("clock_skew")?.unwrap_or(DEFAULT_CLOCK_SKEW);
    Ok(BatchSettings {
        max_contacts: nonzero(max_contacts),
        max_bytes: nonzero(max_bytes),
        max_wait,
        clock_skew: at_most(&node.key("clock_skew"), clock_skew, MAX_CLOCK_SKEW)?,
    })
}

fn retry_settings(node: &Node<'_>) -> Result<RetrySettings, ConfigError> {
    node.only(&["schedule", "max_age", "in_process"])?;
    let schedule = match node.array("schedule")? {
        None => DEFAULT_SCHEDULE.to_vec(),
        Some(items) if items.is_empty() => {
            return Err(invalid(
                node.key("schedule"),
                "must hold at least one delay, such as [\"10s\", \"1m\"]",
            ))
        }
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let key = format!("{}[{index}]", node.key("schedule"));
                let step = at_most(&key, parse_duration(&key, item)?, MAX_RETRY_STEP)?;
                if step.is_zero() {
                    return Err(invalid(key, "must be longer than zero"));
                }
                Ok(step)
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let max_age = node.positive_duration("max_age", DEFAULT_MAX_AGE)?;
    let in_process = node.duration("in_process")?.unwrap_or(DEFAULT_IN_PROCESS);
    if in_process >= MAX_IN_PROCESS {
        return Err(invalid(
            node.key("in_process"),
            format!(
                "is {}; it must be under 25m, since RabbitMQ gives up on a consumer that holds a message for 30m",
                humantime::format_duration(in_process)
            ),
        ));
    }
    Ok(RetrySettings {
        schedule,
        max_age,
        in_process,
    })
}

fn http_settings(node: &Node<'_>) -> Result<HttpSettings, ConfigError> {
    node.only(&["listen"])?;
    let text = node.string("listen")?.unwrap_or(DEFAULT_LISTEN);
    let listen = text.trim().parse().map_err(|_| {
        invalid(
            node.key("listen"),
            format!("{text:?} is not an address and port such as \"0.0.0.0:9464\""),
        )
    })?;
    Ok(HttpSettings { listen })
}

fn shutdown_settings(node: &Node<'_>) -> Result<ShutdownSettings, ConfigError> {
    node.only(&["grace"])?;
    let grace = node.positive_duration("grace", DEFAULT_GRACE)?;
    Ok(ShutdownSettings {
        grace: at_most(&node.key("grace"), grace, MAX_GRACE)?,
    })
}

fn superseded_settings(node: &Node<'_>) -> Result<SupersededSettings, ConfigError> {
    node.only(&["capacity"])?;
    let capacity = node.bounded(
        "capacity",
        DEFAULT_SUPERSEDED_CAPACITY,
        0,
        i64::from(u32::MAX),
    )?;
    Ok(SupersededSettings {
        capacity: usize::try_from(capacity).expect("bounded to be non-negative"),
    })
}

fn mappings(root: &Node<'_>) -> Result<Vec<Mapping>, ConfigError> {
    let none = || {
        invalid(
            "mappings",
            "no mappings: add at least one [[mappings]] table, or every event would be ignored",
        )
    };
    let tables = match root.get("mappings") {
        None => return Err(none()),
        Some(toml::Value::Array(items)) if items.is_empty() => return Err(none()),
        Some(toml::Value::Array(items)) => items,
        Some(other) => {
            return Err(wrong_type(
                "mappings".to_owned(),
                "an array of tables ([[mappings]])",
                other,
            ))
        }
    };
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut mappings = Vec::with_capacity(tables.len());
    for (index, item) in tables.iter().enumerate() {
        let path = format!("mappings[{index}]");
        let toml::Value::Table(table) = item else {
            return Err(wrong_type(path, "a table", item));
        };
        let node = Node {
            path,
            table: Some(table),
        };
        let mapping = mapping(&node)?;
        if let Some(first) = names.get(&mapping.name) {
            return Err(invalid(
                node.key("name"),
                format!(
                    "{:?} is already the name of mappings[{first}]",
                    mapping.name
                ),
            ));
        }
        names.insert(mapping.name.clone(), index);
        mappings.push(mapping);
    }
    Ok(mappings)
}

fn mapping(node: &Node<'_>) -> Result<Mapping, ConfigError> {
    node.only(&[
        "name",
        "events",
        "types",
        "audience_key",
        "list_id",
        "list_id_path",
        "email_path",
        "profile_fields",
        "audience_field",
    ])?;
    let name = match node.string("name")? {
        Some(name) if !name.trim().is_empty() => name.to_owned(),
        _ => {
            return Err(invalid(
                node.key("name"),
                "is missing or empty; every mapping needs a name for logs and dead letters",
            ))
        }
    };

    let events = node.strings("events")?.unwrap_or_default();
    if let Some(index) = events.iter().position(|event| event.is_empty()) {
        return Err(invalid(
            format!("{}[{index}]", node.key("events")),
            "is empty; an event name matches exactly",
        ));
    }
    let events: Vec<String> = events.into_iter().map(str::to_owned).collect();

    let types = node
        .strings("types")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, text)| match text {
            "track" => Ok(SegmentType::Track),
            "identify" => Ok(SegmentType::Identify),
            other => Err(invalid(
                format!("{}[{index}]", node.key("types")),
                format!("{other:?} is not \"track\" or \"identify\""),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() && types.is_empty() {
        return Err(invalid(
            node.key("events"),
            "the mapping has neither `events` nor `types`, so it would match nothing",
        ));
    }

    let audience_key = match node.string("audience_key")? {
        Some("") => {
            return Err(invalid(
                node.key("audience_key"),
                "is empty; leave it out to take every audience",
            ))
        }
        other => other.map(str::to_owned),
    };

    let list = match (node.get("list_id"), node.string("list_id_path")?) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                node.key("list_id_path"),
                "set either `list_id` or `list_id_path`, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                node.key("list_id"),
                "is missing: set `list_id` or `list_id_path`",
            ))
        }
        (Some(_), None) => {
            let number = node.integer("list_id")?.expect("present");
            let id = ListId::new(number).ok_or_else(|| {
                invalid(
                    node.key("list_id"),
                    format!(
                        "is {number}; a list id is a positive 32-bit integer (1 to 2147483647)"
                    ),
                )
            })?;
            ListSource::Id(id)
        }
        (None, Some(text)) => ListSource::Path(
            JsonPath::parse(text).map_err(|why| invalid(node.key("list_id_path"), why))?,
        ),
    };

    let email_paths = email_paths(node)?;
    let (profile_fields, audience_field) = match node.get("audience_field") {
        None => (profile_fields(node)?, None),
        Some(_) if node.get("profile_fields").is_some() => {
            return Err(invalid(
                node.key("audience_field"),
                "set either `profile_fields` or `audience_field`, not both",
            ))
        }
        Some(_) => (Vec::new(), Some(audience_field(node)?)),
    };

    Ok(Mapping {
        name,
        events,
        types,
        audience_key,
        list,
        email_paths,
        profile_fields,
        audience_field,
    })
}

fn audience_field(node: &Node<'_>) -> Result<AudienceField, ConfigError> {
    let table = node.table("audience_field")?;
    table.only(&["group", "create"])?;
    let group = match table.string("group")? {
        Some(group) if !group.trim().is_empty() => group.to_owned(),
        _ => {
            return Err(invalid(
                table.key("group"),
                "is missing or empty; name the profile field group that holds one Check Box field per audience",
            ))
        }
    };
    let create = table.boolean("create")?.unwrap_or(false);
    Ok(AudienceField { group, create })
}

/// A single path goes first and the defaults follow it; an array is exactly those paths.
fn email_paths(node: &Node<'_>) -> Result<Vec<JsonPath>, ConfigError> {
    let key = node.key("email_path");
    match node.get("email_path") {
        None => Ok(default_email_paths()),
        Some(toml::Value::String(text)) => {
            let first = JsonPath::parse(text).map_err(|why| invalid(&key, why))?;
            let mut paths = vec![first];
            for path in default_email_paths() {
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            Ok(paths)
        }
        Some(toml::Value::Array(items)) => {
            if items.is_empty() {
                return Err(invalid(
                    key,
                    "must hold at least one path; leave it out for the default ones",
                ));
            }
            let mut paths: Vec<JsonPath> = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let item_key = format!("{key}[{index}]");
                let toml::Value::String(text) = item else {
                    return Err(wrong_type(item_key, "a string", item));
                };
                let path = JsonPath::parse(text).map_err(|why| invalid(&item_key, why))?;
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            Ok(paths)
        }
        Some(other) => Err(wrong_type(key, "a string or an array of strings", other)),
    }
}

fn profile_fields(node: &Node<'_>) -> Result<Vec<(FieldId, FieldRule)>, ConfigError> {
    let fields = node.table("profile_fields")?;
    let Some(table) = fields.table.filter(|table| !table.is_empty()) else {
        return Err(invalid(
            node.key("profile_fields"),
            "is missing or empty; map at least one profile field id to a value, as in { \"456\" = \"on\" }",
        ));
    };
    let mut rules = BTreeMap::new();
    for (id_text, value) in table {
        // Field ids are always quoted here, since they look like numbers but are keys.
        let key = fields.child_path(&toml_str(id_text));
        let id = id_text
            .parse::<FieldId>()
            .ok()
            .filter(|id| id.to_string() == *id_text)
            .ok_or_else(|| {
                invalid(
                    &key,
                    "is not a profile field id: a positive 32-bit integer written plainly, such as \"456\"",
                )
            })?;
        let toml::Value::String(text) = value else {
            return Err(wrong_type(key, "a string", value));
        };
        let rule = if text == FieldRule::USE_AUDIENCE_KEY {
            FieldRule::UseAudienceKey
        } else if text.eq_ignore_ascii_case(FieldRule::USE_AUDIENCE_KEY) {
            // Listrak would store the misspelling as the field's value.
            return Err(invalid(
                key,
                format!("{text:?} would be sent as written; did you mean \"useAudienceKey\"?"),
            ));
        } else if text.is_empty() {
            return Err(invalid(
                key,
                "is empty; a field is set to \"on\", \"off\", text, or \"useAudienceKey\"",
            ));
        } else {
            FieldRule::Literal(text.clone())
        };
        rules.insert(id, rule);
    }
    Ok(rules.into_iter().collect())
}

/// A TOML basic string.
pub(crate) fn toml_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_array(items: &[impl AsRef<str>]) -> String {
    let items: Vec<String> = items.iter().map(|item| toml_str(item.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

/// A duration in the largest unit that holds it exactly ("24h", "90s", "250ms"), the way
/// people write them in this file.
fn toml_duration(duration: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return toml_str("0s");
    }
    let (unit, size) = UNITS
        .into_iter()
        .find(|(_, size)| nanos.is_multiple_of(*size))
        .expect("every duration is a whole number of nanoseconds");
    toml_str(&format!("{}{unit}", nanos / size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-do-not-print";
    const AMQP_PASSWORD: &str = "br0ker-pw";

    /// The smallest mapping the configuration accepts; appended after the tables a test sets.
    const MAPPING: &str = r#"
[[mappings]]
name = "vip"
events = ["Audience Entered", "Audience Exited"]
list_id = 12345
profile_fields = { "456" = "useAudienceKey" }
"#;

    /// The credentials come from the environment, as the operator is advised to do.
    fn credentials(name: &str) -> Option<String> {
        match name {
            ENV_CLIENT_ID => Some("client-1".to_owned()),
            ENV_CLIENT_SECRET => Some(SECRET.to_owned()),
            _ => None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    fn accepted(text: &str) -> Settings {
        Settings::from_toml(text, credentials).unwrap_or_else(|error| panic!("{error}"))
    }

    fn refusal(text: &str, env: impl Fn(&str) -> Option<String>) -> (String, String) {
        match Settings::from_toml(text, env) {
            Err(ConfigError::Invalid { key, reason }) => (key, reason),
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    struct Refused {
        behaviour: &'static str,
        toml: &'static str,
        key: &'static str,
        reason_mentions: &'static str,
    }

    fn refused(behaviour: &'static str, toml: &'static str, key: &'static str) -> Refused {
        Refused {
            behaviour,
            toml,
            key,
            reason_mentions: "",
        }
    }

    fn check_refusals(cases: &[Refused], with_mapping: bool) {
        for case in cases {
            let text = if with_mapping {
                format!("{}\n{MAPPING}", case.toml)
            } else {
                case.toml.to_owned()
            };
            let (key, reason) = refusal(&text, credentials);
            assert_eq!(key, case.key, "{}: reason {reason:?}", case.behaviour);
            assert!(
                reason.contains(case.reason_mentions),
                "{}: {reason:?} does not mention {:?}",
                case.behaviour,
                case.reason_mentions
            );
            assert!(
                !reason.contains(SECRET),
                "{}: leaks the secret",
                case.behaviour
            );
        }
    }

    #[test]
    fn every_refused_setting_names_its_key() {
        check_refusals(
            &[
                refused("unknown_top_level_key", "colour = \"blue\"", "colour"),
                refused(
                    "unknown_key_in_a_table",
                    "[amqp]\nprefetchh = 10",
                    "amqp.prefetchh",
                ),
                refused(
                    "unknown_key_needing_quotes",
                    "[batch]\n\"max wait\" = \"1s\"",
                    "batch.\"max wait\"",
                ),
                refused("section_that_is_not_a_table", "amqp = 3", "amqp"),
                Refused {
                    behaviour: "word_instead_of_duration",
                    toml: "[batch]\nmax_wait = \"soon\"",
                    key: "batch.max_wait",
                    reason_mentions: "\"soon\" is not a duration",
                },
                refused(
                    "number_instead_of_duration",
                    "[batch]\nmax_wait = 5",
                    "batch.max_wait",
                ),
                refused(
                    "zero_max_wait",
                    "[batch]\nmax_wait = \"0s\"",
                    "batch.max_wait",
                ),
                refused(
                    "max_wait_that_with_in_process_reaches_the_consumer_timeout",
                    "[batch]\nmax_wait = \"24m\"",
                    "batch.max_wait",
                ),
                refused(
                    "zero_request_timeout",
                    "[listrak]\nrequest_timeout = \"0ms\"",
                    "listrak.request_timeout",
                ),
                refused(
                    "zero_max_contacts",
                    "[batch]\nmax_contacts = 0",
                    "batch.max_contacts",
                ),
                refused(
                    "max_bytes_below_1024",
                    "[batch]\nmax_bytes = 1023",
                    "batch.max_bytes",
                ),
                refused("zero_prefetch", "[amqp]\nprefetch = 0", "amqp.prefetch"),
                refused(
                    "max_wait_beyond_any_clock",
                    "[batch]\nmax_wait = \"18446744073709551615s\"",
                    "batch.max_wait",
                ),
                refused(
                    "grace_over_an_hour",
                    "[shutdown]\ngrace = \"2h\"",
                    "shutdown.grace",
                ),
                refused(
                    "request_timeout_over_ten_minutes",
                    "[listrak]\nrequest_timeout = \"1h\"",
                    "listrak.request_timeout",
                ),
                refused(
                    "retry_step_beyond_a_ttl",
                    "[retry]\nschedule = [\"10s\", \"60d\"]",
                    "retry.schedule[1]",
                ),
                refused(
                    "clock_skew_over_a_week",
                    "[batch]\nclock_skew = \"30d\"",
                    "batch.clock_skew",
                ),
                refused(
                    "memory_budget_below_4_mib",
                    "[amqp]\nmemory_budget = 1000",
                    "amqp.memory_budget",
                ),
                refused(
                    "memory_budget_as_text",
                    "[amqp]\nmemory_budget = \"64MiB\"",
                    "amqp.memory_budget",
                ),
                Refused {
                    behaviour: "prefetch_smaller_than_a_batch",
                    toml: "[amqp]\nprefetch = 500",
                    key: "amqp.prefetch",
                    reason_mentions: "batch.max_contacts",
                },
                refused(
                    "prefetch_over_16_bits",
                    "[amqp]\nprefetch = 70000",
                    "amqp.prefetch",
                ),
                refused(
                    "prefetch_as_text",
                    "[amqp]\nprefetch = \"many\"",
                    "amqp.prefetch",
                ),
                Refused {
                    behaviour: "amqp_url_with_http_scheme",
                    toml: "[amqp]\nurl = \"http://guest:guest@localhost\"",
                    key: "amqp.url",
                    reason_mentions: "amqp:// or amqps://",
                },
                refused(
                    "amqp_url_without_host",
                    "[amqp]\nurl = \"amqp:///vhost\"",
                    "amqp.url",
                ),
                refused(
                    "amqp_url_with_bad_port",
                    "[amqp]\nurl = \"amqp://host:99999\"",
                    "amqp.url",
                ),
                refused("empty_queue_name", "[amqp]\nqueue = \"\"", "amqp.queue"),
                Refused {
                    behaviour: "single_active_consumer_as_text",
                    toml: "[amqp]\nsingle_active_consumer = \"yes\"",
                    key: "amqp.single_active_consumer",
                    reason_mentions: "expected true or false, found a string",
                },
                refused(
                    "reserved_exchange_name",
                    "[amqp]\nexchange = \"amq.topic\"",
                    "amqp.exchange",
                ),
                refused(
                    "api_url_with_ftp_scheme",
                    "[listrak]\napi_url = \"ftp://api.listrak.com\"",
                    "listrak.api_url",
                ),
                refused(
                    "api_url_with_query",
                    "[listrak]\napi_url = \"https://api.listrak.com/v1?x=1\"",
                    "listrak.api_url",
                ),
                refused(
                    "auth_url_that_is_not_a_url",
                    "[listrak]\nauth_url = \"auth.listrak.com\"",
                    "listrak.auth_url",
                ),
                refused(
                    "zero_max_concurrency",
                    "[listrak]\nmax_concurrency = 0",
                    "listrak.max_concurrency",
                ),
                refused(
                    "empty_retry_schedule",
                    "[retry]\nschedule = []",
                    "retry.schedule",
                ),
                refused(
                    "zero_retry_step",
                    "[retry]\nschedule = [\"10s\", \"0s\"]",
                    "retry.schedule[1]",
                ),
                refused(
                    "retry_step_that_is_no_duration",
                    "[retry]\nschedule = [\"10s\", \"later\"]",
                    "retry.schedule[1]",
                ),
                refused("zero_max_age", "[retry]\nmax_age = \"0s\"", "retry.max_age"),
                Refused {
                    behaviour: "in_process_at_25_minutes",
                    toml: "[retry]\nin_process = \"25m\"",
                    key: "retry.in_process",
                    reason_mentions: "30m",
                },
                refused(
                    "listen_without_port",
                    "[http]\nlisten = \"0.0.0.0\"",
                    "http.listen",
                ),
                refused(
                    "grace_that_is_no_duration",
                    "[shutdown]\ngrace = \"forever\"",
                    "shutdown.grace",
                ),
                refused(
                    "negative_superseded_capacity",
                    "[superseded]\ncapacity = -1",
                    "superseded.capacity",
                ),
            ],
            true,
        );
    }

    #[test]
    fn audience_field_mapping_names_a_group_instead_of_fields() {
        let text = "[listrak]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
                    [[mappings]]\nname = \"every-audience\"\nevents = [\"Audience Entered\", \"Audience Exited\"]\n\
                    list_id = 12345\naudience_field = { group = \"Engage Audiences\", create = true }\n";
        let settings = Settings::from_toml(text, |_| None).unwrap();
        let mapping = &settings.mappings[0];
        assert!(mapping.profile_fields.is_empty());
        assert_eq!(
            mapping.audience_field,
            Some(AudienceField {
                group: "Engage Audiences".into(),
                create: true
            })
        );
        let shown = settings.redacted_toml();
        assert!(
            shown.contains("audience_field = { group = \"Engage Audiences\", create = true }"),
            "{shown}"
        );
        let again = Settings::from_toml(&shown, |_| None).unwrap();
        assert_eq!(again.mappings, settings.mappings);
    }

    #[test]
    fn every_refused_mapping_names_its_key() {
        const BASE: &str = "[[mappings]]\nname = \"vip\"\nevents = [\"Audience Entered\"]\n";
        check_refusals(
            &[
                refused("no_mappings", "", "mappings"),
                refused("mappings_as_a_single_table", "[mappings]\nname = \"vip\"", "mappings"),
                refused(
                    "unknown_mapping_key",
                    "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 1\nlists = [1]\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].lists",
                ),
                refused(
                    "mapping_without_name",
                    "[[mappings]]\nevents = [\"E\"]\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].name",
                ),
                Refused {
                    behaviour: "duplicate_mapping_names",
                    toml: "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }\n\
                           [[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 2\nprofile_fields = { \"456\" = \"on\" }",
                    key: "mappings[1].name",
                    reason_mentions: "mappings[0]",
                },
                refused(
                    "mapping_with_neither_events_nor_types",
                    "[[mappings]]\nname = \"vip\"\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].events",
                ),
                refused(
                    "mapping_with_empty_events_and_no_types",
                    "[[mappings]]\nname = \"vip\"\nevents = []\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].events",
                ),
                refused(
                    "event_name_that_is_not_a_string",
                    "[[mappings]]\nname = \"vip\"\nevents = [1]\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].events[0]",
                ),
                refused(
                    "type_other_than_track_or_identify",
                    "[[mappings]]\nname = \"vip\"\ntypes = [\"identify\", \"page\"]\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].types[1]",
                ),
                refused(
                    "empty_audience_key",
                    "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\naudience_key = \"\"\nlist_id = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].audience_key",
                ),
            ],
            false,
        );
        let lists_and_fields: &[(&str, &str, &str)] = &[
            ("zero_list_id", "list_id = 0\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("negative_list_id", "list_id = -5\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("list_id_over_int32", "list_id = 2147483648\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("list_id_as_text", "list_id = \"12345\"\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("fractional_list_id", "list_id = 1.5\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("both_list_id_and_path", "list_id = 1\nlist_id_path = \"$.properties.list_id\"\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id_path"),
            ("neither_list_id_nor_path", "profile_fields = { \"456\" = \"on\" }", "mappings[0].list_id"),
            ("list_id_path_without_dollar", "list_id_path = \"properties.list_id\"\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].list_id_path"),
            ("field_id_that_is_a_word", "list_id = 1\nprofile_fields = { \"abc\" = \"on\" }", "mappings[0].profile_fields.\"abc\""),
            ("field_id_zero", "list_id = 1\nprofile_fields = { \"0\" = \"on\" }", "mappings[0].profile_fields.\"0\""),
            ("negative_field_id", "list_id = 1\nprofile_fields = { \"-4\" = \"on\" }", "mappings[0].profile_fields.\"-4\""),
            ("field_id_over_int32", "list_id = 1\nprofile_fields = { \"2147483648\" = \"on\" }", "mappings[0].profile_fields.\"2147483648\""),
            ("field_id_with_leading_zero", "list_id = 1\nprofile_fields = { \"0456\" = \"on\" }", "mappings[0].profile_fields.\"0456\""),
            ("field_id_with_spaces", "list_id = 1\nprofile_fields = { \" 456\" = \"on\" }", "mappings[0].profile_fields.\" 456\""),
            ("field_value_that_is_a_boolean", "list_id = 1\nprofile_fields = { \"456\" = true }", "mappings[0].profile_fields.\"456\""),
            ("empty_field_value", "list_id = 1\nprofile_fields = { \"456\" = \"\" }", "mappings[0].profile_fields.\"456\""),
            ("misspelt_use_audience_key", "list_id = 1\nprofile_fields = { \"456\" = \"useaudiencekey\" }", "mappings[0].profile_fields.\"456\""),
            ("empty_profile_fields", "list_id = 1\nprofile_fields = {}", "mappings[0].profile_fields"),
            ("missing_profile_fields", "list_id = 1", "mappings[0].profile_fields"),
            ("email_path_without_dollar", "list_id = 1\nemail_path = \"context.email\"\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].email_path"),
            ("bad_path_in_email_path_array", "list_id = 1\nemail_path = [\"$.a\", \"$..b\"]\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].email_path[1]"),
            ("empty_email_path_array", "list_id = 1\nemail_path = []\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].email_path"),
            ("email_path_as_number", "list_id = 1\nemail_path = 3\nprofile_fields = { \"456\" = \"on\" }", "mappings[0].email_path"),
            ("both_profile_fields_and_audience_field", "list_id = 1\nprofile_fields = { \"456\" = \"on\" }\naudience_field = { group = \"Engage Audiences\" }", "mappings[0].audience_field"),
            ("audience_field_without_group", "list_id = 1\naudience_field = { create = true }", "mappings[0].audience_field.group"),
            ("audience_field_with_empty_group", "list_id = 1\naudience_field = { group = \" \" }", "mappings[0].audience_field.group"),
            ("audience_field_with_unknown_key", "list_id = 1\naudience_field = { group = \"G\", create_group = true }", "mappings[0].audience_field.create_group"),
            ("audience_field_create_as_text", "list_id = 1\naudience_field = { group = \"G\", create = \"yes\" }", "mappings[0].audience_field.create"),
            ("audience_field_as_text", "list_id = 1\naudience_field = \"Engage Audiences\"", "mappings[0].audience_field"),
        ];
        for (behaviour, rest, expected) in lists_and_fields {
            let (key, reason) = refusal(&format!("{BASE}{rest}"), credentials);
            assert_eq!(key, *expected, "{behaviour}: reason {reason:?}");
        }
    }

    #[test]
    fn refusal_reads_as_key_then_reason() {
        let error = Settings::from_toml(
            &format!("[batch]\nmax_wait = \"soon\"\n{MAPPING}"),
            credentials,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "configuration key `batch.max_wait`: \"soon\" is not a duration (e.g. \"1s\", \"500ms\")"
        );
    }

    #[test]
    fn missing_credentials_name_the_environment_variable() {
        let (key, reason) = refusal(MAPPING, no_env);
        assert_eq!(key, "listrak.client_id");
        assert!(reason.contains(ENV_CLIENT_ID), "{reason}");

        let (key, reason) = refusal(
            &format!("[listrak]\nclient_id = \"c\"\nclient_secret = \"\"\n{MAPPING}"),
            no_env,
        );
        assert_eq!(key, "listrak.client_secret");
        assert!(reason.contains(ENV_CLIENT_SECRET), "{reason}");
    }

    #[test]
    fn bad_value_from_the_environment_says_it_came_from_there() {
        let env = |name: &str| match name {
            ENV_AMQP_URL => Some("http://guest:guest@rabbit".to_owned()),
            other => credentials(other),
        };
        let (key, reason) = refusal(MAPPING, env);
        assert_eq!(key, "amqp.url");
        assert!(reason.contains(ENV_AMQP_URL), "{reason}");
        assert!(!reason.contains("guest"), "the URL is not quoted: {reason}");
    }

    #[test]
    fn syntax_error_gives_line_and_column_without_quoting_the_line() {
        let text = format!("[listrak]\nclient_secret = \"{SECRET}\n{MAPPING}");
        match Settings::from_toml(&text, no_env) {
            Err(ConfigError::Syntax { message }) => {
                assert!(message.starts_with("line 2, column "), "{message}");
                assert!(!message.contains(SECRET), "{message}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn the_window_follows_the_memory_budget_unless_a_prefetch_is_set() {
        let table = [
            ("memory_budget = 75497472", 1000, 49_152),
            ("memory_budget = 4194304", 1000, 2730),
            ("memory_budget = 4194304", 5000, 5000),
            ("memory_budget = 1099511627776", 1000, u16::MAX),
            ("memory_budget = 4194304\nprefetch = 1500", 1000, 1500),
        ];
        for (amqp, max_contacts, window) in table {
            let settings = accepted(&format!("[amqp]\n{amqp}\n{MAPPING}"));
            assert_eq!(settings.amqp.window(max_contacts), window, "{amqp}");
        }
    }

    #[test]
    fn defaults_fill_every_unset_key() {
        let settings = accepted(MAPPING);
        assert_eq!(settings.amqp.url.expose(), DEFAULT_AMQP_URL);
        assert_eq!(settings.amqp.exchange, "listrak.audience");
        assert_eq!(settings.amqp.queue, "listrak.audience");
        assert_eq!(settings.amqp.prefetch, None);
        assert_eq!(settings.amqp.memory_budget, default_memory_budget());
        assert!(settings.amqp.memory_budget <= DEFAULT_MEMORY_BUDGET);
        assert!(!settings.amqp.single_active_consumer);
        assert_eq!(settings.amqp.tls, None);
        assert_eq!(settings.listrak.client_id, "client-1");
        assert_eq!(settings.listrak.client_secret.expose(), SECRET);
        assert_eq!(settings.listrak.api_url, "https://api.listrak.com/email/v1");
        assert_eq!(
            settings.listrak.auth_url,
            "https://auth.listrak.com/OAuth2/Token"
        );
        assert_eq!(settings.listrak.request_timeout, Duration::from_secs(30));
        assert_eq!(settings.listrak.max_concurrency.get(), 32);
        assert!(!settings.listrak.verify_at_start);
        assert_eq!(settings.batch.max_contacts.get(), 1000);
        assert_eq!(settings.batch.max_bytes.get(), 1_000_000);
        assert_eq!(settings.batch.max_wait, Duration::from_secs(1));
        let minutes = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(
            settings.retry.schedule,
            [
                Duration::from_secs(10),
                minutes(1),
                minutes(10),
                minutes(60),
                minutes(240)
            ]
        );
        assert_eq!(settings.retry.max_age, minutes(24 * 60));
        assert_eq!(settings.retry.in_process, minutes(2));
        assert_eq!(settings.http.listen, "0.0.0.0:9464".parse().unwrap());
        assert_eq!(settings.shutdown.grace, Duration::from_secs(30));
        assert_eq!(settings.superseded.capacity, 200_000);
    }

    #[test]
    fn only_the_setup_commands_accept_a_file_without_mappings() {
        let text = "[listrak]\nclient_id = \"id\"\nclient_secret = \"secret\"\n";
        let error = Settings::from_toml(text, |_| None).unwrap_err();
        assert!(error.to_string().contains("no mappings"), "{error}");
        let path = std::env::temp_dir().join(format!(
            "listrak-worker-no-mappings-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        let settings = Settings::load_without_mappings(Some(&path), |_| None).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(settings.mappings.is_empty());
        assert_eq!(settings.listrak.client_id, "id");
        // Mappings that are there are still checked.
        let broken = format!("{text}\n[[mappings]]\nname = \"x\"\n");
        assert!(Settings::parse(&broken, |_| None, MappingsNeeded::Optional).is_err());
    }

    #[test]
    fn file_values_replace_defaults() {
        let settings = accepted(&format!(
            r#"
[amqp]
url = "amqps://worker:pw@rabbit.internal:5671/prod"
exchange = "audiences"
queue = "audiences.listrak"
prefetch = 500
single_active_consumer = true

[listrak]
api_url = "http://127.0.0.1:8080/email/v1/"
request_timeout = "5s"
max_concurrency = 4
verify_at_start = true

[batch]
max_contacts = 250
max_bytes = 2048
max_wait = "250ms"

[retry]
schedule = ["1s", "2s"]
max_age = "1h"
in_process = "0s"

[http]
listen = "127.0.0.1:9000"

[shutdown]
grace = "5s"

[superseded]
capacity = 0
{MAPPING}"#
        ));
        assert_eq!(settings.amqp.exchange, "audiences");
        assert_eq!(settings.amqp.queue, "audiences.listrak");
        assert_eq!(settings.amqp.prefetch, Some(500));
        assert_eq!(settings.amqp.window(500), 500, "an explicit prefetch wins");
        assert!(settings.amqp.single_active_consumer);
        assert_eq!(
            settings.listrak.api_url, "http://127.0.0.1:8080/email/v1",
            "the trailing slash is dropped"
        );
        assert_eq!(settings.listrak.request_timeout, Duration::from_secs(5));
        assert_eq!(settings.listrak.max_concurrency.get(), 4);
        assert!(settings.listrak.verify_at_start);
        assert_eq!(settings.batch.max_contacts.get(), 250);
        assert_eq!(settings.batch.max_bytes.get(), 2048);
        assert_eq!(settings.batch.max_wait, Duration::from_millis(250));
        assert_eq!(
            settings.retry.schedule,
            [Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(settings.retry.max_age, Duration::from_secs(3600));
        assert_eq!(settings.retry.in_process, Duration::ZERO);
        assert_eq!(settings.http.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(settings.shutdown.grace, Duration::from_secs(5));
        assert_eq!(settings.superseded.capacity, 0);
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = format!(
            r#"
[amqp]
url = "amqp://file:file@file-host/"

[listrak]
client_id = "file-id"
client_secret = "file-secret"
api_url = "https://file.example/api"
auth_url = "https://file.example/token"
{MAPPING}"#
        );
        let settings = Settings::from_toml(
            &file,
            env_of(&[
                (ENV_AMQP_URL, "amqps://env:env@env-host/"),
                (ENV_CLIENT_ID, "env-id"),
                (ENV_CLIENT_SECRET, "env-secret\n"),
                (ENV_API_URL, "https://env.example/api/"),
                (ENV_AUTH_URL, "https://env.example/token"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.amqp.url.expose(), "amqps://env:env@env-host/");
        assert_eq!(settings.listrak.client_id, "env-id");
        assert_eq!(
            settings.listrak.client_secret.expose(),
            "env-secret",
            "a trailing newline from a secret file is not part of the secret"
        );
        assert_eq!(settings.listrak.api_url, "https://env.example/api");
        assert_eq!(settings.listrak.auth_url, "https://env.example/token");
    }

    #[test]
    fn empty_environment_value_counts_as_unset() {
        let file = format!(
            "[listrak]\nclient_id = \"file-id\"\nclient_secret = \"file-secret\"\n{MAPPING}"
        );
        let settings = Settings::from_toml(
            &file,
            env_of(&[
                (ENV_CLIENT_ID, ""),
                (ENV_CLIENT_SECRET, "  "),
                (ENV_AMQP_URL, ""),
            ]),
        )
        .unwrap();
        assert_eq!(settings.listrak.client_id, "file-id");
        assert_eq!(settings.listrak.client_secret.expose(), "file-secret");
        assert_eq!(settings.amqp.url.expose(), DEFAULT_AMQP_URL);
    }

    fn secret_laden() -> Settings {
        accepted(&format!(
            "[amqp]\nurl = \"amqp://worker:{AMQP_PASSWORD}@rabbit:5672/%2f\"\n{MAPPING}"
        ))
    }

    #[test]
    fn secrets_never_reach_debug_or_display() {
        let settings = secret_laden();
        let debug = format!("{settings:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(!debug.contains(AMQP_PASSWORD), "{debug}");
        assert!(debug.contains("[redacted]"));
        assert_eq!(settings.listrak.client_secret.to_string(), "[redacted]");
        assert_eq!(
            format!("{:?}", settings.listrak.client_secret),
            "[redacted]"
        );
    }

    #[test]
    fn redacted_toml_hides_the_secret_and_the_broker_password() {
        let text = secret_laden().redacted_toml();
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(AMQP_PASSWORD), "{text}");
        assert!(text.contains("client_secret = \"[redacted]\""), "{text}");
        assert!(
            text.contains("url = \"amqp://worker:[redacted]@rabbit:5672/%2f\""),
            "{text}"
        );
    }

    #[test]
    fn redacted_toml_loads_back_as_the_same_settings() {
        let original = accepted(&format!(
            r#"
[amqp]
single_active_consumer = true

[retry]
schedule = ["1m 30s", "250ms"]
{MAPPING}
[[mappings]]
name = "by \"path\""
types = ["identify", "track"]
audience_key = "gold"
list_id_path = "$.properties['list id']"
email_path = ["$.traits.email", "$.context.traits.email"]
profile_fields = {{ "9" = "tab\there", "10" = "on" }}
"#
        ));
        let reloaded = Settings::from_toml(&original.redacted_toml(), no_env).unwrap();
        let mut expected = original.clone();
        expected.listrak.client_secret = Secret::new("[redacted]");
        expected.amqp.url = Secret::new(original.amqp.redacted_url());
        assert_eq!(
            reloaded.amqp.url.expose(),
            "amqp://guest:[redacted]@127.0.0.1:5672/%2f"
        );
        assert_eq!(reloaded, expected);
    }

    #[test]
    fn printed_durations_use_the_largest_exact_unit() {
        let cases = [
            ("whole_hours", Duration::from_secs(24 * 3600), "\"24h\""),
            ("whole_minutes", Duration::from_secs(600), "\"10m\""),
            ("minutes_and_seconds", Duration::from_secs(90), "\"90s\""),
            ("milliseconds", Duration::from_millis(250), "\"250ms\""),
            ("zero", Duration::ZERO, "\"0s\""),
        ];
        for (behaviour, duration, expected) in cases {
            assert_eq!(toml_duration(duration), expected, "{behaviour}");
        }
    }

    #[test]
    fn redacted_url_replaces_only_the_password() {
        let cases = [
            (
                "user_and_password",
                "amqp://u:p@h:5672/v",
                "amqp://u:[redacted]@h:5672/v",
            ),
            (
                "password_with_at_sign",
                "amqp://u:p@ss@h/v",
                "amqp://u:[redacted]@h/v",
            ),
            ("user_without_password", "amqp://u@h/v", "amqp://u@h/v"),
            ("no_user", "amqps://h", "amqps://h"),
            ("at_sign_in_path_only", "amqp://h/v@x", "amqp://h/v@x"),
        ];
        for (behaviour, url, expected) in cases {
            assert_eq!(redact_url_password(url), expected, "{behaviour}");
        }
    }

    #[test]
    fn email_path_forms() {
        let paths = |email_path: &str| -> Vec<String> {
            let text = format!(
                "[[mappings]]\nname = \"m\"\nevents = [\"E\"]\nlist_id = 1\n{email_path}\nprofile_fields = {{ \"1\" = \"on\" }}"
            );
            accepted(&text).mappings[0]
                .email_paths
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let cases: [(&str, &str, &[&str]); 5] = [
            (
                "absent_means_the_defaults",
                "",
                &[
                    "$.context.traits.email",
                    "$.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "single_string_goes_first_then_the_defaults",
                "email_path = \"$.properties.contact.email\"",
                &[
                    "$.properties.contact.email",
                    "$.context.traits.email",
                    "$.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "single_default_path_is_not_repeated",
                "email_path = \"$.traits.email\"",
                &[
                    "$.traits.email",
                    "$.context.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "default_path_spelled_with_brackets_is_not_repeated",
                "email_path = \"$['traits'].email\"",
                &[
                    "$['traits'].email",
                    "$.context.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "array_means_exactly_those",
                "email_path = [\"$.properties.email\", \"$.traits['e-mail']\"]",
                &["$.properties.email", "$.traits['e-mail']"],
            ),
        ];
        for (behaviour, email_path, expected) in cases {
            assert_eq!(paths(email_path), expected, "{behaviour}");
        }
    }

    #[test]
    fn profile_fields_are_sorted_by_numeric_id_and_keep_literals_as_written() {
        let settings = accepted(
            "[[mappings]]\nname = \"m\"\ntypes = [\"track\"]\nlist_id_path = \"$.properties.list_id\"\n\
             profile_fields = { \"789\" = \"off\", \"1000\" = \"Gold tier\", \"456\" = \"useAudienceKey\", \"5\" = \"on\" }",
        );
        let mapping = &settings.mappings[0];
        let field = |id: i64| FieldId::new(id).unwrap();
        assert_eq!(
            mapping.profile_fields,
            [
                (field(5), FieldRule::Literal("on".into())),
                (field(456), FieldRule::UseAudienceKey),
                (field(789), FieldRule::Literal("off".into())),
                (field(1000), FieldRule::Literal("Gold tier".into())),
            ]
        );
        assert_eq!(mapping.types, [SegmentType::Track]);
        assert!(mapping.events.is_empty());
        assert_eq!(
            mapping.list,
            ListSource::Path(JsonPath::parse("$.properties.list_id").unwrap())
        );
    }

    #[test]
    fn example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let settings = Settings::load(Some(&path), credentials).unwrap_or_else(|e| panic!("{e}"));
        assert!(!settings.mappings.is_empty());
    }

    #[test]
    fn no_file_means_defaults_and_still_needs_a_mapping() {
        let error = Settings::load(None, credentials).unwrap_err();
        assert!(
            matches!(&error, ConfigError::Invalid { key, .. } if key == "mappings"),
            "{error}"
        );
    }

    #[test]
    fn unreadable_file_names_its_path() {
        let error =
            Settings::load(Some(Path::new("/nonexistent/listrak.toml")), credentials).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(
            error.to_string().contains("/nonexistent/listrak.toml"),
            "{error}"
        );
    }

    /// Throwaway TLS files in a directory of their own: a CA, a client certificate it signed
    /// with its key, the key of another certificate, and a file that is not PEM.
    struct TlsFiles {
        dir: PathBuf,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        other_key: PathBuf,
        not_pem: PathBuf,
    }

    const KEY_MARKER: &str = "do-not-quote-this-key-line";

    impl TlsFiles {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "listrak-worker-config-{test}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["listrak-worker".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap();
                path
            };
            TlsFiles {
                ca: write("ca.pem", &ca.pem()),
                cert: write("client.pem", &cert.pem()),
                key: write("client.key", &key.serialize_pem()),
                other_key: write("other.key", &other_key.serialize_pem()),
                not_pem: write("not.pem", &format!("{KEY_MARKER}\n")),
                dir,
            }
        }
    }

    impl Drop for TlsFiles {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn path_str(path: &Path) -> String {
        toml_str(&path.to_string_lossy())
    }

    fn amqps_with(tls_keys: &str) -> String {
        format!(
            "[amqp]\nurl = \"amqps://worker:pw@rabbit.internal:5671/%2f\"\n[amqp.tls]\n{tls_keys}\n{MAPPING}"
        )
    }

    #[test]
    fn tls_files_are_read_and_handed_to_the_connection() {
        let files = TlsFiles::new("read");
        let settings = accepted(&amqps_with(&format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key)
        )));
        let tls = settings.amqp.tls.expect("[amqp.tls] is set");
        assert_eq!(tls.ca.as_ref().unwrap().path, files.ca);
        let lapin = tls.lapin_config();
        assert_eq!(
            lapin.cert_chain.as_deref(),
            Some(std::fs::read_to_string(&files.ca).unwrap().as_str())
        );
        match lapin.identity {
            Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key }) => {
                assert_eq!(pem, std::fs::read(&files.cert).unwrap());
                assert_eq!(key, std::fs::read(&files.key).unwrap());
            }
            other => panic!("expected the PEM client identity, got {other:?}"),
        }
    }

    #[test]
    fn amqps_without_tls_settings_uses_the_system_roots() {
        let settings = accepted(&format!(
            "[amqp]\nurl = \"amqps://worker:pw@rabbit.internal:5671/%2f\"\n{MAPPING}"
        ));
        assert_eq!(settings.amqp.tls, None);
    }

    #[test]
    fn a_ca_file_alone_is_enough() {
        let files = TlsFiles::new("ca-alone");
        let settings = accepted(&amqps_with(&format!("ca_file = {}", path_str(&files.ca))));
        let tls = settings.amqp.tls.unwrap();
        assert!(tls.ca.is_some());
        assert!(tls.client.is_none());
        assert!(tls.lapin_config().identity.is_none());
    }

    #[test]
    fn bad_tls_settings_are_refused_naming_the_key() {
        let files = TlsFiles::new("refused");
        let (ca, cert, key) = (
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key),
        );
        let missing = path_str(&files.dir.join("missing.pem"));
        let not_pem = path_str(&files.not_pem);
        let other_key = path_str(&files.other_key);
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "ca_file_that_does_not_exist",
                amqps_with(&format!("ca_file = {missing}")),
                "amqp.tls.ca_file",
                "cannot read",
            ),
            (
                "ca_file_without_a_certificate",
                amqps_with(&format!("ca_file = {not_pem}")),
                "amqp.tls.ca_file",
                "no PEM certificate",
            ),
            (
                "ca_file_holding_a_key",
                amqps_with(&format!("ca_file = {key}")),
                "amqp.tls.ca_file",
                "no PEM certificate",
            ),
            (
                "empty_ca_file_path",
                amqps_with("ca_file = \"\""),
                "amqp.tls.ca_file",
                "is empty",
            ),
            (
                "certificate_without_its_key",
                amqps_with(&format!("client_cert_file = {cert}")),
                "amqp.tls.client_key_file",
                "is missing",
            ),
            (
                "key_without_its_certificate",
                amqps_with(&format!("client_key_file = {key}")),
                "amqp.tls.client_cert_file",
                "is missing",
            ),
            (
                "client_certificate_that_does_not_exist",
                amqps_with(&format!(
                    "client_cert_file = {missing}\nclient_key_file = {key}"
                )),
                "amqp.tls.client_cert_file",
                "cannot read",
            ),
            (
                "key_of_another_certificate",
                amqps_with(&format!(
                    "client_cert_file = {cert}\nclient_key_file = {other_key}"
                )),
                "amqp.tls.client_key_file",
                "does not belong to the certificate",
            ),
            (
                "key_file_that_is_not_a_key",
                amqps_with(&format!(
                    "client_cert_file = {cert}\nclient_key_file = {not_pem}"
                )),
                "amqp.tls.client_key_file",
                "no PEM private key",
            ),
            (
                "unknown_tls_key",
                amqps_with(&format!("cafile = {ca}")),
                "amqp.tls.cafile",
                "not a known key",
            ),
            (
                "tls_settings_with_a_plain_url",
                format!(
                    "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[amqp.tls]\nca_file = {ca}\n{MAPPING}"
                ),
                "amqp.tls",
                "not encrypted",
            ),
            (
                "tls_table_without_keys_and_the_default_url",
                format!("[amqp.tls]\n{MAPPING}"),
                "amqp.tls",
                "use amqps://",
            ),
        ];
        for (behaviour, text, expected_key, mentions) in cases {
            let (key, reason) = refusal(&text, credentials);
            assert_eq!(key, expected_key, "{behaviour}: {reason}");
            assert!(reason.contains(mentions), "{behaviour}: {reason}");
            assert!(!reason.contains(KEY_MARKER), "{behaviour}: {reason}");
        }
    }

    #[test]
    fn tls_settings_with_a_plain_url_from_the_environment_say_where_it_came_from() {
        let files = TlsFiles::new("env-url");
        let text = amqps_with(&format!("ca_file = {}", path_str(&files.ca)));
        let (key, reason) = refusal(&text, |name| match name {
            ENV_AMQP_URL => Some("amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            other => credentials(other),
        });
        assert_eq!(key, "amqp.tls");
        assert!(reason.contains("AMQP_URL"), "{reason}");
    }

    #[test]
    fn the_client_key_never_reaches_debug_or_check() {
        let files = TlsFiles::new("key-hidden");
        let settings = accepted(&amqps_with(&format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key)
        )));
        let key_pem = std::fs::read_to_string(&files.key).unwrap();
        let key_body = key_pem.lines().nth(1).expect("a base64 line");
        let debug = format!("{settings:?}");
        assert!(!debug.contains(key_body), "{debug}");
        assert!(debug.contains("client.key"), "{debug}");
        let printed = settings.redacted_toml();
        assert!(!printed.contains(key_body), "{printed}");

        let reloaded = Settings::from_toml(&printed, no_env).unwrap();
        assert_eq!(reloaded.amqp.tls, settings.amqp.tls);
    }
}
