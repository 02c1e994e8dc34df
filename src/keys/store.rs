//! The key store: `<state_dir>/keys.db` (SQLite) and `<state_dir>/keys.secret`.
//!
//! Owns the durable record of every API key and the server secret that keys its hashes. Stores
//! only `HMAC-SHA-256(server secret, id ":" secret)` of a key, never the key: a copy of
//! `keys.db` alone (a backup, a support bundle) does not let anyone authenticate or even test
//! guesses offline. Never logs, prints or returns a stored hash.
//!
//! Concurrency: the CLI and the daemon open the same database from different processes. WAL
//! lets the daemon read while the CLI writes; `busy_timeout` makes writers queue rather than
//! fail; every read-modify-write runs in a `BEGIN IMMEDIATE` transaction. The daemon notices
//! commits through `PRAGMA data_version` (see [`super::Keys::watch`]).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::Sha256;

use super::format::{self, Secret};
use crate::fsutil::create_dir_with_mode;
use crate::policy::KeyPolicy;

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "keys.db";
/// File name of the server secret inside the state directory.
pub const SECRET_FILE: &str = "keys.secret";
/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Schema migrations; `PRAGMA user_version` = how many have been applied. Append only: never
/// edit a released migration.
const MIGRATIONS: &[&str] = &[
    // 1: keys. Times are milliseconds since the Unix epoch (UTC).
    "CREATE TABLE keys (
        id                   TEXT PRIMARY KEY,
        name                 TEXT NOT NULL,
        created_at           INTEGER NOT NULL,
        expires_at           INTEGER,
        revoked_at           INTEGER,
        policy               TEXT NOT NULL,
        secret_hash          BLOB NOT NULL,
        previous_hash        BLOB,
        previous_valid_until INTEGER,
        rotated_at           INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX keys_active_name ON keys(name) WHERE revoked_at IS NULL;",
    // 2: the usage ledger (see `super::ledger`). `bucket_start` is in ms since the Unix epoch
    // (UTC), aligned to `bucket_ms` (60_000: a minute row; 86_400_000: a compacted day row).
    "CREATE TABLE usage (
        key_id            TEXT NOT NULL,
        bucket_start      INTEGER NOT NULL,
        bucket_ms         INTEGER NOT NULL,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        requests          INTEGER NOT NULL,
        estimated         INTEGER NOT NULL,
        PRIMARY KEY (key_id, bucket_start, bucket_ms)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX usage_fine ON usage(bucket_ms, bucket_start);",
];

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

/// The 32-byte HMAC key of `keys.secret`. `Debug` is masked.
#[derive(Clone)]
pub struct ServerSecret([u8; 32]);

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(****)")
    }
}

impl ServerSecret {
    /// A fresh random secret (tests and [`super::KeyRing::for_tests`]).
    pub fn generate() -> ServerSecret {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the operating system's random number generator failed");
        ServerSecret(k)
    }

    /// The keyed HMAC, ready to clone per use (cloning skips re-deriving the inner/outer pads).
    pub(crate) fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

/// `HMAC-SHA-256(server secret, id ":" secret)`. Binding the id means a hash copied onto another
/// row does not authenticate that row's id.
pub(crate) fn hash_secret(mac: &HmacSha256, id: &str, secret: &str) -> [u8; 32] {
    let mut m = mac.clone();
    m.update(id.as_bytes());
    m.update(b":");
    m.update(secret.as_bytes());
    m.finalize().into_bytes().into()
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

/// An open key store (one SQLite connection; not shared between threads).
pub struct KeyStore {
    conn: Connection,
    secret: ServerSecret,
    db_path: PathBuf,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("db_path", &self.db_path)
            .finish_non_exhaustive()
    }
}

/// Switches to WAL. SQLite answers `SQLITE_BUSY` to this pragma without calling the busy
/// handler while another connection is converting the same fresh database (seen with several
/// processes opening a new store at once), so retry for up to the busy timeout.
fn set_wal(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
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
        let secret = load_or_create_secret(&state_dir.join(SECRET_FILE))?;
        let db_path = state_dir.join(DB_FILE);
        create_private_file(&db_path)?;
        let sql = |source| StoreError::Sqlite {
            path: db_path.clone(),
            source,
        };
        let conn = Connection::open(&db_path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // WAL: the daemon's reads never block the CLI's writes and vice versa. SQLite creates the
        // -wal and -shm files with the database file's permissions (0600).
        let mode = set_wal(&conn).map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %db_path.display(), mode, "key store: WAL unavailable; using this journal mode");
        }
        let mut store = KeyStore {
            conn,
            secret,
            db_path,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The connection, for the usage ledger (same file, same migrations).
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(super) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub(crate) fn server_secret(&self) -> &ServerSecret {
        &self.secret
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.db_path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let latest = MIGRATIONS.len() as i64;
        let path = self.db_path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version == latest {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        // Re-read under the write lock: another process may have migrated meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version > latest {
            return Err(StoreError::SchemaTooNew {
                path: path.clone(),
                found: version,
                supported: latest,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(m).map_err(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// `PRAGMA data_version`: changes when another connection commits.
    pub(crate) fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.sql(e))
    }

    /// Creates a key with a fresh id and secret. Names are unique among non-revoked keys.
    pub fn create(&mut self, new: NewKey) -> Result<CreatedKey, StoreError> {
        check_key_name(&new.name).map_err(|problem| StoreError::InvalidName {
            name: new.name.clone(),
            problem,
        })?;
        let now = truncate_ms(SystemTime::now());
        let mac = self.secret.mac();
        let path = self.db_path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1 AND revoked_at IS NULL)",
                [&new.name],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if exists {
            return Err(StoreError::NameExists(new.name));
        }
        let mut policy = new.policy;
        policy.expires_at = policy.expires_at.map(truncate_ms);
        let policy_json = serde_json::to_string(&policy).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            id: "(new)".into(),
            problem: e.to_string(),
        })?;
        // 36^12 ids make a collision absurdly unlikely; still, never overwrite one.
        let secret = loop {
            let secret = format::generate();
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM keys WHERE id = ?1)",
                    [secret.id()],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            if !taken {
                break secret;
            }
        };
        let parsed = format::parse(secret.expose()).expect("generated keys parse");
        let hash = hash_secret(&mac, parsed.id(), parsed.secret());
        tx.execute(
            "INSERT INTO keys (id, name, created_at, expires_at, policy, secret_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                secret.id(),
                new.name,
                to_ms(now),
                policy.expires_at.map(to_ms),
                policy_json,
                &hash[..]
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(CreatedKey {
            id: secret.id().to_string(),
            name: new.name,
            created_at: now,
            expires_at: policy.expires_at,
            policy,
            secret,
            previous_valid_until: None,
        })
    }

    /// Every key, revoked ones included, oldest first.
    pub fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT} ORDER BY created_at, name, id"))
            .map_err(|e| self.sql(e))?;
        let rows = stmt.query_map([], RawRow::read).map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(|e| self.sql(e))?.into_record(&self.db_path)?);
        }
        Ok(out)
    }

    /// The key called `name` (the non-revoked one; else the most recently revoked one), or the
    /// key whose id is `name`.
    pub fn get(&self, name: &str) -> Result<KeyRecord, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!(
                    "{SELECT} WHERE name = ?1 OR id = ?1
                     ORDER BY name = ?1 DESC, revoked_at IS NULL DESC, revoked_at DESC LIMIT 1"
                ),
                [name],
                RawRow::read,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        match row {
            Some(r) => r.into_record(&self.db_path),
            None => Err(StoreError::NotFound(name.to_string())),
        }
    }

    /// Starts a write transaction and finds the live key called `name` (or with id `name`);
    /// a missing, revoked or expired key is the matching error.
    fn begin_for_active(
        &mut self,
        name: &str,
    ) -> Result<(rusqlite::Transaction<'_>, String), StoreError> {
        let path = self.db_path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        match active_id(&tx, name).map_err(sql)? {
            Some(id) => Ok((tx, id)),
            None => Err(missing(&tx, name).map_err(sql)?),
        }
    }

    /// Revokes the non-revoked key called `name` (or with id `name`). Takes effect in a running
    /// daemon within a second.
    pub fn revoke(&mut self, name: &str) -> Result<KeyRecord, StoreError> {
        let now = truncate_ms(SystemTime::now());
        let path = self.db_path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let (tx, id) = self.begin_for_active(name)?;
        tx.execute(
            "UPDATE keys SET revoked_at = ?2, previous_hash = NULL, previous_valid_until = NULL
             WHERE id = ?1",
            params![id, to_ms(now)],
        )
        .map_err(sql)?;
        let rec = tx
            .query_row(&format!("{SELECT} WHERE id = ?1"), [&id], RawRow::read)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        rec.into_record(&path)
    }

    /// Gives the key called `name` a new secret; id, name and policy stay. The old secret keeps
    /// working until now + `grace` (`None` or zero: it stops at once). Only one old secret is
    /// kept: rotating again during a grace period ends the previous one.
    pub fn rotate(
        &mut self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<CreatedKey, StoreError> {
        let now = truncate_ms(SystemTime::now());
        let grace = grace.unwrap_or(Duration::ZERO);
        let mac = self.secret.mac();
        let path = self.db_path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let (tx, id) = self.begin_for_active(name)?;
        let rec = tx
            .query_row(&format!("{SELECT} WHERE id = ?1"), [&id], RawRow::read)
            .map_err(sql)?
            .into_record(&path)?;
        if rec.status(now) == KeyStatus::Expired {
            return Err(StoreError::Expired(rec.name));
        }
        let secret = format::generate_for(&rec.id);
        let parsed = format::parse(secret.expose()).expect("generated keys parse");
        let hash = hash_secret(&mac, parsed.id(), parsed.secret());
        let until = if grace.is_zero() {
            None
        } else {
            Some(truncate_ms(now.checked_add(grace).unwrap_or(now)))
        };
        let previous = until.map(|_| rec.hashes.current);
        tx.execute(
            "UPDATE keys SET secret_hash = ?2, previous_hash = ?3, previous_valid_until = ?4,
                             rotated_at = ?5
             WHERE id = ?1",
            params![
                rec.id,
                &hash[..],
                previous.as_ref().map(|h| &h[..]),
                until.map(to_ms),
                to_ms(now)
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(CreatedKey {
            id: rec.id,
            name: rec.name,
            secret,
            created_at: rec.created_at,
            expires_at: rec.expires_at,
            policy: rec.policy,
            previous_valid_until: until,
        })
    }
}

const SELECT: &str = "SELECT id, name, created_at, expires_at, revoked_at, rotated_at,
    previous_valid_until, policy, secret_hash, previous_hash FROM keys";

/// The id of the non-revoked key named `name`, else of the non-revoked key with id `name`.
fn active_id(conn: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT id FROM keys WHERE (name = ?1 OR id = ?1) AND revoked_at IS NULL
         ORDER BY name = ?1 DESC LIMIT 1",
        [name],
        |r| r.get(0),
    )
    .optional()
}

/// The error for a name with no non-revoked key: revoked or unknown.
fn missing(conn: &Connection, name: &str) -> rusqlite::Result<StoreError> {
    let revoked: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1 OR id = ?1)",
        [name],
        |r| r.get(0),
    )?;
    Ok(if revoked {
        StoreError::Revoked(name.to_string())
    } else {
        StoreError::NotFound(name.to_string())
    })
}

/// A row as SQLite returns it; [`RawRow::into_record`] checks it.
struct RawRow {
    id: String,
    name: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    rotated_at: Option<i64>,
    previous_valid_until: Option<i64>,
    policy: String,
    secret_hash: Vec<u8>,
    previous_hash: Option<Vec<u8>>,
}

impl RawRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            id: r.get(0)?,
            name: r.get(1)?,
            created_at: r.get(2)?,
            expires_at: r.get(3)?,
            revoked_at: r.get(4)?,
            rotated_at: r.get(5)?,
            previous_valid_until: r.get(6)?,
            policy: r.get(7)?,
            secret_hash: r.get(8)?,
            previous_hash: r.get(9)?,
        })
    }

    fn into_record(self, path: &Path) -> Result<KeyRecord, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            id: self.id.clone(),
            problem,
        };
        let mut policy: KeyPolicy =
            serde_json::from_str(&self.policy).map_err(|e| corrupt(format!("policy JSON: {e}")))?;
        let expires_at = self.expires_at.map(from_ms);
        // The column is authoritative (it is what `key list` shows).
        policy.expires_at = expires_at;
        let current: [u8; 32] = self
            .secret_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret_hash is not 32 bytes".into()))?;
        let previous = match &self.previous_hash {
            Some(h) => Some(
                <[u8; 32]>::try_from(h.as_slice())
                    .map_err(|_| corrupt("previous_hash is not 32 bytes".into()))?,
            ),
            None => None,
        };
        if !format::is_key_id(&self.id) {
            return Err(corrupt("the id is not 12 of a-z0-9".into()));
        }
        Ok(KeyRecord {
            created_at: from_ms(self.created_at),
            expires_at,
            revoked_at: self.revoked_at.map(from_ms),
            rotated_at: self.rotated_at.map(from_ms),
            previous_valid_until: previous.and(self.previous_valid_until.map(from_ms)),
            policy,
            hashes: Hashes { current, previous },
            id: self.id,
            name: self.name,
        })
    }
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Drops sub-millisecond precision so what callers get back equals what is stored.
fn truncate_ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

/// Creates `path` empty with mode 0600 unless it exists (SQLite would use 0644 minus umask).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if let Ok(m) = fs::metadata(path) {
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        "{}: mode {mode:04o} lets other users read key names and policies; fix: chmod 600 {}",
                        path.display(),
                        path.display()
                    );
                }
            }
            Ok(())
        }
        Err(source) => Err(StoreError::Io {
            action: "create",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads `keys.secret`, or creates it (32 random bytes, 0600) on first use.
///
/// Creation is atomic and never clobbers: the bytes go to a private temporary file which is then
/// hard-linked to the final name. If two processes race, `link(2)` fails for the loser with
/// `EEXIST` and it reads the winner's file, so both end up with the same secret and no reader
/// ever sees a partial file.
fn load_or_create_secret(path: &Path) -> Result<ServerSecret, StoreError> {
    match read_secret(path) {
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let io_err = |action, p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io {
            action,
            path: p,
            source,
        }
    };
    let secret = ServerSecret::generate();
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{SECRET_FILE}.{}.{}.tmp",
        std::process::id(),
        format::new_id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&secret.0)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", &tmp)(e));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
            Ok(secret)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_secret(path),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

fn read_secret(path: &Path) -> Result<ServerSecret, StoreError> {
    let io_err = |source| StoreError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(io_err)?;
    let mode = f.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::SecretMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut buf = Vec::with_capacity(33);
    f.take(1024).read_to_end(&mut buf).map_err(io_err)?;
    let bytes: [u8; 32] = buf
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::SecretLength {
            path: path.to_path_buf(),
            len: buf.len(),
        })?;
    Ok(ServerSecret(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Budget, BudgetPeriod, Endpoint};

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn policy() -> KeyPolicy {
        KeyPolicy {
            models: vec!["llama*".into()],
            endpoints: vec![Endpoint::ChatCompletions],
            expires_at: Some(UNIX_EPOCH + Duration::from_millis(4_102_444_799_123)),
            allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            rpm: Some(60),
            tpm: Some(100_000),
            max_concurrent: Some(4),
            budget: Some(Budget {
                tokens: 1_000_000,
                period: BudgetPeriod::Month,
            }),
            policy: Some("developers".into()),
            missing_policy: false,
        }
    }

    #[test]
    fn create_list_get_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut s = KeyStore::open(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(DB_FILE)), 0o600);
        assert_eq!(mode(&state.join(SECRET_FILE)), 0o600);
        assert_eq!(fs::read(state.join(SECRET_FILE)).unwrap().len(), 32);

        let c = s
            .create(NewKey {
                name: "alice".into(),
                policy: policy(),
            })
            .unwrap();
        assert_eq!(c.policy, policy());
        assert_eq!(c.expires_at, policy().expires_at);
        let r = s.get("alice").unwrap();
        assert_eq!(r.id, c.id);
        assert_eq!(r.created_at, c.created_at);
        assert_eq!(r.policy, policy());
        assert_eq!(r.status(SystemTime::now()), KeyStatus::Active);
        assert_eq!(s.get(&c.id).unwrap(), r);
        assert_eq!(s.list().unwrap(), vec![r.clone()]);
        // The secret is nowhere in the database file.
        drop(s);
        let db = fs::read(state.join(DB_FILE)).unwrap();
        let secret = format::parse(c.secret.expose())
            .unwrap()
            .secret()
            .as_bytes();
        assert!(!db.windows(secret.len()).any(|w| w == secret));
        // Reopening keeps everything (and does not re-run migrations).
        let s = KeyStore::open(&state).unwrap();
        assert_eq!(s.list().unwrap(), vec![r]);
    }

    #[test]
    fn names_unique_among_active_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        let new = || NewKey {
            name: "bob".into(),
            policy: KeyPolicy::default(),
        };
        let first = s.create(new()).unwrap();
        assert!(matches!(s.create(new()), Err(StoreError::NameExists(n)) if n == "bob"));
        let revoked = s.revoke("bob").unwrap();
        assert_eq!(revoked.status(SystemTime::now()), KeyStatus::Revoked);
        assert!(matches!(s.revoke("bob"), Err(StoreError::Revoked(_))));
        assert!(matches!(s.rotate("bob", None), Err(StoreError::Revoked(_))));
        let second = s.create(new()).unwrap();
        assert_ne!(first.id, second.id);
        // `get` prefers the live key; the old one stays reachable by id.
        assert_eq!(s.get("bob").unwrap().id, second.id);
        assert_eq!(
            s.get(&first.id).unwrap().status(SystemTime::now()),
            KeyStatus::Revoked
        );
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(matches!(s.get("carol"), Err(StoreError::NotFound(_))));
        assert!(matches!(s.revoke("carol"), Err(StoreError::NotFound(_))));
        // After revoking the second too, `get` shows the most recently revoked.
        s.revoke("bob").unwrap();
        assert_eq!(s.get("bob").unwrap().id, second.id);
    }

    #[test]
    fn invalid_names_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        for bad in ["", "-x", "a b", "ä", &"x".repeat(65)] {
            let e = s
                .create(NewKey {
                    name: bad.into(),
                    policy: KeyPolicy::default(),
                })
                .unwrap_err();
            assert!(matches!(e, StoreError::InvalidName { .. }), "{bad}");
            assert!(e.to_string().contains("fix:"));
        }
        for good in ["a", "alice@corp.example", "ci_bot-2", "X.Y"] {
            assert!(check_key_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn rotate_keeps_id_and_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        let c = s
            .create(NewKey {
                name: "ci".into(),
                policy: policy(),
            })
            .unwrap();
        let r = s.rotate("ci", Some(Duration::from_secs(60))).unwrap();
        assert_eq!(r.id, c.id);
        assert_eq!(r.policy, c.policy);
        assert_ne!(r.secret, c.secret);
        assert!(r.previous_valid_until.unwrap() > SystemTime::now());
        let rec = s.get("ci").unwrap();
        assert_eq!(rec.previous_valid_until, r.previous_valid_until);
        assert!(rec.rotated_at.is_some());
        let r2 = s.rotate("ci", None).unwrap();
        assert_eq!(r2.previous_valid_until, None);
        assert_eq!(s.get("ci").unwrap().previous_valid_until, None);
    }

    #[test]
    fn rotate_refuses_expired() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        s.create(NewKey {
            name: "old".into(),
            policy: KeyPolicy {
                expires_at: Some(UNIX_EPOCH + Duration::from_secs(1)),
                ..Default::default()
            },
        })
        .unwrap();
        assert!(matches!(s.rotate("old", None), Err(StoreError::Expired(_))));
    }

    #[test]
    fn secret_mode_and_length_checked() {
        let dir = tempfile::tempdir().unwrap();
        drop(KeyStore::open(dir.path()).unwrap());
        let p = dir.path().join(SECRET_FILE);
        let original = fs::read(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = KeyStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::SecretMode { mode: 0o640, .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains("chmod 600"),
            "{msg}"
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        KeyStore::open(dir.path()).unwrap();
        // A short file is an error, never silently replaced (that would invalidate every key).
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, b"short").unwrap();
        assert!(matches!(
            KeyStore::open(dir.path()),
            Err(StoreError::SecretLength { len: 5, .. })
        ));
        fs::write(&p, &original).unwrap();
        KeyStore::open(dir.path()).unwrap();
    }

    #[test]
    fn concurrent_first_open_agrees_on_one_secret() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || KeyStore::open(&d).unwrap().server_secret().0)
            })
            .collect();
        let secrets: Vec<[u8; 32]> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(secrets.windows(2).all(|w| w[0] == w[1]));
        // No temporary files left.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(KeyStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            KeyStore::open(dir.path()),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn ms_conversions() {
        for ms in [0i64, 1, 1_700_000_000_123, -1, -86_400_000] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
        let t = UNIX_EPOCH + Duration::from_nanos(1_500_000_999_999);
        assert_eq!(
            truncate_ms(t),
            UNIX_EPOCH + Duration::from_millis(1_500_000)
        );
    }

    #[test]
    fn debug_masks_server_secret() {
        assert_eq!(
            format!("{:?}", ServerSecret::generate()),
            "ServerSecret(****)"
        );
    }
}
