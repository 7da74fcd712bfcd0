//! The environment variables that override the file. A value remembers which of the two it
//! came from, so that a refusal says where to look.

use super::document::Node;
use super::urls::{check_url, UrlRule};
use super::{invalid, ConfigError};

/// The environment variables that override the file.
pub const ENV_AMQP_URL: &str = "AMQP_URL";
pub const ENV_CLIENT_ID: &str = "LISTRAK_CLIENT_ID";
pub const ENV_CLIENT_SECRET: &str = "LISTRAK_CLIENT_SECRET";
pub const ENV_API_URL: &str = "LISTRAK_API_URL";
pub const ENV_AUTH_URL: &str = "LISTRAK_AUTH_URL";
/// `ingest`'s shared secret: when set, every request must carry a valid `X-Signature`.
pub const ENV_INGEST_SECRET: &str = "LISTRAK_INGEST_SECRET";
/// `ingest`'s bearer token: when set, every request must carry `Authorization: Bearer` it.
pub const ENV_INGEST_TOKEN: &str = "LISTRAK_INGEST_TOKEN";

/// A value the environment may override: the variable wins over the file.
pub(super) struct Sourced {
    value: Option<String>,
    variable: &'static str,
    pub(super) from_env: bool,
}

impl Sourced {
    pub(super) fn read(
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

    /// A value that only some commands need: empty when missing.
    pub(super) fn or_empty(self) -> String {
        self.value.unwrap_or_default()
    }

    /// A value that has no default: missing or empty is refused, naming both places.
    pub(super) fn required(self, node: &Node<'_>, name: &str) -> Result<String, ConfigError> {
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

    pub(super) fn url(
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
