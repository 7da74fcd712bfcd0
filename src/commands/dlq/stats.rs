//! `dlq stats`: dead letters grouped by cause (reason, list, HTTP status, Listrak error code),
//! with counts and the oldest and newest failure of each group.

use std::collections::BTreeMap;

use crate::stages::model::EventTime;

use super::letter::Facts;

/// One cause of failure. Ordered so that equal counts list in a stable order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cause {
    pub reason: String,
    pub list_id: Option<i64>,
    pub status: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub cause: Cause,
    pub count: u64,
    /// Failure times of the group's messages that have one (see [`Facts::failed_at`]).
    pub oldest: Option<EventTime>,
    pub newest: Option<EventTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    groups: BTreeMap<Cause, Group>,
    total: u64,
}

impl Stats {
    pub fn add(&mut self, facts: &Facts) {
        let cause = Cause {
            reason: facts.reason.clone(),
            list_id: facts.list_id,
            status: facts.status,
            error: facts.error.clone(),
        };
        let group = self.groups.entry(cause.clone()).or_insert(Group {
            cause,
            count: 0,
            oldest: None,
            newest: None,
        });
        group.count += 1;
        if let Some(at) = facts.failed_at {
            group.oldest = Some(group.oldest.map_or(at, |t| t.min(at)));
            group.newest = Some(group.newest.map_or(at, |t| t.max(at)));
        }
        self.total += 1;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The largest groups first; equal counts by cause.
    pub fn groups(&self) -> Vec<&Group> {
        let mut groups: Vec<&Group> = self.groups.values().collect();
        groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.cause.cmp(&b.cause)));
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(reason: &str, list: Option<i64>, status: Option<i64>, at: Option<i64>) -> Facts {
        Facts {
            reason: reason.into(),
            list_id: list,
            status,
            error: status.map(|s| format!("E{s}")),
            failed_at: at.map(EventTime),
            ..Facts::default()
        }
    }

    #[test]
    fn messages_group_by_reason_list_status_and_error_largest_first() {
        let mut stats = Stats::default();
        let letters = [
            facts("rejected", Some(1), Some(400), Some(30)),
            facts("rejected", Some(1), Some(400), Some(10)),
            facts("rejected", Some(1), Some(400), None),
            facts("rejected", Some(2), Some(400), Some(5)),
            facts("list_not_found", Some(9), Some(404), Some(20)),
            facts("list_not_found", Some(9), Some(404), Some(25)),
            facts("invalid_json", None, None, Some(1)),
            facts("delivery_limit", None, None, None),
        ];
        for letter in &letters {
            stats.add(letter);
        }
        type Row<'a> = (&'a str, Option<i64>, Option<i64>, u64);
        let rows: Vec<Row> = stats
            .groups()
            .iter()
            .map(|g| {
                let c = &g.cause;
                (c.reason.as_str(), c.list_id, c.status, g.count)
            })
            .collect();
        let spans: Vec<(Option<i64>, Option<i64>)> = stats
            .groups()
            .iter()
            .map(|g| (g.oldest.map(|t| t.0), g.newest.map(|t| t.0)))
            .collect();
        assert_eq!(
            rows,
            [
                ("rejected", Some(1), Some(400), 3),
                ("list_not_found", Some(9), Some(404), 2),
                ("delivery_limit", None, None, 1),
                ("invalid_json", None, None, 1),
                ("rejected", Some(2), Some(400), 1),
            ]
        );
        assert_eq!(
            spans,
            [
                (Some(10), Some(30)),
                (Some(20), Some(25)),
                (None, None),
                (Some(1), Some(1)),
                (Some(5), Some(5)),
            ]
        );
        assert_eq!(stats.total(), letters.len() as u64);
    }

    #[test]
    fn the_same_reason_with_another_error_code_is_another_cause() {
        let mut stats = Stats::default();
        let mut first = facts("rejected", Some(1), Some(400), None);
        stats.add(&first);
        first.error = Some("ERROR_OTHER".into());
        stats.add(&first);
        assert_eq!(stats.groups().len(), 2);
    }
}
