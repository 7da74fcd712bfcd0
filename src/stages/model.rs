//! The vocabulary shared by every stage: list and field ids, event times, profile updates,
//! what became of a contact and of a message, readiness.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A Listrak list id: a positive 32-bit integer (Listrak's `int32`, so at most `i32::MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListId(NonZeroU32);

/// A Listrak profile (segmentation) field id: a positive 32-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldId(NonZeroU32);

macro_rules! positive_id {
    ($name:ident) => {
        impl $name {
            /// Accepts 1..=i32::MAX, the range Listrak's `int32` ids take.
            pub fn new(value: i64) -> Option<Self> {
                if value > 0 && value <= i64::from(i32::MAX) {
                    NonZeroU32::new(value as u32).map(Self)
                } else {
                    None
                }
            }

            pub fn get(self) -> u32 {
                self.0.get()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        /// As the number Listrak uses.
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_u32(self.get())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                text.trim()
                    .parse::<i64>()
                    .ok()
                    .and_then(Self::new)
                    .ok_or_else(|| format!("{text:?} is not a positive 32-bit integer"))
            }
        }
    };
}

positive_id!(ListId);
positive_id!(FieldId);

/// When an event happened, in microseconds since the Unix epoch; the last-write-wins clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventTime(pub i64);

impl EventTime {
    /// More than `skew` ahead of `now`: a producer's clock (or a typo) that last write wins
    /// must not trust, or the event would win over every later one.
    pub fn is_ahead_of(self, now: EventTime, skew: std::time::Duration) -> bool {
        let skew = i64::try_from(skew.as_micros()).unwrap_or(i64::MAX);
        self.0 > now.0.saturating_add(skew)
    }

    /// Parses RFC 3339 (what Segment sends: `2024-05-01T12:00:00.123Z`, offsets allowed).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|t| Self(t.timestamp_micros()))
    }

    pub fn now() -> Self {
        Self(chrono::Utc::now().timestamp_micros())
    }

    /// As [`EventTime::to_rfc3339`], to the microsecond: what the worker compares.
    pub fn to_rfc3339_micros(self) -> String {
        chrono::DateTime::from_timestamp_micros(self.0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .unwrap_or_default()
    }

    pub fn to_rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_micros(self.0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default()
    }
}

/// One contact's field values for one list, produced from one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub list_id: ListId,
    /// Trimmed and lower-cased, so one person is one contact however producers spell it.
    pub email: String,
    pub fields: Vec<(FieldId, String)>,
    pub timestamp: EventTime,
}

/// The most bytes of outside text (Listrak's error messages, a poison message's detail,
/// which quotes its input) that go into a header or a log line.
pub const QUOTE_LIMIT: usize = 1024;

/// `text` cut to at most `max` bytes on a character boundary, with an ellipsis when cut.
pub fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{ELLIPSIS}", &text[..end]))
}

/// Why a message went to the dead-letter queue; the value of its `x-listrak-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    /// Not UTF-8, not JSON, or over the size limit.
    InvalidJson,
    /// JSON, but not an event the worker can apply (wrong types, no email, undecidable value).
    InvalidEvent,
    /// Listrak refused it for good: a 400 for this contact alone, or an answer that resending
    /// cannot change (415, 501, another 4xx), for a contact or a whole request.
    Rejected,
    /// Listrak answered 404 for this contact alone: the list does not exist.
    ListNotFound,
    /// An `audience_field` mapping without `create` found no field for the audience.
    UnknownField,
    /// Systemic failures outlasted `retry.max_age`.
    RetriesExhausted,
    /// The broker's own delivery limit dead-lettered it (recognised from `x-death`).
    DeliveryLimit,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 7] = [
        Self::InvalidJson,
        Self::InvalidEvent,
        Self::Rejected,
        Self::ListNotFound,
        Self::UnknownField,
        Self::RetriesExhausted,
        Self::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidEvent => "invalid_event",
            Self::Rejected => "rejected",
            Self::ListNotFound => "list_not_found",
            Self::UnknownField => "unknown_field",
            Self::RetriesExhausted => "retries_exhausted",
            Self::DeliveryLimit => "delivery_limit",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message was finally acknowledged; the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AckOutcome {
    Applied,
    Ignored,
    Superseded,
    RetryScheduled,
    DeadLettered,
}

impl AckOutcome {
    pub const ALL: [AckOutcome; 5] = [
        Self::Applied,
        Self::Ignored,
        Self::Superseded,
        Self::RetryScheduled,
        Self::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Ignored => "ignored",
            Self::Superseded => "superseded",
            Self::RetryScheduled => "retry_scheduled",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Why Listrak refused a contact for good; becomes the dead letter's `x-listrak-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: DeadLetterReason,
    /// The HTTP status of Listrak's answer, when there was one.
    pub status: Option<u16>,
    /// Listrak's error code (`ERROR_INVALID_PARAMETER`), when it gave one.
    pub error: Option<String>,
    /// Listrak's message, or what the worker says of the message it could not apply.
    pub message: Option<String>,
    pub list_id: Option<ListId>,
}

/// What became of one contact of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Applied,
    /// Every field of it was older than a value already applied.
    Superseded,
    /// Systemic failures outlasted the in-process budget: move to the retry queues.
    Retry,
    DeadLetter(Rejection),
    /// Shutdown came while the batch was held: leave its messages unacknowledged.
    Abandoned,
}

/// A batch's verdicts (in the order of its contacts) and the `resourceId`s of the requests
/// Listrak accepted.
pub struct Delivered {
    pub verdicts: Vec<Verdict>,
    pub resource_ids: Vec<String>,
}

/// A list, contact and field whose value Listrak accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedKey<'a> {
    pub list: ListId,
    pub email: &'a str,
    pub field: FieldId,
}

/// What the applied log teaches whoever keeps the newest values applied (the superseded
/// guard): the log's edge reads records and hands what they say over through this, and
/// knows nothing else of its reader.
pub trait AppliedKnowledge: Send + Sync + 'static {
    /// `value` of (`list`, `email`, `field`), with `event_time`, was applied at `applied_at`
    /// by another replica (or by an earlier run of this one).
    fn applied(
        &self,
        key: AppliedKey<'_>,
        value: &str,
        event_time: EventTime,
        applied_at: EventTime,
    );
    /// A copy of an update of (`list`, `email`, `field`) went to a retry or dead-letter queue
    /// at `at`: an older value may come back.
    fn outstanding(&self, list: ListId, email: &str, field: FieldId, at: EventTime);
    /// Forgets what is past its horizon at `now`; answers how many keys it holds and how far
    /// back it vouches for every applied value.
    fn tick(&self, now: EventTime) -> (usize, std::time::Duration);
}

/// Readiness for `/readyz`: true only while connected to the broker and consuming.
#[derive(Clone, Default)]
pub struct Health {
    consuming: Arc<AtomicBool>,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// The driver counts the change too (`listrak_amqp_connected`).
    pub fn set(&self, up: bool) {
        self.consuming.store(up, Ordering::Relaxed);
    }
}
