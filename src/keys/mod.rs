//! API keys: format ([`format`]), keyed hashing and the SQLite store ([`store`]), the usage
//! ledger in the same database ([`ledger`]), and the daemon's in-memory key ring.
//!
//! Owns "which principal does this bearer key belong to?". The daemon authenticates against an
//! immutable [`KeyRing`] snapshot (no I/O, no lock held while hashing); [`Keys::watch`] swaps in
//! a new snapshot when the CLI commits a change. Never logs, stores or returns a secret: only
//! key ids and names appear in logs.

pub mod format;
pub mod ledger;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;

use crate::policy::{Policies, Principal};
pub use format::{FormatError, Secret};
use store::{hash_secret, HmacSha256};
pub use store::{
    CreatedKey, KeyRecord, KeyStatus, KeyStore, NewKey, ServerSecret, StoreError, DB_FILE,
    SECRET_FILE,
};

/// How often [`Keys::watch`] checks the store for commits by other processes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Why a presented key was refused. All map to 401 `invalid_api_key`; the reason is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed API key")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("revoked API key")]
    Revoked,
    #[error("expired API key")]
    Expired,
}

/// The daemon's view of the keys: an immutable snapshot swapped on change.
pub struct Keys {
    current: RwLock<Arc<KeyRing>>,
    /// The config's named policies the ring is resolved against.
    policies: RwLock<Arc<Policies>>,
    /// Set by [`Keys::set_policies`]: the watcher rebuilds the ring at its next tick.
    stale: std::sync::atomic::AtomicBool,
}

/// One key in the ring.
struct Entry {
    principal: Arc<Principal>,
    hash: [u8; 32],
    /// The hash before the last rotation and until when it is accepted.
    previous: Option<([u8; 32], SystemTime)>,
    revoked: bool,
    expires_at: Option<SystemTime>,
}

/// An immutable set of keys, indexed by key id.
#[derive(Default)]
pub struct KeyRing {
    /// The server secret's HMAC, keyed once (`None` only for the empty default ring).
    mac: Option<HmacSha256>,
    by_id: HashMap<Box<str>, Entry>,
}

/// Counts for logs and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingCounts {
    pub total: usize,
    pub active: usize,
    pub revoked: usize,
    pub expired: usize,
}

impl KeyRing {
    /// A snapshot of every key in `store` (revoked and expired ones too, so that refusals can
    /// say why in the log), each key's policy resolved against the config's named `policies`.
    pub fn load(store: &KeyStore, policies: &Policies) -> Result<KeyRing, StoreError> {
        let by_id = store
            .list()?
            .into_iter()
            .map(|r| {
                let previous = match (r.hashes.previous, r.previous_valid_until) {
                    (Some(h), Some(until)) => Some((h, until)),
                    _ => None,
                };
                let entry = Entry {
                    hash: r.hashes.current,
                    previous,
                    revoked: r.revoked_at.is_some(),
                    expires_at: r.expires_at,
                    principal: Arc::new(Principal {
                        id: r.id.clone(),
                        name: r.name,
                        policy: r.policy.resolve(policies),
                    }),
                };
                (r.id.into_boxed_str(), entry)
            })
            .collect();
        Ok(KeyRing {
            mac: Some(store.server_secret().mac()),
            by_id,
        })
    }

    /// A ring without SQLite (tests): `(key, principal)` pairs, every key active and expiring at
    /// `principal.policy.expires_at`. Keys must be real ones ([`format::generate`]); a string
    /// that is not a well-formed `mg_` key is skipped (it could never authenticate anyway).
    pub fn for_tests(entries: Vec<(String, Arc<Principal>)>) -> KeyRing {
        let mac = ServerSecret::generate().mac();
        let mut by_id = HashMap::new();
        for (key, principal) in entries {
            let expires_at = principal.policy.expires_at;
            if let Ok(p) = format::parse(&key) {
                let entry = Entry {
                    hash: hash_secret(&mac, p.id(), p.secret()),
                    previous: None,
                    revoked: false,
                    expires_at,
                    principal,
                };
                by_id.insert(p.id().into(), entry);
            }
        }
        KeyRing {
            mac: Some(mac),
            by_id,
        }
    }

    /// Number of keys by status at `now`.
    pub fn counts(&self, now: SystemTime) -> RingCounts {
        let mut c = RingCounts {
            total: self.by_id.len(),
            ..RingCounts::default()
        };
        for e in self.by_id.values() {
            if e.revoked {
                c.revoked += 1;
            } else if e.expires_at.is_some_and(|t| now >= t) {
                c.expired += 1;
            } else {
                c.active += 1;
            }
        }
        c
    }

    /// Authenticates a presented bearer key at `now`.
    ///
    /// Order: format and checksum (no lookup for typos and garbage) → id → HMAC of the secret,
    /// compared in constant time with the current hash and, before its deadline, the hash
    /// before the last rotation → revoked → expired (at `expires_at` exactly). Revocation and
    /// expiry are only reported to someone who proved they hold the secret. Allocation-free
    /// apart from the returned `Arc` clone.
    pub fn authenticate(
        &self,
        presented: &str,
        now: SystemTime,
    ) -> Result<Arc<Principal>, AuthError> {
        let key = match format::parse(presented) {
            Ok(k) => k,
            Err(_) => return Err(AuthError::Malformed),
        };
        let entry = self.by_id.get(key.id()).ok_or(AuthError::Unknown)?;
        let mac = self.mac.as_ref().ok_or(AuthError::Unknown)?;
        let h = hash_secret(mac, key.id(), key.secret());
        let current = h.ct_eq(&entry.hash);
        let previous = match &entry.previous {
            Some((ph, until)) if now < *until => h.ct_eq(ph),
            _ => subtle::Choice::from(0),
        };
        if !bool::from(current | previous) {
            return Err(AuthError::Unknown);
        }
        admit(entry, now)
    }
}

/// The checks after the secret matched: revoked, then expired (at `expires_at` exactly).
fn admit(entry: &Entry, now: SystemTime) -> Result<Arc<Principal>, AuthError> {
    if entry.revoked {
        return Err(AuthError::Revoked);
    }
    if entry.expires_at.is_some_and(|t| now >= t) {
        return Err(AuthError::Expired);
    }
    Ok(entry.principal.clone())
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
            stale: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// New named policies (a config reload): the watcher rebuilds the ring with them within
    /// [`WATCH_INTERVAL`].
    pub fn set_policies(&self, policies: Policies) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
        self.stale.store(true, std::sync::atomic::Ordering::Release);
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

    /// Keeps the ring in step with `<state_dir>/keys.db` until `stop` turns true (or its sender
    /// is dropped).
    ///
    /// Opens its own connection, loads once, then every [`WATCH_INTERVAL`] reads
    /// `PRAGMA data_version`, which changes when another connection (the CLI) commits, and
    /// reloads; so a `key create|revoke|rotate` reaches the daemon within a second. Store
    /// errors are logged and retried; the last good ring stays in service meanwhile. The SQLite
    /// calls run on the blocking pool, never on a runtime worker.
    pub async fn watch(
        self: Arc<Self>,
        state_dir: PathBuf,
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
            let taken = store.take();
            if self.stale.swap(false, std::sync::atomic::Ordering::AcqRel) {
                seen = None;
            }
            let policies = self.policies();
            let joined =
                tokio::task::spawn_blocking(move || poll_store(taken, &dir, seen, &policies)).await;
            let (kept, result) = match joined {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "key store watcher: poll task failed");
                    (None, Err(None))
                }
            };
            store = kept;
            match result {
                Ok(None) => {}
                Ok(Some((version, ring))) => {
                    let c = ring.counts(SystemTime::now());
                    self.replace(ring);
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

/// One watcher step (blocking): open if needed, compare `data_version`, load when it moved.
/// Returns the connection to keep (dropped after an error, so the next step reopens).
fn poll_store(
    store: Option<KeyStore>,
    dir: &std::path::Path,
    seen: Option<i64>,
    policies: &Policies,
) -> (Option<KeyStore>, PollResult) {
    let (store, fresh) = match store {
        Some(s) => (s, false),
        None => match KeyStore::open(dir) {
            Ok(s) => (s, true),
            Err(e) => return (None, Err(Some(e))),
        },
    };
    let version = match store.data_version() {
        Ok(v) => v,
        Err(e) => return (None, Err(Some(e))),
    };
    // A reopened connection has its own data_version numbering: always reload then.
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
    use super::*;
    use crate::policy::KeyPolicy;
    use std::time::{Instant, UNIX_EPOCH};

    fn principal(id: &str, expires_at: Option<SystemTime>) -> Arc<Principal> {
        Arc::new(Principal {
            id: id.into(),
            name: "t".into(),
            policy: KeyPolicy {
                expires_at,
                ..Default::default()
            },
        })
    }

    #[test]
    fn for_tests_ring_authenticates() {
        let k = format::generate();
        let ring = KeyRing::for_tests(vec![(k.expose().into(), principal(k.id(), None))]);
        let now = SystemTime::now();
        assert_eq!(ring.authenticate(k.expose(), now).unwrap().id, k.id());
        // Same id, other secret: unknown. Other id: unknown. Garbage: malformed.
        let other = format::generate_for(k.id());
        assert_eq!(
            ring.authenticate(other.expose(), now),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            ring.authenticate(format::generate().expose(), now),
            Err(AuthError::Unknown)
        );
        assert_eq!(ring.authenticate("sk-nope", now), Err(AuthError::Malformed));
        assert_eq!(
            KeyRing::default().authenticate(k.expose(), now),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn expiry_at_the_instant() {
        let at = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let k = format::generate();
        let ring = KeyRing::for_tests(vec![(k.expose().into(), principal(k.id(), Some(at)))]);
        assert!(ring
            .authenticate(k.expose(), at - Duration::from_millis(1))
            .is_ok());
        assert_eq!(ring.authenticate(k.expose(), at), Err(AuthError::Expired));
        assert_eq!(
            ring.counts(at),
            RingCounts {
                total: 1,
                active: 0,
                revoked: 0,
                expired: 1
            }
        );
    }

    #[test]
    fn store_round_trip_with_rotation_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        let a = s
            .create(NewKey {
                name: "a".into(),
                policy: KeyPolicy::default(),
            })
            .unwrap();
        let now = SystemTime::now();
        let ring = KeyRing::load(&s, &Policies::new()).unwrap();
        let p = ring.authenticate(a.secret.expose(), now).unwrap();
        assert_eq!((p.id.as_str(), p.name.as_str()), (a.id.as_str(), "a"));

        let b = s.rotate("a", Some(Duration::from_secs(30))).unwrap();
        let until = b.previous_valid_until.unwrap();
        let ring = KeyRing::load(&s, &Policies::new()).unwrap();
        assert!(ring.authenticate(a.secret.expose(), now).is_ok());
        assert!(ring.authenticate(b.secret.expose(), now).is_ok());
        assert!(ring
            .authenticate(a.secret.expose(), until - Duration::from_millis(1))
            .is_ok());
        assert_eq!(
            ring.authenticate(a.secret.expose(), until),
            Err(AuthError::Unknown)
        );
        assert!(ring.authenticate(b.secret.expose(), until).is_ok());

        s.revoke("a").unwrap();
        let ring = KeyRing::load(&s, &Policies::new()).unwrap();
        assert_eq!(
            ring.authenticate(b.secret.expose(), now),
            Err(AuthError::Revoked)
        );
        // Revocation also ends a grace period.
        assert_eq!(
            ring.authenticate(a.secret.expose(), now),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn test_rings_take_real_keys_and_skip_malformed_ones() {
        let now = SystemTime::now();
        let good = format::generate();
        let expired = format::generate();
        let ring = KeyRing::for_tests(vec![
            (good.expose().to_string(), principal("good", None)),
            (
                expired.expose().to_string(),
                principal("expired", Some(now - Duration::from_secs(1))),
            ),
            ("mg_not_a_real_key".into(), principal("bogus", None)),
        ]);
        assert_eq!(ring.authenticate(good.expose(), now).unwrap().id, "good");
        assert_eq!(
            ring.authenticate(expired.expose(), now),
            Err(AuthError::Expired)
        );
        assert_eq!(
            ring.authenticate("mg_not_a_real_key", now),
            Err(AuthError::Malformed)
        );
        assert_eq!(ring.counts(now).total, 2);
    }

    /// Not a benchmark (debug build, shared CI machine): prints the mean so regressions show.
    #[test]
    fn authenticate_ten_thousand_times() {
        let keys: Vec<Secret> = (0..100).map(|_| format::generate()).collect();
        let ring = KeyRing::for_tests(
            keys.iter()
                .map(|k| (k.expose().to_string(), principal(k.id(), None)))
                .collect(),
        );
        let now = SystemTime::now();
        let n = 10_000;
        let start = Instant::now();
        for i in 0..n {
            let k = &keys[i % keys.len()];
            assert!(ring.authenticate(k.expose(), now).is_ok());
        }
        let per = start.elapsed() / n as u32;
        println!(
            "KeyRing::authenticate: {per:?} per call over {n} calls ({} build)",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
}
