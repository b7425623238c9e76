//! Sleep and clock jumps: after a laptop wakes, the certificate is checked (and renewed when it
//! ended meanwhile) before a mail program's connection goes to the broker, so that the first
//! program after a wake is served, or told what to do, instead of meeting TLS errors.
//!
//! A sleeping laptop runs no code. When it wakes, the wall clock has moved on while the
//! monotonic clock (on Linux) has not, or both have moved far past the last tick; either shows
//! as a gap between two looks at the clocks, which are taken every [`TICK`] and whenever a
//! program connects.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};

/// How often the clocks are looked at while nothing happens.
pub const TICK: Duration = Duration::from_secs(1);

/// A gap between two looks longer than [`TICK`] plus this is taken as a wake (or a stopped
/// process, or the wall clock set forward): the certificate is checked. A busy machine that
/// merely ran the tick late costs one needless, cheap check.
const JUMP: Duration = Duration::from_secs(5);

/// Whether local connections may go to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The certificate is valid.
    Ready,
    /// The certificate is being checked or renewed: connections wait.
    Checking,
    /// The certificate ended and cannot be renewed now; this says why and what to do.
    Unusable(String),
}

/// What the clocks and the certificate say, shared by the accept loops, the clock watcher and
/// the renewal task.
#[derive(Debug)]
pub struct Guard {
    state: watch::Sender<Readiness>,
    check: Notify,
    /// The monotonic and wall clocks at the last look.
    last: Mutex<(Instant, SystemTime)>,
    /// When the certificate in use ends.
    not_after: Mutex<SystemTime>,
    /// After a renewal that failed for a reason that may pass: from when a program's
    /// connection may ask for another try.
    retry_from: Mutex<Option<Instant>>,
}

impl Guard {
    /// A guard for a certificate that is valid until `not_after`.
    pub fn new(not_after: SystemTime) -> Self {
        Self {
            state: watch::Sender::new(Readiness::Ready),
            check: Notify::new(),
            last: Mutex::new((Instant::now(), SystemTime::now())),
            not_after: Mutex::new(not_after),
            retry_from: Mutex::new(None),
        }
    }

    /// Looks at the clocks. When they show a gap (a wake) or the certificate has ended, asks
    /// for a check, during which connections wait. Returns the gap after a wake.
    pub fn look(&self) -> Option<Duration> {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let gap = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let gap = mono
                .saturating_duration_since(last.0)
                .max(wall.duration_since(last.1).unwrap_or_default());
            *last = (mono, wall);
            gap
        };
        let woke = (gap > TICK + JUMP).then_some(gap);
        let ended = *self.not_after.lock().unwrap_or_else(|e| e.into_inner()) <= wall;
        let retry = self
            .retry_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|from| from <= mono);
        // After a wake, always ask again (the network may be back); for an ended certificate,
        // only when nobody has answered yet, or a failed renewal may be tried again.
        let asked = self.state.send_if_modified(|state| match state {
            Readiness::Checking => false,
            Readiness::Unusable(_) if woke.is_none() && !retry => false,
            Readiness::Ready if woke.is_none() && !ended => false,
            _ => {
                *state = Readiness::Checking;
                true
            }
        });
        if asked {
            *self.retry_from.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.check.notify_one();
        }
        woke
    }

    /// After a failed renewal: a program's connection may ask for another try after `wait`.
    pub fn retry_after(&self, wait: Duration) {
        *self.retry_from.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + wait);
    }

    /// Waits until a check is asked for.
    pub async fn check_asked(&self) {
        self.check.notified().await;
    }

    /// Records the outcome of a check.
    pub fn settle(&self, readiness: Readiness) {
        self.state.send_replace(readiness);
    }

    /// Whether a check is in progress.
    pub fn checking(&self) -> bool {
        *self.state.borrow() == Readiness::Checking
    }

    /// Records that the certificate in use now ends at `not_after` (a renewal).
    pub fn renewed(&self, not_after: SystemTime) {
        *self.not_after.lock().unwrap_or_else(|e| e.into_inner()) = not_after;
    }

    /// Waits up to `limit` for a check in progress. `Err` says why a connection cannot go to
    /// the broker now.
    pub async fn ready(&self, limit: Duration) -> Result<(), String> {
        let mut state = self.state.subscribe();
        let settled = tokio::time::timeout(
            limit,
            state.wait_for(|readiness| *readiness != Readiness::Checking),
        )
        .await;
        match settled {
            Ok(Ok(readiness)) => match &*readiness {
                Readiness::Unusable(why) => Err(why.clone()),
                _ => Ok(()),
            },
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(format!(
                "Postern is still renewing this device's certificate after {}s; try again in a moment",
                limit.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_look_asks_for_nothing() {
        let guard = Guard::new(SystemTime::now() + Duration::from_secs(600));
        assert_eq!(guard.look(), None);
        assert!(!guard.checking());
    }

    #[test]
    fn a_gap_between_looks_asks_for_a_check_once() {
        let guard = Guard::new(SystemTime::now() + Duration::from_secs(600));
        // As if the last look were before a 40-minute sleep.
        *guard.last.lock().unwrap() = (
            Instant::now(),
            SystemTime::now() - Duration::from_secs(2400),
        );
        let gap = guard.look().expect("a wake");
        assert!(gap >= Duration::from_secs(2400), "{gap:?}");
        assert!(guard.checking());
        // The next look, a moment later, is quiet and keeps the check going.
        assert_eq!(guard.look(), None);
        assert!(guard.checking());
        guard.settle(Readiness::Ready);
        assert!(!guard.checking());
    }

    #[test]
    fn an_ended_certificate_asks_for_a_check_until_answered() {
        let guard = Guard::new(SystemTime::now() - Duration::from_secs(1));
        assert_eq!(guard.look(), None);
        assert!(guard.checking());
        guard.settle(Readiness::Unusable("log in".into()));
        // Answered: a quiet look does not ask again; a wake does.
        assert_eq!(guard.look(), None);
        assert!(!guard.checking());
        *guard.last.lock().unwrap() = (Instant::now() - Duration::from_secs(60), SystemTime::now());
        assert!(guard.look().is_some());
        assert!(guard.checking());
        guard.renewed(SystemTime::now() + Duration::from_secs(600));
        guard.settle(Readiness::Ready);
        assert_eq!(guard.look(), None);
        assert!(!guard.checking());
    }

    #[test]
    fn after_a_failed_renewal_a_connection_asks_again_once_the_wait_is_over() {
        let guard = Guard::new(SystemTime::now() - Duration::from_secs(1));
        guard.look();
        guard.settle(Readiness::Unusable("no network".into()));
        guard.retry_after(Duration::from_secs(600));
        assert_eq!(guard.look(), None);
        assert!(!guard.checking());
        guard.retry_after(Duration::ZERO);
        guard.look();
        assert!(guard.checking());
    }

    #[tokio::test]
    async fn connections_wait_for_the_outcome_of_a_check() {
        let guard = std::sync::Arc::new(Guard::new(SystemTime::now() - Duration::from_secs(1)));
        guard.look();
        let waiting = tokio::spawn({
            let guard = guard.clone();
            async move { guard.ready(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        guard.settle(Readiness::Unusable("run `postern login`".into()));
        assert_eq!(waiting.await.unwrap(), Err("run `postern login`".into()));
        guard.settle(Readiness::Ready);
        assert_eq!(guard.ready(Duration::from_secs(1)).await, Ok(()));
        // A check that takes too long ends the wait with a reason.
        guard.settle(Readiness::Checking);
        let late = guard.ready(Duration::from_millis(50)).await.unwrap_err();
        assert!(late.contains("still renewing"), "{late}");
    }
}
