//! Fair share of one model server: at most `capacity` requests in flight to it, and when it is
//! saturated the waiting requests are served round-robin across keys, not first come first
//! served, so one key's agent loop cannot starve everyone else.
//!
//! Owns the upstream's concurrency slots and its wait queue. Bounded: at most `max_queued`
//! requests wait (more are refused at once) and each waits at most `timeout`; both refusals
//! become 503 with `Retry-After` in the gateway. Never decides per-key limits (those are
//! [`crate::policy::limits`], checked before a request queues here).
//!
//! Round-robin: keys with waiters form a ring; each freed slot goes to the oldest waiter of the
//! key at the ring's head, and that key moves to the back if it still has waiters. With the
//! server saturated, every waiting key therefore gets one slot per round, whatever the number
//! of requests it has queued. A waiter that gave up (timeout, client gone) is skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Why a request could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// `max_queued` requests already wait.
    Full,
    /// No slot came free within the queue timeout.
    TimedOut,
}

/// Settings of one upstream's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairConfig {
    /// Requests in flight to the server at once.
    pub capacity: usize,
    /// Requests waiting at once.
    pub max_queued: usize,
    /// Longest wait for a slot.
    pub timeout: Duration,
}

/// One upstream's slots and queue.
#[derive(Debug)]
pub struct FairQueue {
    config: FairConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    in_flight: usize,
    /// Keys with at least one waiter, in service order.
    ring: VecDeque<Arc<str>>,
    waiters: HashMap<Arc<str>, VecDeque<Waiter>>,
    queued: usize,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    tx: oneshot::Sender<()>,
}

/// A slot; dropping it hands the slot to the next waiter (round-robin) or frees it.
#[derive(Debug)]
pub struct Slot {
    queue: Arc<FairQueue>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queue.release();
    }
}

/// Removes a waiter that stops waiting (timeout or a dropped request future); a slot granted
/// in the meantime is passed on.
struct WaitGuard<'a> {
    queue: &'a Arc<FairQueue>,
    key: Arc<str>,
    ticket: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let removed = self.queue.remove_waiter(&self.key, self.ticket);
        if !removed && rx.try_recv().is_ok() {
            // The slot was handed to us as we gave up: pass it on.
            self.queue.release();
        }
    }
}

impl FairQueue {
    pub fn new(config: FairConfig) -> Arc<FairQueue> {
        Arc::new(FairQueue {
            config: FairConfig {
                capacity: config.capacity.max(1),
                ..config
            },
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn config(&self) -> FairConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `(in flight, waiting)`, for status and tests.
    pub fn load(&self) -> (usize, usize) {
        let g = self.lock();
        (g.in_flight, g.queued)
    }

    /// Waits for a slot for `key`, round-robin with the other keys' waiters.
    pub async fn acquire(self: &Arc<Self>, key: &str) -> Result<Slot, QueueError> {
        let (ticket, rx, key) = {
            let mut g = self.lock();
            if g.in_flight < self.config.capacity && g.queued == 0 {
                g.in_flight += 1;
                return Ok(Slot {
                    queue: self.clone(),
                });
            }
            if g.queued >= self.config.max_queued {
                return Err(QueueError::Full);
            }
            let key: Arc<str> = Arc::from(key);
            let (tx, rx) = oneshot::channel();
            let ticket = g.next_ticket;
            g.next_ticket += 1;
            g.queued += 1;
            let q = g.waiters.entry(key.clone()).or_default();
            if q.is_empty() {
                g.ring.push_back(key.clone());
            }
            g.waiters
                .get_mut(&key)
                .expect("just inserted")
                .push_back(Waiter { ticket, tx });
            (ticket, rx, key)
        };
        let mut guard = WaitGuard {
            queue: self,
            key,
            ticket,
            rx: Some(rx),
        };
        let rx = guard.rx.as_mut().expect("set above");
        match tokio::time::timeout(self.config.timeout, rx).await {
            Ok(Ok(())) => {
                guard.rx = None;
                Ok(Slot {
                    queue: self.clone(),
                })
            }
            // The sender is dropped only if the queue itself goes away.
            Ok(Err(_)) => {
                guard.rx = None;
                Err(QueueError::TimedOut)
            }
            // The guard removes the waiter, or passes on a slot granted just now.
            Err(_) => Err(QueueError::TimedOut),
        }
    }

    /// Hands a finished request's slot to the next waiter in round-robin order, or frees it.
    fn release(&self) {
        let mut g = self.lock();
        while let Some(key) = g.ring.pop_front() {
            let Some(q) = g.waiters.get_mut(&key) else {
                continue;
            };
            let next = q.pop_front();
            let more = !q.is_empty();
            if more {
                g.ring.push_back(key.clone());
            } else {
                g.waiters.remove(&key);
            }
            if let Some(w) = next {
                g.queued -= 1;
                if w.tx.send(()).is_ok() {
                    // The slot moves to the waiter; in_flight is unchanged.
                    return;
                }
            }
        }
        g.in_flight = g.in_flight.saturating_sub(1);
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
        q.remove(pos);
        let empty = q.is_empty();
        g.queued -= 1;
        if empty {
            g.waiters.remove(key);
            g.ring.retain(|k| k != key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, max_queued: usize, timeout_ms: u64) -> Arc<FairQueue> {
        FairQueue::new(FairConfig {
            capacity,
            max_queued,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// Queues `n` waiters for `key`, each pushing `key` into `order` when served and holding its
    /// slot until `release` fires.
    fn spawn_waiters(
        q: &Arc<FairQueue>,
        key: &'static str,
        n: usize,
        order: &Arc<Mutex<Vec<&'static str>>>,
        release: &tokio::sync::watch::Receiver<u32>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let (q, order, mut release) = (q.clone(), order.clone(), release.clone());
                tokio::spawn(async move {
                    let slot = q.acquire(key).await.unwrap();
                    let mine = {
                        let mut o = order.lock().unwrap();
                        o.push(key);
                        o.len() as u32
                    };
                    // Hold the slot until the test releases this position.
                    while *release.borrow() < mine {
                        if release.changed().await.is_err() {
                            break;
                        }
                    }
                    drop(slot);
                })
            })
            .collect()
    }

    #[tokio::test]
    async fn saturated_slots_go_round_robin_across_keys() {
        let q = queue(1, 100, 10_000);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        let blocker = q.acquire("x").await.unwrap();
        // "a" queues 6 before "b" and "c" queue 2 each: FIFO would serve a×6 first.
        let mut tasks = spawn_waiters(&q, "a", 6, &order, &rx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks.extend(spawn_waiters(&q, "b", 2, &order, &rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks.extend(spawn_waiters(&q, "c", 2, &order, &rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(q.load(), (1, 10));
        drop(blocker);
        for i in 1..=10u32 {
            // Let the i-th served request finish; the next one is then served.
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(i).unwrap();
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a", "a", "a", "a"]);
        assert_eq!(q.load(), (0, 0));
    }

    #[tokio::test]
    async fn full_queue_and_timeout_refuse_and_leak_nothing() {
        let q = queue(1, 2, 50);
        let held = q.acquire("a").await.unwrap();
        let q1 = q.clone();
        let w1 = tokio::spawn(async move { q1.acquire("b").await.map(|_| ()) });
        let q2 = q.clone();
        let w2 = tokio::spawn(async move { q2.acquire("c").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.acquire("d").await.unwrap_err(), QueueError::Full);
        assert_eq!(w1.await.unwrap(), Err(QueueError::TimedOut));
        assert_eq!(w2.await.unwrap(), Err(QueueError::TimedOut));
        assert_eq!(q.load(), (1, 0));
        drop(held);
        assert_eq!(q.load(), (0, 0));
        // A waiter whose request goes away (future dropped) leaves no trace either.
        let held = q.acquire("a").await.unwrap();
        let q3 = q.clone();
        let w = tokio::spawn(async move { q3.acquire("b").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        w.abort();
        let _ = w.await;
        assert_eq!(q.load(), (1, 0));
        drop(held);
        assert_eq!(q.load(), (0, 0));
        // Below capacity nobody waits.
        let _a = q.acquire("a").await.unwrap();
        assert_eq!(q.load(), (1, 0));
    }
}
