//! Fair share of a model's servers: the concurrency slots of every upstream (at most its
//! `max_concurrent` requests in flight) and one wait queue per model spanning all the model's
//! replicas. When every replica a request may use is saturated, it waits, and waiting
//! requests are served **round-robin across keys**, not first come first served, so one key's
//! agent loop cannot starve everyone else; a waiter takes the first slot freed on any of its
//! replicas.
//!
//! Owns the slots and the queue. Bounded: at most `max_queued` requests wait per model (more
//! are refused at once) and each waits at most `timeout`; both refusals become 503
//! `model_overloaded` with `Retry-After` in the gateway. Never decides per-key limits (those are
//! [`crate::policy::limits`], checked before a request queues here), never judges a server's
//! health ([`super::health`]: it only asks whether a server is available) and never chooses by
//! rule ([`super::balance`] does: least loaded, ties in turn, or the affinity replica).
//!
//! One scheduler per gateway, shared by every config snapshot (a reload keeps the waiters; an
//! upstream carried over keeps its slots). Its lock is held for O(replicas) work (and a scan
//! of the waiters when a slot is handed on), never across an `.await`. A pool of servers
//! without `max_concurrent` never queues and never takes the lock: one atomic per request.
//!
//! Round-robin: keys with waiters form a ring; a freed slot at server U goes to the oldest
//! waiter that may use U of the first key in ring order that has one, and that key moves to the
//! back if it still has waiters. With the model saturated every waiting key therefore gets one
//! slot per round, whatever the number of requests it queued. A waiter that gave up (timeout,
//! client gone) is skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::balance::{self, Load};
use super::upstream::Upstream;

/// Why a request could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// `max_queued` requests already wait for this model.
    Full,
    /// No slot came free within the queue timeout.
    TimedOut,
}

/// The queue settings a request waits under (`[gateway] max_queued`, `queue_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Requests waiting at once for one model.
    pub max_queued: usize,
    /// Longest wait for a slot.
    pub timeout: Duration,
}

/// What one request asks for: a slot at one of `candidates` (the model's replicas it has not
/// tried yet), for `key`, waiting in `model`'s queue if they are all saturated.
pub struct Want<'a> {
    pub key: &'a str,
    pub model: &'a str,
    pub candidates: &'a [Arc<Upstream>],
    /// The replica to take when it is usable and has a free slot (affinity); else least loaded.
    pub preferred: Option<usize>,
    /// Use candidates even while they are ejected (the last resort when none is healthy).
    pub any_health: bool,
    pub now: Instant,
}

/// A slot at a server; dropping it hands the slot to the next waiter (round-robin) or frees it.
#[derive(Debug)]
pub struct Slot {
    upstream: Arc<Upstream>,
    scheduler: Arc<Scheduler>,
}

impl Slot {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.scheduler.release(&self.upstream);
    }
}

/// Every server's slots and every model's wait queue.
#[derive(Debug, Default)]
pub struct Scheduler {
    inner: Mutex<Inner>,
    /// Waiters of all models (read without the lock: a release with nobody waiting skips it).
    waiting: AtomicUsize,
    /// Picks so far: each granted slot stamps its server with the count, so ties go to the
    /// server picked longest ago (round-robin).
    picks: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Keys with at least one waiter, in service order.
    ring: VecDeque<Arc<str>>,
    waiters: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Waiters per model.
    queued: HashMap<Arc<str>, usize>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    model: Arc<str>,
    candidates: Vec<Arc<Upstream>>,
    any_health: bool,
    /// The server whose slot it got.
    tx: oneshot::Sender<Arc<Upstream>>,
}

impl Waiter {
    fn may_use(&self, u: &Arc<Upstream>, now: Instant) -> bool {
        self.candidates.iter().any(|c| Arc::ptr_eq(c, u))
            && (self.any_health || u.health.available(now))
    }
}

/// Removes a waiter that stops waiting (timeout or a dropped request future); a slot granted
/// in the meantime is passed on.
struct WaitGuard<'a> {
    scheduler: &'a Arc<Scheduler>,
    key: Arc<str>,
    ticket: u64,
    rx: Option<oneshot::Receiver<Arc<Upstream>>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let removed = self.scheduler.remove_waiter(&self.key, self.ticket);
        if !removed {
            if let Ok(u) = rx.try_recv() {
                // The slot was handed to us as we gave up: pass it on.
                self.scheduler.release(&u);
            }
        }
    }
}

/// True when `u` can take one more request.
fn has_free_slot(u: &Upstream) -> bool {
    u.spec
        .max_concurrent
        .is_none_or(|cap| u.in_flight.load(Ordering::Relaxed) < u64::from(cap))
}

impl Scheduler {
    pub fn new() -> Arc<Scheduler> {
        Arc::new(Scheduler::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(self: &Arc<Self>, upstream: &Arc<Upstream>) -> Slot {
        Slot {
            upstream: upstream.clone(),
            scheduler: self.clone(),
        }
    }

    /// The candidate `want` takes now, if one is usable with a free slot (see [`balance::pick`]).
    fn choose(want: &Want<'_>, free: impl Fn(&Upstream) -> bool) -> Option<usize> {
        let load = |i: usize| {
            let u: &Upstream = &want.candidates[i];
            Load {
                usable: free(u) && (want.any_health || u.health.available(want.now)),
                outstanding: u.in_flight.load(Ordering::Relaxed),
                last_pick: u.last_pick.load(Ordering::Relaxed),
            }
        };
        balance::pick(want.candidates.len(), load, want.preferred)
    }

    /// Stamps a pick of `u`.
    fn stamp(&self, u: &Upstream) {
        let n = self.picks.fetch_add(1, Ordering::Relaxed) + 1;
        u.last_pick.store(n, Ordering::Relaxed);
    }

    /// Takes a slot at one of `want.candidates`, or waits for one (round-robin across keys
    /// with the model's other waiters) under `limits`. Returns the candidate's index and its
    /// slot.
    pub async fn acquire(
        self: &Arc<Self>,
        want: &Want<'_>,
        limits: QueueLimits,
    ) -> Result<(usize, Slot), QueueError> {
        // Servers without a limit never saturate: no queue, no lock.
        if want
            .candidates
            .iter()
            .all(|u| u.spec.max_concurrent.is_none())
        {
            // One server (the common case): nothing to choose.
            let i = match want.candidates.len() {
                1 => 0,
                _ => Scheduler::choose(want, |_| true).unwrap_or(0),
            };
            let u = &want.candidates[i];
            u.in_flight.fetch_add(1, Ordering::Relaxed);
            // Stamped even when it was the only candidate (a retry): ties later go in turn.
            self.stamp(u);
            return Ok((i, self.slot(u)));
        }
        let (ticket, rx, key) = {
            let mut g = self.lock();
            let model_waits = g.queued.get(want.model).copied().unwrap_or(0);
            if model_waits == 0 {
                if let Some(i) = Scheduler::choose(want, has_free_slot) {
                    let u = &want.candidates[i];
                    u.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.stamp(u);
                    return Ok((i, self.slot(u)));
                }
            }
            if model_waits >= limits.max_queued {
                return Err(QueueError::Full);
            }
            let key: Arc<str> = Arc::from(want.key);
            let model: Arc<str> = Arc::from(want.model);
            let (tx, rx) = oneshot::channel();
            let ticket = g.next_ticket;
            g.next_ticket += 1;
            *g.queued.entry(model.clone()).or_default() += 1;
            self.waiting.fetch_add(1, Ordering::Relaxed);
            if !g.waiters.contains_key(&key) {
                g.ring.push_back(key.clone());
            }
            g.waiters.entry(key.clone()).or_default().push_back(Waiter {
                ticket,
                model,
                candidates: want.candidates.to_vec(),
                any_health: want.any_health,
                tx,
            });
            // Others were waiting before us: free slots (a server back from ejection, or one
            // the earlier waiters may not use) go to the queue in its order, us included.
            if model_waits > 0 {
                for u in want.candidates {
                    self.dispatch(&mut g, u, want.now);
                }
            }
            (ticket, rx, key)
        };
        let mut guard = WaitGuard {
            scheduler: self,
            key,
            ticket,
            rx: Some(rx),
        };
        let rx = guard.rx.as_mut().expect("set above");
        let granted = match tokio::time::timeout(limits.timeout, rx).await {
            Ok(Ok(u)) => u,
            // The sender is dropped only if the scheduler itself goes away.
            Ok(Err(_)) => {
                guard.rx = None;
                return Err(QueueError::TimedOut);
            }
            // The guard removes the waiter, or passes on a slot granted just now.
            Err(_) => return Err(QueueError::TimedOut),
        };
        guard.rx = None;
        let slot = self.slot(&granted);
        match want
            .candidates
            .iter()
            .position(|c| Arc::ptr_eq(c, &granted))
        {
            Some(i) => Ok((i, slot)),
            // Cannot happen (waiters are only granted their candidates); the slot goes back.
            None => Err(QueueError::TimedOut),
        }
    }

    /// A request at `u` ended: its slot goes to the next waiter that may use `u`, or is freed.
    fn release(&self, u: &Arc<Upstream>) {
        if u.spec.max_concurrent.is_none() && self.waiting.load(Ordering::Relaxed) == 0 {
            u.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut g = self.lock();
        u.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.dispatch(&mut g, u, Instant::now());
    }

    /// `u` was re-admitted (probe or success): its free slots go to whoever waits for it.
    pub fn readmitted(&self, u: &Arc<Upstream>) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut g = self.lock();
        self.dispatch(&mut g, u, Instant::now());
    }

    /// Hands `u`'s free slots to waiters in round-robin order, as long as one may use it.
    fn dispatch(&self, g: &mut Inner, u: &Arc<Upstream>, now: Instant) {
        while has_free_slot(u) {
            let Some(w) = g.next_waiter_for(u, now) else {
                return;
            };
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            u.in_flight.fetch_add(1, Ordering::Relaxed);
            self.stamp(u);
            if w.tx.send(u.clone()).is_err() {
                // It gave up just now and its guard has not run yet: the slot stays free.
                u.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes the waiter `ticket` of `key`; false if it was already served.
    fn remove_waiter(&self, key: &Arc<str>, ticket: u64) -> bool {
        let mut g = self.lock();
        let Some(q) = g.waiters.get_mut(key) else {
            return false;
        };
        let Some(pos) = q.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        let w = q.remove(pos).expect("position is in range");
        let empty = q.is_empty();
        g.unqueue(&w.model);
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        if empty {
            g.waiters.remove(key);
            g.ring.retain(|k| k != key);
        }
        true
    }

    /// Requests waiting for a slot of `model`.
    pub fn queued(&self, model: &str) -> usize {
        self.lock().queued.get(model).copied().unwrap_or(0)
    }

    /// Requests waiting that may take a slot at `u` (status: its queue).
    pub fn waiting_for(&self, u: &Arc<Upstream>) -> usize {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let g = self.lock();
        g.waiters
            .values()
            .flatten()
            .filter(|w| w.candidates.iter().any(|c| Arc::ptr_eq(c, u)))
            .count()
    }

    /// Waiters of every model.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn unqueue(&mut self, model: &Arc<str>) {
        if let Some(n) = self.queued.get_mut(model) {
            *n -= 1;
            if *n == 0 {
                self.queued.remove(model);
            }
        }
    }

    /// Takes the waiter that gets a slot at `u`: the oldest one that may use `u` of the first
    /// key in ring order that has one; that key moves to the back if it still waits.
    fn next_waiter_for(&mut self, u: &Arc<Upstream>, now: Instant) -> Option<Waiter> {
        let (ring_pos, pos) = self.ring.iter().enumerate().find_map(|(r, key)| {
            let q = self.waiters.get(key)?;
            q.iter().position(|w| w.may_use(u, now)).map(|p| (r, p))
        })?;
        let key = self.ring.remove(ring_pos)?;
        let q = self.waiters.get_mut(&key)?;
        let w = q.remove(pos)?;
        if q.is_empty() {
            self.waiters.remove(&key);
        } else {
            self.ring.push_back(key);
        }
        self.unqueue(&w.model);
        Some(w)
    }
}

#[cfg(test)]
mod tests;
