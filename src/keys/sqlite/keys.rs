//! The `keys` table: [`KeyBackend`] for SQLite.
//!
//! Owns the SQL of key rows. Every change is one [`SqliteBackend::write_tx`] that finds, checks
//! and writes under the write lock, so two CLIs racing on one name cannot both win. Never
//! decides a rule: names, secrets, hashes and expiry come from [`crate::keys::store`].

use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension};

use super::{SqliteBackend, TxError};
use crate::keys::backend::{to_ms, KeyBackend, KeyRow, NewKeyRow, Rotation};
use crate::keys::secret::Minted;
use crate::keys::types::{KeyRecord, StoreError};

const SELECT: &str = "SELECT id, name, created_at, expires_at, revoked_at, rotated_at,
    previous_valid_until, policy, secret_hash, previous_hash FROM keys";

impl KeyBackend for SqliteBackend {
    fn insert_key(
        &mut self,
        row: &NewKeyRow<'_>,
        mint: &mut dyn FnMut() -> Minted,
    ) -> Result<Minted, StoreError> {
        self.write_tx(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1 AND revoked_at IS NULL)",
                [row.name],
                |r| r.get(0),
            )?;
            if exists {
                return Err(StoreError::NameExists(row.name.to_string()).into());
            }
            // 36^12 ids make a collision absurdly unlikely; still, never overwrite one.
            let minted = loop {
                let m = mint();
                let taken: bool = tx.query_row(
                    "SELECT EXISTS(SELECT 1 FROM keys WHERE id = ?1)",
                    [m.id()],
                    |r| r.get(0),
                )?;
                if !taken {
                    break m;
                }
            };
            tx.execute(
                "INSERT INTO keys (id, name, created_at, expires_at, policy, secret_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    minted.id(),
                    row.name,
                    to_ms(row.created_at),
                    row.expires_at.map(to_ms),
                    row.policy_json,
                    &minted.hash()[..]
                ],
            )?;
            Ok(minted)
        })
    }

    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("{SELECT} ORDER BY created_at, name, id"))?;
            let mut out = Vec::new();
            for r in stmt.query_map([], read_row)? {
                out.push(r?.into_record(&self.path)?);
            }
            Ok(out)
        })
    }

    fn find_key(&self, name_or_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = self.read(|c| {
            Ok(c.query_row(
                &format!(
                    "{SELECT} WHERE name = ?1 OR id = ?1
                     ORDER BY name = ?1 DESC, revoked_at IS NULL DESC, revoked_at DESC LIMIT 1"
                ),
                [name_or_id],
                read_row,
            )
            .optional()?)
        })?;
        row.map(|r| r.into_record(&self.path)).transpose()
    }

    fn revoke_key(&mut self, name_or_id: &str, at: SystemTime) -> Result<KeyRecord, StoreError> {
        let row = self.write_tx(|tx| {
            let id = active_id(tx, name_or_id)?;
            tx.execute(
                // Later than every earlier revocation of a key of the same name, even within
                // one millisecond: `find_key` shows the most recently revoked one.
                "UPDATE keys SET revoked_at = MAX(?2, COALESCE(
                     (SELECT MAX(k.revoked_at) + 1 FROM keys k WHERE k.name = keys.name), 0)),
                   previous_hash = NULL, previous_valid_until = NULL
                 WHERE id = ?1",
                params![id, to_ms(at)],
            )?;
            Ok(tx.query_row(&format!("{SELECT} WHERE id = ?1"), [&id], read_row)?)
        })?;
        row.into_record(&self.path)
    }

    fn rotate_key(
        &mut self,
        name_or_id: &str,
        at: SystemTime,
        decide: &mut dyn FnMut(&KeyRecord) -> Result<Rotation, StoreError>,
    ) -> Result<KeyRecord, StoreError> {
        let path = self.path.clone();
        self.write_tx(|tx| {
            let id = active_id(tx, name_or_id)?;
            let rec = tx
                .query_row(&format!("{SELECT} WHERE id = ?1"), [&id], read_row)?
                .into_record(&path)?;
            let r = decide(&rec)?;
            tx.execute(
                "UPDATE keys SET secret_hash = ?2, previous_hash = ?3, previous_valid_until = ?4,
                                 rotated_at = ?5
                 WHERE id = ?1",
                params![
                    rec.id,
                    &r.hash[..],
                    r.previous.as_ref().map(|(h, _)| &h[..]),
                    r.previous.map(|(_, until)| to_ms(until)),
                    to_ms(at)
                ],
            )?;
            Ok(rec)
        })
    }
}

impl SqliteBackend {
    /// Every key row as stored (for `store migrate`).
    pub(crate) fn raw_key_rows(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("{SELECT} ORDER BY created_at, name, id"))?;
            let rows = stmt.query_map([], read_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
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

/// The id of the non-revoked key named `name`, else of the non-revoked key with id `name`;
/// when there is none, [`StoreError::Revoked`] if some key has that name or id, else
/// [`StoreError::NotFound`].
fn active_id(conn: &Connection, name: &str) -> Result<String, TxError> {
    let id = conn
        .query_row(
            "SELECT id FROM keys WHERE (name = ?1 OR id = ?1) AND revoked_at IS NULL
             ORDER BY name = ?1 DESC LIMIT 1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = id {
        return Ok(id);
    }
    let revoked: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM keys WHERE name = ?1 OR id = ?1)",
        [name],
        |r| r.get(0),
    )?;
    Err(if revoked {
        StoreError::Revoked(name.to_string())
    } else {
        StoreError::NotFound(name.to_string())
    }
    .into())
}
