//! A mutex that a panic cannot poison: the state it guards is always left whole between
//! statements (counters, maps, limits), so a panic elsewhere while it was held costs the one
//! task that panicked, not every later user of the lock.

use std::sync::PoisonError;

pub use std::sync::MutexGuard;

#[derive(Debug, Default)]
pub struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    /// The guard, whether or not a holder panicked before.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_the_lock_does_not_poison_it() {
        let shared = std::sync::Arc::new(Mutex::new(1));
        let held = std::sync::Arc::clone(&shared);
        let panicked = std::thread::spawn(move || {
            let mut value = held.lock();
            *value = 2;
            panic!("a bug while the lock is held");
        })
        .join();
        assert!(panicked.is_err());
        *shared.lock() += 1;
        assert_eq!(*shared.lock(), 3);
    }
}
