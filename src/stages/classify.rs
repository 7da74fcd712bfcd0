//! Classifying: one pure decision from a Listrak answer to what happens to the batch.

use std::time::Duration;

use crate::stages::model::{DeadLetterReason, ListId, Rejection, Verdict};

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

/// Why a catalogue request (lists, field groups, fields) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CatalogueError {
    #[error("no Listrak token: {0}")]
    NoToken(String),
    #[error("{request} failed: {reason}")]
    Transport { request: String, reason: String },
    #[error("{request}: Listrak answered {status} {error}: {message}")]
    Refused {
        request: String,
        status: u16,
        error: String,
        message: String,
    },
    #[error("{request}: the answer is not what Listrak documents: {reason}")]
    Unexpected { request: String, reason: String },
}

impl CatalogueError {
    /// Listrak's 404: the list (or group) in the path does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status: 404, .. })
    }
}

impl CatalogueError {
    /// Whether the failure is Listrak's passing fault (tried again within the budget, then
    /// the retry queues), as the update path's classes have it.
    pub fn is_systemic(&self) -> bool {
        match self {
            Self::NoToken(_) | Self::Transport { .. } | Self::Unexpected { .. } => true,
            Self::Refused { status, .. } => {
                matches!(status, 401 | 403 | 408 | 423 | 429) || (*status >= 500 && *status != 501)
            }
        }
    }
}

/// The longest audience key taken as a field name. Listrak documents no limit; Engage's keys
/// are a few dozen characters, and anything longer is a producer's bug, not an audience.
pub const MAX_FIELD_NAME_CHARS: usize = 100;

/// Why a message's fields could not all be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Unresolvable {
    /// No such field, and the mapping does not create it (or a field of another type holds
    /// the name): the message is dead-lettered as `unknown_field`.
    #[error(
        "list {list} has no Check Box field {name:?} in the profile field group {group:?}; \
             create it (`listrak provision --audience {name}`) or set `create = true` in the \
             mapping (a field of that name and another type is never replaced), then replay the \
             dead letters with `dlq replay --reason unknown_field`"
    )]
    UnknownField {
        list: ListId,
        group: String,
        name: String,
    },
    /// `create = true`, but the creation budget of the list is spent.
    #[error(
        "list {list} has no Check Box field {name:?} in the profile field group {group:?}, and \
             {budget} fields were created in this list in the last 24 hours, the most \
             `listrak.field_creation_budget` allows; if these audiences are real, raise the \
             budget (or create the fields with `listrak provision`), then replay the dead \
             letters with `dlq replay --reason unknown_field` (they also apply once the 24 \
             hours have passed)"
    )]
    BudgetSpent {
        list: ListId,
        group: String,
        name: String,
        budget: usize,
    },
    /// The audience key cannot name a Listrak field; no request is made for it.
    #[error(
        "the audience key {name:?} cannot be the name of a profile field in list {list} (empty, \
             over {MAX_FIELD_NAME_CHARS} characters, or with control characters); fix the \
             producer, then replay the dead letters with `dlq replay --reason unknown_field`"
    )]
    InvalidName { list: ListId, name: String },
    /// Reading or extending the catalogue failed.
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    /// The message's hold budget was spent waiting (for a read, a creation, or the turn of
    /// the list): it goes to the retry queues.
    #[error("the list's profile fields could not be resolved within the message's hold budget")]
    OutOfTime,
    /// A bug: the resolution panicked. The message goes to the retry queues.
    #[error("resolving the message's profile fields panicked")]
    Panicked,
}

/// What becomes of a message whose fields could not be resolved, in the update path's
/// classes: a field that is not there (and will not be made) dead-letters it as
/// `unknown_field`, a list that is not there as `list_not_found`, Listrak refusing to make the
/// field as `unknown_field` with its answer; Listrak's passing faults, a spent hold budget and
/// a bug send it to the retry queues.
pub fn unresolved_verdict(why: &Unresolvable) -> Verdict {
    let unknown_field = |list: ListId| {
        Verdict::DeadLetter(Rejection {
            reason: DeadLetterReason::UnknownField,
            status: None,
            error: None,
            message: Some(why.to_string()),
            list_id: Some(list),
        })
    };
    match why {
        Unresolvable::UnknownField { list, .. }
        | Unresolvable::BudgetSpent { list, .. }
        | Unresolvable::InvalidName { list, .. } => unknown_field(*list),
        Unresolvable::Catalogue(error) if error.is_not_found() => Verdict::DeadLetter(Rejection {
            reason: DeadLetterReason::ListNotFound,
            status: Some(404),
            error: None,
            message: Some(error.to_string()),
            list_id: None,
        }),
        Unresolvable::Catalogue(
            error @ CatalogueError::Refused {
                status,
                error: code,
                ..
            },
        ) if !error.is_systemic() => Verdict::DeadLetter(Rejection {
            reason: DeadLetterReason::UnknownField,
            status: Some(*status),
            error: Some(code.clone()).filter(|code| !code.is_empty()),
            message: Some(format!(
                "{error}; the audience's field could not be created, so its events were \
                 dead-lettered; replay them with `dlq replay --reason unknown_field` once the \
                 field exists"
            )),
            list_id: None,
        }),
        Unresolvable::Catalogue(_) | Unresolvable::OutOfTime | Unresolvable::Panicked => {
            Verdict::Retry
        }
    }
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

    #[test]
    fn a_message_whose_fields_cannot_be_resolved_is_dead_lettered_or_retried_by_class() {
        let list = ListId::new(7).unwrap();
        let refused = |status: u16, code: &str| {
            Unresolvable::Catalogue(CatalogueError::Refused {
                request: "POST /List/7/SegmentationFieldGroup/1/SegmentationField".into(),
                status,
                error: code.into(),
                message: "no".into(),
            })
        };
        let dead =
            |reason, status: Option<u16>, list_id: Option<ListId>| (Some(reason), status, list_id);
        let cases = [
            (
                Unresolvable::UnknownField {
                    list,
                    group: "Engage Audiences".into(),
                    name: "vip".into(),
                },
                dead(DeadLetterReason::UnknownField, None, Some(list)),
            ),
            (
                Unresolvable::BudgetSpent {
                    list,
                    group: "Engage Audiences".into(),
                    name: "vip".into(),
                    budget: 100,
                },
                dead(DeadLetterReason::UnknownField, None, Some(list)),
            ),
            (
                Unresolvable::InvalidName {
                    list,
                    name: String::new(),
                },
                dead(DeadLetterReason::UnknownField, None, Some(list)),
            ),
            (
                refused(404, "ERROR_UNABLE_TO_LOCATE_RESOURCE"),
                dead(DeadLetterReason::ListNotFound, Some(404), None),
            ),
            (
                refused(400, "ERROR_INVALID_PARAMETER"),
                dead(DeadLetterReason::UnknownField, Some(400), None),
            ),
            (refused(503, "ERROR_UNAVAILABLE"), (None, None, None)),
            (refused(429, ""), (None, None, None)),
            (refused(401, ""), (None, None, None)),
            (
                Unresolvable::Catalogue(CatalogueError::Transport {
                    request: "GET /List/7/SegmentationFieldGroup".into(),
                    reason: "reset".into(),
                }),
                (None, None, None),
            ),
            (Unresolvable::OutOfTime, (None, None, None)),
            (Unresolvable::Panicked, (None, None, None)),
        ];
        for (why, (reason, status, list_id)) in cases {
            let verdict = unresolved_verdict(&why);
            match (&verdict, reason) {
                (Verdict::DeadLetter(rejection), Some(reason)) => {
                    assert_eq!(rejection.reason, reason, "{why}");
                    assert_eq!(rejection.status, status, "{why}");
                    assert_eq!(rejection.list_id, list_id, "{why}");
                    assert!(rejection.message.is_some(), "{why}: says why");
                }
                (Verdict::Retry, None) => {}
                _ => panic!("{why}: {verdict:?}"),
            }
        }
        let made = unresolved_verdict(&refused(400, "ERROR_INVALID_PARAMETER"));
        let Verdict::DeadLetter(rejection) = made else {
            panic!("dead-lettered");
        };
        assert_eq!(rejection.error.as_deref(), Some("ERROR_INVALID_PARAMETER"));
        assert!(rejection
            .message
            .unwrap()
            .contains("dlq replay --reason unknown_field"));
    }
}
