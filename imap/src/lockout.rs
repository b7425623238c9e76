//! Failed-login counting: past a threshold a key (an identity, a source address) is locked for a
//! time that doubles with each lock, up to a maximum.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Most keys one counter tracks; past it, the stalest entry is forgotten.
pub const MAX_ENTRIES: usize = 100_000;

/// When a key is locked and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Failures within `window` that lock the key.
    pub threshold: u32,
    /// How far back failures count.
    pub window: Duration,
    /// The first lock; each further lock doubles it.
    pub lock: Duration,
    /// The longest lock.
    pub max_lock: Duration,
}

/// Failed logins per key.
#[derive(Debug)]
pub struct Lockout<K> {
    rules: Rules,
    entries: HashMap<K, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    first_failure: Instant,
    locks: u32,
    locked_until: Option<Instant>,
    last_seen: Instant,
}

impl<K: Hash + Eq + Clone> Lockout<K> {
    /// An empty counter.
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            entries: HashMap::new(),
        }
    }

    /// How long `key` stays locked, when it is.
    pub fn locked(&self, key: &K, now: Instant) -> Option<Duration> {
        let until = self.entries.get(key)?.locked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts a failure; returns the length of the lock it starts, if it starts one.
    pub fn fail(&mut self, key: &K, now: Instant) -> Option<Duration> {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_ENTRIES {
            self.forget_stale(now);
        }
        let rules = self.rules;
        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            first_failure: now,
            locks: 0,
            locked_until: None,
            last_seen: now,
        });
        let quiet = now.saturating_duration_since(entry.last_seen);
        if quiet > rules.window.saturating_add(rules.max_lock) {
            // Long enough without trouble: the next lock starts short again.
            entry.locks = 0;
        }
        if now.saturating_duration_since(entry.first_failure) > rules.window {
            entry.failures = 0;
        }
        if entry.failures == 0 {
            entry.first_failure = now;
        }
        entry.failures += 1;
        entry.last_seen = now;
        if entry.failures < rules.threshold {
            return None;
        }
        let lock = rules
            .lock
            .checked_mul(1 << entry.locks.min(20))
            .map_or(rules.max_lock, |l| l.min(rules.max_lock));
        entry.failures = 0;
        entry.locks += 1;
        // Configured locks are at most days long; an instant that far off cannot overflow.
        entry.locked_until = Some(now.checked_add(lock).unwrap_or(now));
        Some(lock)
    }

    /// A successful login: failures so far no longer count.
    pub fn succeed(&mut self, key: &K) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.failures = 0;
        }
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops entries with nothing left to remember; if none, the one seen longest ago.
    fn forget_stale(&mut self, now: Instant) {
        let keep_for = self.rules.window.max(self.rules.max_lock);
        self.entries.retain(|_, e| {
            e.locked_until.is_some_and(|until| until > now)
                || now.saturating_duration_since(e.last_seen) <= keep_for
        });
        if self.entries.len() >= MAX_ENTRIES {
            let stalest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(key) = stalest {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        threshold: 3,
        window: Duration::from_secs(600),
        lock: Duration::from_secs(60),
        max_lock: Duration::from_secs(300),
    };

    #[test]
    fn locks_after_the_threshold_for_a_growing_time() {
        let t0 = Instant::now();
        let mut lockout = Lockout::new(RULES);
        assert_eq!(lockout.fail(&"alice", t0), None);
        assert_eq!(lockout.fail(&"alice", t0), None);
        assert_eq!(lockout.locked(&"alice", t0), None);
        assert_eq!(lockout.fail(&"alice", t0), Some(Duration::from_secs(60)));
        assert_eq!(
            lockout.locked(&"alice", t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(lockout.locked(&"bob", t0), None);
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(lockout.locked(&"alice", t1), None);
        lockout.fail(&"alice", t1);
        lockout.fail(&"alice", t1);
        assert_eq!(lockout.fail(&"alice", t1), Some(Duration::from_secs(120)));
        for _ in 0..12 {
            lockout.fail(&"alice", t1);
        }
        assert_eq!(lockout.locked(&"alice", t1), Some(Duration::from_secs(300)));
    }

    #[test]
    fn old_failures_and_successes_reset_the_count() {
        let t0 = Instant::now();
        let mut lockout = Lockout::new(RULES);
        lockout.fail(&"alice", t0);
        lockout.fail(&"alice", t0);
        assert_eq!(lockout.fail(&"alice", t0 + Duration::from_secs(601)), None);
        lockout.fail(&"alice", t0 + Duration::from_secs(601));
        lockout.succeed(&"alice");
        assert_eq!(lockout.fail(&"alice", t0 + Duration::from_secs(602)), None);
    }

    #[test]
    fn locks_grow_shorter_again_after_a_quiet_time() {
        let t0 = Instant::now();
        let mut lockout = Lockout::new(RULES);
        for _ in 0..6 {
            lockout.fail(&"alice", t0);
        }
        assert_eq!(lockout.locked(&"alice", t0), Some(Duration::from_secs(120)));
        let later = t0 + Duration::from_secs(2000);
        for _ in 0..2 {
            lockout.fail(&"alice", later);
        }
        assert_eq!(lockout.fail(&"alice", later), Some(Duration::from_secs(60)));
    }

    #[test]
    fn stays_bounded() {
        let t0 = Instant::now();
        let mut lockout = Lockout::new(RULES);
        for key in 0..MAX_ENTRIES + 10 {
            lockout.fail(&key, t0);
        }
        assert!(lockout.len() <= MAX_ENTRIES);
    }
}
