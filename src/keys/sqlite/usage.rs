//! The `usage` table: [`LedgerBackend`] for SQLite.
//!
//! Owns the SQL of usage rows: one upsert per (key, minute) row in a batch, range sums, and the
//! compaction of minute rows into day rows. Never decides when to write or compact (that is
//! [`crate::keys::ledger`]'s) and never stores anything but key ids and counts.

use rusqlite::params;

use super::{SqliteBackend, TxError};
use crate::keys::backend::LedgerBackend;
use crate::keys::types::{MinuteRows, StoreError, UsageTotals, DAY_MS, MINUTE_MS};

const UPSERT: &str = "INSERT INTO usage
        (key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens, requests, estimated)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (key_id, bucket_start, bucket_ms) DO UPDATE SET
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        requests = requests + excluded.requests,
        estimated = estimated + excluded.estimated";

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count: never negative, whatever the file says.
fn count(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

/// One stored usage row: key, bucket start, bucket width, sums.
pub(crate) type UsageRow = (String, i64, i64, UsageTotals);

impl SqliteBackend {
    /// Every usage row as stored (for `store migrate`).
    pub(crate) fn raw_usage_rows(&self) -> Result<Vec<UsageRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens,
                        requests, estimated FROM usage ORDER BY key_id, bucket_ms, bucket_start",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    UsageTotals {
                        prompt_tokens: count(r, 3)?,
                        completion_tokens: count(r, 4)?,
                        requests: count(r, 5)?,
                        estimated: count(r, 6)?,
                    },
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}

impl LedgerBackend for SqliteBackend {
    /// `synchronous=NORMAL`: in WAL mode a commit then survives a process crash (not
    /// necessarily a power loss) without an fsync per batch.
    fn prepare_ledger(&mut self) -> Result<(), StoreError> {
        self.read(|c| Ok(c.pragma_update(None, "synchronous", "NORMAL")?))
    }

    fn add_usage(&mut self, rows: &MinuteRows) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            let mut stmt = tx.prepare_cached(UPSERT)?;
            for ((key, start), t) in rows {
                stmt.execute(params![
                    &**key,
                    start,
                    MINUTE_MS,
                    to_i64(t.prompt_tokens),
                    to_i64(t.completion_tokens),
                    to_i64(t.requests),
                    to_i64(t.estimated)
                ])?;
            }
            Ok(())
        })
    }

    fn sum_usage(&self, key_id: &str, from: i64, to: i64) -> Result<UsageTotals, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
                        COALESCE(SUM(requests), 0), COALESCE(SUM(estimated), 0)
                 FROM usage WHERE key_id = ?1 AND bucket_start >= ?2 AND bucket_start < ?3",
            )?;
            Ok(stmt.query_row(params![key_id, from, to], |r| {
                Ok(UsageTotals {
                    prompt_tokens: count(r, 0)?,
                    completion_tokens: count(r, 1)?,
                    requests: count(r, 2)?,
                    estimated: count(r, 3)?,
                })
            })?)
        })
    }

    fn period_tokens(
        &self,
        (d0, d1): (i64, i64),
        (m0, m1): (i64, i64),
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT key_id,
                    COALESCE(SUM(CASE WHEN bucket_start >= ?1 AND bucket_start < ?2
                                 THEN prompt_tokens + completion_tokens ELSE 0 END), 0),
                    COALESCE(SUM(prompt_tokens + completion_tokens), 0)
                 FROM usage WHERE bucket_start >= ?3 AND bucket_start < ?4
                 GROUP BY key_id ORDER BY key_id",
            )?;
            let rows = stmt.query_map(params![d0, d1, m0, m1], |r| {
                Ok((r.get::<_, String>(0)?, count(r, 1)?, count(r, 2)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn compact_usage(&mut self, cutoff: i64) -> Result<usize, StoreError> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO usage
                    (key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens, requests,
                     estimated)
                 SELECT key_id, (bucket_start / ?2) * ?2, ?2, SUM(prompt_tokens),
                        SUM(completion_tokens), SUM(requests), SUM(estimated)
                 FROM usage WHERE bucket_ms = ?3 AND bucket_start >= 0 AND bucket_start < ?1
                 GROUP BY key_id, bucket_start / ?2
                 ON CONFLICT (key_id, bucket_start, bucket_ms) DO UPDATE SET
                    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = completion_tokens + excluded.completion_tokens,
                    requests = requests + excluded.requests,
                    estimated = estimated + excluded.estimated",
                params![cutoff, DAY_MS, MINUTE_MS],
            )?;
            let folded = tx.execute(
                "DELETE FROM usage WHERE bucket_ms = ?2 AND bucket_start >= 0 AND bucket_start < ?1",
                params![cutoff, MINUTE_MS],
            )?;
            Ok::<_, TxError>(folded)
        })
    }

    fn usage_row_count(&self) -> Result<u64, StoreError> {
        self.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM usage", [], |r| count(r, 0))?))
    }
}
