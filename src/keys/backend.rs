//! The boundary between the key store's rules and where its rows live.
//!
//! Owns the [`Backend`] traits and the row shapes every backend shares. A backend stores and
//! finds rows, atomically: key rows ([`KeyBackend`]) and usage rows ([`LedgerBackend`]) in one
//! database. It never decides a rule: names, ids, secrets, hashing, expiry and rotation grace
//! are decided in [`super::store::KeyStore`] and [`super::ledger::Ledger`], so every backend
//! applies the same ones. A backend never holds the server secret, and sees a new key only as its
//! id and hash. SQLite ([`super::sqlite`]) is the one backend today; another (PostgreSQL) is a
//! new sibling of it implementing these traits.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::format;
use super::secret::Minted;
use super::types::{Hashes, KeyRecord, MinuteRows, StoreError, UsageTotals};
use crate::policy::KeyPolicy;

/// A store backend: the key rows and the usage ledger of one database.
pub trait Backend: KeyBackend + LedgerBackend + Send + fmt::Debug {
    /// Names the store in messages (the SQLite file).
    fn location(&self) -> &Path;

    /// A stamp that moves whenever a key row changed (through any connection) since the last
    /// call, and only then: the keys generation, bumped by the database itself (triggers) at
    /// every change to the key rows; usage writes leave it alone. It never stays put across a
    /// key change.
    fn change_stamp(&self) -> Result<i64, StoreError>;

    /// Refuses a server secret other than the one the store was first used with (a shared
    /// store: every appliance must hash with the same `keys.secret`). `fingerprint` is a
    /// keyed digest of the secret, never the secret. A local store has nothing to compare.
    fn check_fingerprint(&mut self, _fingerprint: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether other appliances share this store (so it may be unreachable while this one
    /// serves, and usage is spooled locally meanwhile).
    fn is_shared(&self) -> bool {
        false
    }

    /// Records that appliance `id` is alive at `now_ms` and returns how many appliances were
    /// alive within the last `window_ms` (itself included). A local store has one.
    fn heartbeat(&mut self, _id: &str, _now_ms: i64, _window_ms: i64) -> Result<u32, StoreError> {
        Ok(1)
    }
}

/// A key row to insert (everything but the id and hash, which come from [`Minted`]).
#[derive(Debug)]
pub struct NewKeyRow<'a> {
    pub name: &'a str,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    /// The key's [`KeyPolicy`] as JSON.
    pub policy_json: &'a str,
}

/// What a rotation writes: the new hash and, during a grace period, the old one.
#[derive(Debug)]
pub struct Rotation {
    pub hash: [u8; 32],
    /// The hash the old secret still matches, and until when (both or neither).
    pub previous: Option<([u8; 32], SystemTime)>,
}

/// The key rows.
///
/// `name_or_id` finds the non-revoked key called that, else the non-revoked key with that id;
/// when there is none, the operation fails with [`StoreError::Revoked`] if some key has that
/// name or id and [`StoreError::NotFound`] otherwise. Every `&mut self` method is one
/// transaction.
pub trait KeyBackend {
    /// Inserts a key called `row.name`, with an id and hash from `mint` (called again for as
    /// long as its id is taken), unless a non-revoked key has that name
    /// ([`StoreError::NameExists`]). Returns the minted key that was stored.
    fn insert_key(
        &mut self,
        row: &NewKeyRow<'_>,
        mint: &mut dyn FnMut() -> Minted,
    ) -> Result<Minted, StoreError>;

    /// Every key, revoked ones included, oldest first (by creation time, then name, then id).
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// The key called `name_or_id` (the non-revoked one; else the most recently revoked one),
    /// else the key with that id.
    fn find_key(&self, name_or_id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// Revokes the key `name_or_id` at `at` (ending any rotation grace period) and returns it.
    fn revoke_key(&mut self, name_or_id: &str, at: SystemTime) -> Result<KeyRecord, StoreError>;

    /// Rotates the key `name_or_id` at `at`: `decide` sees the key as stored and returns the
    /// hashes to write (or an error, which leaves the key unchanged). Returns the key as it was
    /// before.
    fn rotate_key(
        &mut self,
        name_or_id: &str,
        at: SystemTime,
        decide: &mut dyn FnMut(&KeyRecord) -> Result<Rotation, StoreError>,
    ) -> Result<KeyRecord, StoreError>;
}

/// The usage rows: per key and bucket (`bucket_ms` wide, starting at `bucket_start`, both in
/// ms since the Unix epoch, UTC); see [`super::ledger`].
pub trait LedgerBackend {
    /// Readies the connection for the ledger's frequent small commits.
    fn prepare_ledger(&mut self) -> Result<(), StoreError>;

    /// Adds `rows` (minute rows, summed per key and minute) in one transaction.
    fn add_usage(&mut self, rows: &MinuteRows) -> Result<(), StoreError>;

    /// Adds `rows` as the batch `batch_id`, once: a batch already applied (its answer was lost,
    /// a spool replays it) is skipped. Returns whether it was written now. A local store
    /// commits or fails as a whole, so it needs no id.
    fn add_usage_batch(&mut self, _batch_id: &str, rows: &MinuteRows) -> Result<bool, StoreError> {
        self.add_usage(rows).map(|()| true)
    }

    /// `key_id`'s sums over the rows with `from <= bucket_start < to`.
    fn sum_usage(&self, key_id: &str, from: i64, to: i64) -> Result<UsageTotals, StoreError>;

    /// Tokens (prompt + completion) per key with rows in `month` (`[start, end)`), as
    /// `(key_id, tokens in day, tokens in month)`, ordered by key id.
    fn period_tokens(
        &self,
        day: (i64, i64),
        month: (i64, i64),
    ) -> Result<Vec<(String, u64, u64)>, StoreError>;

    /// Folds the minute rows starting in `[0, cutoff)` into one row per key and UTC day, in one
    /// transaction (sums unchanged). Returns the number of minute rows folded.
    fn compact_usage(&mut self, cutoff: i64) -> Result<usize, StoreError>;

    /// Number of usage rows.
    fn usage_row_count(&self) -> Result<u64, StoreError>;

    /// Renews and tops up this appliance's budget leases, one transaction for all of them
    /// (a shared store only; see [`super::ledger::LeaseAsk`]). Returns, per ask, the tokens
    /// granted in total and what the store had left after granting.
    fn lease_budgets(
        &mut self,
        _appliance: &str,
        _now_ms: i64,
        _expiry_ms: i64,
        _asks: &[super::ledger::LeaseAsk],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        Err(StoreError::StoreConfig {
            url: "the local store".into(),
            problem: "budget leases need a shared store".into(),
            fix: "set [store] url (PostgreSQL)".into(),
        })
    }
}

/// A key row as a backend reads it; [`KeyRow::into_record`] checks it. Times are ms since
/// the Unix epoch (UTC).
#[derive(Debug)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub rotated_at: Option<i64>,
    pub previous_valid_until: Option<i64>,
    pub policy: String,
    pub secret_hash: Vec<u8>,
    pub previous_hash: Option<Vec<u8>>,
}

impl KeyRow {
    /// The record, or [`StoreError::Corrupt`] naming `location` and what is wrong.
    pub fn into_record(self, location: &Path) -> Result<KeyRecord, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            path: location.to_path_buf(),
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

/// Milliseconds since the Unix epoch (negative before it), as stored.
pub fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Drops sub-millisecond precision so what callers get back equals what is stored.
pub fn truncate_ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
