//! Values that must never be printed, and the broker URL with its password hidden.

use std::fmt;

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

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

pub(super) const REDACTED: &str = "[redacted]";

/// Replaces the password of `scheme://user:password@host/...` with `[redacted]`.
pub(super) fn redact_url_password(url: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{secret_laden, AMQP_PASSWORD, SECRET};

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
}
