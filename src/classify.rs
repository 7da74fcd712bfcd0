//! Classifying: one pure decision from a Listrak answer to what happens to the batch.

use std::time::Duration;

/// Listrak's error envelope: `{"status":400,"error":"ERROR_INVALID_PARAMETER","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct ListrakError {
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub message: String,
}

/// What one request ended with, as seen from the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Listrak answered.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        error: Option<ListrakError>,
    },
    /// No answer within `listrak.request_timeout`.
    Timeout,
    /// No connection, a reset, or a body that could not be read.
    Connection(String),
    /// No token could be obtained (the token endpoint failed or refused the credentials).
    NoToken(String),
}

impl Outcome {
    /// The `status` label of `listrak_requests_total`: the HTTP code, or what stood in for one.
    pub fn status_label(&self) -> String {
        match self {
            Self::Answered { status, .. } => status.to_string(),
            Self::Timeout => "timeout".into(),
            Self::Connection(_) => "connection_error".into(),
            Self::NoToken(_) => "no_token".into(),
        }
    }
}

/// What to do about an outcome (SPEC.md's failure table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Accepted: settle every contact as applied.
    Ok,
    /// The token was refused: refresh it once for everyone, resend.
    Auth,
    /// Not the messages' fault: hold the batch, back off, retry; never dead-letter for it.
    Systemic { retry_after: Option<Duration> },
    /// One of several contacts may be at fault (or the body was too large): split and resend.
    Ambiguous,
    /// Listrak refuses these contacts for good.
    Permanent,
}

/// Decides from the outcome alone; `contacts` is the number of contacts in the request.
pub fn classify(outcome: &Outcome, contacts: usize) -> Class {
    match outcome {
        Outcome::Timeout | Outcome::Connection(_) | Outcome::NoToken(_) => {
            Class::Systemic { retry_after: None }
        }
        Outcome::Answered {
            status,
            retry_after,
            ..
        } => match *status {
            200..=299 => Class::Ok,
            401 => Class::Auth,
            // 413 is not documented for Listrak, but if a proxy says it, halves will pass.
            400 | 404 | 413 if contacts > 1 => Class::Ambiguous,
            400 | 404 | 413 => Class::Permanent,
            // 403 is what paused API access answers: an operator's switch, not the data.
            403 | 408 | 423 | 429 => Class::Systemic {
                retry_after: *retry_after,
            },
            501 => Class::Permanent,
            500..=599 => Class::Systemic {
                retry_after: *retry_after,
            },
            // Other 4xx (415, 422, …) say the request itself is wrong: resending cannot help.
            400..=499 => Class::Permanent,
            // 1xx and 3xx are not answers this API gives; treat them as a fault on the way.
            _ => Class::Systemic {
                retry_after: *retry_after,
            },
        },
    }
}

/// Parses `Retry-After` given in seconds (the HTTP-date form is not used by APIs like this one).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> Outcome {
        Outcome::Answered {
            status,
            retry_after: None,
            error: None,
        }
    }

    #[test]
    fn every_outcome_falls_in_the_class_the_failure_table_gives() {
        let systemic = Class::Systemic { retry_after: None };
        let table: &[(Outcome, usize, Class)] = &[
            (answered(201), 10, Class::Ok),
            (answered(201), 1, Class::Ok),
            (answered(401), 10, Class::Auth),
            (answered(408), 10, systemic),
            (answered(423), 10, systemic),
            (answered(429), 10, systemic),
            (answered(429), 1, systemic),
            (answered(500), 10, systemic),
            (answered(502), 10, systemic),
            (answered(503), 1, systemic),
            (answered(504), 10, systemic),
            (answered(403), 10, systemic),
            (answered(501), 10, Class::Permanent),
            (answered(400), 2, Class::Ambiguous),
            (answered(404), 1000, Class::Ambiguous),
            (answered(413), 2, Class::Ambiguous),
            (answered(400), 1, Class::Permanent),
            (answered(404), 1, Class::Permanent),
            (answered(415), 10, Class::Permanent),
            (answered(302), 10, systemic),
            (Outcome::Timeout, 10, systemic),
            (Outcome::Connection("reset".into()), 1, systemic),
            (
                Outcome::NoToken("503 from the token endpoint".into()),
                1,
                systemic,
            ),
        ];
        for (outcome, contacts, class) in table {
            assert_eq!(
                classify(outcome, *contacts),
                *class,
                "{outcome:?} for {contacts} contacts"
            );
        }
    }

    #[test]
    fn a_retry_after_is_carried_into_the_systemic_class() {
        let outcome = Outcome::Answered {
            status: 429,
            retry_after: parse_retry_after(" 7 "),
            error: None,
        };
        assert_eq!(
            classify(&outcome, 5),
            Class::Systemic {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn an_unreadable_retry_after_is_ignored() {
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
