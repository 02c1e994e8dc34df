//! Cursor's request shapes end to end, in one process and without root: the gateway (HTTPS on
//! loopback, port 0) → a real WireGuard tunnel (two netstacks over loopback UDP) → a bridge →
//! `tests/python/fake_vllm.py` (a vLLM-like server with tool calls, a context limit, and vLLM's
//! request validation) on loopback.
//!
//! The bodies come from `tests/fixtures/cursor_requests.py` (Chat Completions with tools and
//! a `content: []` tool-call history; the Responses-API body Cursor sends to `/chat/completions`
//! for `gpt-*` names). Each reply is checked as raw SSE, and, when a Python with the `openai`
//! package is available (`MODELGATE_PYTHON`, default `.venv/bin/python`), parsed by the openai
//! SDK, tool calls included. Without python3 or the SDK a test fails under the test command
//! (root, CI) and is a recorded skip elsewhere (`tests/support/skip.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelgate::config::{CompatConfig, GatewayConfig};
use modelgate::netstack::TunnelStream;
use serde_json::{json, Value};

use crate::harness::{corp_upstream, key, manifest_path, sdk_python, Reply, Stack, StackOptions};
use crate::skip;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/cursor_requests.py"
);
const CHAT_MODEL: &str = "acme-coder";
const GPT_MODEL: &str = "gpt-5-acme";
/// The fake's context window in tokens (it counts body bytes / 4).
const MAX_MODEL_LEN: usize = 60_000;

/// python3 is a prerequisite (the rule of `tests/support/skip.rs`: it fails under the test
/// command, a recorded skip elsewhere); the fixture is part of the repository, so its absence
/// is always a failure.
fn have_python_and_fixture(test: &str) -> bool {
    assert!(Path::new(FIXTURE).exists(), "{test}: {FIXTURE} is missing");
    let py = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    py || skip::missing(test, "needs python3 (apt-get install python3)")
}

/// `cursor_requests.py SHAPE --history-kb KB [--model M]` → the body.
fn fixture(shape: &str, kb: u32, model: Option<&str>) -> Vec<u8> {
    let mut c = Command::new("python3");
    c.args([FIXTURE, shape, "--history-kb", &kb.to_string()]);
    if let Some(m) = model {
        c.args(["--model", m]);
    }
    let out = c.output().expect("run the fixture");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A child process killed (by its own PID) and reaped when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    gw: Stack,
    key: String,
    /// The gateway's certificate, for the SDK.
    cert: PathBuf,
    fake_log: PathBuf,
    dir: tempfile::TempDir,
    _fake: Kid,
}

/// Copies a tunnel connection both ways to the fake on loopback.
async fn bridge(mut inner: TunnelStream, fake: SocketAddr) {
    if let Ok(mut out) = tokio::net::TcpStream::connect(fake).await {
        let _ = out.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut inner, &mut out).await;
    }
}

impl Env {
    /// Gateway + tunnel + fake vLLM started with `fake_args`.
    async fn up(compat: CompatConfig, fake_args: &[&str]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let fake_log = dir.path().join("fake-vllm.jsonl");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let fake = Command::new("python3")
            .arg(manifest_path("tests/python/fake_vllm.py"))
            .args(["127.0.0.1", &port.to_string(), "--log"])
            .arg(&fake_log)
            .args(["--models", &format!("{CHAT_MODEL},{GPT_MODEL}")])
            .args(["--token-delay-ms", "5"])
            .args(fake_args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start fake_vllm.py");
        let fake = Kid(fake);
        let model_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while tokio::net::TcpStream::connect(model_addr).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "fake_vllm.py did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The corp side of the tunnel forwards its :8000 to the fake on loopback.
        let (secret, principal) = key("cursor", Default::default());
        let upstream = corp_upstream("vllm", &[(CHAT_MODEL, CHAT_MODEL), (GPT_MODEL, GPT_MODEL)]);
        let mut options = StackOptions::new(vec![(secret.clone(), principal)], vec![upstream]);
        options.config = GatewayConfig {
            compat,
            ..GatewayConfig::default()
        };
        options.patience = Duration::from_secs(30);
        let gw = Stack::start(options, move |s| bridge(s, model_addr)).await;
        // Static routes answer at once: without this a request could meet the tunnel still
        // coming up (503; seen once under load).
        gw.wait_tunnel().await;
        let cert = dir.path().join("gateway.pem");
        std::fs::write(&cert, &gw.tls.cert_pem).unwrap();
        Env {
            gw,
            key: secret,
            cert,
            fake_log,
            dir,
            _fake: fake,
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> Reply {
        let auth = format!("Bearer {}", self.key);
        self.gw
            .call(
                "POST",
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    ("accept", "text/event-stream"),
                ],
                body,
            )
            .await
    }

    /// The fake's POST records (what reached the "model").
    fn model_posts(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.fake_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["ev"] == "request" && r["method"] == "POST")
            .collect()
    }

    /// `openai_client.py replay` with the SDK, against `base`; None without the SDK (a missing
    /// prerequisite of the SDK half of `test`, see `tests/support/skip.rs`).
    fn sdk_replay(&self, test: &str, base: &str, body: &[u8], extra: &[&str]) -> Option<Value> {
        let Some(py) = sdk_python() else {
            skip::missing(
                &format!("{test} (openai SDK part)"),
                "no Python with the openai SDK (set MODELGATE_PYTHON, or run scripts/test.sh, \
                 which creates .venv with `pip install openai`)",
            );
            return None;
        };
        let file = self.dir.path().join(format!("body-{}.json", body.len()));
        std::fs::write(&file, body).unwrap();
        let out = Command::new(py)
            .arg(manifest_path("tests/python/openai_client.py"))
            .args([
                "--base",
                &format!("https://localhost:{}{base}", self.gw.addr.port()),
            ])
            .arg("--cert")
            .arg(&self.cert)
            .arg("replay")
            .arg("--body-file")
            .arg(&file)
            .args(extra)
            .env("MG_KEY", &self.key)
            .output()
            .expect("run openai_client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "openai_client.py replay failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(serde_json::from_str(stdout.trim()).unwrap())
    }
}

/// What a Chat Completions stream says: (tool call name, arguments, finish_reason, usage?).
fn stream_summary(r: &Reply) -> (String, String, String, bool) {
    let (events, done) = r.events();
    assert!(done, "no [DONE]: {}", r.body());
    let (mut name, mut args, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), false);
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        usage |= e["usage"].is_object();
        for c in e["choices"].as_array().unwrap() {
            if let Some(calls) = c["delta"]["tool_calls"].as_array() {
                for tc in calls {
                    name += tc["function"]["name"].as_str().unwrap_or("");
                    args += tc["function"]["arguments"].as_str().unwrap_or("");
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (name, args, finish, usage)
}

/// Cursor's Chat Completions body (tools, a `content: []` history, no /v1): the model gets
/// the history with `content: null` (it would refuse `[]`, as vLLM's gpt-oss path does), and
/// the streamed tool call comes back intact, for raw SSE and for the openai SDK alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_tools_and_empty_content_history() {
    if !have_python_and_fixture("chat_with_tools_and_empty_content_history") {
        return;
    }
    let env = Env::up(
        CompatConfig::default(),
        &["--tool-calls", "--reject-empty-content"],
    )
    .await;
    let body = fixture("chat", 60, None);
    let empty_turns = String::from_utf8_lossy(&body)
        .matches("\"content\": []")
        .count();
    assert!(empty_turns > 5, "the fixture has no content: [] turns");

    let r = env.post("/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (name, args, finish, usage) = stream_summary(&r);
    assert_eq!(name, "read_file");
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"target_file": "src/main.rs"})
    );
    assert_eq!(finish, "tool_calls");
    assert!(usage);
    let post = env.model_posts().pop().unwrap();
    assert_eq!(post["empty_content"], 0, "{post}");
    assert_eq!(
        post["tools"],
        json!([
            "read_file",
            "edit_file",
            "run_terminal_cmd",
            "codebase_search"
        ])
    );
    assert_eq!(post["roles"].as_array().unwrap().len() % 4, 2, "{post}");

    // The openai SDK (typed API, base URL with /v1 as Cursor users type it) parses it.
    if let Some(r) = env.sdk_replay(
        "chat_with_tools_and_empty_content_history",
        "/v1",
        &body,
        &["--typed"],
    ) {
        eprintln!("SDK, Cursor chat body: {r}");
        assert_eq!(r["finish_reason"], "tool_calls", "{r}");
        assert_eq!(r["tool_calls"][0]["name"], "read_file", "{r}");
        assert!(r["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("chatcmpl-tool-"));
        assert_eq!(
            serde_json::from_str::<Value>(r["tool_calls"][0]["arguments"].as_str().unwrap())
                .unwrap(),
            json!({"target_file": "src/main.rs"})
        );
        assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    } else {
        eprintln!("note: no Python with the openai SDK; SDK parsing not checked");
    }

    // After the tool result the model answers in text.
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    let msgs = v["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": [], "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]}));
    msgs.push(json!({"role": "tool", "tool_call_id": "call_x", "content": "fn main() {}"}));
    let r = env
        .post("/v1/chat/completions", v.to_string().into_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", r.body());
    let (name, _, finish, _) = stream_summary(&r);
    assert_eq!((name.as_str(), finish.as_str()), ("", "stop"));
}

/// The Responses-API body Cursor sends for `gpt-*` names, POSTed to /chat/completions: the
/// model receives Chat Completions (system + messages with tool calls and tool results, tools
/// in Chat shape, no `input`) and its Chat Completions stream (a tool call) reaches the client
/// as is. With the translation off, the model refuses it as vLLM does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_shaped_body_at_chat_completions() {
    if !have_python_and_fixture("responses_shaped_body_at_chat_completions") {
        return;
    }
    // The cost of the translation itself, on Cursor's default ~400 KB history.
    let big = fixture("responses", 400, Some(GPT_MODEL));
    let t = Instant::now();
    let out = modelgate::gateway::compat::translate(&big, &CompatConfig::default())
        .unwrap()
        .expect("translated");
    eprintln!(
        "translate(): {} KB Responses body → {} KB Chat body in {:?} (this build's profile)",
        big.len() / 1024,
        out.len() / 1024,
        t.elapsed()
    );
    let env = Env::up(CompatConfig::default(), &["--tool-calls"]).await;
    let body = fixture("responses", 60, Some(GPT_MODEL));
    let t = Instant::now();
    let r = env.post("/chat/completions", body.clone()).await;
    eprintln!(
        "Responses-shaped {} KB body answered in {:?}",
        body.len() / 1024,
        t.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.body());
    let (name, args, finish, usage) = stream_summary(&r);
    assert_eq!(finish, "tool_calls");
    assert_eq!(name, "read_file");
    assert!(serde_json::from_str::<Value>(&args).is_ok(), "{args}");
    assert!(usage, "stream_options.include_usage was not kept");

    let post = env.model_posts().pop().unwrap();
    assert_eq!(post["has_input"], false, "{post}");
    assert_eq!(post["model"], GPT_MODEL);
    assert_eq!(post["stream"], true);
    assert_eq!(
        post["tools"],
        json!([
            "read_file",
            "edit_file",
            "run_terminal_cmd",
            "codebase_search",
            "ApplyPatch"
        ])
    );
    let roles: Vec<&str> = post["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(roles[0], "system");
    assert_eq!(roles[roles.len() - 1], "user");
    // Per history step: user, assistant (tool call), tool (its result).
    assert_eq!(&roles[1..4], ["user", "assistant", "tool"]);
    assert_eq!((roles.len() - 2) % 3, 0, "{roles:?}");

    if let Some(r) = env.sdk_replay(
        "responses_shaped_body_at_chat_completions",
        "/v1",
        &body,
        &[],
    ) {
        eprintln!("SDK, Responses-shaped body: {r}");
        assert_eq!(r["finish_reason"], "tool_calls", "{r}");
        assert_eq!(r["tool_calls"][0]["name"], "read_file", "{r}");
        assert!(r["usage"]["total_tokens"].as_u64().unwrap() > 0, "{r}");
    }

    // Switched off, the body goes upstream as is and vLLM's validation refuses it.
    drop(env);
    let off = CompatConfig {
        responses_translation: false,
        ..CompatConfig::default()
    };
    let env = Env::up(off, &["--tool-calls"]).await;
    let r = env.post("/chat/completions", body).await;
    assert_eq!(r.status, 400, "{}", r.body());
    assert!(r.body().contains("messages"), "{}", r.body());
    assert_eq!(env.model_posts().pop().unwrap()["has_input"], true);
}

/// An upstream context-length 400 reaches the client as OpenAI's `context_length_exceeded`
/// (type `invalid_request_error`, param `messages`), which the SDK raises as
/// BadRequestError; switched off, the upstream's 400 passes through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_overflow_is_context_length_exceeded() {
    if !have_python_and_fixture("context_overflow_is_context_length_exceeded") {
        return;
    }
    let max = MAX_MODEL_LEN.to_string();
    let env = Env::up(CompatConfig::default(), &["--max-model-len", &max]).await;
    // ~400 KB of history ≈ 100k tokens by the fake's count: over its 60k window.
    let body = fixture("chat", 400, None);
    let r = env.post("/chat/completions", body.clone()).await;
    assert_eq!(r.status, 400, "{}", r.body());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert_eq!(e["param"], "messages", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("This model's maximum context length is 60000 tokens."),
        "{e}"
    );
    // The same for the Responses-shaped body, through the SDK.
    let gpt = fixture("responses", 400, Some(GPT_MODEL));
    if let Some(r) = env.sdk_replay(
        "context_overflow_is_context_length_exceeded",
        "/v1",
        &gpt,
        &[],
    ) {
        eprintln!("SDK, oversized Responses-shaped body: {r}");
        assert_eq!(r["class"], "BadRequestError", "{r}");
        assert_eq!(r["status"], 400, "{r}");
        assert_eq!(r["code"], "context_length_exceeded", "{r}");
    }
    // A body that fits still works.
    let r = env
        .post("/chat/completions", fixture("chat", 50, None))
        .await;
    assert_eq!(r.status, 200, "{}", r.body());

    drop(env);
    let off = CompatConfig {
        context_length_error: false,
        ..CompatConfig::default()
    };
    let env = Env::up(off, &["--max-model-len", &max]).await;
    let r = env.post("/chat/completions", body).await;
    assert_eq!(r.status, 400, "{}", r.body());
    assert_eq!(r.json()["error"]["type"], "BadRequestError", "{}", r.body());
}

/// CORS preflight on Cursor's path (no /v1) is answered without a key, and echoes what the
/// browser asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_on_the_unversioned_path() {
    if !have_python_and_fixture("preflight_on_the_unversioned_path") {
        return;
    }
    let env = Env::up(CompatConfig::default(), &[]).await;
    let r = env
        .gw
        .call(
            "OPTIONS",
            "/chat/completions",
            &[
                ("origin", "https://cursor.example"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://cursor.example"
    );
    assert!(r.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(
        r.headers["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(env.model_posts().is_empty());
}
