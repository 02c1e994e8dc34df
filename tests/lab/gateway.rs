//! The authenticated HTTPS gateway on the whole chain of `harness::chain`, with real clients:
//! the openai Python SDK, curl and a Cursor-shaped request. Needs root and a Python with the
//! `openai` package (env `MODELGATE_PYTHON`, default `.venv/bin/python` at the repo root, which
//! `scripts/test.sh` creates); `harness::prereq` decides.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::chain::{Chain, Spec, MODEL, OTHER_MODEL};
use crate::harness::curl;
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::run_ok;
use crate::harness::sdk::Sdk;

const BASE_V1: &str = "https://gw.test/v1";
/// The lab and a Python with the openai SDK.
const NEEDS: Needs = Needs::LAB.and_sdk();
/// The project's own generator of Cursor-shaped bodies.
const CURSOR_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/cursor_requests.py"
);

/// The chain and the openai SDK in the client namespace. Fields drop in order: the chain's
/// processes and lab first.
struct Gateway {
    c: Chain,
    client: Sdk,
}

impl Gateway {
    /// `test`'s chain with the fake model's tokens `token_delay_ms` apart and extra `upstream
    /// add` arguments, once a key sees the upstream's models; `None` when the test is skipped.
    fn up(
        test: &str,
        needs: Needs,
        token_delay_ms: &str,
        upstream_args: &[&str],
    ) -> Option<Gateway> {
        let ready = check(test, needs)?;
        let c = Chain::up(Spec {
            token_delay_ms: Some(token_delay_ms),
            upstream_args,
            ..Spec::default()
        });
        let client = c.sdk(ready.python());
        let gw = Gateway { c, client };
        gw.wait_models_discovered();
        Some(gw)
    }

    /// `modelgate key create NAME --json ARGS…` → the secret.
    fn key(&self, name: &str, args: &[&str]) -> String {
        self.c.key(name, args).secret
    }

    fn sdk(&self, key: &str, args: &[&str]) -> Value {
        self.client.run(key, BASE_V1, args)
    }

    /// How many requests reached the model (other than model discovery).
    fn posts(&self) -> usize {
        self.c.model_log.posts().len()
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

    /// The SDK call `args` must fail as `class` with `status` and `code`, and the model's
    /// request log must not grow. Returns the SDK's error record.
    fn assert_refused(&self, key: &str, args: &[&str], refusal: Refusal) -> Value {
        let Refusal(class, status, code) = refusal;
        let before = self.posts();
        let e = self.sdk(key, args);
        assert_eq!(e["class"], class, "{args:?}: {e}");
        assert_eq!(e["status"], status, "{args:?}: {e}");
        assert_eq!(e["code"], code, "{args:?}: {e}");
        assert_eq!(
            self.posts(),
            before,
            "a refused request ({class} {status} {code}) reached the model"
        );
        e
    }

    /// One curl POST of a small chat to /v1/chat/completions.
    fn curl(&self, key: &str, max_tokens: u32) -> curl::Response {
        self.c.curl_chat(key, MODEL, max_tokens)
    }

    /// The curl POST must be refused with 429 `rate_limit_exceeded` and `Retry-After`, and
    /// the model's request log must not grow.
    fn assert_429(&self, key: &str, max_tokens: u32) -> curl::Response {
        let before = self.posts();
        let r = self.curl(key, max_tokens);
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(
            r.json()["error"]["code"],
            "rate_limit_exceeded",
            "{}",
            r.body
        );
        assert!(r.header("retry-after").is_some(), "{r:?}");
        assert_eq!(self.posts(), before, "a 429 reached the model");
        r
    }
}

/// How the SDK sees a refusal: its exception class, the HTTP status, OpenAI's error code.
#[derive(Clone, Copy)]
struct Refusal(&'static str, u64, &'static str);

const UNAUTHENTICATED: Refusal = Refusal("AuthenticationError", 401, "invalid_api_key");
const FORBIDDEN: Refusal = Refusal("PermissionDeniedError", 403, "permission_denied");
const NO_SUCH_MODEL: Refusal = Refusal("NotFoundError", 404, "model_not_found");
const OUT_OF_BUDGET: Refusal = Refusal("RateLimitError", 429, "insufficient_quota");
const TUNNEL_DOWN: Refusal = Refusal("InternalServerError", 503, "tunnel_unavailable");

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
    let Some(gw) = Gateway::up(
        "gateway::openai_sdk_chat_streaming_and_models",
        NEEDS,
        "50",
        &[],
    ) else {
        return;
    };
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

    let posts = gw.c.model_log.posts();
    assert_eq!(posts.len(), 2, "{posts:?}");
    for p in &posts {
        assert_eq!(p["path"], "/v1/chat/completions", "{p}");
        assert_eq!(p["model"], MODEL, "{p}");
        assert_eq!(
            p["auth"], false,
            "the client's Authorization header reached the model: {p}"
        );
    }
    assert!(gw.c.mg.log().contains("request"), "no audit line");
}

/// A Cursor-shaped request (≈400 KB, tools, stream_options.include_usage) posted to
/// `/chat/completions` without `/v1`, exactly as the fixture prints it: it succeeds, streams
/// incrementally, and the model receives the whole body.
#[test]
fn cursor_shaped_request_streams_incrementally() {
    // No max_tokens in Cursor's body: the fake model's default of 8 tokens, 100 ms apart.
    let Some(gw) = Gateway::up(
        "gateway::cursor_shaped_request_streams_incrementally",
        NEEDS.and_file(CURSOR_FIXTURE),
        "100",
        &[],
    ) else {
        return;
    };
    let key = gw.key("cursor", &[]);
    let key_created = Instant::now();
    let body_file = gw.c.lab.dir.path().join("cursor-chat.json");
    let out = run_ok(Command::new("python3").args([CURSOR_FIXTURE, "chat"]));
    std::fs::write(&body_file, &out.stdout).unwrap();
    let size = out.stdout.len();
    assert!(size > 300_000, "fixture body is only {size} bytes");
    // Key changes reach the daemon within 1 s: allow 1.5 s.
    thread::sleep(Duration::from_millis(1500).saturating_sub(key_created.elapsed()));

    let r = gw.client.run(
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

    let posts = gw.c.model_log.posts();
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
    let Some(gw) = Gateway::up(
        "gateway::refused_requests_never_reach_the_model",
        NEEDS,
        "0",
        &[],
    ) else {
        return;
    };
    let expiring = gw.key("expiring", &["--expires", "1s"]);
    let expiry_start = Instant::now();
    gw.c.keys_settle();
    let good = gw.key("good", &[]);
    let revoked = gw.key("revoked", &[]);
    let small_only = gw.key("small-only", &["--models", OTHER_MODEL]);

    // The revoked key works until it is revoked.
    let ok = gw.sdk(&revoked, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");
    gw.c.app.cli(&["key", "revoke", "revoked", "--yes"]);

    // Key changes reach the daemon within 1 s: allow 1.5 s for the revocation, and let the
    // expiring key pass its second.
    thread::sleep(Duration::from_millis(1500));
    thread::sleep(Duration::from_millis(2500).saturating_sub(expiry_start.elapsed()));
    let before = gw.posts();
    let wrong = "mg_this_is_not_a_key_0000000000000000";
    for (case, key, args, refusal) in [
        ("wrong key", wrong, vec!["--model", MODEL], UNAUTHENTICATED),
        (
            "wrong key, models.list()",
            wrong,
            vec!["--model", MODEL, "--op", "models"],
            UNAUTHENTICATED,
        ),
        (
            "revoked key",
            &revoked,
            vec!["--model", MODEL],
            UNAUTHENTICATED,
        ),
        (
            "model outside the key's list",
            &small_only,
            vec!["--model", MODEL],
            FORBIDDEN,
        ),
        (
            "unknown model",
            &good,
            vec!["--model", "no-such-model"],
            NO_SUCH_MODEL,
        ),
        (
            "expired key",
            &expiring,
            vec!["--model", MODEL],
            UNAUTHENTICATED,
        ),
    ] {
        eprintln!("refusal: {case}");
        let mut error = vec!["error"];
        error.extend(args);
        gw.assert_refused(key, &error, refusal);
    }

    // models.list() only shows the key's models; the allowed model works for that key.
    let listed = gw.sdk(&small_only, &["models"]);
    assert_eq!(listed["models"], serde_json::json!([OTHER_MODEL]));
    let ok = gw.sdk(&small_only, &["chat", "--model", OTHER_MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");
    assert_eq!(gw.posts(), before + 1);
}

/// A client that closes a stream mid-way: the gateway closes the upstream connection within 1 s
/// (the fake model sees EOF and records when).
#[test]
fn client_disconnect_closes_upstream_within_1s() {
    let Some(gw) = Gateway::up(
        "gateway::client_disconnect_closes_upstream_within_1s",
        NEEDS,
        "200",
        &[],
    ) else {
        return;
    };
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
    let posts = gw.c.model_log.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let disconnect = gw.c.model_log.stream_end(&posts[0]["id"]);
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
    let Some(mut gw) = Gateway::up(test, NEEDS, "0", upstream_args) else {
        return;
    };
    let key = gw.key("dev", &[]);
    let ok = gw.sdk(&key, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");

    gw.c.corp.stop();
    gw.c.mg.stop();
    gw.c.mg = gw.c.app.run_gateway(&gw.c.lab);
    let e = gw.assert_refused(&key, &["error", "--model", MODEL], TUNNEL_DOWN);
    eprintln!("tunnel down, fresh appliance ({upstream_args:?}): {e}");
    assert!(
        e["retry_after"].as_str().is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    assert!(
        e["elapsed_ms"].as_f64().unwrap() < 1000.0,
        "the 503 took {} ms",
        e["elapsed_ms"]
    );
}

/// Tunnel down with a static model route (`upstream add --model`).
#[test]
fn tunnel_down_static_route_answers_503() {
    assert_tunnel_down_answers_503(
        &["--model", MODEL],
        "gateway::tunnel_down_static_route_answers_503",
    );
}

/// Tunnel down with models discovered from the upstream (the documented default): a fresh
/// appliance has never reached the upstream, so it knows no models yet.
#[test]
fn tunnel_down_discovered_models_answer_503() {
    assert_tunnel_down_answers_503(&[], "gateway::tunnel_down_discovered_models_answer_503");
}

/// Per-key limits through the whole path (curl and the SDK in the client namespace, the real
/// daemon, wireguard-go, the fake model): RPM and TPM exhaustion, the concurrency cap, a
/// disallowed source network and an expired key are refused with OpenAI's status, code,
/// `Retry-After` and `x-ratelimit-*` headers, and none of the refused requests reaches the model.
#[test]
fn key_limits_refuse_before_the_model_with_openai_headers() {
    let Some(gw) = Gateway::up(
        "gateway::key_limits_refuse_before_the_model_with_openai_headers",
        NEEDS,
        "0",
        &[],
    ) else {
        return;
    };
    let rpm = gw.key("rpm2", &["--rpm", "2"]);
    let tpm = gw.key("tpm100", &["--tpm", "100"]);
    let conc = gw.key("one-at-a-time", &["--max-concurrent", "1"]);
    let far = gw.key("elsewhere", &["--allow-cidr", "198.51.100.0/24"]);
    let here = gw.key("client-net", &["--allow-cidr", "192.0.2.10"]);
    let expiring = gw.key("expiring", &["--expires", "1s"]);
    let expiry_start = Instant::now();
    gw.c.keys_settle();

    // RPM 2: two pass with the request headers counting down, the third is 429.
    for remaining in ["1", "0"] {
        let r = gw.curl(&rpm, 4);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
        assert!(r.header("x-ratelimit-reset-requests").is_some(), "{r:?}");
    }
    let r = gw.assert_429(&rpm, 4);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));

    // TPM 100: the first request reserves prompt + max_tokens (40) and settles to the model's
    // usage; the second finds too few tokens left and waits in 429 with the token headers.
    let r = gw.curl(&tpm, 40);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100"));
    let r = gw.assert_429(&tpm, 40);
    assert_eq!(r.json()["error"]["type"], "tokens", "{}", r.body);
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 100, "{r:?}");
    assert!(r.header("x-ratelimit-reset-tokens").is_some(), "{r:?}");

    // Concurrency 1: while one slow stream runs, a second request is refused.
    let before = gw.posts();
    let held = gw.client.spawn(
        &gw.c.lab,
        "held-stream",
        &conc,
        BASE_V1,
        &[
            "chat",
            "--model",
            MODEL,
            "--stream",
            "--max-tokens",
            "30",
            "--delay-ms",
            "100",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.posts() == before {
        assert!(
            Instant::now() < deadline,
            "the held stream never reached the model"
        );
        thread::sleep(Duration::from_millis(50));
    }
    gw.assert_429(&conc, 4);
    drop(held);

    // Source networks: the client is 192.0.2.10 (its TCP address; no header can change it).
    gw.assert_refused(&far, &["error", "--model", MODEL], FORBIDDEN);
    let ok = gw.sdk(&here, &["chat", "--model", MODEL]);
    assert_eq!(ok["finish_reason"], "stop", "{ok}");

    // An expired key is 401.
    thread::sleep(Duration::from_millis(1500).saturating_sub(expiry_start.elapsed()));
    gw.assert_refused(&expiring, &["error", "--model", MODEL], UNAUTHENTICATED);
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
    let Some(gw) = Gateway::up(
        "gateway::budget_runs_out_mid_stream_and_ends_it_cleanly",
        NEEDS,
        "5",
        &[],
    ) else {
        return;
    };
    let key = gw.key("budgeted", &["--budget", "100/day"]);
    gw.c.keys_settle();
    let r = gw.sdk(
        &key,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "500"],
    );
    assert_eq!(r["finish_reason"], "length", "{r}");
    let posts = gw.c.model_log.posts();
    let body_bytes = posts.last().unwrap()["body_bytes"].as_u64().unwrap();
    // The gateway's prompt estimate is the client's body / 4 (the SDK asked for usage itself,
    // so the model got the same bytes).
    let left = 100 - body_bytes / 4;
    let words = r["content"].as_str().unwrap().split_whitespace().count() as u64;
    assert_eq!(words, left, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], left, "{r}");
    let end = gw.c.model_log.stream_end(&posts.last().unwrap()["id"]);
    assert_eq!(
        end["ev"], "disconnect",
        "the model's stream was not cut: {end}"
    );
    let e = gw.assert_refused(&key, &["error", "--model", MODEL], OUT_OF_BUDGET);
    assert!(e["retry_after"].as_str().is_some(), "{e}");
}

/// The ledger against the model's own count, across a `kill -9`: requests that ended more than
/// a second before the kill are all in the ledger, exactly as the model counted them; the one
/// that ended just before the kill is either recorded whole or lost (the documented bound: the
/// last second). After the restart the budget still holds: the exhausted key is refused with
/// `insufficient_quota` before anything reaches the model.
#[test]
fn budget_and_ledger_survive_kill_9_and_match_the_models_count() {
    let Some(mut gw) = Gateway::up(
        "gateway::budget_and_ledger_survive_kill_9_and_match_the_models_count",
        NEEDS,
        "0",
        &[],
    ) else {
        return;
    };
    // Each request: prompt estimate ≈ 38 tokens + max_tokens 20; four fit in 230, a fifth not.
    let metered = gw.key("metered", &["--budget", "230/day"]);
    let last = gw.key("last", &[]);
    gw.c.keys_settle();
    let first_post = gw.posts();
    for i in 0..4 {
        let r = gw.sdk(
            &metered,
            &["chat", "--model", MODEL, "--stream", "--max-tokens", "20"],
        );
        assert_eq!(r["finish_reason"], "stop", "request {i}: {r}");
    }
    let exhausted = ["error", "--model", MODEL, "--max-tokens", "20"];
    gw.assert_refused(&metered, &exhausted, OUT_OF_BUDGET);
    // More than the ledger's flush interval (250 ms) plus a write: these four are durable.
    thread::sleep(Duration::from_millis(1200));
    let r = gw.sdk(
        &last,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "20"],
    );
    assert_eq!(r["finish_reason"], "stop", "{r}");
    gw.c.mg.kill9();

    let counts = model_tokens(&gw.c.model_log.records());
    let counts = &counts[counts.len() - 5..];
    assert_eq!(counts.len() + first_post, gw.posts());
    let served = |c: &(u64, u64, Option<u64>)| fake_prompt_tokens(c.1) + c.2.expect("stream end");
    let model_metered: u64 = counts[..4].iter().map(served).sum();
    let model_last = served(&counts[4]);
    let usage = |name: &str| {
        let v: Value =
            serde_json::from_str(&gw.c.app.cli(&["key", "show", name, "--json"])).unwrap();
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
    gw.c.mg = gw.c.app.run_gateway(&gw.c.lab);
    gw.assert_refused(&metered, &exhausted, OUT_OF_BUDGET);
}
