//! Pacing: send times at most a rate apart (replays, read-backs).

use std::time::{Duration, Instant};

/// Hands out send times `1/rate` apart. The schedule runs from the first send, so the time
/// spent between sends does not slow the rate; a sender that falls behind is not given a
/// burst to catch up, so the rate is never exceeded. (A `tokio::time::interval` cannot go
/// below the timer's millisecond resolution; this can, since it only computes deadlines.)
#[derive(Debug, Clone)]
pub struct Pace {
    interval: Duration,
    next: Option<Instant>,
}

impl Pace {
    pub fn new(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: None,
        }
    }

    /// When the next message may be sent, asked at `now`.
    pub fn slot(&mut self, now: Instant) -> Instant {
        let at = self.next.map_or(now, |next| next.max(now));
        self.next = Some(at + self.interval);
        at
    }
}
