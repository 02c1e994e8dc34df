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
#[path = "common/sdk.rs"]
mod sdk;
use sdk::manifest_path;
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

/// The interpreter with the openai SDK, or None after printing why the test is skipped.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    if lab::skip_unless_root(test) {
        return None;
    }
    sdk::sdk_python_or_skip(test)
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

    /// Waits for keys created just now to reach the daemon: within 1 s by contract (DESIGN.md),
    /// 1.5 s here. A request sent sooner may get 401 (seen in CI).
    fn keys_settle(&self) {
        thread::sleep(Duration::from_millis(1500));
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
    gw.keys_settle();
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

/// One `curl` POST from the client namespace (the key is read from a file, never argv):
/// `(status, lower-cased headers, body)`.
fn curl_post(gw: &Gateway, key: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    let dir = gw.lab.dir.path();
    let n = CURL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (hdr_in, body_in, hdr_out, body_out) = (
        dir.join(format!("curl{n}.auth")),
        dir.join(format!("curl{n}.json")),
        dir.join(format!("curl{n}.headers")),
        dir.join(format!("curl{n}.body")),
    );
    std::fs::write(&hdr_in, format!("Authorization: Bearer {key}\n")).unwrap();
    std::fs::write(&body_in, body).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let cert = gw.cert();
    let out = gw.lab.exec(
        &gw.lab.client,
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            &p(&cert),
            "-H",
            &format!("@{}", p(&hdr_in)),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", p(&body_in)),
            "-D",
            &p(&hdr_out),
            "-o",
            &p(&body_out),
            "-w",
            "%{http_code}",
            &format!("{BASE_V1}/chat/completions"),
        ],
    );
    let status: u16 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        status != 0,
        "curl got no HTTP response ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = std::fs::read_to_string(&hdr_out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = std::fs::read_to_string(&body_out).unwrap_or_default();
    (status, headers, body)
}

static CURL_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn small_chat(max_tokens: u32) -> String {
    serde_json::json!({
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}]
    })
    .to_string()
}

/// Per-key limits through the whole path (curl and the SDK in the client namespace, the real
/// daemon, wireguard-go, the fake model): RPM and TPM exhaustion, the concurrency cap, a
/// disallowed source network and an expired key are refused with OpenAI's status, code,
/// `Retry-After` and `x-ratelimit-*` headers, and none of the refused requests reaches the model.
#[test]
fn key_limits_refuse_before_the_model_with_openai_headers() {
    let Some(py) = python_or_skip("key_limits_refuse_before_the_model_with_openai_headers") else {
        return;
    };
    let gw = Gateway::up(py, "0");
    let rpm = gw.key("rpm2", &["--rpm", "2"]);
    let tpm = gw.key("tpm100", &["--tpm", "100"]);
    let conc = gw.key("one-at-a-time", &["--max-concurrent", "1"]);
    let far = gw.key("elsewhere", &["--allow-cidr", "198.51.100.0/24"]);
    let here = gw.key("client-net", &["--allow-cidr", "192.0.2.10"]);
    let expiring = gw.key("expiring", &["--expires", "1s"]);
    let expiry_start = Instant::now();
    gw.keys_settle();

    // RPM 2: two pass with the request headers counting down, the third is 429.
    for remaining in ["1", "0"] {
        let (status, h, body) = curl_post(&gw, &rpm, &small_chat(4));
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(
            header(&h, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        assert!(header(&h, "x-ratelimit-reset-requests").is_some(), "{h:?}");
    }
    let before = gw.model_posts().len();
    let (status, h, body) = curl_post(&gw, &rpm, &small_chat(4));
    assert_eq!(status, 429, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{body}");
    let retry: u64 = header(&h, "retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(gw.model_posts().len(), before, "a 429 reached the model");

    // TPM 100: the first request reserves prompt + max_tokens (40) and settles to the model's
    // usage; the second finds too few tokens left and waits in 429 with the token headers.
    let (status, h, body) = curl_post(&gw, &tpm, &small_chat(40));
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), Some("100"));
    let before = gw.model_posts().len();
    let (status, h, body) = curl_post(&gw, &tpm, &small_chat(40));
    assert_eq!(status, 429, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(e["error"]["type"], "tokens", "{body}");
    let remaining: u64 = header(&h, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 100, "{h:?}");
    assert!(header(&h, "x-ratelimit-reset-tokens").is_some(), "{h:?}");
    assert!(header(&h, "retry-after").is_some(), "{h:?}");
    assert_eq!(gw.model_posts().len(), before, "a 429 reached the model");

    // Concurrency 1: while one slow stream runs, a second request is refused.
    let held = gw.lab.spawn(
        "held-stream",
        Some(&gw.lab.client),
        &[
            gw.py.to_str().unwrap(),
            manifest_path("tests/netns/openai_client.py")
                .to_str()
                .unwrap(),
            "--base",
            BASE_V1,
            "--cert",
            gw.cert().to_str().unwrap(),
            "chat",
            "--model",
            MODEL,
            "--stream",
            "--max-tokens",
            "30",
            "--delay-ms",
            "100",
        ],
        &[("MG_KEY", conc.as_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = gw.model_posts().len();
    while gw.model_posts().len() == before {
        assert!(
            Instant::now() < deadline,
            "the held stream never reached the model"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (status, h, body) = curl_post(&gw, &conc, &small_chat(4));
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limit_exceeded"), "{body}");
    assert!(header(&h, "retry-after").is_some(), "{h:?}");
    assert_eq!(
        gw.model_posts().len(),
        started + 1,
        "the refused request reached the model"
    );
    drop(held);

    // Source networks: the client is 192.0.2.10 (its TCP address; no header can change it).
    let before = gw.model_posts().len();
    let e = gw.sdk(&far, &["error", "--model", MODEL]);
    assert_eq!(e["class"], "PermissionDeniedError", "{e}");
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(403), Some("permission_denied"))
    );
    assert_eq!(gw.model_posts().len(), before, "a 403 reached the model");
    let ok = gw.sdk(&here, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");

    // An expired key is 401.
    thread::sleep(Duration::from_millis(1500).saturating_sub(expiry_start.elapsed()));
    let before = gw.model_posts().len();
    let e = gw.sdk(&expiring, &["error", "--model", MODEL]);
    assert_eq!(e["class"], "AuthenticationError", "{e}");
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(401), Some("invalid_api_key"))
    );
    assert_eq!(gw.model_posts().len(), before, "a 401 reached the model");
}

/// `(request id, body_bytes)` of each POST and `sent` of each finished or cut stream, from the
/// fake model's log: the model's own count of what it served.
fn model_tokens(log: &[Value]) -> Vec<(u64, u64, Option<u64>)> {
    let mut out: Vec<(u64, u64, Option<u64>)> = log
        .iter()
        .filter(|r| r["ev"] == "request" && r["method"] == "POST")
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["body_bytes"].as_u64().unwrap(),
                None,
            )
        })
        .collect();
    for r in log
        .iter()
        .filter(|r| r["ev"] == "done" || r["ev"] == "disconnect")
    {
        let id = r["id"].as_u64().unwrap();
        if let Some(e) = out.iter_mut().find(|e| e.0 == id) {
            e.2 = r["sent"].as_u64();
        }
    }
    out
}

/// fake_vllm.py's own prompt count for a body (`max(1, bytes // 4)`).
fn fake_prompt_tokens(body_bytes: u64) -> u64 {
    (body_bytes / 4).max(1)
}

/// A day budget runs out in the middle of a stream: the SDK sees a final chunk with
/// `finish_reason: "length"`, the usage, and the end of the stream; the model's stream is cut
/// (it logs a disconnect); the next request is 429 `insufficient_quota` and never reaches it.
#[test]
fn budget_runs_out_mid_stream_and_ends_it_cleanly() {
    let Some(py) = python_or_skip("budget_runs_out_mid_stream_and_ends_it_cleanly") else {
        return;
    };
    let gw = Gateway::up(py, "5");
    let key = gw.key("budgeted", &["--budget", "100/day"]);
    gw.keys_settle();
    let r = gw.sdk(
        &key,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "500"],
    );
    assert_eq!(r["finish_reason"], "length", "{r}");
    let posts = gw.model_posts();
    let body_bytes = posts.last().unwrap()["body_bytes"].as_u64().unwrap();
    // The gateway's prompt estimate is the client's body / 4 (the SDK asked for usage itself,
    // so the model got the same bytes).
    let left = 100 - body_bytes / 4;
    let words = r["content"].as_str().unwrap().split_whitespace().count() as u64;
    assert_eq!(words, left, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], left, "{r}");
    let id = posts.last().unwrap()["id"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = gw.model_log();
        if let Some(end) = log.iter().find(|e| e["id"] == id && e["ev"] != "request") {
            assert_eq!(
                end["ev"], "disconnect",
                "the model's stream was not cut: {end}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the model never saw its stream end"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let before = gw.model_posts().len();
    let e = gw.sdk(&key, &["error", "--model", MODEL]);
    assert_eq!(e["class"], "RateLimitError", "{e}");
    assert_eq!(e["code"], "insufficient_quota", "{e}");
    assert!(e["retry_after"].as_str().is_some(), "{e}");
    assert_eq!(gw.model_posts().len(), before);
}

/// The ledger against the model's own count, across a `kill -9`: requests that ended more than
/// a second before the kill are all in the ledger, exactly as the model counted them; the one
/// that ended just before the kill is either recorded whole or lost (the documented bound: the
/// last second). After the restart the budget still holds: the exhausted key is refused with
/// `insufficient_quota` before anything reaches the model.
#[test]
fn budget_and_ledger_survive_kill_9_and_match_the_models_count() {
    let Some(py) = python_or_skip("budget_and_ledger_survive_kill_9_and_match_the_models_count")
    else {
        return;
    };
    let mut gw = Gateway::up(py, "0");
    // Each request: prompt estimate ≈ 38 tokens + max_tokens 20; four fit in 230, a fifth not.
    let metered = gw.key("metered", &["--budget", "230/day"]);
    let last = gw.key("last", &[]);
    gw.keys_settle();
    let first_post = gw.model_posts().len();
    for i in 0..4 {
        let r = gw.sdk(
            &metered,
            &["chat", "--model", MODEL, "--stream", "--max-tokens", "20"],
        );
        assert_eq!(r["finish_reason"], "stop", "request {i}: {r}");
    }
    let e = gw.sdk(&metered, &["error", "--model", MODEL, "--max-tokens", "20"]);
    assert_eq!(e["code"], "insufficient_quota", "{e}");
    // More than the ledger's flush interval (250 ms) plus a write: these four are durable.
    thread::sleep(Duration::from_millis(1200));
    let r = gw.sdk(
        &last,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "20"],
    );
    assert_eq!(r["finish_reason"], "stop", "{r}");
    gw.mg.kill9();

    let counts = model_tokens(&gw.model_log());
    let counts = &counts[counts.len() - 5..];
    assert_eq!(counts.len() + first_post, gw.model_posts().len());
    let served = |c: &(u64, u64, Option<u64>)| fake_prompt_tokens(c.1) + c.2.expect("stream end");
    let model_metered: u64 = counts[..4].iter().map(served).sum();
    let model_last = served(&counts[4]);
    let usage = |name: &str| {
        let v: Value = serde_json::from_str(&gw.app.cli(&["key", "show", name, "--json"])).unwrap();
        v["usage_today"]["tokens"].as_u64().unwrap()
    };
    let ledger_metered = usage("metered");
    let ledger_last = usage("last");
    eprintln!(
        "after kill -9: ledger metered={ledger_metered} (model {model_metered}), last={ledger_last} (model {model_last})"
    );
    assert_eq!(
        ledger_metered, model_metered,
        "usage older than 1 s was lost"
    );
    assert!(
        ledger_last == model_last || ledger_last == 0,
        "the last request is recorded whole or not at all: {ledger_last} vs {model_last}"
    );

    // Restart: the budget is seeded from the ledger; the key stays refused, at once (the
    // tunnel need not be up for a refusal).
    gw.mg = gw.app.run_gateway(&gw.lab);
    let before = gw.model_posts().len();
    let e = gw.sdk(&metered, &["error", "--model", MODEL, "--max-tokens", "20"]);
    assert_eq!(e["class"], "RateLimitError", "{e}");
    assert_eq!(e["code"], "insufficient_quota", "{e}");
    assert_eq!(gw.model_posts().len(), before);
}
