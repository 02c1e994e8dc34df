//! The data the key store, the usage ledger and their backends exchange: stored keys, what a
//! change returns, usage sums and the store's errors.
//!
//! Owns plain types only; imports nothing else of `keys` (the store, the ledger and every backend
//! import from here, never the other way round). Never holds a secret in clear but
//! [`CreatedKey::secret`], the one time a new key is shown.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::format::Secret;
use crate::policy::KeyPolicy;

/// Everything that can go wrong with the store. Messages name the file and the fix; none
/// contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}; fix: run as the owner of the state directory (root), or check server.state_dir", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: mode {mode:04o} lets other users read the key-hashing secret; fix: chmod 600 {}", path.display(), path.display())]
    SecretMode { path: PathBuf, mode: u32 },
    #[error("{}: holds {len} bytes, expected 32; fix: restore it from a backup (a new secret invalidates every API key: delete it and create new keys)", path.display())]
    SecretLength { path: PathBuf, len: usize },
    #[error("key store {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("key store {url}: {}; fix: check that PostgreSQL runs and [store] url, password_file and ca_file are right (`modelgate doctor`)", error_chain(source))]
    Postgres {
        url: String,
        source: postgres::Error,
    },
    #[error("key store {url}: {problem}; fix: {fix}")]
    StoreConfig {
        url: String,
        problem: String,
        fix: String,
    },
    #[error("key store {url}: was first used with another server secret (keys.secret), so no key of it would work here; fix: copy keys.secret (mode 0600) from an appliance already using this store into this state directory")]
    SecretMismatch { url: String },
    #[error("key store {}: schema version {found} is newer than this modelgate understands ({supported}); fix: upgrade modelgate", path.display())]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("key store {}: key {id}: {problem}; fix: revoke the key and create a new one", path.display())]
    Corrupt {
        path: PathBuf,
        id: String,
        problem: String,
    },
    #[error("key name {name:?}: {problem}; fix: use 1-64 of a-z A-Z 0-9 . _ @ -, starting with a letter or digit")]
    InvalidName { name: String, problem: &'static str },
    #[error(
        "key {0:?}: already exists; fix: choose another NAME, or `modelgate key revoke {0}` first"
    )]
    NameExists(String),
    #[error("key {0:?}: no such key; fix: see `modelgate key list`")]
    NotFound(String),
    #[error("key {0:?}: is revoked; fix: create a new key with `modelgate key create`")]
    Revoked(String),
    #[error("key {0:?}: has expired, a new secret would not work; fix: create a new key with `modelgate key create`")]
    Expired(String),
}

/// `e` and its causes ("error performing TLS handshake: invalid peer certificate: …").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_text = c.to_string();
        if !out.contains(&c_text) {
            out.push_str(": ");
            out.push_str(&c_text);
        }
        cur = c.source();
    }
    out
}

/// A key to create.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    /// `policy.expires_at` becomes the key's expiry.
    pub policy: KeyPolicy,
}

/// A key just created or rotated: the only time its secret exists outside the client.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    /// The whole key (`mg_…`); show it once.
    pub secret: Secret,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    pub policy: KeyPolicy,
    /// After a rotation with a grace period: until when the old secret still works.
    pub previous_valid_until: Option<SystemTime>,
}

/// Whether a key works (ignoring which secret is presented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

/// One stored key, without its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
    /// When the secret was last rotated.
    pub rotated_at: Option<SystemTime>,
    /// Until when the secret before the last rotation still works (`None`: it does not).
    pub previous_valid_until: Option<SystemTime>,
    pub policy: KeyPolicy,
    pub(crate) hashes: Hashes,
}

/// The stored HMACs (not secret without `keys.secret`, but never shown either).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Hashes {
    pub(crate) current: [u8; 32],
    pub(crate) previous: Option<[u8; 32]>,
}

impl fmt::Debug for Hashes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hashes(…)")
    }
}

impl KeyRecord {
    /// Revoked wins over expired; a key expires at `expires_at` exactly.
    pub fn status(&self, now: SystemTime) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|t| now >= t) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// Sums over some rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub requests: u64,
    /// Requests whose counts were estimated.
    pub estimated: u64,
}

impl UsageTotals {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
    pub(crate) fn add(&mut self, o: &UsageTotals) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.requests = self.requests.saturating_add(o.requests);
        self.estimated = self.estimated.saturating_add(o.estimated);
    }
}

/// A key's usage in the current UTC day and month, and ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub today: UsageTotals,
    pub this_month: UsageTotals,
    pub total: UsageTotals,
}

/// Usage summed per (key id, start of its UTC minute in ms): what one write adds.
pub(crate) type MinuteRows = HashMap<(Arc<str>, i64), UsageTotals>;

/// Width of a fine-grained row.
pub const MINUTE_MS: i64 = 60_000;
/// Width of a compacted row.
pub const DAY_MS: i64 = 86_400_000;
