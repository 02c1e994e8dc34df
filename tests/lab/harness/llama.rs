//! llama.cpp's own `llama-server` (the OpenAI-compatible server many on-prem users run) as a
//! model replica in the lab: the binary `scripts/llama-server.sh` built and cached, the tiny
//! model `tests/fixtures/tiny_model.py` writes into the test's temp dir, one server process per
//! replica inside a namespace, and the number of generation requests it processed, read from its
//! own log (one `launch_slot_ … processing task` line per request).
//!
//! Never builds: a missing binary fails the test (as root) with the fix (`bash
//! scripts/llama-server.sh`). Servers are stopped by PID ([`Proc`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::lab::Lab;
use super::proc::{manifest_path, text, Proc};

/// The model id every server answers with (`-a`), so discovery finds it by this name.
pub const MODEL_ID: &str = "tiny-llama";

/// `scripts/llama-server.sh FLAG`'s answer (the binary, or the venv's python with `gguf`).
fn from_build_script(flag: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(manifest_path("scripts/llama-server.sh"))
        .arg(flag)
        .output()
        .expect("run scripts/llama-server.sh");
    assert!(
        out.status.success(),
        "llama-server is not built ({}); fix: run `bash scripts/llama-server.sh` once (it builds and caches it, ~10 min on 2 cores)",
        text(&out.stderr).trim()
    );
    PathBuf::from(text(&out.stdout).trim().lines().last().unwrap_or_default())
}

/// The cached `llama-server` binary.
pub fn binary() -> PathBuf {
    from_build_script("--print-path")
}

/// Writes the tiny model (context `ctx` tokens) to `dir/tiny.gguf` with our own generator.
pub fn tiny_model(dir: &Path, ctx: u32) -> PathBuf {
    let py = from_build_script("--python");
    let out = dir.join("tiny.gguf");
    let r = Command::new(py)
        .arg(manifest_path("tests/fixtures/tiny_model.py"))
        .arg(&out)
        .args(["--context-length", &ctx.to_string()])
        .output()
        .expect("run tiny_model.py");
    assert!(
        r.status.success(),
        "tiny_model.py failed: {}",
        text(&r.stderr)
    );
    out
}

/// One running llama-server.
pub struct LlamaServer {
    pub proc: Proc,
    pub addr: String,
    pub port: u16,
}

impl LlamaServer {
    /// Starts `bin -m model` on `addr:port` inside `ns` with one slot (`-np 1`) of `ctx` tokens,
    /// one thread, and the host-memory prompt cache off (`--cache-ram 0`), so its prefix cache
    /// holds exactly the last prompt it served; waits (bounded: 15 s) until it listens.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        lab: &Lab,
        name: &str,
        ns: &str,
        bin: &Path,
        model: &Path,
        addr: &str,
        port: u16,
        ctx: u32,
    ) -> LlamaServer {
        let (port_s, ctx_s) = (port.to_string(), ctx.to_string());
        let mut proc = lab.spawn(
            name,
            Some(ns),
            &[
                bin.to_str().unwrap(),
                "-m",
                model.to_str().unwrap(),
                "--host",
                addr,
                "--port",
                &port_s,
                "-c",
                &ctx_s,
                "-np",
                "1",
                "-t",
                "1",
                "-a",
                MODEL_ID,
                "--cache-ram",
                "0",
            ],
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !proc.log().contains("listening on") {
            assert!(proc.is_running(), "{name} exited at start:\n{}", proc.log());
            assert!(
                Instant::now() < deadline,
                "{name} did not listen within 15 s:\n{}",
                proc.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        LlamaServer {
            proc,
            addr: addr.to_string(),
            port,
        }
    }

    /// Generation requests it has processed (its own log).
    pub fn processed(&self) -> usize {
        self.proc.log().matches("processing task").count()
    }

    /// `http://ADDR:PORT`, as `upstream add --url` takes it.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.addr, self.port)
    }
}
