//! The SQLite backend: `<state_dir>/keys.db`, holding the key rows and the usage ledger.
//!
//! Owns the connection and how it is used: the file created 0600, WAL, the busy timeout, the
//! schema ([`schema`]), and the one way to write ([`SqliteBackend::write_tx`]). Never decides a
//! rule (that is [`super::store`]'s and [`super::ledger`]'s) and never sees the server secret.
//!
//! Concurrency: the CLI and the daemon open the same database from different processes, and the
//! daemon opens it twice (the key watcher and the ledger writer). WAL lets readers go on while
//! one connection writes; `busy_timeout` makes writers queue rather than fail; every
//! read-modify-write runs in one `BEGIN IMMEDIATE` transaction, so it holds the write lock from
//! its first read. The change stamp is the `keys_generation` counter, which triggers on the
//! `keys` table bump (not `PRAGMA data_version`, which every ledger commit moves too).

mod keys;
mod schema;
mod usage;

pub(crate) use usage::UsageRow;

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::backend::Backend;
use super::types::StoreError;

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "keys.db";
/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to `keys.db`.
pub struct SqliteBackend {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A failure inside [`SqliteBackend::write_tx`] or [`SqliteBackend::read`]: SQLite's (which
/// gets the file's path on the way out) or one of the store's own refusals. Lets the closures
/// use `?` on both.
pub(super) enum TxError {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sql(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl TxError {
    fn at(self, path: &Path) -> StoreError {
        match self {
            TxError::Sql(source) => sql_error(path, source),
            TxError::Store(e) => e,
        }
    }
}

fn sql_error(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

impl SqliteBackend {
    /// Opens (creating on first use, 0600) the database at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<SqliteBackend, StoreError> {
        create_private_file(path)?;
        let sql = |source| sql_error(path, source);
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // WAL: the daemon's reads never block the CLI's writes and vice versa. SQLite creates the
        // -wal and -shm files with the database file's permissions (0600).
        let mode = set_wal(&conn).map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %path.display(), mode, "key store: WAL unavailable; using this journal mode");
        }
        let mut backend = SqliteBackend {
            conn,
            path: path.to_path_buf(),
        };
        schema::migrate(&mut backend)?;
        Ok(backend)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits it; an error from `f` rolls
    /// it back. Immediate: the write lock is taken before the first read, so a
    /// read-modify-write never works on a stale read, and a second writer waits (up to the busy
    /// timeout) instead of failing at its first write.
    pub(super) fn write_tx<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let (conn, path) = (&mut self.conn, &self.path);
        let run = || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        run().map_err(|e: TxError| e.at(path))
    }

    /// Runs the reads of `f` (no transaction: each statement sees one snapshot).
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        f(&self.conn).map_err(|e| e.at(&self.path))
    }
}

impl Backend for SqliteBackend {
    fn location(&self) -> &Path {
        &self.path
    }

    /// The `keys_generation` counter: triggers bump it at every insert, update or delete on
    /// `keys`, and nothing else moves it (the ledger writer's commits leave it alone).
    fn change_stamp(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT generation FROM keys_generation WHERE id = 1",
                [],
                |r| r.get(0),
            )?)
        })
    }
}

/// Switches to WAL. SQLite answers `SQLITE_BUSY` to this pragma without calling the busy
/// handler while another connection is converting the same fresh database (seen with several
/// processes opening a new store at once), so retry for up to the busy timeout.
fn set_wal(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn count(db: &SqliteBackend) -> i64 {
        db.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))?))
            .unwrap()
    }

    const INSERT: &str = "INSERT INTO usage VALUES ('k', 0, 60000, 1, 1, 1, 0)";

    #[test]
    fn write_tx_commits_or_rolls_back_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mut db = SqliteBackend::open(&path).unwrap();
        // A refusal after a write leaves nothing behind and comes out as itself.
        let e = db
            .write_tx(|tx| {
                tx.execute(INSERT, [])?;
                Err::<(), _>(StoreError::NotFound("x".into()).into())
            })
            .unwrap_err();
        assert!(matches!(e, StoreError::NotFound(ref n) if n == "x"), "{e}");
        assert_eq!(count(&db), 0);
        // A failing statement after a write: rolled back, and the error names the file.
        let e = db
            .write_tx(|tx| {
                tx.execute(INSERT, [])?;
                tx.execute(INSERT, [])?; // primary key conflict
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Sqlite { path: ref p, .. } if *p == path),
            "{e}"
        );
        assert_eq!(count(&db), 0);
        db.write_tx(|tx| Ok(tx.execute(INSERT, [])?)).unwrap();
        assert_eq!(count(&db), 1);
        // Another connection sees the commit; a usage commit leaves the change stamp alone, a
        // key row change moves it.
        let other = SqliteBackend::open(&path).unwrap();
        let before = other.change_stamp().unwrap();
        assert_eq!(count(&other), 1);
        db.write_tx(|tx| Ok(tx.execute("DELETE FROM usage", [])?))
            .unwrap();
        assert_eq!(other.change_stamp().unwrap(), before);
        assert_eq!(count(&other), 0);
        db.write_tx(|tx| {
            Ok(tx.execute(
                "INSERT INTO keys (id, name, created_at, policy, secret_hash)
                 VALUES ('aaaaaaaaaaaa', 'n', 0, '{}', x'00')",
                [],
            )?)
        })
        .unwrap();
        assert_eq!(other.change_stamp().unwrap(), before + 1);
    }
}
