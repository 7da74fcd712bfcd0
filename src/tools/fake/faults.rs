//! Faults the fake injects on demand, and the clockwork behind them (outage end, throttle bucket).

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What goes wrong when the fake answers SegmentationField requests; the default is nothing.
///
/// As JSON (`GET`, `PUT`, `PATCH /_fake/faults`) durations are humantime strings such as
/// `"50ms"`, and unknown keys are refused so that a misspelt fault cannot be silently ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every SegmentationField answer.
    #[serde(with = "duration_text")]
    pub latency: Duration,
    /// Up to this much more, drawn at random for each SegmentationField answer.
    #[serde(with = "duration_text")]
    pub latency_jitter: Duration,
    /// Share (0..=1) of SegmentationField requests answered 503 at random.
    pub error_rate: f64,
    /// Above this many SegmentationField requests per second (all lists together): 429.
    /// A token bucket whose burst is `max(1, rate)`.
    pub throttle_rps: Option<f64>,
    /// When set, 429 and 503 answers carry `Retry-After` (whole seconds, rounded up).
    #[serde(with = "optional_duration_text")]
    pub retry_after: Option<Duration>,
    /// When set, every SegmentationField request answers 503 for this long from the moment
    /// the faults are set. Read back, it is the time the outage has left.
    #[serde(with = "optional_duration_text")]
    pub outage_for: Option<Duration>,
    /// Tokens older than this answer 401; also the `expires_in` the token endpoint announces.
    #[serde(with = "duration_text")]
    pub token_lifetime: Duration,
    /// Bodies larger than this answer 404, which is how Listrak answers over-size payloads.
    pub max_body_bytes: Option<usize>,
    /// A request with a contact among these emails (case-insensitive) is refused whole: 400.
    pub reject_emails: BTreeSet<String>,
    /// These list ids answer 404 as lists that do not exist.
    pub unknown_lists: BTreeSet<u32>,
    /// These list ids answer 503, as if Listrak failed for them alone.
    pub failing_lists: BTreeSet<u32>,
    /// Added before every catalogue answer (lists, profile field groups and fields, reads
    /// and creations).
    #[serde(with = "duration_text")]
    pub catalogue_latency: Duration,
    /// When set, every catalogue request answers 503 for this long from the moment the
    /// faults are set. Read back, it is the time the outage has left.
    #[serde(with = "optional_duration_text")]
    pub catalogue_outage_for: Option<Duration>,
    /// Share (0..=1) of catalogue requests answered 503 at random.
    pub catalogue_error_rate: f64,
    /// Every creation of a profile field or group is refused with 400, as Listrak refuses a
    /// name it does not take.
    pub refuse_creations: bool,
    /// An accepted update starts a list import, as Listrak's 201 says; the import completes
    /// after a delay drawn at random between these two, so imports complete in any order, and
    /// the state (and the contact read routes) show only completed imports. Both zero: every
    /// import completes before its 201.
    #[serde(with = "duration_text")]
    pub import_delay_min: Duration,
    #[serde(with = "duration_text")]
    pub import_delay_max: Duration,
}

/// Listrak's tokens live 900 seconds.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(900);

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            error_rate: 0.0,
            throttle_rps: None,
            retry_after: None,
            outage_for: None,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            max_body_bytes: None,
            reject_emails: BTreeSet::new(),
            unknown_lists: BTreeSet::new(),
            failing_lists: BTreeSet::new(),
            catalogue_latency: Duration::ZERO,
            catalogue_outage_for: None,
            catalogue_error_rate: 0.0,
            refuse_creations: false,
            import_delay_min: Duration::ZERO,
            import_delay_max: Duration::ZERO,
        }
    }
}

impl Faults {
    /// Refuses values the fake could only guess at; used for faults that come from outside
    /// (command line, `/_fake/faults`). Values set from Rust are sanitised instead.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be between 0 and 1, not {}",
                self.error_rate
            ));
        }
        if !(0.0..=1.0).contains(&self.catalogue_error_rate) {
            return Err(format!(
                "catalogue_error_rate must be between 0 and 1, not {}",
                self.catalogue_error_rate
            ));
        }
        if self.import_delay_min > self.import_delay_max {
            return Err(format!(
                "import_delay_min ({:?}) must not be above import_delay_max ({:?})",
                self.import_delay_min, self.import_delay_max
            ));
        }
        if let Some(rate) = self.throttle_rps {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!(
                    "throttle_rps must be a positive number, not {rate}"
                ));
            }
        }
        Ok(())
    }
}

/// What a fault did to one request, decided before the request itself is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    Outage,
    Throttled,
    RandomError,
}

/// The faults in force, with the instants they are measured against.
#[derive(Debug)]
pub struct FaultState {
    /// Kept with `outage_for` cleared: the outage lives in `outage_until`.
    faults: Faults,
    outage_until: Option<Instant>,
    catalogue_outage_until: Option<Instant>,
    /// Lower-cased once here so each request only does a set lookup per contact.
    rejected_emails: HashSet<String>,
    /// Empty until throttling first applies, and again whenever the rate changes.
    bucket: Option<TokenBucket>,
}

impl FaultState {
    pub fn new(faults: Faults, now: Instant) -> Self {
        let mut state = Self {
            faults: Faults::default(),
            outage_until: None,
            catalogue_outage_until: None,
            rejected_emails: HashSet::new(),
            bucket: None,
        };
        state.set(faults, now);
        state
    }

    pub fn set(&mut self, mut faults: Faults, now: Instant) {
        self.outage_until = faults.outage_for.take().map(|outage| now + outage);
        self.catalogue_outage_until = faults
            .catalogue_outage_for
            .take()
            .map(|outage| now + outage);
        self.rejected_emails = faults
            .reject_emails
            .iter()
            .map(|email| email.to_lowercase())
            .collect();
        if faults.throttle_rps != self.faults.throttle_rps {
            self.bucket = None;
        }
        self.faults = faults;
    }

    /// The faults as set, with `outage_for` showing what is left of the outage, so that
    /// writing them back unchanged keeps the outage's end where it was.
    pub fn current(&self, now: Instant) -> Faults {
        Faults {
            outage_for: self
                .outage_until
                .and_then(|until| until.checked_duration_since(now))
                .filter(|left| !left.is_zero()),
            catalogue_outage_for: self
                .catalogue_outage_until
                .and_then(|until| until.checked_duration_since(now))
                .filter(|left| !left.is_zero()),
            ..self.faults.clone()
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Outage, then throttle, then random error. `draw(p)` answers true with probability `p`.
    pub fn inject(&mut self, now: Instant, draw: impl FnOnce(f64) -> bool) -> Option<Injected> {
        if self.outage_until.is_some_and(|until| now < until) {
            return Some(Injected::Outage);
        }
        if let Some(rate) = self.faults.throttle_rps {
            let bucket = self
                .bucket
                .get_or_insert_with(|| TokenBucket::full(rate, now));
            if !bucket.try_take(rate, now) {
                return Some(Injected::Throttled);
            }
        }
        let error_rate = self.faults.error_rate;
        if error_rate > 0.0 && draw(error_rate.min(1.0)) {
            return Some(Injected::RandomError);
        }
        None
    }

    /// Catalogue outage, then random catalogue error; `draw(p)` as for [`FaultState::inject`].
    pub fn inject_catalogue(
        &self,
        now: Instant,
        draw: impl FnOnce(f64) -> bool,
    ) -> Option<Injected> {
        if self.catalogue_outage_until.is_some_and(|until| now < until) {
            return Some(Injected::Outage);
        }
        let error_rate = self.faults.catalogue_error_rate;
        if error_rate > 0.0 && draw(error_rate.min(1.0)) {
            return Some(Injected::RandomError);
        }
        None
    }

    pub fn rejects_email(&self, email: &str) -> bool {
        !self.rejected_emails.is_empty() && self.rejected_emails.contains(&email.to_lowercase())
    }
}

/// Requests allowed at `rate` per second with bursts of `max(1, rate)`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    available: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn full(rate: f64, now: Instant) -> Self {
        Self {
            available: burst(sanitised(rate)),
            refilled_at: now,
        }
    }

    pub fn try_take(&mut self, rate: f64, now: Instant) -> bool {
        let rate = sanitised(rate);
        let waited = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.available = (self.available + waited * rate).min(burst(rate));
        self.refilled_at = self.refilled_at.max(now);
        if self.available >= 1.0 {
            self.available -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A rate that is not a positive number refills nothing: only the first request passes.
fn sanitised(rate: f64) -> f64 {
    if rate.is_finite() && rate > 0.0 {
        rate
    } else {
        0.0
    }
}

fn burst(rate: f64) -> f64 {
    rate.max(1.0)
}

/// Serde for `Duration` as a humantime string (`"50ms"`, `"15m"`).
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"50ms\": {err}"))
        })
    }
}

/// Serde for `Option<Duration>` as a humantime string or null.
pub mod optional_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => super::duration_text::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => humantime::parse_duration(&text).map(Some).map_err(|err| {
                serde::de::Error::custom(format!("{text:?} is not a duration like \"2s\": {err}"))
            }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn faults_read_durations_as_humantime_and_default_what_is_missing() {
        let faults: Faults =
            serde_json::from_str(r#"{"latency": "50ms", "retry_after": "2s", "error_rate": 0.25}"#)
                .unwrap();
        assert_eq!(faults.latency, 50 * MS);
        assert_eq!(faults.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(faults.error_rate, 0.25);
        assert_eq!(faults.token_lifetime, DEFAULT_TOKEN_LIFETIME);
        assert_eq!(faults.outage_for, None);
    }

    #[test]
    fn faults_survive_a_json_round_trip() {
        let faults = Faults {
            latency: 5 * MS,
            throttle_rps: Some(20.0),
            outage_for: Some(Duration::from_secs(120)),
            max_body_bytes: Some(1000),
            reject_emails: ["bad@example.com".to_string()].into(),
            unknown_lists: [7].into(),
            ..Faults::default()
        };
        let text = serde_json::to_string(&faults).unwrap();
        assert!(text.contains(r#""outage_for":"2m""#), "{text}");
        assert_eq!(serde_json::from_str::<Faults>(&text).unwrap(), faults);
    }

    #[test]
    fn misspelt_or_malformed_faults_are_refused() {
        assert!(serde_json::from_str::<Faults>(r#"{"errorRate": 0.5}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency": "soon"}"#).is_err());
        let too_likely = Faults {
            error_rate: 1.5,
            ..Faults::default()
        };
        assert!(too_likely.validate().unwrap_err().contains("error_rate"));
        let no_rate = Faults {
            throttle_rps: Some(0.0),
            ..Faults::default()
        };
        assert!(no_rate.validate().unwrap_err().contains("throttle_rps"));
    }

    #[test]
    fn bucket_allows_a_burst_of_the_rate_then_refills_with_time() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(5.0, start);
        let passed = (0..10).filter(|_| bucket.try_take(5.0, start)).count();
        assert_eq!(passed, 5);
        assert!(!bucket.try_take(5.0, start + 100 * MS));
        assert!(bucket.try_take(5.0, start + 200 * MS));
        assert!(!bucket.try_take(5.0, start + 200 * MS));
    }

    #[test]
    fn bucket_below_one_request_per_second_still_lets_one_through() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(0.5, start);
        assert!(bucket.try_take(0.5, start));
        assert!(!bucket.try_take(0.5, start + Duration::from_secs(1)));
        assert!(bucket.try_take(0.5, start + Duration::from_secs(2)));
    }

    #[test]
    fn outage_lasts_from_when_it_is_set_and_reads_back_as_time_left() {
        let start = Instant::now();
        let faults = Faults {
            outage_for: Some(Duration::from_secs(10)),
            ..Faults::default()
        };
        let mut state = FaultState::new(faults, start);
        let later = start + Duration::from_secs(4);
        assert_eq!(state.inject(later, |_| false), Some(Injected::Outage));
        assert_eq!(
            state.current(later).outage_for,
            Some(Duration::from_secs(6))
        );
        let after = start + Duration::from_secs(10);
        assert_eq!(state.inject(after, |_| false), None);
        assert_eq!(state.current(after).outage_for, None);
    }

    #[test]
    fn outage_comes_before_throttle_and_throttle_before_random_errors() {
        let start = Instant::now();
        let faults = Faults {
            throttle_rps: Some(1.0),
            error_rate: 1.0,
            ..Faults::default()
        };
        let mut state = FaultState::new(faults, start);
        assert_eq!(state.inject(start, |_| true), Some(Injected::RandomError));
        assert_eq!(state.inject(start, |_| true), Some(Injected::Throttled));
        let mut with_outage = state.current(start);
        with_outage.outage_for = Some(Duration::from_secs(1));
        state.set(with_outage, start);
        assert_eq!(state.inject(start, |_| true), Some(Injected::Outage));
    }

    #[test]
    fn changing_the_throttle_rate_starts_a_full_bucket_and_other_changes_do_not() {
        let start = Instant::now();
        let faults = Faults {
            throttle_rps: Some(1.0),
            ..Faults::default()
        };
        let mut state = FaultState::new(faults.clone(), start);
        assert_eq!(state.inject(start, |_| false), None);
        state.set(
            Faults {
                latency: MS,
                ..faults.clone()
            },
            start,
        );
        assert_eq!(state.inject(start, |_| false), Some(Injected::Throttled));
        state.set(
            Faults {
                throttle_rps: Some(2.0),
                ..faults
            },
            start,
        );
        assert_eq!(state.inject(start, |_| false), None);
    }

    #[test]
    fn rejected_emails_match_whatever_their_case() {
        let faults = Faults {
            reject_emails: ["Bad@Example.com".to_string()].into(),
            ..Faults::default()
        };
        let state = FaultState::new(faults, Instant::now());
        assert!(state.rejects_email("bad@example.COM"));
        assert!(!state.rejects_email("good@example.com"));
    }
}
