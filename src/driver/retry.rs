//! Every retry schedule of the worker: in-process backoff for a held batch (the delayed retry
//! queues after it are chosen by `stages::disposition`), the pauses between attempts to
//! publish a copy or append a record, and the pauses between reconnections to the broker.
//!
//! The only module that uses the `backoff` crate (unmaintained, RUSTSEC-2025-0012), so it can
//! be replaced here alone.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rand::Rng;

use crate::driver::clock;

const FIRST_INTERVAL: Duration = Duration::from_millis(200);
const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// A retry or dead-letter publish (or an append to the applied log) that fails is tried again
/// on a new channel this many times in all, a little later each time; then the session ends
/// and the broker delivers the message again, so no delivery stays unsettled.
pub const PUBLISH_ATTEMPTS: u32 = 5;
const PUBLISH_RETRY_FIRST: Duration = Duration::from_millis(200);

/// The pause before publishing again after `failed` failed attempts (200 ms, doubling), or
/// `None` once [`PUBLISH_ATTEMPTS`] failed.
pub fn publish_pause(failed: u32) -> Option<Duration> {
    (failed < PUBLISH_ATTEMPTS).then(|| PUBLISH_RETRY_FIRST * 2u32.pow(failed.saturating_sub(1)))
}

/// The pause before reconnecting after a node answered; it doubles while none answers.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The pause after `delay` while no broker node answers.
pub fn next_reconnect_pause(delay: Duration) -> Duration {
    (delay * 2).min(RECONNECT_MAX)
}

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
        clock::now()
            .checked_add(delay)
            .is_some_and(|resume| resume < self.deadline)
            .then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn publishes_are_tried_five_times_in_all_a_little_later_each_time() {
        let pauses: Vec<Option<Duration>> = (1..=5).map(publish_pause).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(pauses, [ms(200), ms(400), ms(800), ms(1600), None]);
    }

    #[test]
    fn reconnections_pause_longer_while_no_node_answers_up_to_half_a_minute() {
        let mut pause = RECONNECT_FIRST;
        let mut pauses = Vec::new();
        for _ in 0..8 {
            pauses.push(pause.as_millis());
            pause = next_reconnect_pause(pause);
        }
        assert_eq!(pauses, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn backoff_ends_when_the_budget_is_spent() {
        let mut backoff = InProcessBackoff::until(Instant::now() + Duration::from_millis(1));
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(1))), None);
    }
}
