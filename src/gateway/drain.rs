//! The end of a shutdown's drain period, as the requests and response bodies see it.
//!
//! On SIGTERM the gateway stops accepting and lets open answers run for `drain_timeout`; what
//! is still open then is cut. [`DrainCut::cut`] tells every waiting request and open body at
//! once: a stream ends with an SSE error event (`server_shutting_down`) and closes cleanly, any
//! other answer is aborted so the client sees an incomplete body, never a silently short one
//! (`body.rs`); a request still waiting for the model server's answer gets a 503 (`proxy.rs`).
//!
//! Cost: a waiter takes the registry's lock twice in its life — when it first waits and when
//! it is dropped — and never per poll or per frame: a later poll only compares its waker
//! with the registered one (the connection's task does not change) and reads one atomic.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Shared by every snapshot of a gateway (a reload keeps it).
#[derive(Clone, Default)]
pub struct DrainCut {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    cut: AtomicBool,
    wakers: Mutex<Wakers>,
}

/// The wakers of everything waiting, in reusable slots.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Inner {
    fn wakers(&self) -> MutexGuard<'_, Wakers> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One waiter's place in the registry; leaves it when dropped.
pub struct Registration {
    inner: Arc<Inner>,
    slot: usize,
    waker: Waker,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut w = self.inner.wakers();
        if let Some(s) = w.slots.get_mut(self.slot) {
            *s = None;
            w.free.push(self.slot);
        }
    }
}

impl DrainCut {
    /// The drain period is over: everything waiting is woken and sees [`DrainCut::is_cut`].
    pub fn cut(&self) {
        self.inner.cut.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self
            .inner
            .wakers()
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_cut(&self) -> bool {
        self.inner.cut.load(Ordering::Acquire)
    }

    /// Whether the drain period is over; when not, makes sure `cx` is woken when it is
    /// (registering in `reg` the first time, re-registering only if the task's waker changed).
    pub fn poll_cut(&self, reg: &mut Option<Registration>, cx: &mut Context<'_>) -> bool {
        if self.is_cut() {
            return true;
        }
        match reg {
            Some(r) if r.waker.will_wake(cx.waker()) => {}
            Some(r) => {
                r.waker = cx.waker().clone();
                if let Some(s) = self.inner.wakers().slots.get_mut(r.slot) {
                    *s = Some(r.waker.clone());
                }
            }
            None => {
                let waker = cx.waker().clone();
                let mut w = self.inner.wakers();
                let slot = match w.free.pop() {
                    Some(i) => {
                        w.slots[i] = Some(waker.clone());
                        i
                    }
                    None => {
                        w.slots.push(Some(waker.clone()));
                        w.slots.len() - 1
                    }
                };
                drop(w);
                *reg = Some(Registration {
                    inner: self.inner.clone(),
                    slot,
                    waker,
                });
            }
        }
        // A cut between the first check and the registration took no waker of ours.
        self.is_cut()
    }

    /// Resolves once the drain period is over (at once when it already is).
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            drain: self,
            reg: None,
        }
    }
}

/// [`DrainCut::cancelled`].
pub struct Cancelled<'a> {
    drain: &'a DrainCut,
    reg: Option<Registration>,
}

impl Future for Cancelled<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.drain.poll_cut(&mut this.reg, cx) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waiters registered before the cut wake; one made after it resolves at once; dropped
    /// waiters leave their slot for the next one (the registry does not grow with requests).
    #[tokio::test]
    async fn waiters_before_and_after_the_cut_resolve() {
        let d = DrainCut::default();
        for _ in 0..100 {
            let d2 = d.clone();
            let t = tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(1), d2.cancelled()).await
            });
            assert!(t.await.unwrap().is_err(), "no cut yet");
        }
        assert!(d.inner.wakers().slots.len() <= 2, "slots are reused");
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let d2 = d.clone();
                tokio::spawn(async move { d2.cancelled().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tasks.iter().all(|t| !t.is_finished()));
        assert!(!d.is_cut());
        d.cut();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("a waiter registered before the cut wakes")
                .unwrap();
        }
        assert!(d.is_cut());
        tokio::time::timeout(Duration::from_secs(5), d.cancelled())
            .await
            .expect("a waiter made after the cut resolves at once");
    }
}
