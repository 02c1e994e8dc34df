//! The usage spool: where an appliance keeps usage its shared store could not take yet.
//!
//! Owns `<state_dir>/usage-spool.db` (SQLite, 0600): batches of per-(key, minute) rows, each
//! with the id it is (or will be) written to the shared store under. A batch that was sent
//! once may have been applied even though the answer was lost, so it is kept as it is and
//! resent under the same id (the store skips an id it has applied: never counted twice); new
//! usage during an outage is merged into the one batch not sent yet. So the spool holds about
//! keys × minutes of outage rows, and [`SPOOL_MAX_ROWS`] bounds it whatever happens. Durable:
//! a spooled row survives a restart of the appliance, and the next writer sends it.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::types::{MinuteRows, StoreError, UsageTotals};

/// File name of the spool inside the state directory.
pub const SPOOL_FILE: &str = "usage-spool.db";
/// Most rows the spool holds; usage past it is dropped and counted (about 700 keys active
/// every minute of a day-long outage).
pub const SPOOL_MAX_ROWS: u64 = 1_000_000;

/// An open spool.
#[derive(Debug)]
pub struct Spool {
    conn: Connection,
    path: PathBuf,
}

/// One spooled batch: its id, whether it was sent before, and its rows.
#[derive(Debug)]
pub struct SpooledBatch {
    pub id: String,
    pub rows: MinuteRows,
}

/// A fresh batch id: 128 random bits in hex.
pub fn new_batch_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Spool {
    /// Opens (creating, 0600) the spool at `path`.
    pub fn open(path: &Path) -> Result<Spool, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        action: "create",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS batches (
                seq  INTEGER PRIMARY KEY AUTOINCREMENT,
                id   TEXT NOT NULL UNIQUE,
                sent INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS rows (
                batch_id          TEXT NOT NULL,
                key_id            TEXT NOT NULL,
                bucket_start      INTEGER NOT NULL,
                prompt_tokens     INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                requests          INTEGER NOT NULL,
                estimated         INTEGER NOT NULL,
                PRIMARY KEY (batch_id, key_id, bucket_start)
             );",
        )
        .map_err(sql)?;
        Ok(Spool {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Rows spooled.
    pub fn row_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM rows", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    /// The oldest spooled batch, if any; marked sent (durably) before it is returned, since the
    /// caller is about to send it.
    pub fn oldest_for_send(&mut self) -> Result<Option<SpooledBatch>, StoreError> {
        let run = |c: &mut Connection| -> rusqlite::Result<Option<SpooledBatch>> {
            let tx = c.transaction()?;
            let Some(id) = tx
                .query_row("SELECT id FROM batches ORDER BY seq LIMIT 1", [], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
            else {
                return Ok(None);
            };
            tx.execute("UPDATE batches SET sent = 1 WHERE id = ?1", [&id])?;
            let mut rows = MinuteRows::new();
            {
                let mut stmt = tx.prepare(
                    "SELECT key_id, bucket_start, prompt_tokens, completion_tokens, requests,
                            estimated FROM rows WHERE batch_id = ?1",
                )?;
                let mut q = stmt.query([&id])?;
                while let Some(r) = q.next()? {
                    let key: String = r.get(0)?;
                    let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                    rows.insert(
                        (key.as_str().into(), r.get(1)?),
                        UsageTotals {
                            prompt_tokens: n(2)?,
                            completion_tokens: n(3)?,
                            requests: n(4)?,
                            estimated: n(5)?,
                        },
                    );
                }
            }
            tx.commit()?;
            Ok(Some(SpooledBatch { id, rows }))
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Forgets the batch `id` (the store has it).
    pub fn remove(&mut self, id: &str) -> Result<(), StoreError> {
        let run = |c: &mut Connection| -> rusqlite::Result<()> {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM rows WHERE batch_id = ?1", [id])?;
            tx.execute("DELETE FROM batches WHERE id = ?1", [id])?;
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Spools `rows` as the batch `id`, already sent once (its answer did not come back).
    pub fn add_sent(&mut self, id: &str, rows: &MinuteRows) -> Result<u64, StoreError> {
        self.add(Some(id), rows)
    }

    /// Merges `rows` into the batch not sent yet (created when there is none). Returns the
    /// number of rows dropped because the spool is full.
    pub fn add_unsent(&mut self, rows: &MinuteRows) -> Result<u64, StoreError> {
        self.add(None, rows)
    }

    fn add(&mut self, sent_id: Option<&str>, rows: &MinuteRows) -> Result<u64, StoreError> {
        let full = self.row_count()? >= SPOOL_MAX_ROWS;
        if full {
            return Ok(rows.len() as u64);
        }
        let run = |c: &mut Connection| -> rusqlite::Result<()> {
            let tx = c.transaction()?;
            let id = match sent_id {
                Some(id) => {
                    tx.execute(
                        "INSERT INTO batches (id, sent) VALUES (?1, 1)
                         ON CONFLICT (id) DO UPDATE SET sent = 1",
                        [id],
                    )?;
                    id.to_string()
                }
                None => match tx
                    .query_row(
                        "SELECT id FROM batches WHERE sent = 0 ORDER BY seq DESC LIMIT 1",
                        [],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()?
                {
                    Some(id) => id,
                    None => {
                        let id = new_batch_id();
                        tx.execute("INSERT INTO batches (id, sent) VALUES (?1, 0)", [&id])?;
                        id
                    }
                },
            };
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO rows VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (batch_id, key_id, bucket_start) DO UPDATE SET
                        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                        completion_tokens = completion_tokens + excluded.completion_tokens,
                        requests = requests + excluded.requests,
                        estimated = estimated + excluded.estimated",
                )?;
                for ((key, start), t) in rows {
                    stmt.execute(params![
                        id,
                        &**key,
                        start,
                        to_i64(t.prompt_tokens),
                        to_i64(t.completion_tokens),
                        to_i64(t.requests),
                        to_i64(t.estimated)
                    ])?;
                }
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| self.err(e))?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(key: &str, start: i64, p: u64) -> MinuteRows {
        let mut m = MinuteRows::new();
        m.insert(
            (key.into(), start),
            UsageTotals {
                prompt_tokens: p,
                completion_tokens: 1,
                requests: 1,
                estimated: 0,
            },
        );
        m
    }

    #[test]
    fn sent_batches_keep_their_id_unsent_usage_merges_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let mut s = Spool::open(&path).unwrap();
        assert!(s.oldest_for_send().unwrap().is_none());
        s.add_sent("b1", &rows("k", 0, 5)).unwrap();
        s.add_unsent(&rows("k", 0, 7)).unwrap();
        s.add_unsent(&rows("k", 0, 11)).unwrap();
        s.add_unsent(&rows("j", 60_000, 1)).unwrap();
        assert_eq!(s.row_count().unwrap(), 3);
        drop(s);
        let mut s = Spool::open(&path).unwrap();
        let b = s.oldest_for_send().unwrap().unwrap();
        assert_eq!(b.id, "b1");
        assert_eq!(b.rows[&("k".into(), 0)].prompt_tokens, 5);
        // Not removed: still the oldest, same id, same rows.
        let again = s.oldest_for_send().unwrap().unwrap();
        assert_eq!(again.id, "b1");
        s.remove("b1").unwrap();
        let b = s.oldest_for_send().unwrap().unwrap();
        assert_ne!(b.id, "b1");
        assert_eq!(b.rows[&("k".into(), 0)].prompt_tokens, 18);
        assert_eq!(b.rows[&("k".into(), 0)].requests, 2);
        assert_eq!(b.rows[&("j".into(), 60_000)].prompt_tokens, 1);
        // Once sent, it takes no more merges: new usage opens a new batch.
        s.add_unsent(&rows("k", 0, 100)).unwrap();
        let still = s.oldest_for_send().unwrap().unwrap();
        assert_eq!(still.id, b.id);
        assert_eq!(still.rows[&("k".into(), 0)].prompt_tokens, 18);
        s.remove(&b.id).unwrap();
        let newer = s.oldest_for_send().unwrap().unwrap();
        assert_eq!(newer.rows[&("k".into(), 0)].prompt_tokens, 100);
        s.remove(&newer.id).unwrap();
        assert_eq!(s.row_count().unwrap(), 0);
    }
}
