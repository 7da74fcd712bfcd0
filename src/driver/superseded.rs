//! The superseded guard: remembers the newest event time applied per list, contact and field,
//! so a retried, redelivered, replayed or late update never overwrites a newer value. It is
//! fed by this process's own 201s and by the applied log (every replica's, read at start and
//! tailed while running), so it outlives a process.
//!
//! What it must remember scales with failures, not with the account: a key needs remembering
//! while an older update for it may still come back. So it holds two kinds of keys, each with
//! an explicit bound:
//! - *recent*: the last `capacity` values applied (first in, first out), for redeliveries,
//!   replicas racing and producers publishing late;
//! - *watched*: keys with an older copy outstanding (in a retry queue or the dead-letter
//!   queue, noted in the applied log when the copy was made), for `watch_for` (the log's
//!   horizon) and at most `watch_capacity` of them; their newest applied value is kept
//!   however many others are applied after it.
//!
//! Keys are a keyed 128-bit hash (two SipHash-1-3 with random keys of this process) of the
//! list, field and email: no input can make two contacts collide on purpose, and an entry
//! costs the same whatever the email's length.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::driver::unpoisoned::Mutex;
use crate::stages::model::{AppliedKey, AppliedKnowledge, EventTime, FieldId, ListId};

/// A list, contact and field, hashed with this process's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key(u64, u64);

/// Hashes a list, contact and field to 128 bits with two SipHash-1-3 keyed at random for this
/// process: no input can make two contacts collide on purpose.
pub struct KeyHasher(RandomState, RandomState);

impl KeyHasher {
    pub fn new() -> Self {
        Self(RandomState::new(), RandomState::new())
    }

    pub fn hash(&self, list: ListId, email: &str, field: FieldId) -> (u64, u64) {
        let hash = |state: &RandomState| {
            let mut hasher = state.build_hasher();
            list.hash(&mut hasher);
            field.hash(&mut hasher);
            email.hash(&mut hasher);
            hasher.finish()
        };
        (hash(&self.0), hash(&self.1))
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// The bytes one key costs: its map entry (with the map's overhead) and one entry in each
/// queue (see `guard_memory_stays_within_its_bound`). The table takes its room for the recent
/// keys at start and keeps it (see `make_room`); only watched keys beyond that make it grow,
/// by doubling. `listrak_guard_keys` times this is the guard's memory.
pub const BYTES_PER_KEY: usize = 96;

/// The recent keys whose room is taken at start. A table that grows doubles, and holds the
/// old table and the new one while it copies: at 115,000 keys that is 15 MiB for an instant
/// where the full table takes 10, while a backlog keeps the most messages in hand. The room
/// is only address space until a key lands in it. Above this many, the guard grows as keys
/// come.
const MAX_RESERVED_KEYS: usize = 1 << 22;

#[derive(Debug, Clone, Copy)]
struct Entry {
    newest: EventTime,
    /// Until when (applied-log time, microseconds) an older copy may still come back; 0 when
    /// none is known.
    watched_until: i64,
    /// How many entries of `recent` name it.
    in_recent: u32,
}

struct Inner {
    entries: FxHashMap<Key, Entry>,
    /// Applied values in the order written: key, event time, when applied.
    recent: VecDeque<(Key, EventTime)>,
    /// Watched keys in the order noted: key, until when.
    watched: VecDeque<(Key, i64)>,
    /// When the newest value forgotten from `recent` was applied: the guard vouches for what
    /// was applied after it (and for watched keys, for `watch_for`).
    forgot_applied_at: Option<EventTime>,
    /// When the oldest value the guard learnt was applied (its log read starts there).
    learnt_since: Option<EventTime>,
}

pub struct SupersededGuard {
    capacity: usize,
    /// The keys whose room the table takes at start and keeps (see `make_room`); 0 for a
    /// guard that never forgets.
    reserved: usize,
    watch_capacity: usize,
    watch_for: Duration,
    hashers: KeyHasher,
    inner: Mutex<Inner>,
}

impl SupersededGuard {
    /// `capacity` recent values; keys with an outstanding older copy are watched as many
    /// times over, for a week.
    pub fn new(capacity: usize) -> Self {
        Self::with_watch(capacity, capacity, Duration::from_secs(7 * 24 * 3600))
    }

    pub fn with_watch(capacity: usize, watch_capacity: usize, watch_for: Duration) -> Self {
        let reserved = if capacity == usize::MAX {
            0
        } else {
            capacity.min(MAX_RESERVED_KEYS)
        };
        Self {
            capacity,
            reserved,
            watch_capacity,
            watch_for,
            hashers: KeyHasher::new(),
            inner: Mutex::new(Inner {
                entries: FxHashMap::with_capacity_and_hasher(reserved, Default::default()),
                recent: VecDeque::with_capacity(reserved),
                watched: VecDeque::new(),
                forgot_applied_at: None,
                learnt_since: None,
            }),
        }
    }

    fn key(&self, list: ListId, email: &str, field: FieldId) -> Key {
        let (high, low) = self.hashers.hash(list, email, field);
        Key(high, low)
    }

    /// True when a value with a strictly newer event time was applied; an equal time is not
    /// newer (the later delivery wins ties).
    pub fn is_superseded(
        &self,
        list: ListId,
        email: &str,
        field: FieldId,
        time: EventTime,
    ) -> bool {
        if self.capacity == 0 && self.watch_capacity == 0 {
            return false;
        }
        let key = self.key(list, email, field);
        let inner = self.inner.lock();
        inner
            .entries
            .get(&key)
            .is_some_and(|entry| entry.newest > time)
    }

    /// The newest event time applied to the key, if the guard holds the key.
    pub fn newest(&self, list: ListId, email: &str, field: FieldId) -> Option<EventTime> {
        let key = self.key(list, email, field);
        let inner = self.inner.lock();
        inner
            .entries
            .get(&key)
            .map(|entry| entry.newest)
            .filter(|newest| newest.0 != i64::MIN)
    }

    /// Whether the guard knows every value applied since `since` (it forgot none applied
    /// after it, and learnt the log from before it).
    pub fn knows_everything_since(&self, since: EventTime) -> bool {
        if self.capacity == usize::MAX {
            return true;
        }
        let inner = self.inner.lock();
        let forgot_after = inner
            .forgot_applied_at
            .is_some_and(|forgot| forgot >= since);
        let learnt_before = inner.learnt_since.is_some_and(|learnt| learnt <= since);
        self.capacity > 0 && !forgot_after && learnt_before
    }

    /// The guard read the whole applied log, which reaches back to `since`: it knows every
    /// value applied since then (up to what it forgets).
    pub fn learnt_from(&self, since: EventTime) {
        let mut inner = self.inner.lock();
        if inner.learnt_since.is_none_or(|learnt| since < learnt) {
            inner.learnt_since = Some(since);
        }
    }

    /// Records that Listrak accepted a value with this event time, now.
    pub fn record(&self, list: ListId, email: &str, field: FieldId, time: EventTime) {
        self.record_at(list, email, field, time, EventTime::now());
    }

    /// Records that Listrak accepted a value with this event time at `applied_at` (as the
    /// applied log says).
    pub fn record_at(
        &self,
        list: ListId,
        email: &str,
        field: FieldId,
        time: EventTime,
        applied_at: EventTime,
    ) {
        if self.capacity == 0 && self.watch_capacity == 0 {
            return;
        }
        let key = self.key(list, email, field);
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        if inner.learnt_since.is_none_or(|since| applied_at < since) {
            inner.learnt_since = Some(applied_at);
        }
        if self.capacity == 0 {
            // Only watched keys are remembered.
            if let Some(entry) = inner.entries.get_mut(&key) {
                entry.newest = entry.newest.max(time);
            }
            return;
        }
        make_room(&mut inner.entries, key, self.reserved);
        let entry = inner.entries.entry(key).or_insert(Entry {
            newest: time,
            watched_until: 0,
            in_recent: 0,
        });
        if entry.newest > time {
            return;
        }
        entry.newest = time;
        if self.capacity == usize::MAX {
            // Unbounded (a command reading the whole log): nothing is ever forgotten.
            return;
        }
        entry.in_recent += 1;
        // The oldest goes before the newest comes, so the queue never outgrows its room.
        while inner.recent.len() >= self.capacity {
            let Some((old, applied)) = inner.recent.pop_front() else {
                break;
            };
            inner.forgot_applied_at = Some(applied);
            forget_recent(&mut inner.entries, old, applied);
        }
        inner.recent.push_back((key, applied_at));
    }

    /// Notes that an update of this key with an older event time may come back (a copy was
    /// made for a retry queue or the dead-letter queue at `noted_at`): its newest value is
    /// kept for `watch_for`.
    pub fn watch(&self, list: ListId, email: &str, field: FieldId, noted_at: EventTime) {
        if self.watch_capacity == 0 {
            return;
        }
        let key = self.key(list, email, field);
        let until = noted_at
            .0
            .saturating_add(i64::try_from(self.watch_for.as_micros()).unwrap_or(i64::MAX));
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        make_room(&mut inner.entries, key, self.reserved);
        let entry = inner.entries.entry(key).or_insert(Entry {
            newest: EventTime(i64::MIN),
            watched_until: 0,
            in_recent: 0,
        });
        if entry.watched_until >= until {
            return;
        }
        entry.watched_until = until;
        inner.watched.push_back((key, until));
        while inner.watched.len() > self.watch_capacity {
            let Some((old, old_until)) = inner.watched.pop_front() else {
                break;
            };
            unwatch(&mut inner.entries, old, old_until);
        }
    }

    /// Forgets watched keys whose outstanding copies can no longer come back (past
    /// `watch_for`), as of `now`.
    pub fn expire(&self, now: EventTime) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        while inner
            .watched
            .front()
            .is_some_and(|(_, until)| *until < now.0)
        {
            let Some((old, old_until)) = inner.watched.pop_front() else {
                break;
            };
            unwatch(&mut inner.entries, old, old_until);
        }
    }

    /// How far back, from `now`, the guard knows every applied value: since the newest value
    /// it had to forget, or since the oldest it learnt (the start of the log it read).
    pub fn horizon(&self, now: EventTime) -> Duration {
        let inner = self.inner.lock();
        let since = inner.forgot_applied_at.or(inner.learnt_since);
        since.map_or(Duration::ZERO, |since| {
            Duration::from_micros(u64::try_from(now.0.saturating_sub(since.0)).unwrap_or(0))
        })
    }

    /// Keys held (recent and watched).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys watched for an outstanding older copy.
    pub fn watched(&self) -> usize {
        self.inner.lock().watched.len()
    }
}

/// Makes room for `key` without doubling the table. A guard forgets keys as fast as it learns
/// them, and a forgotten key leaves a tombstone in a table that was mostly full; once the
/// tombstones use up its room, the table would double (it only cleans itself in place while
/// at most half full) and stay doubled: 21 MiB for the default 200,000 recent keys instead of
/// 10. Copied into a fresh table instead, the live keys fit in the room reserved at start
/// with an eighth to spare, and the copy comes again only after that eighth is used up.
fn make_room(entries: &mut FxHashMap<Key, Entry>, key: Key, reserved: usize) {
    if reserved == 0 || entries.len() < entries.capacity() || entries.contains_key(&key) {
        return;
    }
    let live = entries.len();
    let mut fresh =
        FxHashMap::with_capacity_and_hasher(reserved.max(live + live / 8), Default::default());
    fresh.extend(entries.drain());
    *entries = fresh;
}

fn forget_recent(entries: &mut FxHashMap<Key, Entry>, key: Key, _applied: EventTime) {
    let Some(entry) = entries.get_mut(&key) else {
        return;
    };
    entry.in_recent = entry.in_recent.saturating_sub(1);
    if entry.in_recent == 0 && entry.watched_until == 0 {
        entries.remove(&key);
    }
}

fn unwatch(entries: &mut FxHashMap<Key, Entry>, key: Key, until: i64) {
    let Some(entry) = entries.get_mut(&key) else {
        return;
    };
    if entry.watched_until != until {
        // Watched again later: that later note decides.
        return;
    }
    entry.watched_until = 0;
    if entry.in_recent == 0 {
        entries.remove(&key);
    }
}

impl AppliedKnowledge for SupersededGuard {
    fn applied(&self, key: AppliedKey<'_>, _: &str, event_time: EventTime, applied_at: EventTime) {
        self.record_at(key.list, key.email, key.field, event_time, applied_at);
    }

    fn outstanding(&self, list: ListId, email: &str, field: FieldId, at: EventTime) {
        self.watch(list, email, field, at);
    }

    fn tick(&self, now: EventTime) -> (usize, Duration) {
        self.expire(now);
        (self.len(), self.horizon(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list() -> ListId {
        ListId::new(1).unwrap()
    }
    fn field(id: i64) -> FieldId {
        FieldId::new(id).unwrap()
    }

    #[test]
    fn an_older_update_is_superseded_by_an_applied_newer_one() {
        let guard = SupersededGuard::new(10);
        guard.record(list(), "a@x.io", field(1), EventTime(20));
        assert!(guard.is_superseded(list(), "a@x.io", field(1), EventTime(10)));
        assert!(
            !guard.is_superseded(list(), "a@x.io", field(1), EventTime(20)),
            "ties apply"
        );
        assert!(!guard.is_superseded(list(), "a@x.io", field(1), EventTime(30)));
        assert!(!guard.is_superseded(list(), "a@x.io", field(2), EventTime(10)));
        assert!(!guard.is_superseded(list(), "b@x.io", field(1), EventTime(10)));
    }

    #[test]
    fn recording_an_older_time_keeps_the_newer_one() {
        let guard = SupersededGuard::new(10);
        guard.record(list(), "a@x.io", field(1), EventTime(20));
        guard.record(list(), "a@x.io", field(1), EventTime(5));
        assert!(guard.is_superseded(list(), "a@x.io", field(1), EventTime(10)));
    }

    #[test]
    fn memory_stays_within_its_capacity_and_forgets_the_oldest() {
        let guard = SupersededGuard::new(3);
        for i in 0..10 {
            guard.record(list(), &format!("p{i}@x.io"), field(1), EventTime(100));
            guard.record(list(), &format!("p{i}@x.io"), field(1), EventTime(101));
        }
        assert!(guard.len() <= 3);
        assert!(guard.is_superseded(list(), "p9@x.io", field(1), EventTime(1)));
        assert!(!guard.is_superseded(list(), "p0@x.io", field(1), EventTime(1)));
    }

    #[test]
    fn a_watched_key_keeps_its_newest_value_however_much_is_applied_after_it() {
        let guard = SupersededGuard::with_watch(10, 10, Duration::from_secs(3600));
        // Entered failed and waits in a retry queue; Exited is applied; a flood follows.
        guard.watch(list(), "a@x.io", field(1), EventTime(1_000));
        guard.record_at(list(), "a@x.io", field(1), EventTime(20), EventTime(2_000));
        for i in 0..1000 {
            let email = format!("p{i}@x.io");
            guard.record_at(list(), &email, field(1), EventTime(30), EventTime(3_000));
        }
        assert!(guard.is_superseded(list(), "a@x.io", field(1), EventTime(10)));
        assert!(guard.len() <= 11);
        // Past the horizon the copy cannot come back: the key is forgotten.
        guard.expire(EventTime(1_000 + 3_600_000_001));
        assert!(!guard.is_superseded(list(), "a@x.io", field(1), EventTime(10)));
        assert_eq!(guard.watched(), 0);
        assert!(guard.len() <= 10);
    }

    #[test]
    fn the_horizon_is_since_the_newest_value_forgotten() {
        let guard = SupersededGuard::new(2);
        guard.record_at(
            list(),
            "a@x.io",
            field(1),
            EventTime(1),
            EventTime(1_000_000),
        );
        assert_eq!(
            guard.horizon(EventTime(11_000_000)),
            Duration::from_secs(10)
        );
        guard.record_at(
            list(),
            "b@x.io",
            field(1),
            EventTime(1),
            EventTime(2_000_000),
        );
        guard.record_at(
            list(),
            "c@x.io",
            field(1),
            EventTime(1),
            EventTime(3_000_000),
        );
        assert_eq!(
            guard.horizon(EventTime(11_000_000)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn the_recent_keys_fill_room_taken_at_start() {
        let guard = SupersededGuard::new(5_000);
        let room = |guard: &SupersededGuard| {
            let inner = guard.inner.lock();
            (inner.entries.capacity(), inner.recent.capacity())
        };
        let reserved = room(&guard);
        assert!(reserved.0 >= 5_000 && reserved.1 >= 5_000, "{reserved:?}");
        for i in 0..5_000 {
            guard.record(list(), &format!("p{i}@x.io"), field(1), EventTime(100));
        }
        assert_eq!(
            room(&guard),
            reserved,
            "neither grew on its way to capacity"
        );
        for i in 5_000..20_000 {
            guard.record(list(), &format!("p{i}@x.io"), field(1), EventTime(100));
        }
        assert_eq!(guard.len(), 5_000);
        // Forgotten keys leave tombstones that count against the table's room until it is
        // cleaned: what is left may be less, never more.
        let (table, queue) = room(&guard);
        assert!(
            table <= reserved.0 && queue == reserved.1,
            "forgetting as fast as it learns, neither grew: {table}, {queue}"
        );
        assert!(guard.is_superseded(list(), "p19999@x.io", field(1), EventTime(1)));
        assert!(guard.is_superseded(list(), "p15000@x.io", field(1), EventTime(1)));
        assert!(!guard.is_superseded(list(), "p14999@x.io", field(1), EventTime(1)));
    }

    #[test]
    fn a_guard_that_never_forgets_takes_no_room_ahead() {
        let guard = SupersededGuard::with_watch(usize::MAX, 0, Duration::from_secs(60));
        assert_eq!(guard.inner.lock().entries.capacity(), 0);
        for i in 0..1_000 {
            guard.record(list(), &format!("p{i}@x.io"), field(1), EventTime(100));
        }
        assert_eq!(guard.len(), 1_000);
    }

    #[test]
    fn guard_memory_stays_within_its_bound() {
        // The entry and its queue entries, with the map's own overhead (hashbrown keeps
        // one control byte per slot and at most 7/8 of its slots full).
        let per_key = std::mem::size_of::<(Key, Entry)>() * 8 / 7
            + 1
            + std::mem::size_of::<(Key, EventTime)>()
            + std::mem::size_of::<(Key, i64)>();
        assert!(per_key <= BYTES_PER_KEY, "{per_key} bytes per key");
    }

    /// One applied value as a log holds it: contact, field, event time, applied at.
    fn applied() -> impl Strategy<Value = (u8, u8, i64, i64)> {
        (0u8..6, 0u8..3, 0i64..50, 0i64..1000)
    }

    proptest! {
        /// Several replicas' logs, read in any interleaving (each log in its own order):
        /// the guard ends on the newest event time per key, as last write wins has it.
        #[test]
        fn logs_read_in_any_interleaving_end_as_last_write_wins(
            logs in proptest::collection::vec(proptest::collection::vec(applied(), 0..30), 1..4),
            picks in proptest::collection::vec(0usize..4, 0..200),
        ) {
            let guard = SupersededGuard::new(10_000);
            let mut cursors = vec![0usize; logs.len()];
            let mut order = Vec::new();
            for pick in picks.iter().chain(std::iter::repeat_n(&0, 200)) {
                let live: Vec<usize> =
                    (0..logs.len()).filter(|&l| cursors[l] < logs[l].len()).collect();
                if live.is_empty() {
                    break;
                }
                let log = live[pick % live.len()];
                order.push(logs[log][cursors[log]]);
                cursors[log] += 1;
            }
            for &(contact, f, time, at) in &order {
                let email = format!("c{contact}@x.io");
                guard.record_at(list(), &email, field(i64::from(f) + 1), EventTime(time),
                    EventTime(at));
            }
            let mut newest = std::collections::HashMap::new();
            for &(contact, f, time, _) in logs.iter().flatten() {
                let slot = newest.entry((contact, f)).or_insert(time);
                *slot = (*slot).max(time);
            }
            for ((contact, f), time) in newest {
                let email = format!("c{contact}@x.io");
                let id = field(i64::from(f) + 1);
                prop_assert!(guard.is_superseded(list(), &email, id, EventTime(time - 1)));
                prop_assert!(!guard.is_superseded(list(), &email, id, EventTime(time)));
            }
        }
    }
}
