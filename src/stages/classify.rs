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
        /// The `resourceId` of a 201: the import Listrak started.
        resource_id: Option<String>,
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

/// What to do about an outcome (the failure table in `docs/design.md`, "Delivery semantics").
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

/// The longest `Retry-After` taken as it is: a day. The header comes from outside, any
/// number fits in it, and the delivery clamps it further to its own budget.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parses `Retry-After` as delay-seconds or as an HTTP-date (`now` is the clock it is read
/// against); a date in the past is no wait at all, anything else unreadable is ignored.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = date.with_timezone(&chrono::Utc) - now;
    Some(wait.to_std().unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> Outcome {
        Outcome::Answered {
            status,
            retry_after: None,
            error: None,
            resource_id: None,
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

    fn at(text: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn a_retry_after_is_carried_into_the_systemic_class() {
        let outcome = Outcome::Answered {
            status: 429,
            retry_after: parse_retry_after(" 7 ", at("2015-10-21T07:28:00Z")),
            error: None,
            resource_id: None,
        };
        assert_eq!(
            classify(&outcome, 5),
            Class::Systemic {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn a_retry_after_reads_as_seconds_or_a_date_and_never_beyond_a_day() {
        let now = at("2015-10-21T07:28:00Z");
        let second = Duration::from_secs(1);
        let table: &[(&str, Option<Duration>)] = &[
            ("0", Some(Duration::ZERO)),
            ("120", Some(120 * second)),
            ("9223372036854775807", Some(MAX_RETRY_AFTER)),
            ("18446744073709551615", Some(MAX_RETRY_AFTER)),
            ("Wed, 21 Oct 2015 07:28:30 GMT", Some(30 * second)),
            ("Wed, 21 Oct 2015 07:00:00 GMT", Some(Duration::ZERO)),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(MAX_RETRY_AFTER)),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
            ("99999999999999999999999", None),
        ];
        for (header, expected) in table {
            assert_eq!(parse_retry_after(header, now), *expected, "{header:?}");
        }
    }
}
