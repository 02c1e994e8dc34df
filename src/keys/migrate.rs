//! `modelgate store migrate`: copies an appliance's SQLite store into a shared PostgreSQL one.
//!
//! Owns the copy: every key row as it is (same id, same HMAC, so every key keeps working with
//! the same `keys.secret`) and every usage row, as the difference against what an earlier run
//! from this state directory brought (so running it again, or after more usage, never counts
//! anything twice). Refuses a PostgreSQL store first used with another server secret. Never
//! deletes the SQLite file: it stays as the rollback.

use std::io::ErrorKind;
use std::path::Path;

use super::postgres::{PgBackend, PgStoreConfig};
use super::sqlite::{SqliteBackend, DB_FILE};
use super::store::{KeyStore, StoreConfig};
use super::types::StoreError;

/// The file naming this state directory as a migration source (random, kept across runs).
pub const SOURCE_ID_FILE: &str = "store-migrate.id";

/// What a migration copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub keys: usize,
    pub usage_rows: usize,
    /// Tokens (prompt + completion) and requests in the SQLite store.
    pub tokens: u64,
    pub requests: u64,
}

/// Copies `<state_dir>/keys.db` into the PostgreSQL store `to`.
pub fn sqlite_to_postgres(
    state_dir: &Path,
    to: &PgStoreConfig,
) -> Result<MigrateReport, StoreError> {
    let db = state_dir.join(DB_FILE);
    if !db.exists() {
        return Err(StoreError::StoreConfig {
            url: db.display().to_string(),
            problem: "no SQLite store to migrate".into(),
            fix: "check server.state_dir in the config (or pass --config)".into(),
        });
    }
    // Opening the shared store with this state directory's secret records the secret's
    // fingerprint (a fresh store) or checks it (an existing one).
    drop(KeyStore::open_in(
        state_dir,
        &StoreConfig::Postgres(to.clone()),
    )?);
    let src = SqliteBackend::open(&db)?;
    let keys = src.raw_key_rows()?;
    let usage = src.raw_usage_rows()?;
    let source = source_id(state_dir)?;
    let mut dst = PgBackend::open(to)?;
    dst.import_keys(&keys)?;
    dst.import_usage(&source, &usage)?;
    Ok(MigrateReport {
        keys: keys.len(),
        usage_rows: usage.len(),
        tokens: usage
            .iter()
            .map(|(_, _, _, t)| t.prompt_tokens + t.completion_tokens)
            .sum(),
        requests: usage.iter().map(|(_, _, _, t)| t.requests).sum(),
    })
}

fn source_id(state_dir: &Path) -> Result<String, StoreError> {
    let path = state_dir.join(SOURCE_ID_FILE);
    let io = |action, source| StoreError::Io {
        action,
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", e)),
    }
    let id = super::spool::new_batch_id();
    crate::fsutil::write_atomic(&path, format!("{id}\n").as_bytes(), 0o600)
        .map_err(|e| io("write", e))?;
    Ok(id)
}
