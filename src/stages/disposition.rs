//! What a settled message becomes: an ack, a copy in a delayed retry queue, or a dead
//! letter, each with the headers that say why. Pure: the clock and the message's earlier
//! failure headers are passed in, and the session loop does the publishing and acking.

use std::time::Duration;

use lapin::types::AMQPValue;
use lapin::BasicProperties;

use crate::stages::headers::{
    self, int_header, publishable, text_header, with_headers, within_frame,
    without_foreign_own_headers, RetryHeaders, Topology,
};

use crate::stages::model::{
    capped, AckOutcome, DeadLetterReason, EventTime, Rejection, QUOTE_LIMIT,
};
use crate::stages::settle::Settlement;

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Ack(AckOutcome),
    /// Leave it unacknowledged: the broker delivers it again (shutdown came first).
    Leave,
    /// Publish a copy with these headers, wait for the broker's confirm, then ack.
    Republish(Republish),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    pub exchange: String,
    pub routing_key: String,
    /// Added to the message's own headers (or replacing them, by name).
    pub headers: Vec<(&'static str, AMQPValue)>,
    /// Set for dead letters: the reason they are counted under once confirmed.
    pub dead_letter: Option<DeadLetterReason>,
}

impl Republish {
    /// How the original is counted once the copy is confirmed.
    pub fn outcome(&self) -> AckOutcome {
        match self.dead_letter {
            Some(_) => AckOutcome::DeadLettered,
            None => AckOutcome::RetryScheduled,
        }
    }
}

/// The retry settings and queue names a disposition needs.
pub struct Rules<'a> {
    pub schedule: &'a [Duration],
    /// A failure time further ahead than this is not believed (see `batch.clock_skew`).
    pub clock_skew: Duration,
    pub max_age: Duration,
    pub topology: &'a Topology,
}

/// Decides what becomes of a message whose updates all have a verdict (or that cannot be
/// applied at all: a dead letter with the poison's rejection).
pub fn dispose(
    settlement: Settlement,
    previous: RetryHeaders,
    now: EventTime,
    rules: &Rules<'_>,
) -> Disposition {
    // The headers may come from a producer, or a replica with a clock ahead: a first failure
    // in the future would keep the message's age at zero for ever.
    let previous = RetryHeaders {
        first_failed_at: previous
            .first_failed_at
            .filter(|at| !at.is_ahead_of(now, rules.clock_skew)),
        ..previous
    };
    match settlement {
        Settlement::Ack(outcome) => Disposition::Ack(outcome),
        Settlement::Abandon => Disposition::Leave,
        Settlement::DeadLetter(rejection) => dead_letter(rejection, previous, now, rules),
        Settlement::Retry => {
            let first_failed_at = previous.first_failed_at.unwrap_or(now);
            match plan_retry(
                previous.attempts,
                first_failed_at,
                now,
                rules.schedule,
                rules.max_age,
            ) {
                RetryPlan::Exhausted => {
                    let rejection = Rejection {
                        reason: DeadLetterReason::RetriesExhausted,
                        status: None,
                        error: None,
                        message: Some(format!(
                            "still failing after {} retries over {}",
                            previous.attempts,
                            humantime::format_duration(rules.max_age)
                        )),
                        list_id: None,
                    };
                    dead_letter(rejection, previous, now, rules)
                }
                RetryPlan::Delay { step } => Disposition::Republish(Republish {
                    exchange: String::new(),
                    routing_key: rules.topology.retry_queue(rules.schedule[step]),
                    headers: vec![
                        (
                            headers::ATTEMPTS,
                            int_header(i64::from(previous.attempts) + 1),
                        ),
                        (
                            headers::FIRST_FAILED_AT,
                            text_header(first_failed_at.to_rfc3339()),
                        ),
                        (headers::LAST_FAILED_AT, text_header(now.to_rfc3339())),
                    ],
                    dead_letter: None,
                }),
            }
        }
    }
}

fn dead_letter(
    rejection: Rejection,
    previous: RetryHeaders,
    now: EventTime,
    rules: &Rules<'_>,
) -> Disposition {
    let mut headers = vec![
        (headers::REASON, text_header(rejection.reason.as_str())),
        (headers::ATTEMPTS, int_header(i64::from(previous.attempts))),
        (
            headers::FIRST_FAILED_AT,
            text_header(previous.first_failed_at.unwrap_or(now).to_rfc3339()),
        ),
        (headers::LAST_FAILED_AT, text_header(now.to_rfc3339())),
    ];
    if let Some(status) = rejection.status {
        headers.push((headers::STATUS, int_header(i64::from(status))));
    }
    // Both quote what Listrak or the producer sent: any length.
    if let Some(error) = &rejection.error {
        headers.push((headers::ERROR, text_header(capped(error, QUOTE_LIMIT))));
    }
    if let Some(message) = &rejection.message {
        headers.push((headers::MESSAGE, text_header(capped(message, QUOTE_LIMIT))));
    }
    if let Some(list) = rejection.list_id {
        headers.push((headers::LIST_ID, int_header(i64::from(list.get()))));
    }
    Disposition::Republish(Republish {
        exchange: rules.topology.dead.clone(),
        routing_key: rules.topology.queue.clone(),
        headers,
        dead_letter: Some(rejection.reason),
    })
}

/// Where a message goes after in-process retries failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPlan {
    /// Publish to the retry queue of `retry.schedule[step]`.
    Delay { step: usize },
    /// Older than `retry.max_age`: dead-letter as `retries_exhausted`.
    Exhausted,
}

/// Picks the delayed retry queue for a message that has already been retried `attempts`
/// times, first failing at `first_failed_at`; the last step repeats until `max_age`.
pub fn plan_retry(
    attempts: u32,
    first_failed_at: EventTime,
    now: EventTime,
    schedule: &[Duration],
    max_age: Duration,
) -> RetryPlan {
    let age = Duration::from_micros(now.0.saturating_sub(first_failed_at.0).max(0) as u64);
    if age >= max_age || schedule.is_empty() {
        return RetryPlan::Exhausted;
    }
    let step = (attempts as usize).min(schedule.len() - 1);
    RetryPlan::Delay { step }
}

/// The properties of a copy for a retry queue or the dead-letter queue: the original's,
/// with the copy's headers, minus what would make the broker refuse or drop the copy.
/// RabbitMQ refuses a `user_id` other than the publishing connection's user (a producer
/// with its own user sets its own), so it moves to a header; a dead letter drops its
/// `expiration`, which would otherwise silently delete it from the dead-letter queue, as
/// RabbitMQ's own dead-lettering does.
pub fn republished(properties: &BasicProperties, copy: &Republish) -> BasicProperties {
    let properties = with_headers(
        &without_foreign_own_headers(properties),
        copy.headers.iter().cloned(),
    );
    within_frame(publishable(&properties, copy.dead_letter.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::model::ListId;

    const SECOND: i64 = 1_000_000;
    const NOW: EventTime = EventTime(1_700_000_000 * SECOND);

    fn topology() -> Topology {
        Topology::new("audiences", "audiences", &schedule())
    }

    fn schedule() -> Vec<Duration> {
        vec![Duration::from_secs(10), Duration::from_secs(60)]
    }

    fn decide(settlement: Settlement, previous: RetryHeaders) -> Disposition {
        let topology = topology();
        let schedule = schedule();
        let rules = Rules {
            schedule: &schedule,
            clock_skew: Duration::from_secs(3600),
            max_age: Duration::from_secs(3600),
            topology: &topology,
        };
        dispose(settlement, previous, NOW, &rules)
    }

    fn header<'a>(disposition: &'a Disposition, name: &str) -> Option<&'a AMQPValue> {
        match disposition {
            Disposition::Republish(copy) => copy
                .headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    fn failed(attempts: u32, seconds_ago: i64) -> RetryHeaders {
        RetryHeaders {
            attempts,
            first_failed_at: Some(EventTime(NOW.0 - seconds_ago * SECOND)),
        }
    }

    #[test]
    fn each_settlement_becomes_what_its_table_row_says() {
        let rejected = Rejection {
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: Some("ERROR_INVALID_PARAMETER".into()),
            message: Some("bad email".into()),
            list_id: ListId::new(7),
        };
        // (settlement, earlier failures, exchange and routing key or ack, outcome, attempts)
        type Row<'a> = (
            Settlement,
            RetryHeaders,
            Option<(&'a str, &'a str)>,
            AckOutcome,
            i64,
        );
        let table: Vec<Row<'_>> = vec![
            (
                Settlement::Ack(AckOutcome::Applied),
                RetryHeaders::default(),
                None,
                AckOutcome::Applied,
                0,
            ),
            (
                Settlement::Retry,
                RetryHeaders::default(),
                Some(("", "audiences.retries.10s")),
                AckOutcome::RetryScheduled,
                1,
            ),
            (
                Settlement::Retry,
                failed(1, 30),
                Some(("", "audiences.retries.1m")),
                AckOutcome::RetryScheduled,
                2,
            ),
            (
                Settlement::Retry,
                failed(9, 600),
                Some(("", "audiences.retries.1m")),
                AckOutcome::RetryScheduled,
                10,
            ),
            (
                Settlement::Retry,
                failed(4, 3600),
                Some(("audiences.dead", "audiences")),
                AckOutcome::DeadLettered,
                4,
            ),
            (
                Settlement::DeadLetter(rejected),
                failed(2, 60),
                Some(("audiences.dead", "audiences")),
                AckOutcome::DeadLettered,
                2,
            ),
        ];
        for (settlement, previous, route, outcome, attempts) in table {
            let row = format!("{settlement:?} after {previous:?}");
            let disposition = decide(settlement, previous);
            match (&disposition, route) {
                (Disposition::Ack(acked), None) => assert_eq!(*acked, outcome, "{row}"),
                (Disposition::Republish(copy), Some((exchange, routing_key))) => {
                    assert_eq!(copy.exchange, exchange, "{row}");
                    assert_eq!(copy.routing_key, routing_key, "{row}");
                    assert_eq!(copy.outcome(), outcome, "{row}");
                    assert_eq!(
                        header(&disposition, headers::ATTEMPTS),
                        Some(&int_header(attempts)),
                        "{row}"
                    );
                }
                other => panic!("{row}: got {other:?}"),
            }
        }
    }

    #[test]
    fn a_first_retry_starts_the_age_now_and_later_ones_keep_it() {
        let first = decide(Settlement::Retry, RetryHeaders::default());
        assert_eq!(
            header(&first, headers::FIRST_FAILED_AT),
            Some(&text_header(NOW.to_rfc3339()))
        );
        let later = decide(Settlement::Retry, failed(1, 30));
        assert_eq!(
            header(&later, headers::FIRST_FAILED_AT),
            Some(&text_header(EventTime(NOW.0 - 30 * SECOND).to_rfc3339()))
        );
    }

    #[test]
    fn a_dead_letter_carries_listraks_answer_and_its_reason() {
        let rejection = Rejection {
            reason: DeadLetterReason::Rejected,
            status: Some(400),
            error: Some("ERROR_INVALID_PARAMETER".into()),
            message: Some("bad email".into()),
            list_id: ListId::new(7),
        };
        let disposition = decide(Settlement::DeadLetter(rejection), RetryHeaders::default());
        assert_eq!(
            header(&disposition, headers::REASON),
            Some(&text_header("rejected"))
        );
        assert_eq!(
            header(&disposition, headers::STATUS),
            Some(&int_header(400))
        );
        assert_eq!(
            header(&disposition, headers::ERROR),
            Some(&text_header("ERROR_INVALID_PARAMETER"))
        );
        assert_eq!(
            header(&disposition, headers::MESSAGE),
            Some(&text_header("bad email"))
        );
        assert_eq!(header(&disposition, headers::LIST_ID), Some(&int_header(7)));
        let Disposition::Republish(copy) = disposition else {
            unreachable!()
        };
        assert_eq!(copy.dead_letter, Some(DeadLetterReason::Rejected));
    }

    #[test]
    fn quoted_text_in_a_dead_letter_is_cut_to_a_kibibyte_on_a_character_boundary() {
        let rejection = Rejection {
            reason: DeadLetterReason::InvalidEvent,
            status: None,
            error: Some("E".repeat(5000)),
            message: Some("é".repeat(5000)),
            list_id: None,
        };
        let disposition = decide(Settlement::DeadLetter(rejection), RetryHeaders::default());
        for name in [headers::ERROR, headers::MESSAGE] {
            let text = headers::as_text(header(&disposition, name).unwrap()).unwrap();
            assert!(text.len() <= QUOTE_LIMIT, "{name}: {} bytes", text.len());
            assert!(text.ends_with('…'), "{name}");
        }
    }

    #[test]
    fn retries_older_than_max_age_are_exhausted_dead_letters() {
        let disposition = decide(Settlement::Retry, failed(5, 7200));
        assert_eq!(
            header(&disposition, headers::REASON),
            Some(&text_header("retries_exhausted"))
        );
    }

    #[test]
    fn a_first_failure_dated_in_the_future_counts_from_now() {
        let disposition = decide(Settlement::Retry, failed(1, -10 * 24 * 3600));
        assert_eq!(
            header(&disposition, headers::FIRST_FAILED_AT),
            Some(&text_header(NOW.to_rfc3339()))
        );
    }

    #[test]
    fn an_abandoned_message_is_left_for_the_broker() {
        assert_eq!(
            decide(Settlement::Abandon, RetryHeaders::default()),
            Disposition::Leave
        );
    }

    fn three_steps() -> Vec<Duration> {
        ["10s", "1m", "10m"]
            .iter()
            .map(|s| humantime::parse_duration(s).unwrap())
            .collect()
    }

    #[test]
    fn each_retry_takes_the_next_step_and_the_last_step_repeats() {
        let max_age = Duration::from_secs(3600);
        let table = [(0, 0), (1, 1), (2, 2), (3, 2), (40, 2)];
        for (attempts, step) in table {
            assert_eq!(
                plan_retry(
                    attempts,
                    EventTime(0),
                    EventTime(60 * SECOND),
                    &three_steps(),
                    max_age
                ),
                RetryPlan::Delay { step },
                "after {attempts} attempts"
            );
        }
    }

    #[test]
    fn a_message_older_than_max_age_is_exhausted() {
        let max_age = Duration::from_secs(3600);
        assert_eq!(
            plan_retry(
                1,
                EventTime(0),
                EventTime(3600 * SECOND),
                &three_steps(),
                max_age
            ),
            RetryPlan::Exhausted
        );
        assert_eq!(
            plan_retry(
                1,
                EventTime(0),
                EventTime(3599 * SECOND),
                &three_steps(),
                max_age
            ),
            RetryPlan::Delay { step: 1 }
        );
    }
}
