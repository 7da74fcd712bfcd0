//! Adaptive request concurrency: how many requests Listrak gets at once, learned from its
//! answers (additive increase, multiplicative decrease), between 1 and a configured maximum.
//!
//! Modelled on Vector's adaptive request concurrency, with a slow start and three changes:
//! a 429, 5xx or timeout cuts the limit at most once per round trip (a burst of failures
//! from one overload is one signal, not ten); the limit only grows while it is used; and a
//! 429 also sets a request *rate*, because a rate limit is what a 429 announces. Concurrency
//! alone cannot fit under one: at concurrency 1 a fast API still takes more requests per
//! second than it allows. The rate starts just under what Listrak accepted in the last
//! second, grows by a small share every second without a 429, and is cut again at the next.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::driver::clock;
use crate::driver::unpoisoned::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What one answer says about Listrak's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered in time and without a sign of overload.
    Healthy,
    /// 5xx, timeout or connection failure.
    Overloaded,
    /// 429: too many requests per unit of time.
    Throttled,
    /// Says nothing about load (401, 4xx rejections).
    Neutral,
}

pub struct AdaptiveConcurrency {
    max: usize,
    state: Mutex<State>,
    released: Notify,
    /// Told every new limit (the driver exports it as a gauge).
    on_limit: Box<dyn Fn(usize) + Send + Sync>,
}

struct State {
    limit: f64,
    in_flight: usize,
    /// Smoothed round trip of healthy answers: the baseline that "rising latency" is
    /// measured against.
    rtt: Option<f64>,
    samples: u32,
    /// Until the first sign of overload the limit doubles every round trip, as TCP's slow
    /// start does, instead of growing by one: a backlog at start-up reaches a healthy API's
    /// capacity in a few round trips rather than a few dozen.
    slow_start: bool,
    last_decrease: Instant,
    /// Requests per second allowed since the last 429, if one came; `None`: no cap.
    rate: Option<f64>,
    /// The earliest start of the next request under `rate`.
    next_start: Instant,
    last_rate_change: Instant,
    last_throttled: Instant,
    /// When the accepted requests of the last second were answered.
    accepted: VecDeque<Instant>,
}

/// A slot for one request; dropping it without `record` counts as neutral.
pub struct Permit {
    owner: Arc<AdaptiveConcurrency>,
    /// The limit was reached when this slot was taken: only then may success raise it.
    saturated: bool,
    started: Instant,
}

const DECREASE: f64 = 0.5;
const LATENCY_DECREASE: f64 = 0.9;
const RTT_SMOOTHING: f64 = 0.1;
/// A round trip this many times the baseline counts as a sign of overload…
const LATENCY_TOLERANCE: f64 = 2.0;
/// …when it is also this much longer, in seconds: below that it is the scheduler's jitter on
/// a busy machine (which made sub-millisecond round trips look like overload), not Listrak.
const LATENCY_NOISE: f64 = 0.005;
/// On a 429, the rate drops to this share of what was accepted in the last second…
const RATE_DECREASE: f64 = 0.9;
/// …and, from a few seconds after a cut (the bucket behind a rate limit refills first),
/// grows by this share for every second without one.
const RATE_INCREASE: f64 = 0.01;
const RATE_WINDOW: Duration = Duration::from_secs(1);
const RATE_SETTLE: Duration = Duration::from_secs(3);

impl AdaptiveConcurrency {
    /// `on_limit` is told the starting limit and every change.
    pub fn new(max: usize, on_limit: impl Fn(usize) + Send + Sync + 'static) -> Arc<Self> {
        let max = max.max(1);
        // A backlog's first batches, one per list, leave together: starting at a quarter,
        // half of eight lists' batches waited a whole round trip, and every ack behind them.
        let initial = (max / 2).max(1);
        on_limit(initial);
        Arc::new(Self {
            max,
            state: Mutex::new(State {
                limit: initial as f64,
                in_flight: 0,
                rtt: None,
                samples: 0,
                slow_start: true,
                last_decrease: clock::now(),
                rate: None,
                next_start: clock::now(),
                last_rate_change: clock::now(),
                last_throttled: clock::now(),
                accepted: VecDeque::new(),
            }),
            released: Notify::new(),
            on_limit: Box::new(on_limit),
        })
    }

    pub fn limit(&self) -> usize {
        self.state.lock().limit as usize
    }

    /// The request rate in force since the last 429, if any.
    pub fn rate(&self) -> Option<f64> {
        self.state.lock().rate
    }

    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.released.notified();
            let wait_for_rate = {
                let mut state = self.state.lock();
                let limit = state.limit as usize;
                let now = clock::now();
                if state.in_flight >= limit {
                    None
                } else if state.rate.is_some() && now < state.next_start {
                    Some(state.next_start - now)
                } else {
                    if let Some(rate) = state.rate {
                        state.next_start =
                            state.next_start.max(now) + Duration::from_secs_f64(1.0 / rate);
                    }
                    state.in_flight += 1;
                    return Permit {
                        owner: Arc::clone(self),
                        saturated: state.in_flight >= limit,
                        started: now,
                    };
                }
            };
            match wait_for_rate {
                Some(wait) => tokio::time::sleep(wait).await,
                None => notified.await,
            }
        }
    }

    fn observe(&self, signal: Signal, saturated: bool, rtt: Duration) {
        let mut state = self.state.lock();
        let now = clock::now();
        let rtt = rtt.as_secs_f64();
        let baseline = state.rtt.unwrap_or(rtt);
        let once_per_round_trip = now.duration_since(state.last_decrease).as_secs_f64() >= baseline;
        while state
            .accepted
            .front()
            .is_some_and(|at| now.duration_since(*at) > RATE_WINDOW)
        {
            state.accepted.pop_front();
        }
        let rate_may_change = now.duration_since(state.last_rate_change) >= RATE_WINDOW;
        if signal == Signal::Healthy {
            state.accepted.push_back(now);
            let settled = now.duration_since(state.last_throttled) >= RATE_SETTLE;
            if let (Some(rate), true, true) = (state.rate, rate_may_change, settled) {
                state.rate = Some(rate * (1.0 + RATE_INCREASE));
                state.last_rate_change = now;
            }
        }
        if matches!(signal, Signal::Throttled | Signal::Overloaded) {
            state.slow_start = false;
        }
        match signal {
            Signal::Throttled => {
                state.last_throttled = now;
                if rate_may_change {
                    let accepted = state.accepted.len().max(1) as f64;
                    let current = state.rate.unwrap_or(f64::MAX).min(accepted);
                    state.rate = Some((current * RATE_DECREASE).max(1.0));
                    state.last_rate_change = now;
                    tracing::info!(
                        rate = state.rate,
                        "Listrak throttles: capping the request rate"
                    );
                }
                if once_per_round_trip {
                    state.limit = (state.limit * DECREASE).max(1.0);
                    state.last_decrease = now;
                }
            }
            Signal::Overloaded if once_per_round_trip => {
                state.limit = (state.limit * DECREASE).max(1.0);
                state.last_decrease = now;
            }
            Signal::Healthy
                if state.samples >= 5
                    && rtt > baseline * LATENCY_TOLERANCE
                    && rtt - baseline > LATENCY_NOISE
                    && once_per_round_trip =>
            {
                state.limit = (state.limit * LATENCY_DECREASE).max(1.0);
                state.last_decrease = now;
                state.slow_start = false;
            }
            Signal::Healthy => {
                if saturated {
                    // One more per answer doubles the limit per round trip; one more per
                    // limit's worth of answers adds one.
                    let step = if state.slow_start {
                        1.0
                    } else {
                        1.0 / state.limit
                    };
                    state.limit = (state.limit + step).min(self.max as f64);
                }
                state.rtt = Some(baseline + RTT_SMOOTHING * (rtt - baseline));
                state.samples = state.samples.saturating_add(1);
            }
            Signal::Overloaded | Signal::Neutral => {}
        }
        (self.on_limit)(state.limit as usize);
    }

    fn release(&self) {
        self.state.lock().in_flight -= 1;
        self.released.notify_waiters();
    }
}

impl Permit {
    /// Reports how the request went; the slot is freed.
    pub fn record(self, signal: Signal) {
        self.owner
            .observe(signal, self.saturated, self.started.elapsed());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.owner.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limit_grows_while_used_and_halves_on_overload() {
        let limiter = AdaptiveConcurrency::new(8, |_| {});
        assert_eq!(limiter.limit(), 4);
        for _ in 0..40 {
            let mut permits = Vec::new();
            for _ in 0..4 {
                permits.push(limiter.acquire().await);
            }
            permits.into_iter().for_each(|p| p.record(Signal::Healthy));
        }
        let grown = limiter.limit();
        assert!(grown > 4, "grew to {grown}");
        assert!(grown <= 8);
        tokio::time::advance(Duration::from_millis(2)).await;
        limiter.acquire().await.record(Signal::Overloaded);
        assert_eq!(limiter.limit(), (grown as f64 * DECREASE).max(1.0) as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_doubles_per_round_trip_until_the_first_overload_then_grows_by_one() {
        let limiter = AdaptiveConcurrency::new(128, |_| {});
        let rtt = Duration::from_millis(1);
        assert_eq!(limiter.limit(), 64, "half the maximum to start with");
        for _ in 0..64 {
            limiter.observe(Signal::Healthy, true, rtt);
        }
        assert_eq!(limiter.limit(), 128, "one round trip of answers doubled it");
        tokio::time::advance(Duration::from_millis(2)).await;
        limiter.observe(Signal::Overloaded, true, rtt);
        assert_eq!(limiter.limit(), 64);
        // A little more than a round trip of answers, for the limit grows as they come.
        for _ in 0..65 {
            limiter.observe(Signal::Healthy, true, rtt);
        }
        assert_eq!(limiter.limit(), 65, "then one more per round trip");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_never_goes_below_one_nor_above_the_maximum() {
        let limiter = AdaptiveConcurrency::new(3, |_| {});
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(1)).await;
            limiter.acquire().await.record(Signal::Overloaded);
        }
        assert_eq!(limiter.limit(), 1);
        for _ in 0..200 {
            let mut permits = Vec::new();
            for _ in 0..limiter.limit() {
                permits.push(limiter.acquire().await);
            }
            permits.into_iter().for_each(|p| p.record(Signal::Healthy));
        }
        assert_eq!(limiter.limit(), 3);
    }

    #[tokio::test]
    async fn an_unused_limit_does_not_grow() {
        let limiter = AdaptiveConcurrency::new(8, |_| {});
        for _ in 0..100 {
            limiter.acquire().await.record(Signal::Healthy);
        }
        assert_eq!(limiter.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_caps_the_rate_under_what_was_accepted_and_the_cap_then_grows() {
        let limiter = AdaptiveConcurrency::new(4, |_| {});
        assert_eq!(limiter.rate(), None);
        for _ in 0..20 {
            limiter.acquire().await.record(Signal::Healthy);
        }
        tokio::time::advance(RATE_WINDOW + Duration::from_millis(1)).await;
        for _ in 0..10 {
            limiter.acquire().await.record(Signal::Healthy);
        }
        limiter.acquire().await.record(Signal::Throttled);
        let capped = limiter.rate().expect("a 429 sets a rate");
        assert!(
            (capped - 9.0).abs() < 0.01,
            "90% of the 10 accepted in the last second: {capped}"
        );

        // Requests are now spaced by 1/rate.
        let started = clock::now();
        for _ in 0..4 {
            limiter.acquire().await.record(Signal::Neutral);
        }
        assert!(clock::now() - started >= Duration::from_secs_f64(3.0 / capped));

        tokio::time::advance(RATE_SETTLE).await;
        limiter.acquire().await.record(Signal::Healthy);
        assert!(limiter.rate().unwrap() > capped, "grows without 429s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_lowers_concurrency_but_sets_no_rate() {
        let limiter = AdaptiveConcurrency::new(8, |_| {});
        tokio::time::advance(Duration::from_millis(2)).await;
        limiter.acquire().await.record(Signal::Overloaded);
        assert_eq!(limiter.rate(), None);
    }

    #[tokio::test]
    async fn a_request_waits_for_a_free_slot() {
        let limiter = AdaptiveConcurrency::new(1, |_| {});
        let held = limiter.acquire().await;
        let waiting = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            async move { limiter.acquire().await.record(Signal::Neutral) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        waiting.await.unwrap();
    }
}
