//! The openai Python SDK as the lab's client: `tests/python/openai_client.py` run inside the
//! client namespace with the key in the environment (never argv), trusting only one CA file.
//! Each run prints one JSON line, which is what the tests assert on.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use super::lab::Lab;
use super::proc::{manifest_path, text, Proc};

/// `openai_client.py --base BASE --cert CERT …` in namespace `ns` with interpreter `py`.
pub struct Sdk {
    pub py: PathBuf,
    pub ns: String,
    pub cert: PathBuf,
}

impl Sdk {
    fn argv<'a>(&'a self, script: &'a str, base: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut argv = vec![
            self.py.to_str().unwrap(),
            script,
            "--base",
            base,
            "--cert",
            self.cert.to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        argv
    }

    /// One run (bounded: 90 s) with `MG_KEY=key`; its JSON line. Panics with its output when
    /// the script fails.
    pub fn run(&self, key: &str, base: &str, args: &[&str]) -> Value {
        let script = manifest_path("tests/python/openai_client.py");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", "90"])
            .args(self.argv(script.to_str().unwrap(), base, args))
            .env("MG_KEY", key)
            .output()
            .expect("run openai_client.py");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "openai_client.py {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            text(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    /// The same in the background (a stream held open meanwhile); [`Proc::last_json`] reads its
    /// result once it has exited.
    pub fn spawn(&self, lab: &Lab, name: &str, key: &str, base: &str, args: &[&str]) -> Proc {
        let script = manifest_path("tests/python/openai_client.py");
        lab.spawn(
            name,
            Some(&self.ns),
            &self.argv(script.to_str().unwrap(), base, args),
            &[("MG_KEY", key)],
        )
    }
}
