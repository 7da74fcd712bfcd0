//! The retry schedule: in-process backoff for a held batch, then the delayed retry queues.
//!
//! The only module that uses the `backoff` crate (unmaintained, RUSTSEC-2025-0012), so it can
//! be replaced here alone.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rand::Rng;

use crate::model::EventTime;

const FIRST_INTERVAL: Duration = Duration::from_millis(200);
const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// Backoff for one held batch: exponential intervals with full jitter, within a budget.
pub struct InProcessBackoff {
    exponential: ExponentialBackoff,
    deadline: Instant,
}

impl InProcessBackoff {
    /// `deadline` bounds the whole hold, so it stays well under RabbitMQ's consumer timeout.
    pub fn until(deadline: Instant) -> Self {
        let exponential = ExponentialBackoff {
            current_interval: FIRST_INTERVAL,
            initial_interval: FIRST_INTERVAL,
            // Jitter is applied below, over the whole interval (full jitter).
            randomization_factor: 0.0,
            multiplier: 2.0,
            max_interval: MAX_INTERVAL,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Self {
            exponential,
            deadline,
        }
    }

    /// How long to wait before the next attempt, or `None` when the budget is spent.
    /// A `Retry-After` from Listrak is a floor under the jittered wait.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
        let ceiling = self.exponential.next_backoff()?;
        let jittered = rand::rng().random_range(Duration::ZERO..=ceiling);
        // `retry_after` comes from Listrak's answer: any size, so no unchecked addition.
        let delay = retry_after.map_or(jittered, |floor| jittered.max(floor));
        Instant::now()
            .checked_add(delay)
            .is_some_and(|resume| resume < self.deadline)
            .then_some(delay)
    }
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

/// The name of the retry queue for one step: `<queue>.retry.<delay>`, e.g. `….retry.10m`.
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", humantime::format_duration(delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    fn schedule() -> Vec<Duration> {
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
                    &schedule(),
                    max_age
                ),
                RetryPlan::Delay { step },
                "after {attempts} attempts"
            );
        }
    }

    #[test]
    fn a_retry_after_beyond_any_clock_ends_the_hold_instead_of_overflowing() {
        let mut backoff = InProcessBackoff::until(Instant::now() + Duration::from_secs(60));
        assert_eq!(backoff.next_delay(Some(Duration::MAX)), None);
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(9_223_372_036_854_775_807))),
            None
        );
        assert!(backoff.next_delay(None).is_some());
    }

    #[test]
    fn a_message_older_than_max_age_is_exhausted() {
        let max_age = Duration::from_secs(3600);
        assert_eq!(
            plan_retry(
                1,
                EventTime(0),
                EventTime(3600 * SECOND),
                &schedule(),
                max_age
            ),
            RetryPlan::Exhausted
        );
        assert_eq!(
            plan_retry(
                1,
                EventTime(0),
                EventTime(3599 * SECOND),
                &schedule(),
                max_age
            ),
            RetryPlan::Delay { step: 1 }
        );
    }

    #[test]
    fn retry_queues_are_named_after_their_delay() {
        assert_eq!(
            retry_queue_name("listrak.audience", Duration::from_secs(600)),
            "listrak.audience.retry.10m"
        );
        assert_eq!(
            retry_queue_name("q", Duration::from_secs(4 * 3600)),
            "q.retry.4h"
        );
    }

    #[test]
    fn backoff_stays_within_its_ceiling_and_honours_retry_after() {
        let mut backoff = InProcessBackoff::until(Instant::now() + Duration::from_secs(600));
        let mut ceiling = FIRST_INTERVAL;
        for _ in 0..6 {
            let delay = backoff.next_delay(None).unwrap();
            assert!(delay <= ceiling, "{delay:?} over {ceiling:?}");
            ceiling = (ceiling * 2).min(MAX_INTERVAL);
        }
        let floor = Duration::from_secs(5);
        assert!(backoff.next_delay(Some(floor)).unwrap() >= floor);
    }

    #[test]
    fn backoff_ends_when_the_budget_is_spent() {
        let mut backoff = InProcessBackoff::until(Instant::now() + Duration::from_millis(1));
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(1))), None);
    }
}
