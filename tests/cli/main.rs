//! The `modelgate` binary's offline verbs end to end, each test on a temporary directory of
//! its own (`env::Env`): `init` and `peer …`, `key …` (the store the binary writes,
//! authenticated by the library's `KeyRing`, and a watching `Keys` seeing CLI changes within a
//! second), `upstream …`, and what an operator is told around a running daemon (`operator`:
//! reload, not restart; a config that is not TOML); exit codes 1/2/64, error lines that name
//! the fix, file modes, operator comments kept across edits. Needs no root and no network.

mod env;

mod keys;
mod operator;
mod peers;
#[path = "../support/skip.rs"]
mod skip;
mod upstreams;
