//! One reader per table of the file (`[amqp]`, `[listrak]`, ...), each checking its keys.

use std::num::NonZeroUsize;

use super::broker_tls::broker_tls;
use super::broker_urls::broker_urls;
use super::defaults::{
    default_memory_budget, DEFAULT_AMQP_URL, DEFAULT_API_URL, DEFAULT_AUTH_URL, DEFAULT_CLOCK_SKEW,
    DEFAULT_EXCHANGE, DEFAULT_FIELD_CREATION_BUDGET, DEFAULT_GRACE, DEFAULT_IN_PROCESS,
    DEFAULT_LISTEN, DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_CONTACTS, DEFAULT_MAX_WAIT, DEFAULT_QUEUE, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SCHEDULE, DEFAULT_SUPERSEDED_CAPACITY, MAX_CLOCK_SKEW, MAX_FIELD_CREATION_BUDGET,
    MAX_GRACE, MAX_IN_PROCESS, MAX_MEMORY_BUDGET, MAX_QUEUE_NAME_BYTES, MAX_REQUEST_TIMEOUT,
    MAX_RETRY_STEP, MIN_MAX_BYTES, MIN_MEMORY_BUDGET,
};
use super::defaults::{
    DEFAULT_APPLIED_LOG_MAX_AGE, DEFAULT_APPLIED_LOG_MAX_BYTES, DEFAULT_WATCH_CAPACITY,
    MAX_ANY_DURATION, MAX_WATCH_CAPACITY, MIN_APPLIED_LOG_MAX_BYTES,
};
use super::defaults::{
    DEFAULT_INGEST_LISTEN, DEFAULT_INGEST_MAX_BODY, MAX_INGEST_MAX_BODY, MIN_INGEST_MAX_BODY,
};
use super::defaults::{
    DEFAULT_MAX_READ_RATE, DEFAULT_RECONCILE_AFTER, DEFAULT_RECONCILE_WINDOW, MAX_MAX_READ_RATE,
    MAX_RECONCILE_AFTER,
};
use super::document::{at_most, parse_duration, Node};
use super::environment::{Sourced, ENV_API_URL, ENV_AUTH_URL, ENV_CLIENT_ID, ENV_CLIENT_SECRET};
use super::environment::{ENV_INGEST_SECRET, ENV_INGEST_TOKEN};
use super::urls::{BASE_URL, ENDPOINT_URL};
use super::{
    invalid, AmqpSettings, AppliedLogSettings, BatchSettings, ConfigError, HttpSettings,
    IngestSettings, ListrakSettings, ReconcileSettings, RetrySettings, Secret, ShutdownSettings,
    SupersededSettings,
};

pub(super) fn amqp_settings(
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
    let (urls, url_from_env) = broker_urls(node, env, DEFAULT_AMQP_URL)?;
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
    let tls = broker_tls(&node.table("tls")?, urls.all()[0].expose(), url_from_env)?;
    Ok(AmqpSettings {
        urls,
        exchange,
        queue,
        prefetch: prefetch.map(|p| u16::try_from(p).expect("bounded to u16")),
        memory_budget,
        single_active_consumer,
        tls,
    })
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
            "is {} bytes long; at most {MAX_QUEUE_NAME_BYTES}, so that the retry and dead-letter \
             names fit AMQP's 255",
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

/// `[listrak]`; the credentials may be missing (left empty) when `credentials_required` is
/// false, for the commands that never call Listrak.
pub(super) fn listrak_settings(
    node: &Node<'_>,
    env: &impl Fn(&str) -> Option<String>,
    credentials_required: bool,
) -> Result<ListrakSettings, ConfigError> {
    node.only(&[
        "client_id",
        "client_secret",
        "api_url",
        "auth_url",
        "request_timeout",
        "max_concurrency",
        "verify_at_start",
        "field_creation_budget",
    ])?;
    let client_id = Sourced::read(node, "client_id", ENV_CLIENT_ID, env)?;
    let client_secret = Sourced::read(node, "client_secret", ENV_CLIENT_SECRET, env)?;
    let (client_id, client_secret) = if credentials_required {
        (
            client_id.required(node, "client_id")?,
            client_secret.required(node, "client_secret")?,
        )
    } else {
        (client_id.or_empty(), client_secret.or_empty())
    };
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
    let field_creation_budget = node.bounded(
        "field_creation_budget",
        DEFAULT_FIELD_CREATION_BUDGET,
        0,
        MAX_FIELD_CREATION_BUDGET,
    )?;
    Ok(ListrakSettings {
        client_id,
        client_secret: Secret(client_secret),
        api_url,
        auth_url,
        request_timeout,
        max_concurrency: nonzero(max_concurrency),
        verify_at_start,
        field_creation_budget: usize::try_from(field_creation_budget)
            .expect("bounded to be non-negative"),
    })
}

fn nonzero(number: i64) -> NonZeroUsize {
    usize::try_from(number)
        .ok()
        .and_then(NonZeroUsize::new)
        .expect("bounded to be positive")
}

pub(super) fn batch_settings(node: &Node<'_>) -> Result<BatchSettings, ConfigError> {
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

pub(super) fn retry_settings(node: &Node<'_>) -> Result<RetrySettings, ConfigError> {
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
                "is {}; it must be under 25m, since RabbitMQ gives up on a consumer that holds a \
                 message for 30m",
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

pub(super) fn http_settings(node: &Node<'_>) -> Result<HttpSettings, ConfigError> {
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

/// `[ingest]`: where `listrak-worker ingest` listens and the largest body it takes; the
/// shared secret and the bearer token come from the environment only, never the file.
pub(super) fn ingest_settings(
    node: &Node<'_>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<IngestSettings, ConfigError> {
    node.only(&["listen", "max_body"])?;
    let text = node.string("listen")?.unwrap_or(DEFAULT_INGEST_LISTEN);
    let listen = text.trim().parse().map_err(|_| {
        invalid(
            node.key("listen"),
            format!("{text:?} is not an address and port such as \"0.0.0.0:9470\""),
        )
    })?;
    let max_body = match node.integer("max_body")? {
        None => DEFAULT_INGEST_MAX_BODY,
        Some(_) => node.bounded("max_body", 0, MIN_INGEST_MAX_BODY, MAX_INGEST_MAX_BODY)? as usize,
    };
    Ok(IngestSettings {
        listen,
        max_body,
        shared_secret: env(ENV_INGEST_SECRET).map(Secret),
        bearer_token: env(ENV_INGEST_TOKEN).map(Secret),
    })
}

pub(super) fn shutdown_settings(node: &Node<'_>) -> Result<ShutdownSettings, ConfigError> {
    node.only(&["grace"])?;
    let grace = node.positive_duration("grace", DEFAULT_GRACE)?;
    Ok(ShutdownSettings {
        grace: at_most(&node.key("grace"), grace, MAX_GRACE)?,
    })
}

pub(super) fn superseded_settings(node: &Node<'_>) -> Result<SupersededSettings, ConfigError> {
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

pub(super) fn applied_log_settings(node: &Node<'_>) -> Result<AppliedLogSettings, ConfigError> {
    node.only(&["max_age", "max_bytes", "watch_capacity"])?;
    let max_age = node.positive_duration("max_age", DEFAULT_APPLIED_LOG_MAX_AGE)?;
    let max_age = at_most(&node.key("max_age"), max_age, MAX_ANY_DURATION)?;
    let max_bytes = node.bounded(
        "max_bytes",
        DEFAULT_APPLIED_LOG_MAX_BYTES,
        MIN_APPLIED_LOG_MAX_BYTES,
        i64::MAX,
    )?;
    let watch_capacity = node.bounded(
        "watch_capacity",
        DEFAULT_WATCH_CAPACITY,
        0,
        MAX_WATCH_CAPACITY,
    )?;
    Ok(AppliedLogSettings {
        max_age,
        max_bytes: u64::try_from(max_bytes).expect("bounded to be positive"),
        watch_capacity: usize::try_from(watch_capacity).expect("bounded to be non-negative"),
    })
}

pub(super) fn reconcile_settings(node: &Node<'_>) -> Result<ReconcileSettings, ConfigError> {
    node.only(&["enabled", "after", "window", "max_read_rate"])?;
    let enabled = node.boolean("enabled")?.unwrap_or(true);
    let after = node.positive_duration("after", DEFAULT_RECONCILE_AFTER)?;
    let after = at_most(&node.key("after"), after, MAX_RECONCILE_AFTER)?;
    let window = node.positive_duration("window", DEFAULT_RECONCILE_WINDOW)?;
    let window = at_most(&node.key("window"), window, MAX_ANY_DURATION)?;
    let max_read_rate = node
        .number("max_read_rate")?
        .unwrap_or(DEFAULT_MAX_READ_RATE);
    if !(max_read_rate > 0.0 && max_read_rate <= MAX_MAX_READ_RATE) {
        return Err(invalid(
            node.key("max_read_rate"),
            format!(
                "is {max_read_rate}; it must be more than 0 and at most {MAX_MAX_READ_RATE} \
                 (contacts read per second)"
            ),
        ));
    }
    Ok(ReconcileSettings {
        enabled,
        after,
        window,
        max_read_rate,
    })
}
