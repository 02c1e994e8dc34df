//! The daemon's live key set: the current [`KeyRing`], swapped when the store changes.
//!
//! Owns [`Keys`] and its watcher, which keeps the ring in step with the store and with the
//! config's named policies. Never blocks a request: readers clone an `Arc` under a read lock
//! held for that clone only, and every store call runs on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::ring::KeyRing;
use super::store::{KeyStore, StoreConfig};
use super::types::StoreError;
use crate::policy::Policies;

/// How often [`Keys::watch`] checks the store for commits by other processes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The daemon's view of the keys: an immutable snapshot swapped on change.
pub struct Keys {
    current: RwLock<Arc<KeyRing>>,
    /// The config's named policies the ring is resolved against.
    policies: RwLock<Arc<Policies>>,
    /// Set by [`Keys::set_policies`]: the watcher rebuilds the ring at its next tick.
    stale: AtomicBool,
    /// Rings the watcher has swapped in (the first load included).
    loads: AtomicU64,
    /// Since when (ms since the epoch) the store cannot be read; 0 while it can.
    failing_since_ms: std::sync::atomic::AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Keys {
    pub fn new(ring: KeyRing) -> Arc<Keys> {
        Keys::with_policies(ring, Policies::new())
    }

    /// Keys whose ring was loaded with `policies` (the watcher reloads with them too).
    pub fn with_policies(ring: KeyRing, policies: Policies) -> Arc<Keys> {
        Arc::new(Keys {
            current: RwLock::new(Arc::new(ring)),
            policies: RwLock::new(Arc::new(policies)),
            stale: AtomicBool::new(false),
            loads: AtomicU64::new(0),
            failing_since_ms: std::sync::atomic::AtomicI64::new(0),
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// Since when the watcher cannot read the store, and the last error; `None` while it can.
    pub fn degraded(&self) -> Option<(SystemTime, String)> {
        let ms = self.failing_since_ms.load(Ordering::Acquire);
        (ms != 0).then(|| {
            (
                super::backend::from_ms(ms),
                self.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default(),
            )
        })
    }

    fn set_failing(&self, e: Option<String>) {
        match e {
            Some(e) => {
                let now = super::backend::to_ms(SystemTime::now()).max(1);
                let _ = self.failing_since_ms.compare_exchange(
                    0,
                    now,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            None => {
                self.failing_since_ms.store(0, Ordering::Release);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }

    /// How many rings the watcher has loaded from the store so far (the first load included).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Acquire)
    }

    /// New named policies (a config reload): the watcher rebuilds the ring with them within
    /// [`WATCH_INTERVAL`].
    pub fn set_policies(&self, policies: Policies) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
        self.stale.store(true, Ordering::Release);
    }

    fn policies(&self) -> Arc<Policies> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn current(&self) -> Arc<KeyRing> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn replace(&self, ring: KeyRing) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
    }

    /// Keeps the ring in step with the store (`store_cfg`) until `stop` turns true (or its sender
    /// is dropped).
    ///
    /// Opens its own connection, loads once, then every [`WATCH_INTERVAL`] reads the store's
    /// change stamp (`KeyStore::change_stamp`, the keys generation) and reloads when it moved;
    /// so a `key create|revoke|rotate` reaches the daemon within a second, and the ledger
    /// writer's commits (several a second under traffic) cause no reload. Store errors are
    /// logged and retried; the last good ring stays in service meanwhile. The store calls run
    /// on the blocking pool, never on a runtime worker.
    pub async fn watch(
        self: Arc<Self>,
        state_dir: PathBuf,
        store_cfg: StoreConfig,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut store: Option<KeyStore> = None;
        let mut seen: Option<i64> = None;
        let mut failing = false;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => {
                    if changed.is_err() { return; }
                    continue;
                }
            }
            let dir = state_dir.clone();
            let cfg = store_cfg.clone();
            let taken = store.take();
            if self.stale.swap(false, Ordering::AcqRel) {
                seen = None;
            }
            let policies = self.policies();
            let joined =
                tokio::task::spawn_blocking(move || poll_store(taken, &dir, &cfg, seen, &policies))
                    .await;
            let (kept, result) = match joined {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "key store watcher: poll task failed");
                    (None, Err(None))
                }
            };
            store = kept;
            if let Err(e) = &result {
                self.set_failing(Some(
                    e.as_ref()
                        .map_or_else(|| "poll task failed".into(), |e| e.to_string()),
                ));
            }
            match result {
                Ok(None) => self.set_failing(None),
                Ok(Some((version, ring))) => {
                    let c = ring.counts(SystemTime::now());
                    self.replace(ring);
                    self.loads.fetch_add(1, Ordering::AcqRel);
                    // Healthy again only once the reloaded ring is in service (and counted):
                    // after an outage, `degraded()` turning `None` means the keys are current.
                    self.set_failing(None);
                    tracing::info!(
                        total = c.total,
                        active = c.active,
                        revoked = c.revoked,
                        expired = c.expired,
                        "API keys {}",
                        if seen.is_some() { "reloaded" } else { "loaded" }
                    );
                    seen = Some(version);
                    if failing {
                        tracing::info!("key store readable again");
                        failing = false;
                    }
                }
                Err(e) => {
                    // Log the first failure of a streak only, not four lines a second.
                    if !failing {
                        if let Some(e) = e {
                            tracing::error!(error = %e, "cannot reload API keys; the previous set stays in service");
                        }
                        failing = true;
                    }
                }
            }
        }
    }
}

type PollResult = Result<Option<(i64, KeyRing)>, Option<StoreError>>;

/// One watcher step (blocking): open if needed, compare the change stamp, load when it moved.
/// Returns the connection to keep (dropped after an error, so the next step reopens).
fn poll_store(
    store: Option<KeyStore>,
    dir: &Path,
    cfg: &StoreConfig,
    seen: Option<i64>,
    policies: &Policies,
) -> (Option<KeyStore>, PollResult) {
    let (store, fresh) = match store {
        Some(s) => (s, false),
        None => match KeyStore::open_in(dir, cfg) {
            Ok(s) => (s, true),
            Err(e) => return (None, Err(Some(e))),
        },
    };
    let version = match store.change_stamp() {
        Ok(v) => v,
        Err(e) => return (None, Err(Some(e))),
    };
    // A reopened connection has its own stamp numbering: always reload then.
    if !fresh && seen == Some(version) {
        return (Some(store), Ok(None));
    }
    match KeyRing::load(&store, policies) {
        Ok(ring) => (Some(store), Ok(Some((version, ring)))),
        Err(e) => (None, Err(Some(e))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime};

    use super::{Keys, WATCH_INTERVAL};
    use crate::keys::ledger::{Ledger, UsageEvent};
    use crate::keys::{KeyRing, KeyStore, NewKey};

    async fn wait_loads(keys: &Keys, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while keys.loads() < n {
            assert!(Instant::now() < deadline, "watcher did not load {n} rings");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ledger commits (another connection to the same database, as in the daemon) cause no
    /// reload; one key change causes exactly one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ledger_commits_do_not_reload_a_key_change_reloads_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = KeyStore::open(dir.path()).unwrap();
        let k = store
            .create(NewKey {
                name: "a".into(),
                policy: Default::default(),
            })
            .unwrap();
        let keys = Keys::new(KeyRing::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(keys.clone().watch(
            dir.path().to_path_buf(),
            Default::default(),
            stop_rx,
        ));
        wait_loads(&keys, 1).await;
        assert_eq!(keys.current().counts(SystemTime::now()).total, 1);

        // Ledger commits for 8 watcher ticks.
        let d = dir.path().to_path_buf();
        let id: Arc<str> = k.id.as_str().into();
        tokio::task::spawn_blocking(move || {
            let mut l = Ledger::open(&d).unwrap();
            let until = Instant::now() + WATCH_INTERVAL * 8;
            let mut n = 0;
            while Instant::now() < until {
                l.write(&[UsageEvent {
                    key_id: id.clone(),
                    at: SystemTime::now(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    estimated: false,
                }])
                .unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(n > 20, "only {n} ledger commits");
        })
        .await
        .unwrap();
        tokio::time::sleep(WATCH_INTERVAL * 2).await;
        assert_eq!(keys.loads(), 1, "ledger commits reloaded the keys");

        store.revoke("a").unwrap();
        wait_loads(&keys, 2).await;
        tokio::time::sleep(WATCH_INTERVAL * 4).await;
        assert_eq!(keys.loads(), 2, "one key change, more than one reload");
        assert_eq!(keys.current().counts(SystemTime::now()).revoked, 1);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
