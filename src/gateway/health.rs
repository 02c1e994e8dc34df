//! Passive health of one model server (replica): ejected for a capped exponential backoff when
//! a request to it fails before its answer began (connect failure, reset, timeout before the
//! first response byte, a 502 or 503 from the server) or when its `GET /models` probe cannot
//! connect; re-admitted when the backoff ends (the next request tries it again), when the probe
//! answers, or when a request succeeds.
//!
//! Owns only that state; never decides where a request goes (`balance`) or retries anything
//! (`forward`). Pure apart from its atomics and one lock: every method takes `now`, so the
//! backoff is unit-tested with an injected clock. Hot path: a healthy server costs one atomic
//! load per check and per success; the lock is taken only while it is failing.
//!
//! Backoff: [`EJECT_BASE`] (1 s) for the first ejection, doubling with every further failure of
//! a request sent after the previous ejection ended (a half-open try), capped at [`EJECT_MAX`]
//! (30 s). Failures of requests that were already on their way when it was ejected do not
//! lengthen it, so one incident with many requests in flight costs one step. A successful
//! request resets the streak; a probe that answers re-admits but keeps the streak (the server
//! answers `GET /models`, but its next failed request ejects it for longer).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The first ejection.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// The ejection after `streak` consecutive failures (1 = the first).
pub fn backoff(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    EJECT_BASE.saturating_mul(1 << doublings).min(EJECT_MAX)
}

/// One server's health.
#[derive(Debug, Default)]
pub struct Health {
    /// False while the server is healthy with no failure streak: the fast path.
    failing: AtomicBool,
    state: Mutex<State>,
    ejections: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Failures since the last successful request (each one that ejected counts).
    streak: u32,
    ejected_until: Option<Instant>,
    last_error: Option<(String, SystemTime)>,
}

/// What `status` shows of a server's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    /// Not ejected now.
    pub healthy: bool,
    /// How much longer it stays ejected (`None` when healthy).
    pub ejected_for: Option<Duration>,
    /// The last failure and when it happened (kept after recovery).
    pub last_error: Option<(String, SystemTime)>,
    pub ejections: u64,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// The server was healthy (or half-open) and is now ejected for this long.
    Ejected(Duration),
    /// It was already ejected (a request that was on its way then); nothing lengthened.
    AlreadyEjected,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True unless the server is ejected at `now`.
    pub fn available(&self, now: Instant) -> bool {
        if !self.failing.load(Ordering::Acquire) {
            return true;
        }
        self.lock().ejected_until.is_none_or(|t| t <= now)
    }

    /// When an ejected server comes back (`None`: available now).
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.lock().ejected_until.filter(|t| *t > now)
    }

    /// A request (or probe) failed at `now` for `reason` before its answer began: ejects the
    /// server unless it is already ejected.
    pub fn failed(&self, now: Instant, reason: &str) -> Failed {
        let mut s = self.lock();
        s.last_error = Some((reason.to_string(), SystemTime::now()));
        if s.ejected_until.is_some_and(|t| t > now) {
            return Failed::AlreadyEjected;
        }
        s.streak = s.streak.saturating_add(1);
        let d = backoff(s.streak);
        s.ejected_until = Some(now + d);
        self.failing.store(true, Ordering::Release);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        Failed::Ejected(d)
    }

    /// A request got its answer: the streak ends. True when the server was ejected or failing
    /// until now (so waiters may use it again).
    pub fn succeeded(&self) -> bool {
        if !self.failing.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        s.streak = 0;
        s.ejected_until = None;
        self.failing.store(false, Ordering::Release);
        true
    }

    /// The `GET /models` probe answered at `now`: an ejected server is re-admitted at once (the
    /// streak stays). True when it was ejected.
    pub fn probe_answered(&self, now: Instant) -> bool {
        if !self.failing.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        let was_ejected = s.ejected_until.is_some_and(|t| t > now);
        s.ejected_until = None;
        if s.streak == 0 {
            self.failing.store(false, Ordering::Release);
        }
        was_ejected
    }

    /// Times the server was ejected since it was configured.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// The state at `now`, for `status` and metrics.
    pub fn view(&self, now: Instant) -> HealthView {
        let s = self.lock();
        let ejected_for = s
            .ejected_until
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        HealthView {
            healthy: ejected_for.is_none(),
            ejected_for,
            last_error: s.last_error.clone(),
            ejections: self.ejections(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(0), EJECT_BASE);
        assert_eq!(backoff(u32::MAX), EJECT_MAX);
    }

    /// Ejection, half-open retries that double it, the cap, and recovery by a success, all on
    /// an injected clock.
    #[test]
    fn ejection_backs_off_and_a_success_resets_it() {
        let h = Health::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(h.available(t0));
        assert!(
            !h.succeeded(),
            "a healthy server has nothing to recover from"
        );

        assert_eq!(h.failed(at(0), "refused"), Failed::Ejected(EJECT_BASE));
        assert!(!h.available(at(999)));
        assert_eq!(h.ejected_until(at(500)), Some(at(1000)));
        // Requests already on their way when it was ejected do not lengthen it.
        assert_eq!(h.failed(at(10), "reset"), Failed::AlreadyEjected);
        assert_eq!(h.ejections(), 1);
        assert!(h.available(at(1000)), "back when the backoff ends");
        assert_eq!(h.ejected_until(at(1000)), None);

        // The half-open try fails: twice as long, and so on up to the cap.
        assert_eq!(
            h.failed(at(1000), "refused"),
            Failed::Ejected(Duration::from_secs(2))
        );
        assert!(!h.available(at(2999)) && h.available(at(3000)));
        let mut t = 3000;
        for want in [4, 8, 16, 30, 30] {
            assert_eq!(
                h.failed(at(t), "refused"),
                Failed::Ejected(Duration::from_secs(want))
            );
            t += want * 1000;
        }
        assert_eq!(h.ejections(), 7);
        let v = h.view(at(t - 1000));
        assert!(!v.healthy);
        assert_eq!(v.ejected_for, Some(Duration::from_secs(1)));
        assert_eq!(v.last_error.as_ref().map(|e| e.0.as_str()), Some("refused"));

        // A success ends the streak: the next failure is a first one again.
        assert!(h.succeeded());
        assert!(h.available(at(t - 1000)), "a success re-admits at once");
        assert!(h.view(at(t)).healthy);
        assert_eq!(
            h.view(at(t)).last_error.map(|e| e.0),
            Some("refused".to_string()),
            "the last error stays visible after recovery"
        );
        assert_eq!(h.failed(at(t), "503"), Failed::Ejected(EJECT_BASE));
    }

    #[test]
    fn an_answering_probe_readmits_but_keeps_the_streak() {
        let h = Health::default();
        let t0 = Instant::now();
        h.failed(t0, "refused");
        h.failed(t0 + EJECT_BASE, "refused");
        let t = t0 + Duration::from_millis(1500);
        assert!(!h.available(t));
        assert!(h.probe_answered(t), "it was ejected");
        assert!(h.available(t));
        assert!(!h.probe_answered(t), "already re-admitted");
        // Its next failure continues the streak (2 → 3: 4 s).
        assert_eq!(h.failed(t, "503"), Failed::Ejected(Duration::from_secs(4)));
        // A probe of a server that is failing but not ejected changes nothing.
        let h = Health::default();
        assert!(!h.probe_answered(t0));
        assert!(h.view(t0).healthy);
        assert_eq!(h.view(t0).ejections, 0);
    }
}
