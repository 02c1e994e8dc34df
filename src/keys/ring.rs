//! The daemon's in-memory key ring: an immutable snapshot of every key, for authentication.
//!
//! Owns "which principal does this bearer key belong to?" on the request path: [`KeyRing`]
//! answers with no I/O, no lock and no allocation beyond an `Arc` clone. Never logs or returns
//! a secret; revocation and expiry are only told to someone who proved they hold the secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use subtle::ConstantTimeEq;

use super::format;
use super::secret::{hash_secret, HmacSha256, ServerSecret};
use super::store::KeyStore;
use super::types::StoreError;
use crate::policy::{Policies, Principal};

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

    /// `(key id, budget)` of every key that is neither revoked nor expired and has a budget
    /// (its policy resolved): the keys a shared store's budget sync leases for.
    pub fn budgets(&self) -> Vec<(String, crate::policy::Budget)> {
        let now = SystemTime::now();
        self.by_id
            .iter()
            .filter(|(_, e)| !e.revoked && e.expires_at.is_none_or(|t| t > now))
            .filter_map(|(id, e)| e.principal.policy.budget.map(|b| (id.to_string(), b)))
            .collect()
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

#[cfg(test)]
mod tests;
