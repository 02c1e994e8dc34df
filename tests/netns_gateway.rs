//! Root-only tests of the authenticated HTTPS gateway in network namespaces, with real clients:
//! the openai Python SDK and a Cursor-shaped request, in the topology of LAB.md
//! (`scripts/lab.sh`, shared with `tests/netns.rs` through `netns/lab.rs`):
//!
//! ```text
//! [client] 192.0.2.10  openai SDK → https://gw.test (/etc/netns/<client>/hosts → 192.0.2.1)
//!     │
//! [edge]   192.0.2.1   modelgate run: HTTPS :443 (self-signed gw.test) → key → policy → tunnel
//!     │
//! [corp]               wireguard-go from the exact `peer add` text (PostUp included)
//!     │
//! [model]  10.20.0.5   tests/netns/fake_vllm.py :8000, logs every request it receives
//! ```
//!
//! Run: `cargo test --test netns_gateway` as root. Without root, or without a Python that has
//! the `openai` package (env `MODELGATE_PYTHON`, default `.venv/bin/python` at the repo root, which
//! `scripts/test.sh` creates), every test prints SKIPPED and passes.

#[path = "netns/helper.rs"]
mod helper;
// Shared with tests/netns.rs; not every helper is used by both targets.
#[allow(dead_code)]
#[path = "netns/lab.rs"]
mod lab;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lab::{Appliance, Lab, Proc, EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT};
use serde_json::Value;

const GATEWAY_LISTEN: &str = "192.0.2.1:443";
const BASE_V1: &str = "https://gw.test/v1";
const MODEL: &str = "acme-coder";
const OTHER_MODEL: &str = "acme-small";
/// The shared fixture, beside the repository (`../shared`), as on every developer machine and in CI.
const CURSOR_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/cursor_requests.py"
);

/// Not a test: the entry point of the in-namespace helper (see `netns/helper.rs`).
#[test]
#[ignore = "not a test: the in-namespace helper's entry point, run by the lab with --ignored"]
fn netns_helper_entry() {
    helper::run_from_env();
}

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The interpreter with the openai SDK, or None after printing why the test is skipped.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    if lab::skip_unless_root(test) {
        return None;
    }
    let py = std::env::var_os("MODELGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_path(".venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIPPED {test}: no Python with the openai SDK at {} (set MODELGATE_PYTHON, or run \
             scripts/test.sh, which creates .venv with `pip install openai`)",
            py.display()
        );
        return None;
    }
    Some(py)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One lab with the whole chain up: fake vLLM, modelgate's HTTPS gateway with upstream `vllm`
/// (models discovered), corp wireguard-go. Fields drop in order: processes first, the lab last.
struct Gateway {
    mg: Proc,
    corp: Proc,
    _model: Proc,
    app: Appliance,
    py: PathBuf,
    model_log: PathBuf,
    lab: Lab,
}

impl Gateway {
    fn up(py: PathBuf, token_delay_ms: &str) -> Gateway {
        Gateway::up_with(py, token_delay_ms, &[])
    }

    /// [`Gateway::up`] with extra `upstream add` arguments (e.g. static `--model` routes).
    fn up_with(py: PathBuf, token_delay_ms: &str, upstream_args: &[&str]) -> Gateway {
        let lab = Lab::up();
        lab.add_host(&lab.client, EDGE_PUBLIC, "gw.test");
        let model_log = lab.dir.path().join("fake-vllm.jsonl");
        let model = lab.start_fake_vllm(
            &model_log,
            &[
                "--models",
                &format!("{MODEL},{OTHER_MODEL}"),
                "--token-delay-ms",
                token_delay_ms,
            ],
        );
        let app = Appliance::init_with(&lab, GATEWAY_LISTEN);
        let url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
        let mut add = vec!["upstream", "add", "vllm", "--url", &url];
        add.extend_from_slice(upstream_args);
        app.cli(&add);
        let mg = app.run_gateway(&lab);
        let corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &app.corp_conf, true);
        assert!(
            lab.wait_handshake(&lab.corp, &lab.wg_corp, 0, Duration::from_secs(10)),
            "corp wireguard-go did not complete a handshake with modelgate within 10 s"
        );
        let gw = Gateway {
            mg,
            corp,
            _model: model,
            app,
            py,
            model_log,
            lab,
        };
        gw.wait_models_discovered();
        gw
    }

    fn cert(&self) -> PathBuf {
        self.app.state.join("self-signed.crt")
    }

    /// `modelgate key create NAME --json ARGS…` → the secret.
    fn key(&self, name: &str, args: &[&str]) -> String {
        let mut a = vec!["key", "create", name, "--json"];
        a.extend_from_slice(args);
        let out: Value = serde_json::from_str(&self.app.cli(&a)).expect("key create --json");
        out["secret"].as_str().expect("secret").to_string()
    }

    /// Runs `openai_client.py --base BASE ARGS…` in the client namespace with `MG_KEY=key`;
    /// returns its JSON line (panics with its output when it fails).
    fn client(&self, key: &str, base: &str, args: &[&str]) -> Value {
        let script = manifest_path("tests/netns/openai_client.py");
        let cert = self.cert();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.client, "timeout", "90"])
            .arg(&self.py)
            .arg(script)
            .args(["--base", base, "--cert"])
            .arg(&cert)
            .args(args)
            .env("MG_KEY", key)
            .output()
            .expect("run openai_client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "openai_client.py {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    fn sdk(&self, key: &str, args: &[&str]) -> Value {
        self.client(key, BASE_V1, args)
    }

    /// Every record of the fake model's log.
    fn model_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.model_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Requests that reached the model other than the gateway's own model discovery.
    fn model_posts(&self) -> Vec<Value> {
        self.model_log()
            .into_iter()
            .filter(|r| r["ev"] == "request" && r["method"] == "POST")
            .collect()
    }

    /// The gateway learns models from the upstream's GET /v1/models once the tunnel is up
    /// (retrying every 2 s): wait (bounded) until a key sees them.
    fn wait_models_discovered(&self) {
        let key = self.key("discovery-probe", &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            last = self.sdk(&key, &["models"]);
            if last["models"].as_array().is_some_and(|m| !m.is_empty()) {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
        panic!("modelgate never listed the upstream's models within 20 s: {last}");
    }
}

/// Times (ms) of the chunks in a client result.
fn times(v: &Value) -> Vec<f64> {
    v["times_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// The openai SDK against the gateway: models.list() shows the upstream's models, a
/// non-streaming and a streaming chat complete (usage included), chunks arrive spread out, and
/// the model never sees the client's Authorization header.
#[test]
fn openai_sdk_chat_streaming_and_models() {
    let Some(py) = python_or_skip("openai_sdk_chat_streaming_and_models") else {
        return;
    };
    let gw = Gateway::up(py, "50");
    let key = gw.key("dev", &[]);

    let models = gw.sdk(&key, &["models"]);
    assert_eq!(models["models"], serde_json::json!([MODEL, OTHER_MODEL]));

    let plain = gw.sdk(&key, &["chat", "--model", MODEL, "--max-tokens", "3"]);
    assert_eq!(plain["content"], "tok tok tok", "{plain}");
    assert_eq!(plain["finish_reason"], "stop", "{plain}");
    assert_eq!(plain["usage"]["completion_tokens"], 3, "{plain}");

    let stream = gw.sdk(
        &key,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "6"],
    );
    assert_eq!(
        stream["content"], "tok0 tok1 tok2 tok3 tok4 tok5 ",
        "{stream}"
    );
    assert_eq!(stream["finish_reason"], "stop", "{stream}");
    assert_eq!(stream["usage"]["completion_tokens"], 6, "{stream}");
    // role + 6 content + finish + usage chunks, 50 ms apart on the model's side.
    let t = times(&stream);
    assert_eq!(t.len(), 9, "{stream}");
    assert!(
        t[t.len() - 1] - t[0] >= 200.0,
        "the stream arrived in one burst (buffered?): {t:?}"
    );
    eprintln!("SDK stream chunk times (ms): {t:?}");

    let posts = gw.model_posts();
    assert_eq!(posts.len(), 2, "{posts:?}");
    for p in &posts {
        assert_eq!(p["path"], "/v1/chat/completions", "{p}");
        assert_eq!(p["model"], MODEL, "{p}");
        assert_eq!(
            p["auth"], false,
            "the client's Authorization header reached the model: {p}"
        );
    }
    assert!(gw.mg.log().contains("request"), "no audit line");
}

/// A Cursor-shaped request (≈400 KB, tools, stream_options.include_usage) posted to
/// `/chat/completions` without `/v1`, exactly as the fixture prints it: it succeeds, streams
/// incrementally, and the model receives the whole body.
#[test]
fn cursor_shaped_request_streams_incrementally() {
    let Some(py) = python_or_skip("cursor_shaped_request_streams_incrementally") else {
        return;
    };
    if !Path::new(CURSOR_FIXTURE).exists() {
        eprintln!("SKIPPED cursor_shaped_request_streams_incrementally: {CURSOR_FIXTURE} missing");
        return;
    }
    // No max_tokens in Cursor's body: the fake model's default of 8 tokens, 100 ms apart.
    let gw = Gateway::up(py, "100");
    let key = gw.key("cursor", &[]);
    let key_created = Instant::now();
    let body_file = gw.lab.dir.path().join("cursor-chat.json");
    let out = lab::run_ok(Command::new("python3").args([CURSOR_FIXTURE, "chat"]));
    std::fs::write(&body_file, &out.stdout).unwrap();
    let size = out.stdout.len();
    assert!(size > 300_000, "fixture body is only {size} bytes");
    // Key changes reach the daemon within 1 s (DESIGN.md): allow 1.5 s.
    thread::sleep(Duration::from_millis(1500).saturating_sub(key_created.elapsed()));

    let r = gw.client(
        &key,
        "https://gw.test",
        &[
            "raw-post",
            "--path",
            "/chat/completions",
            "--body-file",
            body_file.to_str().unwrap(),
        ],
    );
    eprintln!("Cursor-shaped request: {r}");
    assert_eq!(r["status"], 200, "{r}");
    assert!(
        r["content_type"]
            .as_str()
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "{r}"
    );
    assert_eq!(r["done"], true, "no data: [DONE]: {r}");
    assert_eq!(r["usage"], true, "no usage chunk: {r}");
    let t = times(&r);
    // role + 8 content + finish + usage + [DONE]
    assert_eq!(t.len(), 12, "{r}");
    let (first, last) = (t[0], t[t.len() - 1]);
    assert!(
        last - first >= 500.0,
        "first event at {first} ms, last at {last} ms: the stream was not incremental"
    );

    let posts = gw.model_posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["path"], "/v1/chat/completions");
    // The whole body, with Cursor's `content: []` tool-call turns normalised (compat).
    let expected = modelgate::gateway::compat::translate(
        &out.stdout,
        &modelgate::config::CompatConfig::default(),
    )
    .unwrap()
    .map_or(size, |b| b.len());
    assert_eq!(
        posts[0]["body_bytes"].as_u64(),
        Some(expected as u64),
        "the model did not receive the full body: {}",
        posts[0]
    );
    assert_eq!(posts[0]["empty_content"], 0, "{}", posts[0]);
    assert_eq!(posts[0]["stream"], true);
    assert_eq!(posts[0]["auth"], false);
}

/// Wrong, revoked and expired keys, a model outside the key's list and an unknown model: each
/// surfaces as the SDK's typed exception with OpenAI's status and code, and none reaches the
/// model (its request log does not grow).
#[test]
fn refused_requests_never_reach_the_model() {
    let Some(py) = python_or_skip("refused_requests_never_reach_the_model") else {
        return;
    };
    let gw = Gateway::up(py, "0");
    let expiring = gw.key("expiring", &["--expires", "1s"]);
    let expiry_start = Instant::now();
    let good = gw.key("good", &[]);
    let revoked = gw.key("revoked", &[]);
    let small_only = gw.key("small-only", &["--models", OTHER_MODEL]);

    // The revoked key works until it is revoked.
    let ok = gw.sdk(&revoked, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");
    gw.app.cli(&["key", "revoke", "revoked", "--yes"]);

    let before = gw.model_posts().len();
    let refused = |key: &str, model: &str, class: &str, status: u64, code: &str| {
        let e = gw.sdk(key, &["error", "--model", model]);
        assert_eq!(e["class"], class, "{model}: {e}");
        assert_eq!(e["status"], status, "{e}");
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(
            gw.model_posts().len(),
            before,
            "a refused request ({class} {code}) reached the model"
        );
    };
    let wrong = "mg_this_is_not_a_key_0000000000000000";
    refused(wrong, MODEL, "AuthenticationError", 401, "invalid_api_key");
    // Key changes reach the daemon within 1 s (DESIGN.md): allow 1.5 s.
    thread::sleep(Duration::from_millis(1500));
    refused(
        &revoked,
        MODEL,
        "AuthenticationError",
        401,
        "invalid_api_key",
    );
    refused(
        &small_only,
        MODEL,
        "PermissionDeniedError",
        403,
        "permission_denied",
    );
    refused(
        &good,
        "no-such-model",
        "NotFoundError",
        404,
        "model_not_found",
    );
    let left = Duration::from_millis(2500).saturating_sub(expiry_start.elapsed());
    thread::sleep(left);
    refused(
        &expiring,
        MODEL,
        "AuthenticationError",
        401,
        "invalid_api_key",
    );

    // models.list() only shows the key's models; the allowed model works for that key.
    let listed = gw.sdk(&small_only, &["models"]);
    assert_eq!(listed["models"], serde_json::json!([OTHER_MODEL]));
    let ok = gw.sdk(&small_only, &["chat", "--model", OTHER_MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");
    assert_eq!(gw.model_posts().len(), before + 1);
    let e = gw.sdk(wrong, &["error", "--model", MODEL, "--op", "models"]);
    assert_eq!(e["class"], "AuthenticationError", "{e}");
}

/// A client that closes a stream mid-way: the gateway closes the upstream connection within 1 s
/// (the fake model sees EOF and records when).
#[test]
fn client_disconnect_closes_upstream_within_1s() {
    let Some(py) = python_or_skip("client_disconnect_closes_upstream_within_1s") else {
        return;
    };
    let gw = Gateway::up(py, "200");
    let key = gw.key("dev", &[]);
    let r = gw.sdk(
        &key,
        &[
            "disconnect",
            "--model",
            MODEL,
            "--after",
            "2",
            "--max-tokens",
            "100",
        ],
    );
    let closed_at = r["closed_at"].as_f64().expect("closed_at");
    let deadline = Instant::now() + Duration::from_secs(5);
    let disconnect = loop {
        let found = gw
            .model_log()
            .into_iter()
            .find(|e| e["ev"] == "disconnect" || e["ev"] == "done");
        if let Some(e) = found {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the model saw no disconnect within 5 s of the client leaving ({})",
            unix_now() - closed_at
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        disconnect["ev"], "disconnect",
        "the stream ran to its end: {disconnect}"
    );
    let lag = disconnect["t"].as_f64().unwrap() - closed_at;
    eprintln!(
        "client closed at {closed_at:.3}; model saw the disconnect {lag:.3} s later: {disconnect}"
    );
    assert!(
        lag < 1.0,
        "the upstream stayed open {lag:.3} s after the client left"
    );
    assert!(
        disconnect["sent"].as_u64().unwrap() < 10,
        "the model kept generating: {disconnect}"
    );
}

/// The corp peer goes away and the appliance restarts (so it has no session and has never
/// handshaken): a request gets 503 with Retry-After within 1 s, as the SDK's
/// InternalServerError, and not a hang or a 404.
fn assert_tunnel_down_answers_503(upstream_args: &[&str], test: &str) {
    let Some(py) = python_or_skip(test) else {
        return;
    };
    let mut gw = Gateway::up_with(py, "0", upstream_args);
    let key = gw.key("dev", &[]);
    let ok = gw.sdk(&key, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");

    gw.corp.stop();
    gw.mg.stop();
    gw.mg = gw.app.run_gateway(&gw.lab);
    let before = gw.model_posts().len();
    let e = gw.sdk(&key, &["error", "--model", MODEL]);
    eprintln!("tunnel down, fresh appliance ({upstream_args:?}): {e}");
    assert_eq!(e["status"], 503, "{e}");
    assert_eq!(e["class"], "InternalServerError", "{e}");
    assert_eq!(e["code"], "tunnel_unavailable", "{e}");
    assert!(
        e["retry_after"].as_str().is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    assert!(
        e["elapsed_ms"].as_f64().unwrap() < 1000.0,
        "the 503 took {} ms",
        e["elapsed_ms"]
    );
    assert_eq!(gw.model_posts().len(), before);
}

/// Tunnel down with a static model route (`upstream add --model`).
#[test]
fn tunnel_down_static_route_answers_503() {
    assert_tunnel_down_answers_503(&["--model", MODEL], "tunnel_down_static_route_answers_503");
}

/// Tunnel down with models discovered from the upstream (the documented default): a fresh
/// appliance has never reached the upstream, so it knows no models yet.
#[test]
fn tunnel_down_discovered_models_answer_503() {
    assert_tunnel_down_answers_503(&[], "tunnel_down_discovered_models_answer_503");
}
