//! Property tests (proptest, stable Rust) of the parts that take input from outside: the
//! config parser and validator (`config`), the API key parser (`keys`), the SSE meter
//! (`meter`) and WireGuard ingress (`tunnel`). Only public APIs are used.
//!
//! Each property runs `PROPTEST_CASES` cases (default [`DEFAULT_CASES`], a few seconds for the
//! whole binary); `scripts/proptest-long.sh` runs many more. Failures are printed with the
//! shrunk input; nothing is written to the repository.

mod config;
mod keys;
mod meter;
mod tunnel;

/// Cases per property in the suite.
pub const DEFAULT_CASES: u32 = 64;

/// The config of every property: `PROPTEST_CASES` (or [`DEFAULT_CASES`]) cases, no
/// regression files.
pub fn cases() -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}
