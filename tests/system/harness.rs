//! The system tests' one harness: the binary cargo built, the repository's scripts, commands run
//! to completion, the decision whether a root-only test runs here (by the rule of every test
//! binary, `tests/support/skip.rs`: a missing prerequisite fails under the test command and is
//! a recorded skip elsewhere; a skip the operator asked for is recorded), and the `.deb` built
//! from the debug binary. It changes
//! nothing on the machine itself; the tests that install a package say so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

#[path = "../support/skip.rs"]
mod skip;
pub use skip::{is_root, missing, skipped as skip};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_modelgate")
}

/// `rel` inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a root test that builds the `.deb` runs: `false` (recorded) with `skip_var=1` or
/// `MODELGATE_SKIP_DEB=1`; without root or off Debian a missing prerequisite (see
/// `tests/support/skip.rs`); as root a missing cargo-deb fails the test unless
/// `MODELGATE_SKIP_DEB=1` says to go without it.
pub fn deb_test_runs(test: &str, skip_var: Option<&str>) -> bool {
    if !is_root() {
        return missing(
            test,
            "it needs root (dpkg, systemd-nspawn); CI runs it as root",
        );
    }
    if let Some(var) = skip_var.filter(|v| std::env::var(v).as_deref() == Ok("1")) {
        skip(test, &format!("{var}=1"));
        return false;
    }
    if !have("dpkg") {
        return missing(test, "not a Debian system (no dpkg)");
    }
    if !have("cargo-deb") {
        if std::env::var("MODELGATE_SKIP_DEB").as_deref() == Ok("1") {
            skip(test, "MODELGATE_SKIP_DEB is set");
            return false;
        }
        panic!(
            "{test}: cargo-deb is not installed; fix: cargo install cargo-deb --locked \
             (scripts/test.sh does), or set MODELGATE_SKIP_DEB=1"
        );
    }
    true
}

/// `scripts/build-deb.sh` stages into the fixed `target/deb-stage`: one build at a time.
static DEB_BUILD: Mutex<()> = Mutex::new(());

/// Builds the `.deb` from the debug binary into `out` (`--fast`; `version` as its Debian
/// version when given) and returns its path.
pub fn build_deb(out: &Path, version: Option<&str>) -> PathBuf {
    let _one_at_a_time = DEB_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("bash");
    cmd.arg(repo("scripts/build-deb.sh"))
        .args(["--binary", bin(), "--fast", "--out"])
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--deb-version", v]);
    }
    run_ok(&mut cmd);
    std::fs::read_dir(out)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("build-deb.sh wrote a .deb")
}
