//! The effective configuration as TOML, as `check` prints it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::secret::REDACTED;
use super::Settings;
use crate::stages::mapping::{JsonPath, ListSource};

impl Settings {
    /// The effective configuration as TOML (what `check` prints), with the client secret
    /// and the broker password replaced by `[redacted]`. It loads back as the same settings.
    pub fn redacted_toml(&self) -> String {
        let mut out = String::new();
        let amqp = &self.amqp;
        let _ = writeln!(out, "[amqp]");
        let urls: Vec<String> = amqp
            .urls
            .redacted()
            .iter()
            .map(|url| toml_str(url))
            .collect();
        match urls.as_slice() {
            [one] => {
                let _ = writeln!(out, "url = {one}");
            }
            several => {
                let _ = writeln!(out, "url = [{}]", several.join(", "));
            }
        }
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
        let _ = writeln!(
            out,
            "field_creation_budget = {}",
            listrak.field_creation_budget
        );

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

        let log = &self.applied_log;
        let _ = writeln!(out, "\n[applied_log]");
        let _ = writeln!(out, "max_age = {}", toml_duration(log.max_age));
        let _ = writeln!(out, "max_bytes = {}", log.max_bytes);
        let _ = writeln!(out, "watch_capacity = {}", log.watch_capacity);

        let reconcile = &self.reconcile;
        let _ = writeln!(out, "\n[reconcile]");
        let _ = writeln!(out, "enabled = {}", reconcile.enabled);
        let _ = writeln!(out, "after = {}", toml_duration(reconcile.after));
        let _ = writeln!(out, "window = {}", toml_duration(reconcile.window));
        let _ = writeln!(out, "max_read_rate = {:?}", reconcile.max_read_rate);

        let ingest = &self.ingest;
        let _ = writeln!(out, "\n[ingest]");
        let _ = writeln!(out, "listen = {}", toml_str(&ingest.listen.to_string()));
        let _ = writeln!(out, "max_body = {}", ingest.max_body);
        let set = |secret: &Option<crate::config::Secret>| {
            if secret.is_some() {
                "set"
            } else {
                "not set"
            }
        };
        let _ = writeln!(
            out,
            "# shared secret (LISTRAK_INGEST_SECRET): {}; bearer token (LISTRAK_INGEST_TOKEN): {}",
            set(&ingest.shared_secret),
            set(&ingest.bearer_token)
        );

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
    use crate::config::tests::{accepted, no_env, secret_laden, AMQP_PASSWORD, MAPPING, SECRET};
    use crate::config::Secret;

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
        expected.amqp.urls = crate::config::BrokerUrls::one(original.amqp.redacted_url());
        assert_eq!(
            reloaded.amqp.urls.all()[0].expose(),
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
}
