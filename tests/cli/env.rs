//! The CLI tests' one environment: the `modelgate` binary run on a temporary directory, with the
//! config at `DIR/etc/modelgate.toml`, the state dir at `DIR/state`, `DIR` as working directory,
//! no stdin and no log filters from the caller's environment. It never touches anything outside
//! that directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use modelgate::keys::{KeyRing, KeyStore};
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

    /// `modelgate init --public-endpoint ENDPOINT` done.
    pub fn initialised(endpoint: &str) -> Env {
        let env = Env::new();
        env.init(endpoint);
        env
    }

    /// [`Env::initialised`] plus one corp peer routing 10.20.0.0/24 and an operator comment.
    pub fn with_corp_peer() -> Env {
        let env = Env::initialised("gw.example.com:51820");
        env.ok(&["peer", "add", "corp", "--allowed-ips", "10.20.0.0/24"]);
        let mut text = env.text();
        text.push_str("\n# operator note: ticket OPS-42\n");
        fs::write(env.config(), text).unwrap();
        env
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("etc/modelgate.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The config file's text.
    pub fn text(&self) -> String {
        fs::read_to_string(self.config()).unwrap()
    }

    /// `init --public-endpoint ENDPOINT --state-dir DIR/state --json`, which must succeed.
    pub fn init(&self, endpoint: &str) -> Output {
        let state = self.state();
        let out = self.mg(&[
            "init",
            "--public-endpoint",
            endpoint,
            "--state-dir",
            state.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        out
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

    /// Runs a command that must exit with `exit` and say each of `needles` on stderr; returns
    /// stderr.
    pub fn fails(&self, args: &[&str], exit: i32, needles: &[&str]) -> String {
        let out = self.mg(args);
        let err = stderr(&out);
        assert_eq!(code(&out), exit, "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
        err
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// The gateway's key ring, loaded from the store the CLI wrote.
    pub fn ring(&self) -> KeyRing {
        let config = modelgate::config::Config::load(&self.config()).unwrap();
        KeyRing::load(&KeyStore::open(&self.state()).unwrap(), &config.policies).unwrap()
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
