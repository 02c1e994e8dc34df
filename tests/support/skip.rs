//! The one rule every test binary follows when a test cannot run here (each includes this file
//! with `#[path]`):
//!
//! - A **missing prerequisite** (root, a tool, the openai SDK…) fails the test under the test
//!   command — as root, or with `CI` set — because there it means a broken machine or image,
//!   and a test that passes without testing anything hides it. Elsewhere (a developer's
//!   non-root `cargo test`) the test is skipped.
//! - A skip the operator **asked for** (`MODELGATE_SKIP_BOOT=1`…) or one that protects the
//!   machine is never a failure.
//!
//! Every skip is visible: one `SKIPPED test: why` line on stderr (written to the handle, so
//! libtest's capture does not hide it) and, when `MODELGATE_SKIP_LOG` names a file, one line
//! appended to it; `scripts/test.sh` sets it and prints the list and the count at the end.

#![allow(dead_code)] // each binary uses the part it needs

use std::io::Write as _;

/// Under the test command: root, or `CI` set to anything but "", "0" or "false".
pub fn strict() -> bool {
    is_root() || ci()
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A prerequisite of `test` is missing (`why` says which, and the fix): panics under the test
/// command, records the skip elsewhere. Returns `false` (do not run), so a caller writes
/// `if !prereq_ok { return skip::missing(..) }` or uses it in a condition.
pub fn missing(test: &str, why: &str) -> bool {
    assert!(
        !strict(),
        "{test}: {why} — a missing prerequisite fails under the test command (root or CI set); \
         install it (scripts/test.sh does) instead of skipping"
    );
    record(test, why);
    false
}

/// `test` is skipped because the operator asked for it or to protect this machine: recorded,
/// never a failure.
pub fn skipped(test: &str, why: &str) {
    record(test, why);
}

fn record(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}");
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Some(path) = std::env::var_os("MODELGATE_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// True when the effective UID is 0. Read from `/proc` to keep the tests free of `unsafe`/libc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
