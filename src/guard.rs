//! The superseded guard: remembers the newest event time applied per list, contact and field,
//! so a retried, redelivered or late update never overwrites a newer value.
//!
//! Bounded: past `capacity` entries the oldest-written are forgotten (first in, first out).
//! Keys are 64-bit hashes, so an entry costs a few dozen bytes whatever the email's length;
//! a collision (odds about n²/2⁶⁵) could only make an update look superseded.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};

use crate::unpoisoned::Mutex;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::model::{EventTime, FieldId, ListId};

pub struct SupersededGuard {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    newest: FxHashMap<u64, EventTime>,
    /// Write order, for eviction; a key written again appears again (the stale copy is
    /// recognised by comparing times when it reaches the front).
    order: VecDeque<(u64, EventTime)>,
}

fn key(list: ListId, email: &str, field: FieldId) -> u64 {
    // Fx is fast and good enough here: keys are already spread by the email's bytes, and a
    // collision can only make an update look superseded.
    let mut hasher = FxBuildHasher.build_hasher();
    list.hash(&mut hasher);
    field.hash(&mut hasher);
    email.hash(&mut hasher);
    hasher.finish()
}

impl SupersededGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// True when a value with a strictly newer event time was already applied; an equal
    /// time is not newer (the later delivery wins ties).
    pub fn is_superseded(
        &self,
        list: ListId,
        email: &str,
        field: FieldId,
        time: EventTime,
    ) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let inner = self.inner.lock();
        inner
            .newest
            .get(&key(list, email, field))
            .is_some_and(|newest| *newest > time)
    }

    /// Records that Listrak accepted a value with this event time.
    pub fn record(&self, list: ListId, email: &str, field: FieldId, time: EventTime) {
        if self.capacity == 0 {
            return;
        }
        let key = key(list, email, field);
        let mut inner = self.inner.lock();
        let newest = inner.newest.entry(key).or_insert(time);
        if *newest > time {
            return;
        }
        *newest = time;
        inner.order.push_back((key, time));
        while inner.newest.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            let Some((old_key, old_time)) = inner.order.pop_front() else {
                break;
            };
            if inner.newest.get(&old_key) == Some(&old_time) {
                inner.newest.remove(&old_key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().newest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(guard.len(), 3);
        assert!(guard.is_superseded(list(), "p9@x.io", field(1), EventTime(1)));
        assert!(!guard.is_superseded(list(), "p0@x.io", field(1), EventTime(1)));
    }
}
