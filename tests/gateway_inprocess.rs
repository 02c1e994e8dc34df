//! The gateway end to end in one process: HTTPS (rustls) on loopback, keys and policy, routing,
//! and a real WireGuard tunnel (two netstacks over loopback UDP) to the echo model. No root.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use modelgate::config::GatewayConfig;
use modelgate::demo::model::EchoModel;
use modelgate::demo::LoopbackPair;
use modelgate::gateway::upstream::UpstreamSpec;
use modelgate::gateway::Gateway;
use modelgate::keys::ledger::{Ledger, LedgerOptions, LedgerWriter};
use modelgate::keys::{KeyRing, Keys};
use modelgate::netstack::{Netstack, TcpTuning};
use modelgate::policy::{Budget, BudgetPeriod, KeyPolicy, Principal};
use tokio::sync::watch;

/// Tokens of the `budget` key's day budget and of the `tpm` key's TPM.
const BUDGET: u64 = 400;

struct Env {
    addr: SocketAddr,
    /// Real `mg_` keys (format + checksum), as `key create` makes them.
    good: String,
    limited: String,
    expired: String,
    /// `max_concurrent: Some(1)`.
    single: String,
    /// `rpm: Some(2)`.
    rpm2: String,
    /// A day budget of [`BUDGET`] tokens.
    budget: String,
    /// A TPM limit of [`BUDGET`] tokens.
    tpm: String,
    /// Three unlimited keys for the fair-share test.
    fair: [String; 3],
    tls: Arc<rustls::ClientConfig>,
    model: EchoModel,
    corp: Netstack,
    _stop: watch::Sender<bool>,
}

fn principal(id: &str, policy: KeyPolicy) -> Arc<Principal> {
    Arc::new(Principal {
        id: id.into(),
        name: id.into(),
        policy,
    })
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

async fn env_with(corp_up: bool) -> Env {
    env_full(corp_up, None).await
}

/// An environment whose gateway records usage with `ledger`.
async fn env_full(corp_up: bool, ledger: Option<LedgerWriter>) -> Env {
    env_custom(
        corp_up,
        ledger,
        Duration::from_millis(30),
        GatewayConfig::default(),
    )
    .await
}

async fn env_custom(
    corp_up: bool,
    ledger: Option<LedgerWriter>,
    token_delay: Duration,
    settings: GatewayConfig,
) -> Env {
    env_opts(Opts {
        corp_up,
        ledger,
        token_delay,
        settings,
        max_concurrent: None,
    })
    .await
}

/// Everything an environment can vary.
struct Opts {
    corp_up: bool,
    ledger: Option<LedgerWriter>,
    /// The echo model's pause between words.
    token_delay: Duration,
    settings: GatewayConfig,
    /// `max_concurrent` of both upstreams (fair-share queue).
    max_concurrent: Option<u32>,
}

/// Full control: the echo model's pause between words, the gateway's settings, the upstream
/// concurrency cap.
async fn env_opts(o: Opts) -> Env {
    let Opts {
        corp_up,
        ledger,
        token_delay,
        settings,
        max_concurrent,
    } = o;
    let LoopbackPair { appliance, corp } =
        LoopbackPair::start(&[], corp_up, TcpTuning::default()).unwrap();
    let model = EchoModel::new("echo", token_delay);
    let mut listener = corp.listen(8000).await.unwrap();
    let m = model.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(m.clone().serve_connection(s));
        }
    });

    let good = modelgate::keys::format::generate().expose().to_string();
    let limited = modelgate::keys::format::generate().expose().to_string();
    let expired = modelgate::keys::format::generate().expose().to_string();
    let single = modelgate::keys::format::generate().expose().to_string();
    let rpm2 = modelgate::keys::format::generate().expose().to_string();
    let gen = || modelgate::keys::format::generate().expose().to_string();
    let (budget, tpm) = (gen(), gen());
    let fair = [gen(), gen(), gen()];
    let mut ring = vec![
        (
            budget.clone(),
            principal(
                "budget",
                KeyPolicy {
                    budget: Some(Budget {
                        tokens: BUDGET,
                        period: BudgetPeriod::Day,
                    }),
                    ..KeyPolicy::default()
                },
            ),
        ),
        (
            tpm.clone(),
            principal(
                "tpm",
                KeyPolicy {
                    tpm: Some(BUDGET as u32),
                    ..KeyPolicy::default()
                },
            ),
        ),
    ];
    for (k, name) in fair.iter().zip(["fair-a", "fair-b", "fair-c"]) {
        ring.push((k.clone(), principal(name, KeyPolicy::default())));
    }
    ring.extend([
        (
            single.clone(),
            principal(
                "single",
                KeyPolicy {
                    max_concurrent: Some(1),
                    ..KeyPolicy::default()
                },
            ),
        ),
        (
            rpm2.clone(),
            principal(
                "rpm2",
                KeyPolicy {
                    rpm: Some(2),
                    ..KeyPolicy::default()
                },
            ),
        ),
        (good.clone(), principal("good", KeyPolicy::default())),
        (
            limited.clone(),
            principal(
                "limited",
                KeyPolicy {
                    models: vec!["other-*".into()],
                    ..KeyPolicy::default()
                },
            ),
        ),
        (
            expired.clone(),
            principal(
                "expired",
                KeyPolicy {
                    expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
                    ..KeyPolicy::default()
                },
            ),
        ),
    ]);
    let keys = Keys::new(KeyRing::for_tests(ring));
    let upstreams = vec![
        UpstreamSpec {
            name: "discovered".into(),
            addr: "10.99.0.2:8000".parse().unwrap(),
            base_path: "/v1".into(),
            api_key: Some("upstream-secret".into()),
            models: vec![],
            max_concurrent,
        },
        UpstreamSpec {
            name: "aliased".into(),
            addr: "10.99.0.2:8000".parse().unwrap(),
            base_path: "/v1".into(),
            api_key: None,
            models: vec![("coder".into(), "echo".into())],
            max_concurrent,
        },
    ];
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut gateway = Gateway::new(keys, appliance, upstreams, settings);
    if let Some(l) = ledger {
        gateway = gateway.ledger(l);
    }
    let (server_tls, client_tls) = tls_pair();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    gateway.start(listener, server_tls, stop_rx);
    Env {
        addr,
        good,
        limited,
        expired,
        single,
        rpm2,
        budget,
        tpm,
        fair,
        tls: client_tls,
        model,
        corp,
        _stop: stop_tx,
    }
}

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    /// Body chunks with their arrival time since the request was sent.
    chunks: Vec<(Duration, Bytes)>,
}

impl Reply {
    fn body(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body()).unwrap_or_else(|e| panic!("{e}: {}", self.body()))
    }
}

async fn call(
    env: &Env,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
) -> Reply {
    let (mut send, _conn) = connect(env).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("no response head within 20 s")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    while let Some(f) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("body stalled")
    {
        if let Ok(d) = f.unwrap().into_data() {
            chunks.push((start.elapsed(), d));
        }
    }
    Reply {
        status,
        headers,
        chunks,
    }
}

/// One HTTPS + HTTP/1.1 connection to the gateway; the task drives the connection.
async fn connect(
    env: &Env,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(env.tls.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

/// A 500-word stream of the echo model with `key`, after its first three frames arrived.
struct LongStream {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<hyper::Result<()>>,
    body: hyper::body::Incoming,
}

impl LongStream {
    async fn open(env: &Env, key: &str) -> LongStream {
        let long = serde_json::json!({
            "model": "echo", "stream": true,
            "messages": [{"role": "user", "content": "word ".repeat(500)}]
        })
        .to_string();
        let (mut send, conn) = connect(env).await;
        let req = Request::post("/v1/chat/completions")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(long)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        LongStream { send, conn, body }
    }

    /// The client goes away mid-stream: body, request handle and connection are dropped.
    fn abandon(self) {
        drop(self.body);
        drop(self.send);
        self.conn.abort();
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

async fn wait_for_models(env: &Env) {
    let start = Instant::now();
    loop {
        let r = call(env, "GET", "/v1/models", Some(env.good.as_str()), None).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_policy_routing_and_streaming() {
    let env = env_with(true).await;
    let r = call(&env, "GET", "/healthz", None, None).await;
    assert_eq!((r.status, r.body().as_str()), (200, "ok"));
    wait_for_models(&env).await;

    // Refusals never reach the model.
    let before = env.model.stats.requests.load(Ordering::Relaxed);
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some("mg_wrong"),
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.expired.as_str()),
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.limited.as_str()),
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(chat("nope", false)),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some("{not json".into()),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), before);

    // Models: the limited key sees none of ours.
    let r = call(&env, "GET", "/v1/models", Some(env.good.as_str()), None).await;
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["coder".to_string(), "echo".to_string()]);
    let r = call(&env, "GET", "/v1/models", Some(env.limited.as_str()), None).await;
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 0);

    // Non-streaming, with the upstream's own key and never the client's.
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "one two three four five six"
    );
    assert_eq!(
        env.model
            .stats
            .last_authorization
            .lock()
            .unwrap()
            .as_deref(),
        Some("Bearer upstream-secret")
    );

    // Streaming: chunks arrive as they are generated (30 ms apart), not in one burst.
    let r = call(
        &env,
        "POST",
        "/chat/completions",
        Some(env.good.as_str()),
        Some(chat("coder", true)),
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
    assert_eq!(
        env.model
            .stats
            .last_authorization
            .lock()
            .unwrap()
            .as_deref(),
        None
    );

    // CORS preflight without auth.
    let r = call(&env, "OPTIONS", "/v1/chat/completions", None, None).await;
    assert_eq!(r.status, 204);
    assert!(r.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream() {
    let env = env_with(true).await;
    wait_for_models(&env).await;
    let stream = LongStream::open(&env, &env.good).await;
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
    let env = env_with(false).await;
    let t = Instant::now();
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(chat("coder", true)),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body());
    assert_eq!(r.headers["retry-after"], "5");
    assert!(t.elapsed() < Duration::from_secs(1));
    // A request admitted but failed before the model answered gives its slot back: a
    // `max_concurrent: 1` key gets 503 twice, never 429.
    for _ in 0..2 {
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(env.single.as_str()),
            Some(chat("coder", true)),
        )
        .await;
        assert_eq!(r.status, 503, "{}", r.body());
    }
    drop(env.corp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_is_429_before_the_upstream() {
    let env = env_with(true).await;
    wait_for_models(&env).await;
    let before = env.model.stats.requests.load(Ordering::Relaxed);
    for i in 0..2 {
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(env.rpm2.as_str()),
            Some(chat("echo", false)),
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body());
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
        assert_eq!(
            r.headers["x-ratelimit-remaining-requests"],
            if i == 0 { "1" } else { "0" }
        );
    }
    assert_eq!(env.model.stats.requests.load(Ordering::Relaxed), before + 2);
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.rpm2.as_str()),
        Some(chat("echo", false)),
    )
    .await;
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
    let env = env_with(true).await;
    wait_for_models(&env).await;
    let stream = LongStream::open(&env, &env.single).await;
    // While the stream runs, the key's one slot is taken.
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.single.as_str()),
        Some(chat("echo", false)),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.headers.contains_key("retry-after"));

    stream.abandon();
    let t = Instant::now();
    loop {
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(env.single.as_str()),
            Some(chat("echo", false)),
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slot still held 1 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An environment whose gateway writes usage to a ledger in a temporary state directory every
/// 20 ms, with the models discovered.
async fn env_with_ledger() -> (tempfile::TempDir, Env, modelgate::keys::ledger::LedgerTask) {
    let dir = tempfile::tempdir().unwrap();
    let (writer, task) = LedgerWriter::start(
        Ledger::open(dir.path()).unwrap(),
        LedgerOptions {
            flush_every: Duration::from_millis(20),
            ..LedgerOptions::default()
        },
    );
    let env = env_full(true, Some(writer)).await;
    wait_for_models(&env).await;
    (dir, env, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_usage_reaches_the_ledger() {
    let (dir, env, _task) = env_with_ledger().await;
    let usage = || {
        Ledger::open(dir.path())
            .unwrap()
            .usage("good", SystemTime::now())
            .unwrap()
    };
    let wait_for = |requests: u64| {
        let usage = &usage;
        async move {
            let t = Instant::now();
            loop {
                let u = usage();
                if u.total.requests >= requests {
                    return u;
                }
                assert!(t.elapsed() < Duration::from_secs(2), "ledger: {u:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // A stream with usage: the upstream's counts are recorded as they are.
    let body = chat("echo", true);
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    let u = wait_for(1).await;
    assert_eq!(u.today.completion_tokens, 6, "{u:?}");
    assert_eq!(u.today.prompt_tokens, (body.len() / 4) as u64, "{u:?}");
    assert_eq!(u.today.estimated, 0);

    // A stream the client abandons reports no usage: it is recorded as an estimate.
    let stream = LongStream::open(&env, &env.good).await;
    stream.abandon();
    let u = wait_for(2).await;
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
    let settings = GatewayConfig {
        sse_keepalive: Duration::from_millis(40),
        ..GatewayConfig::default()
    };
    let env = env_custom(true, None, Duration::from_millis(200), settings).await;
    wait_for_models(&env).await;
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(chat("echo", true)),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = r.body();
    let comments = body.matches(": keep-alive\n\n").count();
    assert!(comments >= 3, "{comments} keep-alive comments in {body}");
    // Comments sit only between events: every event is still one intact JSON object.
    let mut text = String::new();
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        if event.starts_with(':') {
            continue;
        }
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("bad event {event:?}"));
        if data == "[DONE]" {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(s);
        }
    }
    assert_eq!(text, "one two three four five six");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

/// The events of an SSE body as JSON values (comments skipped), and whether it ended with
/// `[DONE]`.
fn sse_events(body: &str) -> (Vec<serde_json::Value>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        if event.starts_with(':') {
            continue;
        }
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("bad event {event:?}"));
        assert!(!done, "event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        out.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
    }
    (out, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_asked_upstream_and_stripped_when_the_client_did_not_ask() {
    let (dir, env, _task) = env_with_ledger().await;
    let body = serde_json::json!({
        "model": "echo", "stream": true,
        "messages": [{"role": "user", "content": "one two three four"}]
    })
    .to_string();
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    let (events, done) = sse_events(&r.body());
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
    let t = Instant::now();
    let u = loop {
        let u = Ledger::open(dir.path())
            .unwrap()
            .usage("good", SystemTime::now())
            .unwrap();
        if u.total.requests >= 1 {
            break u;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "ledger: {u:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.good.as_str()),
        Some(chat("echo", true)),
    )
    .await;
    let (events, _) = sse_events(&r.body());
    let last = events.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 6, "{}", r.body());
    assert_eq!(env.model.stats.usage_requested.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_or_tpm_running_out_mid_stream_ends_the_stream_cleanly() {
    let env = env_custom(
        true,
        None,
        Duration::from_millis(2),
        GatewayConfig::default(),
    )
    .await;
    wait_for_models(&env).await;
    // 200 words: the prompt estimate (body bytes / 4) fits in BUDGET, the completion does not.
    let body = serde_json::json!({
        "model": "echo", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "word ".repeat(200)}]
    })
    .to_string();
    let prompt = (body.len() / 4) as u64;
    assert!(prompt < BUDGET && prompt + 200 > BUDGET);
    for (key, next_code) in [
        (env.budget.clone(), "insufficient_quota"),
        (env.tpm.clone(), "rate_limit_exceeded"),
    ] {
        let cancelled = env.model.stats.cancelled.load(Ordering::Relaxed);
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(key.as_str()),
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body());
        let (events, done) = sse_events(&r.body());
        assert!(done, "the stream ends with [DONE]: {}", r.body());
        let words = events
            .iter()
            .filter(|e| e["choices"][0]["delta"]["content"].as_str().map(str::trim) == Some("word"))
            .count() as u64;
        // Exactly what was left after the prompt estimate: not one token more. (The TPM bucket
        // also refills while the stream runs, BUDGET tokens per minute.)
        let left = BUDGET - prompt;
        let refill = if key == env.tpm {
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
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(key.as_str()),
            Some(chat("echo", true)),
        )
        .await;
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
        env_opts(Opts {
            corp_up: true,
            ledger: None,
            token_delay: Duration::from_millis(20),
            settings: GatewayConfig::default(),
            max_concurrent: Some(2),
        })
        .await,
    );
    wait_for_models(&env).await;
    let start = Instant::now();
    let (from, to) = (Duration::from_secs(1), Duration::from_secs(5));
    let mut tasks = Vec::new();
    for (i, clients) in [20usize, 2, 2].into_iter().enumerate() {
        for _ in 0..clients {
            let env = env.clone();
            tasks.push(tokio::spawn(async move {
                let key = env.fair[i].clone();
                let mut done_in_window = 0u64;
                // Bounded: at most 1000 requests or until the window closes.
                for _ in 0..1000 {
                    if start.elapsed() >= to {
                        break;
                    }
                    // Streams: each holds its upstream slot for ~6 × 20 ms.
                    let r = call(
                        &env,
                        "POST",
                        "/v1/chat/completions",
                        Some(key.as_str()),
                        Some(chat("echo", true)),
                    )
                    .await;
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
    let env = env_opts(Opts {
        corp_up: true,
        ledger: None,
        token_delay: Duration::from_millis(30),
        settings: GatewayConfig {
            queue_timeout: Duration::from_millis(300),
            max_queued: 1,
            ..GatewayConfig::default()
        },
        max_concurrent: Some(1),
    })
    .await;
    wait_for_models(&env).await;
    let requests = env.model.stats.requests.load(Ordering::Relaxed);
    let hold = LongStream::open(&env, &env.fair[0]).await;
    // One waiter fits in the queue and times out after 300 ms.
    let env = Arc::new(env);
    let e = env.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = call(
            &e,
            "POST",
            "/v1/chat/completions",
            Some(e.fair[1].as_str()),
            Some(chat("echo", false)),
        )
        .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The queue (1) is full: the next request is refused at once.
    let t = Instant::now();
    let r = call(
        &env,
        "POST",
        "/v1/chat/completions",
        Some(env.fair[2].as_str()),
        Some(chat("echo", false)),
    )
    .await;
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
    let t = Instant::now();
    loop {
        let r = call(
            &env,
            "POST",
            "/v1/chat/completions",
            Some(env.fair[1].as_str()),
            Some(chat("echo", false)),
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "slot not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
