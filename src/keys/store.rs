//! The key store: the durable record of every API key, and the rules for changing it.
//!
//! Owns [`KeyStore`], what the CLI, the daemon and `doctor` open, and the rules of every change:
//! key names, fresh ids and secrets, the keyed hash, expiry, rotation grace. Stores only
//! `HMAC-SHA-256(server secret, id ":" secret)` of a key, never the key, so a copy of the
//! database alone (a backup, a support bundle) does not let anyone authenticate or even test
//! guesses offline. Never logs, prints or returns a stored hash. Where the rows live is the
//! backend's business (`keys::backend`): today `<state_dir>/keys.db` (SQLite, `keys::sqlite`),
//! next to the server secret `<state_dir>/keys.secret` (`keys::secret`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::backend::{truncate_ms, Backend, NewKeyRow, Rotation};
use super::format::{self, Secret};
use super::secret::{self, hash_secret, HmacSha256, ServerSecret, SECRET_FILE};
use super::sqlite::{SqliteBackend, DB_FILE};
use crate::fsutil::create_dir_with_mode;
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

/// Checks a key name: 1-64 of `a-z A-Z 0-9 . _ @ -`, starting with a letter or digit.
pub fn check_key_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 64 {
        return Err("is longer than 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
    {
        return Err("contains a character other than a-z A-Z 0-9 . _ @ -");
    }
    Ok(())
}

/// A freshly generated key and its hash, on its way into the store. A backend reads the id and
/// the hash; only the store gets the secret back out.
pub(crate) struct Minted {
    secret: Secret,
    hash: [u8; 32],
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Minted {
    /// A new secret for the key `id` (a fresh id when `None`), hashed with `mac`.
    fn new(mac: &HmacSha256, id: Option<&str>) -> Minted {
        let secret = match id {
            Some(id) => format::generate_for(id),
            None => format::generate(),
        };
        let parsed = format::parse(secret.expose()).expect("generated keys parse");
        let hash = hash_secret(mac, parsed.id(), parsed.secret());
        Minted { secret, hash }
    }

    pub fn id(&self) -> &str {
        self.secret.id()
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

/// An open key store: the rows in a backend, the server secret beside it. Not shared between
/// threads; each user opens its own.
pub struct KeyStore {
    backend: Box<dyn Backend>,
    secret: ServerSecret,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Opens (creating on first use) `<state_dir>/keys.db` and `<state_dir>/keys.secret`.
    ///
    /// The state directory is created 0700 when missing, both files 0600. Refuses a
    /// `keys.secret` that group or others can access.
    pub fn open(state_dir: &Path) -> Result<KeyStore, StoreError> {
        create_dir_with_mode(state_dir, 0o700).map_err(|source| StoreError::Io {
            action: "create the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let secret = secret::load_or_create(&state_dir.join(SECRET_FILE))?;
        let backend = SqliteBackend::open(&state_dir.join(DB_FILE))?;
        Ok(KeyStore {
            backend: Box::new(backend),
            secret,
        })
    }

    /// Where the rows live (the database file).
    pub fn db_path(&self) -> &Path {
        self.backend.location()
    }

    /// The backend, for the usage ledger (same database).
    pub(super) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub(super) fn backend_mut(&mut self) -> &mut dyn Backend {
        &mut *self.backend
    }

    pub(crate) fn server_secret(&self) -> &ServerSecret {
        &self.secret
    }

    /// Moves whenever keys may have changed through another connection (see
    /// [`Backend::change_stamp`]).
    pub(crate) fn change_stamp(&self) -> Result<i64, StoreError> {
        self.backend.change_stamp()
    }

    /// Creates a key with a fresh id and secret. Names are unique among non-revoked keys.
    pub fn create(&mut self, new: NewKey) -> Result<CreatedKey, StoreError> {
        check_key_name(&new.name).map_err(|problem| StoreError::InvalidName {
            name: new.name.clone(),
            problem,
        })?;
        let now = truncate_ms(SystemTime::now());
        let mut policy = new.policy;
        policy.expires_at = policy.expires_at.map(truncate_ms);
        let policy_json = serde_json::to_string(&policy).map_err(|e| StoreError::Corrupt {
            path: self.db_path().to_path_buf(),
            id: "(new)".into(),
            problem: e.to_string(),
        })?;
        let mac = self.secret.mac();
        let row = NewKeyRow {
            name: &new.name,
            created_at: now,
            expires_at: policy.expires_at,
            policy_json: &policy_json,
        };
        let minted = self
            .backend
            .insert_key(&row, &mut || Minted::new(&mac, None))?;
        Ok(CreatedKey {
            id: minted.id().to_string(),
            name: new.name,
            created_at: now,
            expires_at: policy.expires_at,
            policy,
            secret: minted.secret,
            previous_valid_until: None,
        })
    }

    /// Every key, revoked ones included, oldest first.
    pub fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.backend.list_keys()
    }

    /// The key called `name` (the non-revoked one; else the most recently revoked one), or the
    /// key whose id is `name`.
    pub fn get(&self, name: &str) -> Result<KeyRecord, StoreError> {
        self.backend
            .find_key(name)?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))
    }

    /// Revokes the non-revoked key called `name` (or with id `name`). Takes effect in a running
    /// daemon within a second.
    pub fn revoke(&mut self, name: &str) -> Result<KeyRecord, StoreError> {
        let now = truncate_ms(SystemTime::now());
        self.backend.revoke_key(name, now)
    }

    /// Gives the key called `name` a new secret; id, name and policy stay. The old secret keeps
    /// working until now + `grace` (`None` or zero: it stops at once). Only one old secret is
    /// kept: rotating again during a grace period ends the previous one. An expired key is
    /// refused (a new secret would not work).
    pub fn rotate(
        &mut self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<CreatedKey, StoreError> {
        let now = truncate_ms(SystemTime::now());
        let grace = grace.unwrap_or(Duration::ZERO);
        let mac = self.secret.mac();
        let until = if grace.is_zero() {
            None
        } else {
            Some(truncate_ms(now.checked_add(grace).unwrap_or(now)))
        };
        let mut minted = None;
        let rec = self.backend.rotate_key(name, now, &mut |rec| {
            if rec.status(now) == KeyStatus::Expired {
                return Err(StoreError::Expired(rec.name.clone()));
            }
            let m = Minted::new(&mac, Some(&rec.id));
            let rotation = Rotation {
                hash: m.hash,
                previous: until.map(|t| (rec.hashes.current, t)),
            };
            minted = Some(m);
            Ok(rotation)
        })?;
        let minted = minted.expect("a successful rotation minted a secret");
        Ok(CreatedKey {
            id: rec.id,
            name: rec.name,
            secret: minted.secret,
            created_at: rec.created_at,
            expires_at: rec.expires_at,
            policy: rec.policy,
            previous_valid_until: until,
        })
    }
}

#[cfg(test)]
mod tests;
