use super::defaults::{default_memory_budget, DEFAULT_MEMORY_BUDGET};
use super::*;

pub(super) const SECRET: &str = "s3cr3t-do-not-print";
pub(super) const AMQP_PASSWORD: &str = "br0ker-pw";

/// The smallest mapping the configuration accepts; appended after the tables a test sets.
pub(super) const MAPPING: &str = r#"
[[mappings]]
name = "vip"
events = ["Audience Entered", "Audience Exited"]
list_id = 12345
profile_fields = { "456" = "useAudienceKey" }
"#;

/// The credentials come from the environment, as the operator is advised to do.
pub(super) fn credentials(name: &str) -> Option<String> {
    match name {
        ENV_CLIENT_ID => Some("client-1".to_owned()),
        ENV_CLIENT_SECRET => Some(SECRET.to_owned()),
        _ => None,
    }
}

pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn env_of(
    vars: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(var, _)| *var == name)
            .map(|(_, value)| (*value).to_owned())
    }
}

pub(super) fn accepted(text: &str) -> Settings {
    Settings::from_toml(text, credentials).unwrap_or_else(|error| panic!("{error}"))
}

pub(super) fn refusal(text: &str, env: impl Fn(&str) -> Option<String>) -> (String, String) {
    match Settings::from_toml(text, env) {
        Err(ConfigError::Invalid { key, reason }) => (key, reason),
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

pub(super) struct Refused {
    pub(super) behaviour: &'static str,
    pub(super) toml: &'static str,
    pub(super) key: &'static str,
    pub(super) reason_mentions: &'static str,
}

pub(super) fn refused(behaviour: &'static str, toml: &'static str, key: &'static str) -> Refused {
    Refused {
        behaviour,
        toml,
        key,
        reason_mentions: "",
    }
}

pub(super) fn check_refusals(cases: &[Refused], with_mapping: bool) {
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

pub(super) fn secret_laden() -> Settings {
    accepted(&format!(
        "[amqp]\nurl = \"amqp://worker:{AMQP_PASSWORD}@rabbit:5672/%2f\"\n{MAPPING}"
    ))
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
            Refused {
                behaviour: "request_timeout_that_with_the_other_waits_reaches_the_consumer_timeout",
                toml: "[listrak]\nrequest_timeout = \"10m\"\n[retry]\nin_process = \"9m\"\n\
                       [batch]\nmax_wait = \"6m\"",
                key: "listrak.request_timeout",
                reason_mentions: "retry.in_process = 9m",
            },
            refused(
                "negative_field_creation_budget",
                "[listrak]\nfield_creation_budget = -1",
                "listrak.field_creation_budget",
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
            refused(
                "zero_read_rate",
                "[reconcile]\nmax_read_rate = 0",
                "reconcile.max_read_rate",
            ),
            refused(
                "read_rate_as_text",
                "[reconcile]\nmax_read_rate = \"50/s\"",
                "reconcile.max_read_rate",
            ),
            refused(
                "zero_read_back_delay",
                "[reconcile]\nafter = \"0s\"",
                "reconcile.after",
            ),
            refused(
                "read_back_after_two_days",
                "[reconcile]\nafter = \"2d\"",
                "reconcile.after",
            ),
            refused(
                "enabled_as_text",
                "[reconcile]\nenabled = \"yes\"",
                "reconcile.enabled",
            ),
            refused(
                "unknown_reconcile_key",
                "[reconcile]\nevery = \"1m\"",
                "reconcile.every",
            ),
        ],
        true,
    );
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
    assert_eq!(settings.amqp.urls.all()[0].expose(), DEFAULT_AMQP_URL);
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
    assert!(settings.reconcile.enabled);
    assert_eq!(settings.reconcile.after, Duration::from_secs(120));
    assert_eq!(settings.reconcile.window, Duration::from_secs(3600));
    assert!((settings.reconcile.max_read_rate - 50.0).abs() < f64::EPSILON);
    assert_eq!(settings.listrak.field_creation_budget, 100);
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

[reconcile]
enabled = false
after = "5s"
window = "10m"
max_read_rate = 2.5
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
    assert!(!settings.reconcile.enabled);
    assert_eq!(settings.reconcile.after, Duration::from_secs(5));
    assert_eq!(settings.reconcile.window, Duration::from_secs(600));
    assert!((settings.reconcile.max_read_rate - 2.5).abs() < f64::EPSILON);
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
    assert_eq!(
        settings.amqp.urls.all()[0].expose(),
        "amqps://env:env@env-host/"
    );
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
    let file =
        format!("[listrak]\nclient_id = \"file-id\"\nclient_secret = \"file-secret\"\n{MAPPING}");
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
    assert_eq!(settings.amqp.urls.all()[0].expose(), DEFAULT_AMQP_URL);
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

#[test]
fn ingest_takes_its_secret_and_token_from_the_environment_only_and_never_prints_them() {
    let env = |name: &str| match name {
        ENV_INGEST_SECRET => Some("segment-secret-value".to_owned()),
        ENV_INGEST_TOKEN => Some("bearer-token-value".to_owned()),
        other => credentials(other),
    };
    let settings = Settings::from_toml(
        &format!("[ingest]\nlisten = \"127.0.0.1:9999\"\nmax_body = 2048\n{MAPPING}"),
        env,
    )
    .unwrap();
    assert_eq!(settings.ingest.listen.to_string(), "127.0.0.1:9999");
    assert_eq!(settings.ingest.max_body, 2048);
    assert_eq!(
        settings.ingest.shared_secret.as_ref().map(Secret::expose),
        Some("segment-secret-value")
    );
    let printed = settings.redacted_toml();
    let debug = format!("{settings:?}");
    for text in [&printed, &debug] {
        assert!(!text.contains("segment-secret-value"), "{text}");
        assert!(!text.contains("bearer-token-value"), "{text}");
    }
    assert!(
        printed.contains("shared secret (LISTRAK_INGEST_SECRET): set"),
        "{printed}"
    );
    let defaults = accepted(MAPPING);
    assert_eq!(defaults.ingest.listen.to_string(), "0.0.0.0:9470");
    assert_eq!(defaults.ingest.max_body, 5_000_000);
    assert!(defaults.ingest.shared_secret.is_none());
}

#[test]
fn a_bad_ingest_setting_is_refused_naming_its_key() {
    check_refusals(
        &[
            refused(
                "ingest_listen_not_an_address",
                "[ingest]\nlisten = \"here\"",
                "ingest.listen",
            ),
            refused(
                "ingest_max_body_too_small",
                "[ingest]\nmax_body = 10",
                "ingest.max_body",
            ),
            refused(
                "ingest_secret_in_the_file",
                "[ingest]\nshared_secret = \"x\"",
                "ingest.shared_secret",
            ),
        ],
        true,
    );
}

#[test]
fn ingest_needs_neither_mappings_nor_listrak_credentials() {
    let settings = Settings::load_for_broker(None, |name| {
        (name == ENV_AMQP_URL).then(|| "amqp://u:p@rabbit:5672/%2f".to_owned())
    })
    .unwrap();
    assert!(settings.mappings.is_empty());
    assert_eq!(settings.listrak.client_id, "");
    let refused = Settings::load_without_mappings(None, |_| None).unwrap_err();
    assert!(
        refused.to_string().contains("listrak.client_id"),
        "{refused}"
    );
}
