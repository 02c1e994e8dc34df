//! The whole chain in one lab, as the gateway, control and doctor tests use it:
//!
//! ```text
//! [client] 192.0.2.10  curl, the openai SDK → https://gw.test (lab.sh hosts: → 192.0.2.1)
//!     │
//! [edge]   192.0.2.1   modelgate run: HTTPS :443 → key → policy → upstream `vllm` → tunnel
//!     │
//! [corp]               wireguard-go from the exact `peer add` text (PostUp included)
//!     │
//! [model]  10.20.0.5   tests/python/fake_vllm.py :8000, logging every request it receives
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::curl;
use super::lab::{Appliance, Lab, EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT};
use super::model::ModelLog;
use super::proc::Proc;
use super::sdk::Sdk;

pub const GATEWAY_LISTEN: &str = "192.0.2.1:443";
/// The gateway's public name: its self-signed certificate's, resolving to the edge.
pub const NAME: &str = "gw.test";
pub const MODEL: &str = "acme-coder";
pub const OTHER_MODEL: &str = "acme-small";

/// How a [`Chain`] differs from the default one.
pub struct Spec<'a> {
    /// The fake model's `--token-delay-ms` (`None`: its default, 20 ms).
    pub token_delay_ms: Option<&'a str>,
    /// `modelgate init`'s TLS options.
    pub tls: &'a [&'a str],
    /// Extra `upstream add vllm` arguments (e.g. a static `--model` route).
    pub upstream_args: &'a [&'a str],
    /// TOML appended to the config before the daemon starts.
    pub extra_config: &'a str,
}

impl Default for Spec<'static> {
    fn default() -> Self {
        Spec {
            token_delay_ms: None,
            tls: &["--self-signed", NAME],
            upstream_args: &[],
            extra_config: "",
        }
    }
}

/// A key made with `key create --json`.
pub struct Key {
    pub id: String,
    pub secret: String,
}

/// Fields drop in order: processes first, the lab last.
pub struct Chain {
    pub mg: Proc,
    pub corp: Proc,
    pub model: Proc,
    pub app: Appliance,
    pub model_log: ModelLog,
    pub lab: Lab,
}

impl Chain {
    /// Everything up and the corp peer handshaken. Models are discovered through the tunnel a
    /// little later: see [`Chain::wait_upstream`].
    pub fn up(spec: Spec) -> Chain {
        let lab = Lab::up();
        lab.add_host(&lab.client, EDGE_PUBLIC, NAME);
        lab.add_host(&lab.edge, EDGE_PUBLIC, NAME);
        let model_log = lab.dir.path().join("fake-vllm.jsonl");
        let models = format!("{MODEL},{OTHER_MODEL}");
        let mut args = vec!["--models", &models];
        if let Some(delay) = spec.token_delay_ms {
            args.extend(["--token-delay-ms", delay]);
        }
        let model = lab.start_fake_vllm(&model_log, &args);
        let app = Appliance::init_tls(&lab, GATEWAY_LISTEN, spec.tls);
        let url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
        let mut add = vec!["upstream", "add", "vllm", "--url", &url];
        add.extend_from_slice(spec.upstream_args);
        app.cli(&add);
        if !spec.extra_config.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&app.cfg)
                .unwrap();
            writeln!(f, "\n{}", spec.extra_config).unwrap();
        }
        let mg = app.run_gateway(&lab);
        let corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &app.corp_conf, true);
        lab.assert_corp_handshake();
        Chain {
            mg,
            corp,
            model,
            app,
            model_log: ModelLog(model_log),
            lab,
        }
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.app.status()
    }

    /// The self-signed certificate clients trust.
    pub fn cert(&self) -> PathBuf {
        self.app.state.join("self-signed.crt")
    }

    /// The openai SDK in the client namespace with interpreter `py`, trusting [`Chain::cert`].
    pub fn sdk(&self, py: PathBuf) -> Sdk {
        Sdk {
            py,
            ns: self.lab.client.clone(),
            cert: self.cert(),
        }
    }

    /// Waits (bounded: 20 s) until `status` shows upstream `name` reachable with models, or
    /// (`reachable` false) unreachable.
    pub fn wait_upstream(&self, name: &str, reachable: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            let done = s["upstreams"]
                .as_array()
                .and_then(|us| us.iter().find(|u| u["name"] == name))
                .is_some_and(|u| {
                    if reachable {
                        u["reachable"] == true
                            && u["models"].as_array().is_some_and(|m| !m.is_empty())
                    } else {
                        u["reachable"] == false
                    }
                });
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "upstream {name} never became reachable={reachable}: {s}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `modelgate key create NAME --json ARGS…`. Not usable at once: see [`Chain::keys_settle`].
    pub fn key(&self, name: &str, args: &[&str]) -> Key {
        let mut a = vec!["key", "create", name, "--json"];
        a.extend_from_slice(args);
        let out: Value = serde_json::from_str(&self.app.cli(&a)).expect("key create --json");
        Key {
            id: out["id"].as_str().expect("id").to_string(),
            secret: out["secret"].as_str().expect("secret").to_string(),
        }
    }

    /// Waits for keys created or revoked just now to reach the daemon: within 1 s by contract,
    /// 1.5 s here. A request sent sooner may get 401 (seen in CI).
    pub fn keys_settle(&self) {
        thread::sleep(Duration::from_millis(1500));
    }

    /// One non-streaming chat completion of `max_tokens` with curl from the client namespace.
    pub fn curl_chat(&self, secret: &str, model: &str, max_tokens: u32) -> curl::Response {
        curl::post(
            &self.lab,
            &self.cert(),
            secret,
            &format!("https://{NAME}/v1/chat/completions"),
            &chat_body(model, max_tokens),
        )
    }
}

/// A one-message chat request body.
pub fn chat_body(model: &str, max_tokens: u32) -> String {
    serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}]
    })
    .to_string()
}
