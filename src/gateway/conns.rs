//! The gateway's table of open client connections and what each one is doing, for the limits
//! that per-byte timeouts cannot give:
//!
//! - **No request for `header_read_timeout`** closes a connection, HTTP/2 included. hyper
//!   applies that limit to HTTP/1.1 only, and an HTTP/2 client that answers our keep-alive
//!   PINGs (or sends a HEADERS frame without its end) was never idle for `idle_timeout`.
//! - **Under pressure** (every connection permit taken), the connection that has gone longest
//!   without a request past its body — idle keep-alive connections, slow handshakes, stalled
//!   heads and bodies — is closed to make room, one at a time, after [`EVICT_AFTER`]. A flood
//!   of stalled bodies therefore cannot lock legitimate clients out until `body_read_timeout`
//!   frees the permits; requests being answered (waiting for the model or streaming) are never
//!   chosen.
//!
//! A request counts from the moment hyper hands it to the service until its response body
//! ends; it is *busy* from the moment its body has been read. The counters are atomics of the
//! connection; the table's lock is taken when a connection opens or closes and when room must
//! be made, never per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
// tokio's clock (the real one outside tests), so paused-time tests can drive it.
use tokio::time::Instant;

/// How long a connection must have been without a busy request before it may be closed to
/// make room: long enough for a handshake and a request head on a sane link.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// While every permit is taken and nothing can be closed yet, how often to look again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Every open client connection of one gateway.
pub struct Conns {
    epoch: Instant,
    /// The accept loop's permits: at this many open connections the gateway is full.
    max: usize,
    table: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    full: Notify,
}

/// One client connection, as its requests see it.
pub struct Conn {
    epoch: Instant,
    requests: AtomicU32,
    busy: AtomicU32,
    /// Milliseconds since `epoch` when `busy` last became 0 (or the connection opened).
    quiet_since: AtomicU64,
    /// Milliseconds since `epoch` when `requests` last became 0 (or the connection opened).
    idle_since: AtomicU64,
    /// Woken when `requests` becomes 0.
    no_requests: Notify,
    closed_for_room: Notify,
}

/// A connection's place in the table; leaving it (drop) frees the place.
pub struct Registered {
    conns: Arc<Conns>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Conns {
    pub fn new(max: usize) -> Arc<Conns> {
        Arc::new(Conns {
            epoch: Instant::now(),
            max,
            table: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            full: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection that just got its permit.
    pub fn open(self: &Arc<Self>) -> Registered {
        let conn = Arc::new(Conn {
            epoch: self.epoch,
            requests: AtomicU32::new(0),
            busy: AtomicU32::new(0),
            quiet_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            no_requests: Notify::new(),
            closed_for_room: Notify::new(),
        });
        let now = conn.now_ms();
        conn.quiet_since.store(now, Ordering::Relaxed);
        conn.idle_since.store(now, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let open = {
            let mut t = self.lock();
            t.insert(id, conn.clone());
            t.len()
        };
        if open >= self.max {
            self.full.notify_one();
        }
        Registered {
            conns: self.clone(),
            id,
            conn,
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the connection quiet for longest (at least [`EVICT_AFTER`]); false when none
    /// qualifies.
    fn make_room(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let min_quiet = EVICT_AFTER.as_millis() as u64;
        let victim = self
            .lock()
            .values()
            .filter(|c| c.busy.load(Ordering::Relaxed) == 0)
            .map(|c| (c.quiet_since.load(Ordering::Relaxed), c))
            .filter(|(since, _)| now.saturating_sub(*since) >= min_quiet)
            .min_by_key(|(since, _)| *since)
            .map(|(_, c)| c.clone());
        match victim {
            Some(c) => {
                // Once: a connection that is already closing is not chosen again.
                c.busy.fetch_add(1, Ordering::Relaxed);
                c.closed_for_room.notify_one();
                true
            }
            None => false,
        }
    }

    /// Runs until `stop` changes: whenever the gateway is full, closes one connection at a
    /// time as [`Self::make_room`] allows, until it is not full any more.
    pub async fn relieve(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.full.notified() => {}
                _ = stop.changed() => return,
            }
            while self.len() >= self.max {
                let closed = self.make_room();
                let pause = if closed {
                    Duration::from_millis(10)
                } else {
                    RETRY_EVERY
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request on this connection, until the guard is dropped (with its response body).
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            conn: self.clone(),
            busy: AtomicBool::new(false),
        }
    }

    /// Resolves when the gateway closes this connection to make room.
    pub async fn closed_for_room(&self) {
        self.closed_for_room.notified().await
    }

    /// Resolves once the connection has had no request in progress for `limit` (checks at
    /// most every `limit`, no busy loop).
    pub async fn without_request_for(&self, limit: Duration) {
        loop {
            // Registered before the count is read, so a request that ends in between wakes it.
            let ended = self.no_requests.notified();
            if self.requests.load(Ordering::Relaxed) > 0 {
                ended.await;
                continue;
            }
            let since = self.idle_since.load(Ordering::Relaxed);
            let deadline = self.epoch + Duration::from_millis(since) + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request of a connection: counted while it lives, busy once [`RequestGuard::busy`].
pub struct RequestGuard {
    conn: Arc<Conn>,
    busy: AtomicBool,
}

impl RequestGuard {
    /// The request's body has been read: from now on it is being answered, and its connection
    /// is not closed to make room.
    pub fn busy(&self) {
        if !self.busy.swap(true, Ordering::Relaxed) {
            self.conn.busy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = self.conn.now_ms();
        if self.busy.load(Ordering::Relaxed) && self.conn.busy.fetch_sub(1, Ordering::Relaxed) == 1
        {
            self.conn.quiet_since.store(now, Ordering::Relaxed);
        }
        if self.conn.requests.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn.idle_since.store(now, Ordering::Relaxed);
            self.conn.no_requests.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_gateway_closes_the_longest_quiet_connection_never_a_busy_one() {
        let conns = Conns::new(3);
        let (stop_tx, stop) = watch::channel(false);
        let relief = tokio::spawn(conns.clone().relieve(stop));
        let busy = conns.open();
        let guard = busy.conn.request();
        guard.busy();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let oldest_quiet = conns.open();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let young = conns.open();
        // Full: the quiet one goes (after EVICT_AFTER), the busy and the young ones stay.
        tokio::time::timeout(Duration::from_secs(2), oldest_quiet.conn.closed_for_room())
            .await
            .expect("the quiet connection is closed for room");
        drop(oldest_quiet);
        assert_eq!(conns.len(), 2);
        // Not full any more: nothing else is closed.
        let nothing = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = busy.conn.closed_for_room() => "busy",
                _ = young.conn.closed_for_room() => "young",
            }
        })
        .await;
        assert!(nothing.is_err(), "{nothing:?} closed while not full");
        // Full again with only busy connections besides the young one: the young one goes
        // once it is quiet long enough, the busy one never.
        let b2 = conns.open();
        let g2 = b2.conn.request();
        g2.busy();
        tokio::time::timeout(Duration::from_secs(3), young.conn.closed_for_room())
            .await
            .expect("the young connection, once quiet for EVICT_AFTER");
        drop(young);
        let both_busy = conns.open();
        let g3 = both_busy.conn.request();
        g3.busy();
        let none = tokio::time::timeout(Duration::from_secs(10), busy.conn.closed_for_room()).await;
        assert!(none.is_err(), "a busy connection was closed");
        stop_tx.send(true).unwrap();
        relief.await.unwrap();
        drop((guard, g2, g3));
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_for_the_limit_resolves_and_a_request_holds_it_off() {
        let conns = Conns::new(10);
        let r = conns.open();
        let limit = Duration::from_secs(30);
        let t = Instant::now();
        r.conn.without_request_for(limit).await;
        assert_eq!(t.elapsed(), limit);
        // A request that lasts 100 s keeps the connection; 30 s after it ends, it goes.
        let g = r.conn.request();
        let t = Instant::now();
        let wait = tokio::spawn({
            let c = r.conn.clone();
            async move { c.without_request_for(limit).await }
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!wait.is_finished());
        drop(g);
        wait.await.unwrap();
        let e = t.elapsed();
        assert!(
            e >= Duration::from_secs(130) && e <= Duration::from_secs(132),
            "{e:?}"
        );
    }
}
