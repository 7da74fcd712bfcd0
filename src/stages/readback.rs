//! Read-backs: which keys (list, contact, field) are at risk of ending on an older value in
//! Listrak, what a scheduled read-back says, and what reading one back decides.
//!
//! A 201 from Listrak starts an import; it does not say when the import completes, nor in
//! which order two imports of one contact complete. A key updated once cannot end on an
//! older value. A key updated twice or more within `reconcile.window` can: its imports may
//! complete out of order, two replicas may race, or the guard may have forgotten a newer
//! value and let an older one through. Such a key is read back `reconcile.after` its update
//! and repaired when Listrak holds anything but the newest applied value.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stages::model::EventTime;

/// A key hashed to 128 bits by the caller (with keys of its own process, so no input can
/// make two contacts collide on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub u64, pub u64);

/// Slices of the window: a key is remembered for at least the window and at most a slice
/// more.
const SLICES: usize = 4;
/// Bits of one slice of one filter: 512 KiB.
const SLICE_BITS: usize = 1 << 22;
/// Bits set per key: with 9.6 bits per key (437,000 keys in a slice) 2% of unseen keys look
/// seen; at a quarter of that load, 0.1%.
const PROBES: u64 = 3;

/// The memory the filters take, whatever the traffic: two filters of `SLICES + 1` slices.
pub const RISK_FILTER_BYTES: usize = 2 * (SLICES + 1) * SLICE_BITS / 8;

/// Notices keys applied twice within the window, in a fixed amount of memory.
///
/// Two Bloom filters, each a ring of time slices: `all` holds every key this worker saw
/// applied (by itself or, through the applied log, by another replica), `own` the keys it
/// applied itself. A key this worker applies is at risk when `all` holds it; a key another
/// replica applied is at risk when `own` holds it (the two raced). So of two replicas that
/// race on a key, at least one schedules its read-back, and a key only other replicas update
/// is left to them. A false positive costs one read; there are no false negatives within
/// the window.
pub struct RiskFilter {
    slice: i64,
    /// Newest first; each with the time (µs) it started.
    slices: VecDeque<Slice>,
}

struct Slice {
    started: i64,
    own: Vec<u64>,
    all: Vec<u64>,
}

impl Slice {
    fn new(started: i64) -> Self {
        // Zeroed memory is only address space until a bit is set in it.
        Self {
            started,
            own: vec![0; SLICE_BITS / 64],
            all: vec![0; SLICE_BITS / 64],
        }
    }
}

fn probes(key: KeyHash) -> impl Iterator<Item = usize> {
    (0..PROBES).map(move |i| {
        let bit = key.0.wrapping_add(i.wrapping_mul(key.1 | 1));
        usize::try_from(bit % SLICE_BITS as u64).expect("below SLICE_BITS")
    })
}

fn holds(bits: &[u64], key: KeyHash) -> bool {
    probes(key).all(|bit| bits[bit / 64] & (1 << (bit % 64)) != 0)
}

fn set(bits: &mut [u64], key: KeyHash) {
    for bit in probes(key) {
        bits[bit / 64] |= 1 << (bit % 64);
    }
}

impl RiskFilter {
    pub fn new(window: Duration) -> Self {
        let window = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        Self {
            slice: (window / SLICES as i64).max(1),
            slices: VecDeque::new(),
        }
    }

    /// This worker had Listrak accept a value of `key` at `now`: true when the key is at
    /// risk (it was applied within the window before).
    pub fn applied_here(&mut self, key: KeyHash, now: EventTime) -> bool {
        self.advance(now);
        let at_risk = self.slices.iter().any(|slice| holds(&slice.all, key));
        let newest = self.slices.front_mut().expect("advance leaves a slice");
        set(&mut newest.own, key);
        set(&mut newest.all, key);
        at_risk
    }

    /// Another replica had Listrak accept a value of `key` (the applied log says so), learnt
    /// at `now`: true when this worker applied the key within the window (the two raced).
    pub fn applied_elsewhere(&mut self, key: KeyHash, now: EventTime) -> bool {
        self.advance(now);
        let at_risk = self.slices.iter().any(|slice| holds(&slice.own, key));
        let newest = self.slices.front_mut().expect("advance leaves a slice");
        set(&mut newest.all, key);
        at_risk
    }

    /// A request with `key` got no answer (a timeout, a lost connection): Listrak may apply
    /// it whenever, so the key's next update is at risk as if this one had been applied.
    pub fn uncertain(&mut self, key: KeyHash, now: EventTime) {
        self.applied_here(key, now);
    }

    /// Starts a new slice when the newest is a slice old, dropping those past the window.
    fn advance(&mut self, now: EventTime) {
        let current = self.slices.front().map(|slice| slice.started);
        if current.is_some_and(|started| now.0 < started.saturating_add(self.slice)) {
            return;
        }
        let reused = if self.slices.len() > SLICES {
            self.slices.pop_back().map(|mut slice| {
                slice.own.fill(0);
                slice.all.fill(0);
                slice.started = now.0;
                slice
            })
        } else {
            None
        };
        self.slices
            .push_front(reused.unwrap_or_else(|| Slice::new(now.0)));
        // A pause longer than the window: everything held is past it.
        while self.slices.back().is_some_and(|oldest| {
            now.0.saturating_sub(oldest.started) > self.slice * (SLICES as i64 + 1)
        }) {
            self.slices.pop_back();
        }
    }
}

/// The version of the read-back message this worker writes and reads.
pub const VERSION: u32 = 1;

/// A scheduled read-back: one message of the read-back queue, naming keys to read once its
/// delay is over. Compact JSON: `{"v":1,"k":[{"l":1001,"e":"a@x.io","f":456,"v":"on",
/// "t":<µs>,"a":<µs>}]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadBacks {
    pub v: u32,
    pub k: Vec<KeyToRead>,
}

/// A key at risk, with the update that put it at risk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyToRead {
    /// List id.
    pub l: u32,
    /// Email, lower-cased.
    pub e: String,
    /// Field id.
    pub f: u32,
    /// The value that was applied.
    pub v: String,
    /// Its event time (µs since the epoch).
    pub t: i64,
    /// When Listrak accepted it (µs since the epoch).
    pub a: i64,
}

impl ReadBacks {
    /// The message naming `keys`, without copying them into a `ReadBacks`.
    pub fn encode_keys(keys: &[KeyToRead]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            v: u32,
            k: &'a [KeyToRead],
        }
        serde_json::to_vec(&Borrowed {
            v: VERSION,
            k: keys,
        })
        .expect("a read-back serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let read: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a read-back message: {e}"))?;
        if read.v != VERSION {
            return Err(format!(
                "read-back version {} (this worker reads {VERSION})",
                read.v
            ));
        }
        if let Some(key) = read.k.iter().find(|key| key.l == 0 || key.f == 0) {
            return Err(format!(
                "list {} field {} is not a list and a field",
                key.l, key.f
            ));
        }
        Ok(read)
    }
}

/// What is known, when a read-back is due, of the newest value applied to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Knowledge {
    /// The guard remembers every value applied since the window before the update that put
    /// the key at risk: the newest event time it holds for the key, if any.
    Guard { newest: Option<EventTime> },
    /// The guard forgot some of them; the applied log was read over that span: the newest
    /// value it holds for the key and its event time, if any.
    Log { newest: Option<(String, EventTime)> },
}

/// What a due read-back does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    /// A newer value was applied after this one: its own read-back follows, so this one is
    /// not read.
    Postponed,
    /// Listrak should hold this value, of this event time.
    Holds { value: String, time: EventTime },
}

/// The newest applied value of a key whose read-back is due.
///
/// The guard only says *when* the newest value happened; a newer value the guard knows was
/// applied by an update that was itself at risk (its key had this one's update within the
/// window), so it has a read-back of its own, and this one is postponed to it. The log says
/// *what* the newest value was; a newer value found there may be one the guard forgot and
/// that was never read back (it came first, and an older one came after it), so it is
/// expected now, never postponed.
pub fn expectation(key: &KeyToRead, knowledge: Knowledge) -> Expectation {
    let scheduled = Expectation::Holds {
        value: key.v.clone(),
        time: EventTime(key.t),
    };
    match knowledge {
        Knowledge::Guard { newest } => match newest {
            Some(newest) if newest.0 > key.t => Expectation::Postponed,
            _ => scheduled,
        },
        Knowledge::Log { newest } => match newest {
            Some((value, time)) if time.0 > key.t => Expectation::Holds { value, time },
            _ => scheduled,
        },
    }
}

/// What Listrak holds for a key, against what it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    InSync,
    /// Listrak holds another value, or none.
    Differs,
    /// The contact is not on the list (Listrak's 404): sending the value adds it.
    NotOnList,
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InSync => "in_sync",
            Self::Differs => "differs",
            Self::NotOnList => "not_on_list",
        }
    }

    /// Whether the newest value is sent again.
    pub fn repairs(self) -> bool {
        !matches!(self, Self::InSync)
    }
}

/// Compares what Listrak holds (`None`: the contact is not on the list; `Some(None)`: no
/// value in the field) with the expected value. Listrak trims what it stores, so surrounding
/// blanks do not count as a difference.
pub fn compare(expected: &str, held: Option<Option<&str>>) -> Comparison {
    match held {
        None => Comparison::NotOnList,
        Some(Some(value)) if value.trim() == expected.trim() => Comparison::InSync,
        Some(_) => Comparison::Differs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const MINUTE: i64 = 60_000_000;

    fn key(n: u64) -> KeyHash {
        // Spread like a real hash.
        let mix = |x: u64| {
            let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^ (x >> 29)
        };
        KeyHash(mix(n), mix(n ^ 0xDEAD_BEEF))
    }

    fn filter() -> RiskFilter {
        RiskFilter::new(Duration::from_secs(3600))
    }

    #[test]
    fn a_key_applied_once_is_not_at_risk_and_twice_is() {
        let mut risk = filter();
        assert!(!risk.applied_here(key(1), EventTime(0)));
        assert!(!risk.applied_here(key(2), EventTime(MINUTE)));
        assert!(risk.applied_here(key(1), EventTime(2 * MINUTE)));
    }

    #[test]
    fn two_updates_further_apart_than_the_window_are_not_at_risk() {
        let mut risk = filter();
        assert!(!risk.applied_here(key(1), EventTime(0)));
        // The window and a slice more: surely forgotten.
        assert!(!risk.applied_here(key(1), EventTime(76 * MINUTE)));
        // Within the window, still remembered, however the slices turned.
        assert!(risk.applied_here(key(1), EventTime(130 * MINUTE)));
    }

    #[test]
    fn a_key_is_remembered_for_the_whole_window() {
        let mut risk = filter();
        risk.applied_here(key(7), EventTime(0));
        for minute in 1..60 {
            risk.applied_here(key(1000 + minute as u64), EventTime(minute * MINUTE));
        }
        assert!(risk.applied_here(key(7), EventTime(59 * MINUTE + MINUTE / 2)));
    }

    #[test]
    fn replicas_racing_on_a_key_put_it_at_risk_for_the_one_that_applied_it() {
        let mut here = filter();
        assert!(!here.applied_here(key(1), EventTime(0)));
        assert!(here.applied_elsewhere(key(1), EventTime(1)));
        // Learnt first, applied after: at risk too.
        assert!(!here.applied_elsewhere(key(2), EventTime(2)));
        assert!(here.applied_here(key(2), EventTime(3)));
    }

    #[test]
    fn a_key_only_other_replicas_update_is_left_to_them() {
        let mut here = filter();
        assert!(!here.applied_elsewhere(key(1), EventTime(0)));
        assert!(!here.applied_elsewhere(key(1), EventTime(1)));
    }

    #[test]
    fn a_request_without_an_answer_puts_the_next_update_at_risk() {
        let mut risk = filter();
        risk.uncertain(key(1), EventTime(0));
        assert!(risk.applied_here(key(1), EventTime(5)));
    }

    #[test]
    fn a_pause_longer_than_the_window_forgets_everything() {
        let mut risk = filter();
        risk.applied_here(key(1), EventTime(0));
        assert!(!risk.applied_here(key(1), EventTime(24 * 60 * MINUTE)));
        assert!(risk.slices.len() <= SLICES + 1);
    }

    #[test]
    fn false_positives_stay_rare_at_a_slice_of_a_hundred_thousand_keys() {
        let mut risk = filter();
        for n in 0..100_000 {
            risk.applied_here(key(n), EventTime(0));
        }
        let false_positives = (1_000_000..1_100_000)
            .filter(|n| risk.applied_here(key(*n), EventTime(1)))
            .count();
        // 100,000 probes, the filter filling up as they go: about 0.3%.
        assert!(
            false_positives < 1_000,
            "{false_positives} of 100,000 unseen keys looked seen"
        );
    }

    #[test]
    fn the_filters_never_hold_more_than_their_slices() {
        let mut risk = filter();
        for minute in 0..600 {
            risk.applied_here(key(minute as u64), EventTime(minute * MINUTE));
        }
        assert_eq!(risk.slices.len(), SLICES + 1);
        let bytes: usize = risk
            .slices
            .iter()
            .map(|slice| (slice.own.len() + slice.all.len()) * 8)
            .sum();
        assert_eq!(bytes, RISK_FILTER_BYTES);
    }

    proptest! {
        /// Whatever else happens, the second update of a key within the window is noticed.
        #[test]
        fn no_second_update_within_the_window_goes_unnoticed(
            others in proptest::collection::vec((0u64..500, 0i64..120), 0..200),
            first in 0i64..120,
            gap in 0i64..60,
        ) {
            let mut risk = filter();
            let mut events: Vec<(i64, u64)> =
                others.iter().map(|(k, minute)| (minute * MINUTE, 10_000 + k)).collect();
            events.push((first * MINUTE, 1));
            events.sort_unstable();
            let second = first * MINUTE + gap * MINUTE;
            let mut noticed = false;
            let mut done = false;
            for (at, k) in events {
                if !done && at > second {
                    noticed = risk.applied_here(key(1), EventTime(second));
                    done = true;
                }
                risk.applied_here(key(k), EventTime(at));
            }
            if !done {
                noticed = risk.applied_here(key(1), EventTime(second));
            }
            prop_assert!(noticed);
        }
    }

    fn to_read(value: &str, t: i64) -> KeyToRead {
        KeyToRead {
            l: 1001,
            e: "a@x.io".into(),
            f: 456,
            v: value.into(),
            t,
            a: t + 10,
        }
    }

    #[test]
    fn what_a_due_read_back_expects() {
        let holds = |value: &str, t: i64| Expectation::Holds {
            value: value.into(),
            time: EventTime(t),
        };
        let cases = [
            (
                "guard: the scheduled update is the newest",
                Knowledge::Guard {
                    newest: Some(EventTime(100)),
                },
                holds("on", 100),
            ),
            (
                "guard: a newer update was applied since, and is read back itself",
                Knowledge::Guard {
                    newest: Some(EventTime(101)),
                },
                Expectation::Postponed,
            ),
            (
                "guard: holds nothing newer",
                Knowledge::Guard { newest: None },
                holds("on", 100),
            ),
            (
                "log: a newer value the guard forgot is expected, not postponed",
                Knowledge::Log {
                    newest: Some(("off".into(), EventTime(150))),
                },
                holds("off", 150),
            ),
            (
                "log: the scheduled update is the newest",
                Knowledge::Log {
                    newest: Some(("on".into(), EventTime(100))),
                },
                holds("on", 100),
            ),
            (
                "log: past the log's horizon",
                Knowledge::Log { newest: None },
                holds("on", 100),
            ),
        ];
        for (case, knowledge, expected) in cases {
            assert_eq!(
                expectation(&to_read("on", 100), knowledge),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn what_listrak_holds_against_what_it_should() {
        let cases = [
            ("on", Some(Some("on")), Comparison::InSync),
            ("on", Some(Some(" on ")), Comparison::InSync),
            ("on", Some(Some("off")), Comparison::Differs),
            ("on", Some(None), Comparison::Differs),
            ("on", None, Comparison::NotOnList),
        ];
        for (expected, held, comparison) in cases {
            assert_eq!(
                compare(expected, held),
                comparison,
                "{expected} vs {held:?}"
            );
            assert_eq!(comparison.repairs(), comparison != Comparison::InSync);
        }
    }

    #[test]
    fn a_read_back_message_reads_back_what_was_written_and_refuses_what_is_not_one() {
        let message = ReadBacks {
            v: VERSION,
            k: vec![to_read("on", 100)],
        };
        assert_eq!(
            ReadBacks::decode(&ReadBacks::encode_keys(&message.k)).unwrap(),
            message
        );
        assert!(ReadBacks::decode(b"{\"v\":2,\"k\":[]}")
            .unwrap_err()
            .contains("version 2"));
        assert!(ReadBacks::decode(b"[1]").is_err());
        let zero = br#"{"v":1,"k":[{"l":0,"e":"a@x.io","f":1,"v":"on","t":1,"a":1}]}"#;
        assert!(ReadBacks::decode(zero).is_err());
    }
}
