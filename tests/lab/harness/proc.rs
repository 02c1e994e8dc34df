//! Processes a lab test starts: each is a [`Proc`], stopped by its own PID when dropped (SIGTERM,
//! bounded wait, SIGKILL) and reaped; its stdout and stderr go to a log file whose tail is
//! printed when the test is failing. Nothing here ever kills by name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `rel` inside the repository (scripts, the Python helpers).
pub fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The `modelgate` binary cargo built for the tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_modelgate"))
}

/// Lossy UTF-8 of a command's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command to completion and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `modelgate --config CFG ARGS…` to completion, whatever its exit status.
pub fn modelgate(cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run modelgate")
}

/// `modelgate --config CFG status --json`, which must succeed.
pub fn status_json(cfg: &Path) -> serde_json::Value {
    let out = modelgate(cfg, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

/// Runs `cmd` inside namespace `ns` to completion (does not check the exit status).
pub fn exec(ns: &str, cmd: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {cmd:?}: {e}"))
}

/// Runs `cmd` inside `ns` and panics when it fails; returns stdout.
pub fn exec_ok(ns: &str, cmd: &[&str]) -> String {
    text(&run_ok(Command::new("ip").args(["netns", "exec", ns]).args(cmd)).stdout)
}

/// Starts `cmd` inside `ns` (or the test's own namespace for `None`), logging to `dir/NAME.log`.
/// `ip netns exec` execs the command in place, so the child's PID is the program's.
pub fn spawn(
    dir: &Path,
    name: &str,
    ns: Option<&str>,
    cmd: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let out = fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(cmd);
            c
        }
        None => {
            let mut c = Command::new(cmd[0]);
            c.args(&cmd[1..]);
            c
        }
    };
    c.envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = c
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
    Proc {
        name: name.to_string(),
        child: Some(child),
        log,
    }
}

/// A process started by a test, stopped by PID when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by PID (no chance to clean up, like a crash or `kill -9`) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM by PID, wait up to 5 s, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Waits (bounded) for the process to exit by itself; returns how it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("{} was already stopped", self.name));
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {limit:?}:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last JSON line the process printed (the Python clients end with one).
    pub fn last_json(&self) -> serde_json::Value {
        let log = self.log();
        log.lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{} printed no JSON line:\n{log}", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// `kill -SIG PID` (a daemon's PID from its own status), which must succeed.
pub fn signal(pid: u64, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Polls `ok` every 100 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {timeout:?}");
}
