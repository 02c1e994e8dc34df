//! Shared harness for the tests that run the `modelgate` binary on a temporary directory:
//! the config lives at `DIR/etc/modelgate.toml`, the state dir at `DIR/state`, commands run with
//! `DIR` as working directory, no stdin and no log filters from the caller's environment.
#![allow(dead_code)] // each test crate uses a different part of it

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// An empty directory: no config yet.
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("etc/modelgate.toml")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn mg(&self, args: &[&str]) -> Output {
        self.mg_env(args, &[])
    }
    pub fn mg_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("MODELGATE_CONFIG", self.config())
            .env_remove("MODELGATE_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.mg(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        stdout(&out)
    }
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}
