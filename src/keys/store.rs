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
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::backend::{truncate_ms, Backend, NewKeyRow, Rotation};
use super::postgres::{PgBackend, PgStoreConfig};
use super::secret::{self, Minted, ServerSecret, SECRET_FILE};
use super::sqlite::{SqliteBackend, DB_FILE};
pub use super::types::{CreatedKey, KeyRecord, KeyStatus, NewKey, StoreError};
use crate::fsutil::create_dir_with_mode;

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

/// Where the rows live (`[store]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// `<state_dir>/keys.db` (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several appliances.
    Postgres(PgStoreConfig),
}

impl StoreConfig {
    /// Names the store in messages and `status` (never with a password).
    pub fn describe(&self, state_dir: &Path) -> String {
        match self {
            StoreConfig::Sqlite => format!("sqlite {}", state_dir.join(DB_FILE).display()),
            StoreConfig::Postgres(pg) => format!("postgres {}", pg.display_url()),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, StoreConfig::Postgres(_))
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
        KeyStore::open_in(state_dir, &StoreConfig::Sqlite)
    }

    /// Opens the store `store` names, with the server secret of `<state_dir>/keys.secret`
    /// (created on first use). A shared store records the secret's fingerprint on first use
    /// and refuses any other secret ([`StoreError::SecretMismatch`]).
    pub fn open_in(state_dir: &Path, store: &StoreConfig) -> Result<KeyStore, StoreError> {
        create_dir_with_mode(state_dir, 0o700).map_err(|source| StoreError::Io {
            action: "create the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let secret = secret::load_or_create(&state_dir.join(SECRET_FILE))?;
        let mut backend: Box<dyn Backend> = match store {
            StoreConfig::Sqlite => Box::new(SqliteBackend::open(&state_dir.join(DB_FILE))?),
            StoreConfig::Postgres(pg) => Box::new(PgBackend::open(pg)?),
        };
        backend.check_fingerprint(&secret.fingerprint())?;
        Ok(KeyStore { backend, secret })
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

    /// Whether other appliances share this store.
    pub fn is_shared(&self) -> bool {
        self.backend.is_shared()
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
            secret: minted.into_secret(),
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
                hash: *m.hash(),
                previous: until.map(|t| (rec.hashes.current, t)),
            };
            minted = Some(m);
            Ok(rotation)
        })?;
        let minted = minted.expect("a successful rotation minted a secret");
        Ok(CreatedKey {
            id: rec.id,
            name: rec.name,
            secret: minted.into_secret(),
            created_at: rec.created_at,
            expires_at: rec.expires_at,
            policy: rec.policy,
            previous_valid_until: until,
        })
    }
}

#[cfg(test)]
mod tests;
