//! API keys: format, keyed hashing, the SQLite store and the daemon's in-memory key ring.
//! (Being built; the daemon uses [`Keys`] and [`AuthError`].)

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::policy::Principal;

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
}

/// An immutable set of keys.
#[derive(Default)]
pub struct KeyRing {
    /// (presented secret, principal): placeholder until the store lands.
    entries: Vec<(String, Arc<Principal>)>,
}

impl KeyRing {
    pub fn from_entries(entries: Vec<(String, Arc<Principal>)>) -> Self {
        KeyRing { entries }
    }
    pub fn authenticate(
        &self,
        presented: &str,
        _now: SystemTime,
    ) -> Result<Arc<Principal>, AuthError> {
        self.entries
            .iter()
            .find(|(s, _)| s == presented)
            .map(|(_, p)| p.clone())
            .ok_or(AuthError::Unknown)
    }
}

impl Keys {
    pub fn new(ring: KeyRing) -> Arc<Keys> {
        Arc::new(Keys {
            current: RwLock::new(Arc::new(ring)),
        })
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
}
