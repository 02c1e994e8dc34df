//! The schema of `keys.db` and its migrations.
//!
//! Owns the tables (`keys`, `usage`) and bringing a database up to date. Migrations are append
//! only: never edit a released one (a database records how many it has applied in
//! `PRAGMA user_version`). Never downgrades: a database newer than this build is refused.

use super::{SqliteBackend, TxError};
use crate::keys::types::StoreError;

/// Schema migrations; `PRAGMA user_version` = how many have been applied.
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
    // 2: the usage ledger (see `crate::keys::ledger`). `bucket_start` is in ms since the Unix
    // epoch (UTC), aligned to `bucket_ms` (60_000: a minute row; 86_400_000: a compacted day
    // row).
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
    // 3: the keys generation: one counter that triggers bump at every change to `keys` (and
    // only there), so the daemon's watcher can tell a key change from a ledger commit (both
    // move `PRAGMA data_version`).
    "CREATE TABLE keys_generation (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    ) STRICT;
    INSERT INTO keys_generation VALUES (1, 0);
    CREATE TRIGGER keys_generation_insert AFTER INSERT ON keys
        BEGIN UPDATE keys_generation SET generation = generation + 1; END;
    CREATE TRIGGER keys_generation_update AFTER UPDATE ON keys
        BEGIN UPDATE keys_generation SET generation = generation + 1; END;
    CREATE TRIGGER keys_generation_delete AFTER DELETE ON keys
        BEGIN UPDATE keys_generation SET generation = generation + 1; END;",
];

/// Applies the migrations `db` lacks, in one transaction.
pub(super) fn migrate(db: &mut SqliteBackend) -> Result<(), StoreError> {
    let latest = MIGRATIONS.len() as i64;
    let version = db.read(|c| Ok(user_version(c)?))?;
    if version == latest {
        return Ok(());
    }
    let path = db.path.clone();
    db.write_tx(|tx| {
        // Re-read under the write lock: another process may have migrated meanwhile.
        let version = user_version(tx)?;
        if version > latest {
            return Err(TxError::Store(StoreError::SchemaTooNew {
                path,
                found: version,
                supported: latest,
            }));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
        }
        Ok(())
    })
}

fn user_version(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::Connection;

    use super::user_version;
    use crate::keys::ledger::{Ledger, UsageEvent, UsageTotals};
    use crate::keys::store::{KeyStore, NewKey, StoreError};
    use crate::keys::DB_FILE;

    fn raw(dir: &Path) -> Connection {
        Connection::open(dir.join(DB_FILE)).unwrap()
    }

    #[test]
    fn newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(KeyStore::open(dir.path()).unwrap());
        let c = raw(dir.path());
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            KeyStore::open(dir.path()),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn migration_adds_the_usage_table_to_an_existing_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KeyStore::open(dir.path()).unwrap();
        let k = s
            .create(NewKey {
                name: "a".into(),
                policy: Default::default(),
            })
            .unwrap();
        drop(s);
        // Make it look like a version-1 database.
        raw(dir.path())
            .execute_batch(
                "DROP TABLE usage; DROP TRIGGER keys_generation_insert;
                 DROP TRIGGER keys_generation_update; DROP TRIGGER keys_generation_delete;
                 DROP TABLE keys_generation; PRAGMA user_version = 1;",
            )
            .unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(user_version(&raw(dir.path())).unwrap(), 3);
        assert_eq!(l.store().get("a").unwrap().id, k.id);
        let at = humantime::parse_rfc3339("2024-03-10T12:00:00Z").unwrap();
        l.write(&[UsageEvent {
            key_id: k.id.as_str().into(),
            at,
            prompt_tokens: 1,
            completion_tokens: 2,
            estimated: false,
        }])
        .unwrap();
        assert_eq!(
            l.usage(
                &k.id,
                humantime::parse_rfc3339("2024-03-10T13:00:00Z").unwrap()
            )
            .unwrap()
            .total,
            UsageTotals {
                prompt_tokens: 1,
                completion_tokens: 2,
                requests: 1,
                estimated: 0,
            }
        );
    }
}
