//! The model side of the lab: `tests/python/model_server.py` (plain HTTP for the tunnel tests)
//! and `tests/python/fake_vllm.py` (a vLLM-like OpenAI server that logs every request it
//! receives), both on 10.20.0.5:8000 in the model namespace, and the fake model's own log, which
//! is how a test proves a refused request never reached the model.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::lab::{Lab, MODEL_ADDR, MODEL_PORT};
use super::proc::{manifest_path, Proc};

impl Lab {
    /// Starts `model_server.py` and waits until it listens.
    pub fn start_model_server(&self) -> Proc {
        let script = manifest_path("tests/python/model_server.py");
        let port = MODEL_PORT.to_string();
        let p = self.spawn(
            "model-server",
            Some(&self.model),
            &["python3", "-u", script.to_str().unwrap(), MODEL_ADDR, &port],
            &[],
        );
        self.wait_model_listen(p)
    }

    /// Starts `fake_vllm.py`, logging requests to `log` (JSON lines), with extra arguments
    /// `args`; waits until it listens.
    pub fn start_fake_vllm(&self, log: &Path, args: &[&str]) -> Proc {
        let script = manifest_path("tests/python/fake_vllm.py");
        let port = MODEL_PORT.to_string();
        let mut cmd = vec![
            "python3",
            "-u",
            script.to_str().unwrap(),
            MODEL_ADDR,
            &port,
            "--log",
            log.to_str().unwrap(),
        ];
        cmd.extend_from_slice(args);
        let p = self.spawn("fake-vllm", Some(&self.model), &cmd, &[]);
        self.wait_model_listen(p)
    }

    fn wait_model_listen(&self, p: Proc) -> Proc {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{MODEL_PORT}");
        while Instant::now() < deadline {
            let out = self.exec(&self.model, &["ss", "-Htln", &filter]);
            if !out.stdout.is_empty() {
                return p;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not listen within 10 s:\n{}", p.name, p.log());
    }
}

/// The JSON-lines request log of `fake_vllm.py`.
pub struct ModelLog(pub PathBuf);

impl ModelLog {
    /// Every record so far.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Requests that reached the model other than the gateway's own model discovery.
    pub fn posts(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["ev"] == "request" && r["method"] == "POST")
            .collect()
    }

    /// Waits (bounded: 5 s) for the first record after the request of `id` (`done` or
    /// `disconnect`): how the model saw its stream end.
    pub fn stream_end(&self, id: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(end) = self
                .records()
                .into_iter()
                .find(|e| e["id"] == *id && e["ev"] != "request")
            {
                return end;
            }
            assert!(
                Instant::now() < deadline,
                "the model never saw the stream of request {id} end"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}
