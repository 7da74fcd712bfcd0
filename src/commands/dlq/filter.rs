//! Which dead letters a command acts on: `--reason`, `--list-id`, `--status`, `--error`,
//! `--older-than`. A pure decision over [`Facts`].

use std::fmt;
use std::time::Duration;

use crate::stages::model::EventTime;

use super::letter::{known_reasons, Facts};

/// Every filter given must hold; a filter given several values holds when one of them does.
/// The empty filter matches every message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub reasons: Vec<String>,
    pub list_ids: Vec<i64>,
    pub statuses: Vec<i64>,
    /// Listrak error codes, compared without regard to case.
    pub errors: Vec<String>,
    /// Failed longer ago than this. A message whose failure time is unknown does not match:
    /// a destructive command should not guess.
    pub older_than: Option<Duration>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches(&self, facts: &Facts, now: EventTime) -> bool {
        let any = |values: &[i64], value: Option<i64>| {
            values.is_empty() || value.is_some_and(|v| values.contains(&v))
        };
        (self.reasons.is_empty() || self.reasons.contains(&facts.reason))
            && any(&self.list_ids, facts.list_id)
            && any(&self.statuses, facts.status)
            && (self.errors.is_empty()
                || facts.error.as_deref().is_some_and(|error| {
                    self.errors
                        .iter()
                        .any(|wanted| wanted.eq_ignore_ascii_case(error))
                }))
            && self.older_than.is_none_or(|age| {
                let age = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
                facts
                    .failed_at
                    .is_some_and(|failed| failed.0 <= now.0.saturating_sub(age))
            })
    }
}

/// The filter as it would be typed, for summaries: `--reason rejected --older-than 2h`.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: ToString>(values: &[T]) -> String {
            values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
        let mut parts = Vec::new();
        if !self.reasons.is_empty() {
            parts.push(format!("--reason {}", list(&self.reasons)));
        }
        if !self.list_ids.is_empty() {
            parts.push(format!("--list-id {}", list(&self.list_ids)));
        }
        if !self.statuses.is_empty() {
            parts.push(format!("--status {}", list(&self.statuses)));
        }
        if !self.errors.is_empty() {
            parts.push(format!("--error {}", list(&self.errors)));
        }
        if let Some(age) = self.older_than {
            parts.push(format!("--older-than {}", humantime::format_duration(age)));
        }
        if parts.is_empty() {
            f.write_str("no filter")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// Parses a `--reason` value: one of the worker's reasons, `unknown`, or a broker reason
/// (`broker_expired`, ...). A typo is refused rather than silently matching nothing.
pub fn parse_reason(text: &str) -> Result<String, String> {
    let text = text.trim();
    let valid = known_reasons().any(|known| known == text)
        || text
            .strip_prefix("broker_")
            .is_some_and(|rest| !rest.is_empty());
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a dead-letter reason; expected one of {}, or broker_<reason>",
            known_reasons().collect::<Vec<_>>().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000;
    const NOW: EventTime = EventTime(1_000 * HOUR);

    fn rejected() -> Facts {
        Facts {
            reason: "rejected".into(),
            list_id: Some(12345),
            status: Some(400),
            error: Some("ERROR_INVALID_PARAMETER".into()),
            failed_at: Some(EventTime(NOW.0 - 3 * HOUR)),
            ..Facts::default()
        }
    }

    fn invalid_json() -> Facts {
        Facts {
            reason: "invalid_json".into(),
            ..Facts::default()
        }
    }

    #[test]
    fn each_filter_selects_what_it_names() {
        let hours = |h: u64| Some(Duration::from_secs(h * 3600));
        let table: Vec<(Filter, Facts, bool)> = vec![
            (Filter::default(), rejected(), true),
            (Filter::default(), invalid_json(), true),
            (
                Filter {
                    reasons: vec!["rejected".into()],
                    ..Filter::default()
                },
                rejected(),
                true,
            ),
            (
                Filter {
                    reasons: vec!["list_not_found".into(), "invalid_json".into()],
                    ..Filter::default()
                },
                rejected(),
                false,
            ),
            (
                Filter {
                    list_ids: vec![999, 12345],
                    ..Filter::default()
                },
                rejected(),
                true,
            ),
            (
                Filter {
                    list_ids: vec![12345],
                    ..Filter::default()
                },
                invalid_json(),
                false,
            ),
            (
                Filter {
                    statuses: vec![404],
                    ..Filter::default()
                },
                rejected(),
                false,
            ),
            (
                Filter {
                    errors: vec!["error_invalid_parameter".into()],
                    ..Filter::default()
                },
                rejected(),
                true,
            ),
            (
                Filter {
                    errors: vec!["ERROR_INVALID_PARAMETER".into()],
                    ..Filter::default()
                },
                invalid_json(),
                false,
            ),
            (
                Filter {
                    older_than: hours(2),
                    ..Filter::default()
                },
                rejected(),
                true,
            ),
            (
                Filter {
                    older_than: hours(3),
                    ..Filter::default()
                },
                rejected(),
                true,
            ),
            (
                Filter {
                    older_than: hours(4),
                    ..Filter::default()
                },
                rejected(),
                false,
            ),
            (
                Filter {
                    older_than: hours(1),
                    ..Filter::default()
                },
                invalid_json(),
                false,
            ),
            (
                Filter {
                    reasons: vec!["rejected".into()],
                    statuses: vec![400],
                    list_ids: vec![7],
                    ..Filter::default()
                },
                rejected(),
                false,
            ),
        ];
        for (i, (filter, facts, expected)) in table.into_iter().enumerate() {
            assert_eq!(filter.matches(&facts, NOW), expected, "case {i}: {filter}");
        }
    }

    #[test]
    fn reasons_are_checked_so_a_typo_matches_nothing_by_accident() {
        assert_eq!(parse_reason("rejected"), Ok("rejected".into()));
        assert_eq!(parse_reason("delivery_limit"), Ok("delivery_limit".into()));
        assert_eq!(parse_reason("unknown_field"), Ok("unknown_field".into()));
        assert_eq!(parse_reason("unknown"), Ok("unknown".into()));
        assert_eq!(parse_reason("broker_expired"), Ok("broker_expired".into()));
        let refused = parse_reason("rejcted").unwrap_err();
        assert!(refused.contains("list_not_found"), "{refused}");
        assert!(parse_reason("broker_").is_err());
    }

    #[test]
    fn a_filter_prints_as_it_is_typed() {
        let filter = Filter {
            reasons: vec!["rejected".into(), "list_not_found".into()],
            older_than: Some(Duration::from_secs(7200)),
            ..Filter::default()
        };
        assert_eq!(
            filter.to_string(),
            "--reason rejected,list_not_found --older-than 2h"
        );
        assert_eq!(Filter::default().to_string(), "no filter");
    }
}
