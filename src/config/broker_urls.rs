//! `amqp.url`: one broker URL, or the URLs of several nodes of one cluster, tried in turn.

use super::document::{wrong_type, Node};
use super::environment::ENV_AMQP_URL;
use super::secret::{redact_url_password, Secret};
use super::urls::{check_url, AMQP_URL};
use super::{invalid, ConfigError};

/// The broker's addresses, in the order they are tried; never empty. Several URLs name
/// nodes of one cluster: they share a vhost and a scheme, so that the worker finds the same
/// queues wherever it connects and one `[amqp.tls]` fits them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<Secret>);

impl BrokerUrls {
    /// One broker.
    pub fn one(url: impl Into<String>) -> Self {
        Self(vec![Secret::new(url)])
    }

    /// Every URL, in the order they are tried.
    pub fn all(&self) -> &[Secret] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every URL with its password replaced, for logs and `check`.
    pub fn redacted(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|url| redact_url_password(url.expose()))
            .collect()
    }

    /// The `host:port` of the `index`th URL, with neither user nor password: what logs and
    /// the `listrak_amqp_node` metric call a node.
    pub fn node(&self, index: usize) -> String {
        self.0
            .get(index)
            .map(|url| node_of(url.expose()))
            .unwrap_or_default()
    }

    /// Every node, as [`BrokerUrls::node`] names it.
    pub fn nodes(&self) -> Vec<String> {
        (0..self.len()).map(|index| self.node(index)).collect()
    }
}

/// `host:port` of an AMQP URL (the scheme's default port when it gives none).
fn node_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let has_port = match host_port.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => host_port.contains(':'),
    };
    if has_port {
        host_port.to_owned()
    } else if scheme.eq_ignore_ascii_case("amqps") {
        format!("{host_port}:5671")
    } else {
        format!("{host_port}:5672")
    }
}

/// Reads `amqp.url` (a string or an array of strings) or `AMQP_URL` (URLs separated by
/// commas), which wins over the file; without either, `default`. Every URL is checked, and
/// several must agree on their vhost and scheme. A refusal names the key and, for a value
/// from the environment, the variable; it never quotes a URL, which may hold a password.
pub(super) fn broker_urls(
    node: &Node<'_>,
    env: &impl Fn(&str) -> Option<String>,
    default: &str,
) -> Result<(BrokerUrls, bool), ConfigError> {
    let key = node.key("url");
    // Each URL with the key a refusal names: `amqp.url[i]` in an array; from the environment,
    // `amqp.url`, with the URL's place in the variable said in the reason.
    let (urls, from_env): (Vec<(Element, String)>, bool) = match env(ENV_AMQP_URL) {
        Some(value) => (
            value
                .split(',')
                .map(str::trim)
                .enumerate()
                .map(|(index, url)| (Some(index + 1), url.to_owned()))
                .collect(),
            true,
        ),
        None => match node.get("url") {
            None => (vec![(None, default.to_owned())], false),
            Some(toml::Value::String(url)) => (vec![(None, url.clone())], false),
            Some(toml::Value::Array(items)) => {
                let mut urls = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    match item {
                        toml::Value::String(url) => urls.push((Some(index), url.clone())),
                        other => {
                            return Err(wrong_type(format!("{key}[{index}]"), "a string", other))
                        }
                    }
                }
                (urls, false)
            }
            Some(other) => {
                return Err(wrong_type(key, "a string or an array of strings", other));
            }
        },
    };
    let several = urls.len() > 1;
    let refuse = |element: &Element, why: String| match (from_env, element) {
        (true, Some(place)) if several => invalid(
            key.clone(),
            format!("{why} (URL {place} of the {ENV_AMQP_URL} environment variable)"),
        ),
        (true, _) => invalid(
            key.clone(),
            format!("{why} (the value comes from the {ENV_AMQP_URL} environment variable)"),
        ),
        (false, Some(index)) => invalid(format!("{key}[{index}]"), why),
        (false, None) => invalid(key.clone(), why),
    };
    if urls.is_empty() {
        return Err(invalid(
            key,
            "is an empty array: give at least one broker URL",
        ));
    }
    let mut first: Option<(String, String)> = None;
    for (element, url) in &urls {
        if url.is_empty() {
            return Err(refuse(
                element,
                "is empty: give a broker URL (several are separated by commas)".to_owned(),
            ));
        }
        check_url(url, &AMQP_URL).map_err(|why| refuse(element, why))?;
        let parsed: lapin::uri::AMQPUri = url.parse().map_err(|why: String| {
            refuse(
                element,
                format!("is not an AMQP URL: {}", without_url(&why, url)),
            )
        })?;
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
            .unwrap_or_default();
        match &first {
            None => first = Some((scheme, parsed.vhost)),
            Some((first_scheme, first_vhost)) => {
                if *first_vhost != parsed.vhost {
                    return Err(refuse(
                        element,
                        format!(
                            "names the vhost {:?}, but the first URL names {:?}: several URLs must \
                             be nodes of one cluster, with one vhost",
                            parsed.vhost, first_vhost
                        ),
                    ));
                }
                if *first_scheme != scheme {
                    return Err(refuse(
                        element,
                        format!(
                            "is {scheme}://, but the first URL is {first_scheme}://: the nodes of \
                             one cluster are reached the same way (one [amqp.tls] fits them all)"
                        ),
                    ));
                }
            }
        }
    }
    Ok((
        BrokerUrls(urls.into_iter().map(|(_, url)| Secret(url)).collect()),
        from_env,
    ))
}

/// Where a URL was given: its index in the file's array, or its place (from 1) among the
/// environment variable's; `None` for a lone string.
type Element = Option<usize>;

/// The URL parser's reason with the URL itself taken out: it may hold a password.
fn without_url(why: &str, url: &str) -> String {
    why.replace(url, "the URL")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::credentials;
    use crate::config::Settings;

    const MAPPING: &str = "[[mappings]]\nname = \"m\"\nevents = [\"Audience Entered\"]\n\
                           list_id = 1\nprofile_fields = { \"2\" = \"on\" }\n";

    fn load(text: &str, env_url: Option<&str>) -> Result<Settings, ConfigError> {
        let env_url = env_url.map(str::to_owned);
        Settings::from_toml(&format!("{text}\n{MAPPING}"), move |name| {
            if name == ENV_AMQP_URL {
                env_url.clone()
            } else {
                credentials(name)
            }
        })
    }

    fn refusal(text: &str, env_url: Option<&str>) -> String {
        load(text, env_url).expect_err("refused").to_string()
    }

    #[test]
    fn one_url_or_an_array_of_urls_are_tried_in_the_order_given() {
        let one = load("[amqp]\nurl = \"amqp://u:p@a:5672/%2f\"", None).unwrap();
        assert_eq!(one.amqp.urls.nodes(), ["a:5672"]);
        let several = load(
            "[amqp]\nurl = [\"amqp://u:p@a:5681/%2f\", \"amqp://u:p@b:5682/%2f\", \
             \"amqp://u:p@c/%2f\"]",
            None,
        )
        .unwrap();
        assert_eq!(several.amqp.urls.nodes(), ["a:5681", "b:5682", "c:5672"]);
    }

    #[test]
    fn the_environment_gives_several_urls_separated_by_commas() {
        let settings = load(
            "[amqp]\nurl = \"amqp://u:p@file:5672/%2f\"",
            Some("amqp://u:p@a:5681/%2f, amqp://u:p@b:5682/%2f"),
        )
        .unwrap();
        assert_eq!(settings.amqp.urls.nodes(), ["a:5681", "b:5682"]);
        let exposed: Vec<&str> = settings
            .amqp
            .urls
            .all()
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(exposed, ["amqp://u:p@a:5681/%2f", "amqp://u:p@b:5682/%2f"]);
    }

    #[test]
    fn urls_of_different_vhosts_are_refused_naming_the_key() {
        let why = refusal(
            "[amqp]\nurl = [\"amqp://u:secret1@a/%2f\", \"amqp://u:secret2@b/other\"]",
            None,
        );
        assert!(why.contains("`amqp.url[1]`"), "{why}");
        assert!(why.contains("vhost"), "{why}");
        assert!(!why.contains("secret"), "{why}");
        let why = refusal("", Some("amqp://u:secret1@a/%2f,amqp://u:secret2@b/x"));
        assert!(why.contains("AMQP_URL"), "{why}");
        assert!(!why.contains("secret"), "{why}");
    }

    #[test]
    fn mixed_schemes_empty_entries_and_wrong_types_are_refused() {
        let why = refusal("[amqp]\nurl = [\"amqp://a/%2f\", \"amqps://b/%2f\"]", None);
        assert!(
            why.contains("`amqp.url[1]`") && why.contains("amqps://"),
            "{why}"
        );
        let why = refusal("", Some("amqp://a/%2f,,amqp://b/%2f"));
        assert!(
            why.contains("URL 2 of the AMQP_URL") && why.contains("empty"),
            "{why}"
        );
        let why = refusal("[amqp]\nurl = []", None);
        assert!(
            why.contains("`amqp.url`") && why.contains("at least one"),
            "{why}"
        );
        let why = refusal("[amqp]\nurl = [\"amqp://a/%2f\", 5]", None);
        assert!(
            why.contains("`amqp.url[1]`") && why.contains("a string"),
            "{why}"
        );
        let why = refusal("[amqp]\nurl = 5", None);
        assert!(why.contains("`amqp.url`"), "{why}");
        let why = refusal("[amqp]\nurl = [\"amqp://a/%2f\", \"http://b/\"]", None);
        assert!(why.contains("`amqp.url[1]`"), "{why}");
    }

    #[test]
    fn every_password_of_every_url_stays_out_of_check_and_debug() {
        let settings = load(
            "[amqp]\nurl = [\"amqp://u:first-pw@a/%2f\", \"amqp://u:second-pw@b/%2f\"]",
            None,
        )
        .unwrap();
        let printed = settings.redacted_toml();
        let debug = format!("{settings:?}");
        for text in [&printed, &debug] {
            assert!(!text.contains("first-pw"), "{text}");
            assert!(!text.contains("second-pw"), "{text}");
        }
        assert!(
            printed
                .contains("url = [\"amqp://u:[redacted]@a/%2f\", \"amqp://u:[redacted]@b/%2f\"]"),
            "{printed}"
        );
    }
}
