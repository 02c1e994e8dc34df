//! API keys: who may call the gateway, and how much they have used.
//!
//! Owns "which principal does this bearer key belong to?" and the durable record behind it.
//! The daemon authenticates against an immutable [`KeyRing`] snapshot (no I/O, no lock held
//! while hashing); [`Keys::watch`] swaps in a new snapshot when the CLI commits a change. Never
//! logs, stores or returns a secret: only key ids and names appear in logs.
//!
//! Map:
//! - [`format`](mod@format): the `mg_…` key format (generate, parse, mask);
//! - [`store`]: [`KeyStore`], the rules of creating, rotating and revoking keys;
//! - [`ledger`]: the usage ledger (per key and minute) and its background writer;
//! - `backend`: the traits a store backend implements (key rows, usage rows, change stamp);
//! - `sqlite`: the SQLite backend (`keys.db`: schema, key rows, usage rows);
//! - `postgres`: the PostgreSQL backend (a store shared by several appliances);
//! - `secret`: the server secret (`keys.secret`) and the keyed hash;
//! - `ring`: the in-memory [`KeyRing`] and [`KeyRing::authenticate`];
//! - `watch`: [`Keys`], the daemon's live ring, and its watcher.

mod backend;
pub mod format;
pub mod ledger;
pub mod migrate;
pub mod postgres;
mod ring;
mod secret;
mod spool;
mod sqlite;
pub mod store;
mod types;
mod watch;

pub use format::{FormatError, Secret};
pub use postgres::PgStoreConfig;
pub use ring::{AuthError, KeyRing, RingCounts};
pub use secret::{ServerSecret, SECRET_FILE};
pub use sqlite::DB_FILE;
pub use store::{KeyStore, StoreConfig};
pub use types::{CreatedKey, KeyRecord, KeyStatus, NewKey, StoreError};
pub use watch::{Keys, WATCH_INTERVAL};
