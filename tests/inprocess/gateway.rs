//! The gateway end to end: HTTPS (rustls) on loopback, keys and policy, limits, routing, the
//! usage ledger, fair share, and a real WireGuard tunnel (two netstacks over loopback UDP) to
//! the echo model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use modelgate::config::GatewayConfig;
use modelgate::demo::model::EchoModel;
use modelgate::keys::ledger::{KeyUsage, Ledger, LedgerOptions, LedgerTask, LedgerWriter};
use modelgate::policy::{Budget, BudgetPeriod, KeyPolicy};

use crate::harness::{corp_upstream, key, Connection, Reply, Stack, StackOptions};

/// Tokens of the `budget` key's day budget and of the `tpm` key's TPM.
const BUDGET: u64 = 400;

/// The keys of every environment, by name: `good` (no limits), `limited` (models `other-*`
/// only), `expired`, `single` (`max_concurrent` 1), `rpm2` (RPM 2), `budget` (a day budget of
/// [`BUDGET`] tokens), `tpm` (a TPM of [`BUDGET`]) and `fair-a`…`fair-c` (no limits).
fn policies() -> Vec<(&'static str, KeyPolicy)> {
    let none = KeyPolicy::default;
    vec![
        (
            "budget",
            KeyPolicy {
                budget: Some(Budget {
                    tokens: BUDGET,
                    period: BudgetPeriod::Day,
                }),
                ..none()
            },
        ),
        (
            "tpm",
            KeyPolicy {
                tpm: Some(BUDGET as u32),
                ..none()
            },
        ),
        ("fair-a", none()),
        ("fair-b", none()),
        ("fair-c", none()),
        (
            "single",
            KeyPolicy {
                max_concurrent: Some(1),
                ..none()
            },
        ),
        (
            "rpm2",
            KeyPolicy {
                rpm: Some(2),
                ..none()
            },
        ),
        ("good", none()),
        (
            "limited",
            KeyPolicy {
                models: vec!["other-*".into()],
                ..none()
            },
        ),
        (
            "expired",
            KeyPolicy {
                expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
                ..none()
            },
        ),
    ]
}

/// Everything an environment can vary.
struct Opts {
    corp_up: bool,
    ledger: Option<LedgerWriter>,
    /// The echo model's pause between words.
    token_delay: Duration,
    config: GatewayConfig,
    /// `max_concurrent` of both upstreams (fair-share queue).
    max_concurrent: Option<u32>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            corp_up: true,
            ledger: None,
            token_delay: Duration::from_millis(30),
            config: GatewayConfig::default(),
            max_concurrent: None,
        }
    }
}

/// The gateway with the keys of [`policies`] and two upstreams on the corp peer's echo model:
/// `discovered` (models discovered, its own API key) and `aliased` (`coder` → `echo`, no key).
struct Env {
    gw: Stack,
    /// Secrets by key name.
    keys: HashMap<&'static str, String>,
    model: EchoModel,
}

async fn env(o: Opts) -> Env {
    let mut keys = HashMap::new();
    let mut ring = Vec::new();
    for (name, policy) in policies() {
        let (secret, principal) = key(name, policy);
        keys.insert(name, secret.clone());
        ring.push((secret, principal));
    }
    let mut discovered = corp_upstream("discovered", &[]);
    discovered.api_key = Some("upstream-secret".into());
    discovered.max_concurrent = o.max_concurrent;
    let mut aliased = corp_upstream("aliased", &[("coder", "echo")]);
    aliased.max_concurrent = o.max_concurrent;
    let mut options = StackOptions::new(ring, vec![discovered, aliased]);
    options.corp_dials = o.corp_up;
    options.config = o.config;
    options.ledger = o.ledger;
    let model = EchoModel::new("echo", o.token_delay);
    let m = model.clone();
    let gw = Stack::start(options, move |s| m.clone().serve_connection(s)).await;
    Env { gw, keys, model }
}

/// [`env`] with the models discovered.
async fn env_up(o: Opts) -> Env {
    let env = env(o).await;
    env.wait_for_models().await;
    env
}

/// An environment whose gateway writes usage to a ledger in a temporary state directory every
/// 20 ms, with the models discovered.
async fn env_with_ledger() -> (tempfile::TempDir, Env, LedgerTask) {
    let dir = tempfile::tempdir().unwrap();
    let (writer, task) = LedgerWriter::start(
        Ledger::open(dir.path()).unwrap(),
        LedgerOptions {
            flush_every: Duration::from_millis(20),
            ..LedgerOptions::default()
        },
    );
    let env = env_up(Opts {
        ledger: Some(writer),
        ..Opts::default()
    })
    .await;
    (dir, env, task)
}

/// The `good` key's usage in the ledger at `dir` once it counts `requests` requests (bounded).
async fn usage_after(dir: &Path, requests: u64) -> KeyUsage {
    let t = Instant::now();
    loop {
        let u = Ledger::open(dir)
            .unwrap()
            .usage("good", SystemTime::now())
            .unwrap();
        if u.total.requests >= requests {
            return u;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "ledger: {u:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Env {
    /// The secret of the key named `name` in [`policies`].
    fn key(&self, name: &str) -> &str {
        &self.keys[name]
    }

    /// A JSON request with `key` as the bearer token.
    async fn call(&self, method: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let body = Bytes::copy_from_slice(body.as_bytes());
        self.gw.call(method, path, &headers, body).await
    }

    /// `POST /v1/chat/completions` with the key named `key`.
    async fn chat(&self, key: &str, body: &str) -> Reply {
        let secret = self.key(key);
        self.call("POST", "/v1/chat/completions", Some(secret), body)
            .await
    }

    /// Asks with `key` (a small chat, every `pause_ms`) until one is answered 200, within
    /// `within` of the first try; every answer before must be `refused`, where given.
    async fn slot_comes_back(
        &self,
        key: &str,
        refused: Option<u16>,
        within: Duration,
        pause_ms: u64,
    ) {
        let t = Instant::now();
        loop {
            let r = self.chat(key, &chat("echo", false)).await;
            if r.status == 200 {
                return;
            }
            if let Some(status) = refused {
                assert_eq!(r.status, status, "{}", r.body());
            }
            assert!(
                t.elapsed() < within,
                "{key}: slot still held {within:?} after the client left"
            );
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    }

    async fn wait_for_models(&self) {
        let start = Instant::now();
        loop {
            let r = self
                .call("GET", "/v1/models", Some(self.key("good")), "")
                .await;
            if r.status == 200 && r.body().contains("\"echo\"") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "models never discovered: {}",
                r.body()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A 500-word stream of the echo model with a key, after its first three frames arrived.
struct LongStream {
    conn: Connection,
    body: hyper::body::Incoming,
}

impl LongStream {
    async fn open(env: &Env, key: &str) -> LongStream {
        let long = serde_json::json!({
            "model": "echo", "stream": true,
            "messages": [{"role": "user", "content": "word ".repeat(500)}]
        })
        .to_string();
        let mut conn = env.gw.connect().await;
        let req = Request::post("/v1/chat/completions")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", env.key(key)))
            .body(Full::new(Bytes::from(long)))
            .unwrap();
        let resp = conn.0.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        LongStream { conn, body }
    }

    /// The client goes away mid-stream: body, request handle and connection are dropped.
    fn abandon(self) {
        let (send, task) = self.conn;
        drop(self.body);
        drop(send);
        task.abort();
    }
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three four five six"}],
        "x_unknown_field": {"kept": true}
    })
    .to_string()
}

/// The text of the `delta.content` parts of a Chat Completions stream.
fn streamed_text(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_policy_routing_and_streaming() {
    let env = env(Opts::default()).await;
    let r = env.call("GET", "/healthz", None, "").await;
    assert_eq!((r.status, r.body().as_str()), (200, "ok"));
    env.wait_for_models().await;

    // Refusals never reach the model: (key, body) → status and, where given, one field of
    // the OpenAI error object.
    let before = env.model.stats.requests.load(Ordering::Relaxed);
    let echo = chat("echo", false);
    let refusals = [
        (None, echo.clone(), 401, Some(("code", "invalid_api_key"))),
        (Some("mg_wrong"), echo.clone(), 401, None),
        (Some(env.key("expired")), echo.clone(), 401, None),
        (
            Some(env.key("limited")),
            echo.clone(),
            403,
            Some(("param", "model")),
        ),
        (
            Some(env.key("good")),
            chat("nope", false),
            404,
            Some(("code", "model_not_found")),
        ),
        (Some(env.key("good")), "{not json".into(), 400, None),
    ];
    for (key, body, status, field) in refusals {
        let r = env.call("POST", "/v1/chat/completions", key, &body).await;
        assert_eq!(r.status, status, "{key:?} {body}: {}", r.body());
        if let Some((name, value)) = field {
            assert_eq!(
                r.json()["error"][name],
                value,
                "{key:?} {body}: {}",
                r.body()
            );
        }
    }
    assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), before);

    // Models: the limited key sees none of ours.
    let r = env
        .call("GET", "/v1/models", Some(env.key("good")), "")
        .await;
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["coder".to_string(), "echo".to_string()]);
    let r = env
        .call("GET", "/v1/models", Some(env.key("limited")), "")
        .await;
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 0);

    // Non-streaming, with the upstream's own key and never the client's.
    let r = env.chat("good", &echo).await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "one two three four five six"
    );
    let last_authorization = || env.model.stats.last_authorization.lock().unwrap().clone();
    assert_eq!(
        last_authorization().as_deref(),
        Some("Bearer upstream-secret")
    );

    // Streaming: chunks arrive as they are generated (30 ms apart), not in one burst.
    let r = env
        .call(
            "POST",
            "/chat/completions",
            Some(env.key("good")),
            &chat("coder", true),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.body();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(body.contains("\"usage\""));
    let first = r.chunks.first().unwrap().0;
    let last = r.chunks.last().unwrap().0;
    assert!(r.chunks.len() >= 5, "only {} chunks", r.chunks.len());
    assert!(
        last - first >= Duration::from_millis(100),
        "burst: first {first:?} last {last:?}"
    );
    // The alias was rewritten for the upstream, and no key went with the aliased upstream.
    assert_eq!(
        env.model.stats.last_model.lock().unwrap().as_deref(),
        Some("echo")
    );
    assert_eq!(last_authorization(), None);

    // CORS preflight without auth.
    let r = env.call("OPTIONS", "/v1/chat/completions", None, "").await;
    assert_eq!(r.status, 204);
    assert!(r.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream() {
    let env = env_up(Opts::default()).await;
    let stream = LongStream::open(&env, "good").await;
    let cancelled_before = env.model.stats.cancelled.load(Ordering::Relaxed);
    stream.abandon();
    let t = Instant::now();
    while env.model.stats.cancelled.load(Ordering::Relaxed) == cancelled_before {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "upstream still generating 1 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.model.stats.completed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_handshake_is_503_with_retry_after_at_once() {
    let env = env(Opts {
        corp_up: false,
        ..Opts::default()
    })
    .await;
    let t = Instant::now();
    let r = env.chat("good", &chat("coder", true)).await;
    assert_eq!(r.status, 503, "{}", r.body());
    assert_eq!(r.headers["retry-after"], "5");
    assert!(t.elapsed() < Duration::from_secs(1));
    // A request admitted but failed before the model answered gives its slot back: a
    // `max_concurrent: 1` key gets 503 twice, never 429.
    for _ in 0..2 {
        let r = env.chat("single", &chat("coder", true)).await;
        assert_eq!(r.status, 503, "{}", r.body());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_is_429_before_the_upstream() {
    let env = env_up(Opts::default()).await;
    let before = env.model.stats.requests.load(Ordering::Relaxed);
    for i in 0..2 {
        let r = env.chat("rpm2", &chat("echo", false)).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body());
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
        assert_eq!(
            r.headers["x-ratelimit-remaining-requests"],
            if i == 0 { "1" } else { "0" }
        );
    }
    assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), before + 2);
    let r = env.chat("rpm2", &chat("echo", false)).await;
    assert_eq!(r.status, 429, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
    // The refused request never reached the model.
    assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slot_is_released_after_a_client_disconnect() {
    let env = env_up(Opts::default()).await;
    let stream = LongStream::open(&env, "single").await;
    // While the stream runs, the key's one slot is taken.
    let r = env.chat("single", &chat("echo", false)).await;
    assert_eq!(r.status, 429, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.headers.contains_key("retry-after"));

    stream.abandon();
    env.slot_comes_back("single", Some(429), Duration::from_secs(1), 20)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_usage_reaches_the_ledger() {
    let (dir, env, _task) = env_with_ledger().await;

    // A stream with usage: the upstream's counts are recorded as they are.
    let body = chat("echo", true);
    let r = env.chat("good", &body).await;
    assert_eq!(r.status, 200);
    let u = usage_after(dir.path(), 1).await;
    assert_eq!(u.today.completion_tokens, 6, "{u:?}");
    assert_eq!(u.today.prompt_tokens, (body.len() / 4) as u64, "{u:?}");
    assert_eq!(u.today.estimated, 0);

    // A stream the client abandons reports no usage: it is recorded as an estimate.
    let stream = LongStream::open(&env, "good").await;
    stream.abandon();
    let u = usage_after(dir.path(), 2).await;
    assert_eq!(u.today.requests, 2);
    assert_eq!(u.today.estimated, 1, "{u:?}");
    // A few events made it out, far fewer than the 500 words asked for.
    assert!(
        u.today.completion_tokens > 6 && u.today.completion_tokens < 6 + 100,
        "{u:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_keepalive_comments_fill_silences_between_events() {
    let env = env_up(Opts {
        token_delay: Duration::from_millis(200),
        config: GatewayConfig {
            sse_keepalive: Duration::from_millis(40),
            ..GatewayConfig::default()
        },
        ..Opts::default()
    })
    .await;
    let r = env.chat("good", &chat("echo", true)).await;
    assert_eq!(r.status, 200);
    let body = r.body();
    let comments = body.matches(": keep-alive\n\n").count();
    assert!(comments >= 3, "{comments} keep-alive comments in {body}");
    // Comments sit only between events: every event is still one intact JSON object.
    let (events, done) = r.events();
    assert!(done);
    assert_eq!(streamed_text(&events), "one two three four five six");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_asked_upstream_and_stripped_when_the_client_did_not_ask() {
    let (dir, env, _task) = env_with_ledger().await;
    let body = serde_json::json!({
        "model": "echo", "stream": true,
        "messages": [{"role": "user", "content": "one two three four"}]
    })
    .to_string();
    let r = env.chat("good", &body).await;
    assert_eq!(r.status, 200);
    let (events, done) = r.events();
    assert!(done);
    // The model was asked for usage...
    assert_eq!(env.model.stats.usage_requested.load(Ordering::Relaxed), 1);
    // ...but the client, who did not ask, sees no usage chunk: role, 4 words, finish.
    assert_eq!(events.len(), 6, "{}", r.body());
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "{}",
        r.body()
    );
    // And the ledger has the model's own numbers, not an estimate.
    let u = usage_after(dir.path(), 1).await;
    // The gateway added `"stream_options":{"include_usage":true}` (40 bytes) to the body the
    // model counted.
    let upstream_len = body.len() + r#","stream_options":{"include_usage":true}"#.len();
    assert_eq!(
        (
            u.today.prompt_tokens,
            u.today.completion_tokens,
            u.today.estimated
        ),
        ((upstream_len / 4) as u64, 4, 0),
        "{u:?}"
    );

    // A client that asks gets the usage chunk as the model sent it.
    let r = env.chat("good", &chat("echo", true)).await;
    let (events, _) = r.events();
    let last = events.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 6, "{}", r.body());
    assert_eq!(env.model.stats.usage_requested.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_or_tpm_running_out_mid_stream_ends_the_stream_cleanly() {
    let env = env_up(Opts {
        token_delay: Duration::from_millis(2),
        ..Opts::default()
    })
    .await;
    // 200 words: the prompt estimate (body bytes / 4) fits in BUDGET, the completion does not.
    let body = serde_json::json!({
        "model": "echo", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "word ".repeat(200)}]
    })
    .to_string();
    let prompt = (body.len() / 4) as u64;
    assert!(prompt < BUDGET && prompt + 200 > BUDGET);
    for (key, next_code) in [
        ("budget", "insufficient_quota"),
        ("tpm", "rate_limit_exceeded"),
    ] {
        let cancelled = env.model.stats.cancelled.load(Ordering::Relaxed);
        let r = env.chat(key, &body).await;
        assert_eq!(r.status, 200, "{}", r.body());
        let (events, done) = r.events();
        assert!(done, "the stream ends with [DONE]: {}", r.body());
        let words = events
            .iter()
            .filter(|e| e["choices"][0]["delta"]["content"].as_str().map(str::trim) == Some("word"))
            .count() as u64;
        // Exactly what was left after the prompt estimate: not one token more. (The TPM bucket
        // also refills while the stream runs, BUDGET tokens per minute.)
        let left = BUDGET - prompt;
        let refill = if key == "tpm" {
            let secs = r.chunks.last().unwrap().0.as_secs_f64();
            (BUDGET as f64 * secs / 60.0).ceil() as u64
        } else {
            0
        };
        assert!(
            (left..=left + refill).contains(&words),
            "{words} words, {left} left, refill {refill}: {}",
            r.body()
        );
        let n = events.len();
        assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[n - 1]["choices"], serde_json::json!([]));
        assert_eq!(events[n - 1]["usage"]["completion_tokens"], words);
        assert_eq!(events[n - 1]["id"], events[0]["id"]);
        // The upstream stream was cut, so the model stopped generating.
        let t = Instant::now();
        while env.model.stats.cancelled.load(Ordering::Relaxed) == cancelled {
            assert!(t.elapsed() < Duration::from_secs(2), "model not cancelled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The next request finds the budget (or the TPM bucket) empty.
        let requests = env.model.stats.requests.load(Ordering::Relaxed);
        let r = env.chat(key, &chat("echo", true)).await;
        assert_eq!(r.status, 429, "{}", r.body());
        assert_eq!(r.json()["error"]["code"], next_code);
        assert!(r.headers.contains_key("retry-after"));
        assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), requests);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_upstream_is_shared_round_robin_across_keys() {
    // Capacity 2; key A runs 20 clients in a loop, keys B and C 2 each (10× fewer).
    let env = Arc::new(
        env_up(Opts {
            token_delay: Duration::from_millis(20),
            max_concurrent: Some(2),
            ..Opts::default()
        })
        .await,
    );
    let start = Instant::now();
    let (from, to) = (Duration::from_secs(1), Duration::from_secs(5));
    let mut tasks = Vec::new();
    for (i, (key, clients)) in [("fair-a", 20usize), ("fair-b", 2), ("fair-c", 2)]
        .into_iter()
        .enumerate()
    {
        for _ in 0..clients {
            let env = env.clone();
            tasks.push(tokio::spawn(async move {
                let mut done_in_window = 0u64;
                // Bounded: at most 1000 requests or until the window closes.
                for _ in 0..1000 {
                    if start.elapsed() >= to {
                        break;
                    }
                    // Streams: each holds its upstream slot for ~6 × 20 ms.
                    let r = env.chat(key, &chat("echo", true)).await;
                    assert_eq!(r.status, 200, "{}", r.body());
                    assert!(r.body().ends_with("data: [DONE]\n\n"));
                    let at = start.elapsed();
                    if at >= from && at < to {
                        done_in_window += 1;
                    }
                }
                (i, done_in_window)
            }));
        }
    }
    let mut per_key = [0u64; 3];
    for t in tasks {
        let (i, n) = t.await.unwrap();
        per_key[i] += n;
    }
    let total: u64 = per_key.iter().sum();
    let shares: Vec<f64> = per_key.iter().map(|&n| n as f64 / total as f64).collect();
    println!(
        "fair share over {:?}: completions A={} B={} C={} of {total}; shares A={:.3} B={:.3} C={:.3} (A ran 20 clients, B and C 2 each)",
        to - from,
        per_key[0], per_key[1], per_key[2], shares[0], shares[1], shares[2]
    );
    assert!(total >= 30, "too few completions to judge: {per_key:?}");
    // Round-robin gives each waiting key one slot per round: B and C get a third each, less at
    // most two requests cut by the window's edges.
    for k in [1, 2] {
        assert!(
            per_key[k] + 2 >= total / 3,
            "key {k} got {} of {total}: {per_key:?}",
            per_key[k]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_slow_queue_is_503_with_retry_after() {
    let env = env_up(Opts {
        config: GatewayConfig {
            queue_timeout: Duration::from_millis(300),
            max_queued: 1,
            ..GatewayConfig::default()
        },
        max_concurrent: Some(1),
        ..Opts::default()
    })
    .await;
    let requests = env.model.stats.requests.load(Ordering::Relaxed);
    let hold = LongStream::open(&env, "fair-a").await;
    // One waiter fits in the queue and times out after 300 ms.
    let env = Arc::new(env);
    let e = env.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = e.chat("fair-b", &chat("echo", false)).await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The queue (1) is full: the next request is refused at once.
    let t = Instant::now();
    let r = env.chat("fair-c", &chat("echo", false)).await;
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.status, 503, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "model_overloaded");
    assert_eq!(r.headers["retry-after"], "5");
    let (r, waited) = waiter.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "model_overloaded");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    // Neither refused request reached the model; the held stream did.
    assert_eq!(
        env.model.stats.requests.load(Ordering::Relaxed),
        requests + 1
    );
    hold.abandon();
    // The slot comes back when the stream goes away.
    env.slot_comes_back("fair-b", None, Duration::from_secs(2), 50)
        .await;
}
