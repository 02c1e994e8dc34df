//! What a hostile or broken client cannot do to the gateway any more, one test per fix:
//! stalled bodies (408, permit freed), a flood of them (legitimate clients still get in), an
//! HTTP/2 connection that never sends a request (closed), ambiguous `Authorization` (400),
//! bodies nested too deep (400, never forwarded), unknown paths (404, preflight kept), early
//! errors over HTTP/2 (the stream ends without a reset), and answers the client can read
//! before the connection closes (431). Each runs the real gateway in-process over TLS.

use std::sync::atomic::Ordering;
use std::time::Duration;

use modelgate::config::GatewayConfig;
use modelgate::demo::model::EchoModel;
use modelgate::policy::KeyPolicy;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::harness::{corp_upstream, key, Reply, Stack, StackOptions};
use crate::raw::{self, frame, H2Raw};

/// A gateway whose one upstream routes `echo` statically (no discovery to wait for), with the
/// key `good`; `config` changes the `[gateway]` settings.
pub struct Env {
    pub gw: Stack,
    pub key: String,
    pub model: EchoModel,
}

impl Env {
    pub async fn up(config: GatewayConfig) -> Env {
        let (secret, principal) = key("good", KeyPolicy::default());
        let mut o = StackOptions::new(
            vec![(secret.clone(), principal)],
            vec![corp_upstream("static", &[("echo", "echo")])],
        );
        o.config = config;
        let model = EchoModel::new("echo", Duration::from_millis(1));
        let m = model.clone();
        let gw = Stack::start(o, move |s| m.clone().serve_connection(s)).await;
        Env {
            gw,
            key: secret,
            model,
        }
    }

    pub fn model_requests(&self) -> u64 {
        self.model.stats.requests.load(Ordering::Relaxed)
    }

    pub fn auth(&self) -> String {
        format!("Bearer {}", self.key)
    }

    /// A small chat with the key, on a fresh connection, bounded by `within`.
    pub async fn chat(&self, within: Duration) -> Option<Reply> {
        let auth = self.auth();
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        tokio::time::timeout(
            within,
            self.gw.call("POST", "/v1/chat/completions", &headers, CHAT),
        )
        .await
        .ok()
    }
}

pub const CHAT: &str = r#"{"model":"echo","messages":[{"role":"user","content":"hi there"}]}"#;

/// Short limits, so slow-client tests take seconds.
pub fn quick() -> GatewayConfig {
    GatewayConfig {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        body_min_rate: 1024,
        ..GatewayConfig::default()
    }
}

/// `POST /v1/chat/completions` head announcing `len` body bytes, with `auth`.
pub fn post_head(auth: &str, len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_408_and_its_permit_comes_back() {
    // The one permit is taken, so the connection would also be closed to make room after
    // `conns::EVICT_AFTER` (1 s): the body's deadline comes first.
    let env = Env::up(GatewayConfig {
        max_connections: 1,
        body_read_timeout: Duration::from_millis(500),
        ..quick()
    })
    .await;
    let t = Instant::now();
    let mut bytes = post_head(&env.auth(), 1000).into_bytes();
    bytes.extend_from_slice(br#"{"model":"#);
    let r = raw::h1(&env.gw, &bytes, Duration::from_secs(5)).await;
    assert_eq!(r.status, Some(408), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert!(r.closed, "the connection stays open after a 408: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // The only permit is free again: the next client is served.
    let ok = env.chat(Duration::from_secs(5)).await.expect("served");
    assert_eq!(ok.status, 200, "{}", ok.body());
    assert_eq!(env.model_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stalled_bodies_does_not_lock_out_other_clients() {
    // Bodies would be cut only after 30 s: the flood holds every permit until then.
    let env = Env::up(GatewayConfig {
        max_connections: 8,
        body_read_timeout: Duration::from_secs(30),
        ..GatewayConfig::default()
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..8 {
        let mut io = raw::tls(&env.gw, &[]).await;
        io.write_all(post_head(&env.auth(), 5000).as_bytes())
            .await
            .unwrap();
        io.write_all(b"{\"model\":\"echo\",").await.unwrap();
        flood.push(io);
    }
    // Every permit is taken; a legitimate client still gets its answer within seconds.
    let t = Instant::now();
    let ok = env
        .chat(Duration::from_secs(8))
        .await
        .expect("locked out by stalled bodies");
    assert_eq!(ok.status, 200, "{}", ok.body());
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(env.model_requests(), 1);
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_a_request_is_closed() {
    let env = Env::up(quick()).await;
    // Only SETTINGS and PINGs, which the server answers (so bytes keep moving).
    let mut c = H2Raw::open(&env.gw).await;
    let t = Instant::now();
    let closed = loop {
        c.send(frame::PING, 0, 0, &[7; 8]).await;
        let (_, eof) = c
            .until(Duration::from_millis(200), |f| f.ty == frame::GOAWAY)
            .await;
        if eof {
            break true;
        }
        if t.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(closed, "an HTTP/2 connection without a request stayed open");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // A request head that never ends (HEADERS without END_HEADERS) is no request either.
    let mut c = H2Raw::open(&env.gw).await;
    let block = raw::hpack_literals(&[(":method", "POST"), (":scheme", "https")]);
    c.send(frame::HEADERS, 0, 1, &block).await;
    let (_, eof) = c.until(Duration::from_secs(4), |_| false).await;
    assert!(eof, "a never-ending request head kept the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_400_even_when_the_first_is_valid() {
    let env = Env::up(GatewayConfig::default()).await;
    let auth = env.auth();
    for pair in [
        [auth.as_str(), "Bearer nope"],
        ["Bearer nope", auth.as_str()],
    ] {
        let r = env
            .gw
            .call(
                "POST",
                "/v1/chat/completions",
                &[("authorization", pair[0]), ("authorization", pair[1])],
                CHAT,
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.body());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(env.model_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_nested_too_deep_never_reaches_the_model() {
    let env = Env::up(GatewayConfig::default()).await;
    let auth = env.auth();
    let nested = |levels: usize| {
        format!(
            r#"{{"model":"echo","messages":[{{"role":"user","content":"hi"}}],"x":{}{}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    };
    let headers = [("authorization", auth.as_str())];
    for levels in [100_000, 100] {
        let r = env
            .gw
            .call("POST", "/v1/chat/completions", &headers, nested(levels))
            .await;
        assert_eq!(r.status, 400, "{levels}: {}", r.body());
        assert!(r.body().contains("levels deep"), "{}", r.body());
    }
    assert_eq!(env.model_requests(), 0);
    // At the limit (the object is 1, `x` adds 99), the body goes through.
    let r = env
        .gw
        .call("POST", "/v1/chat/completions", &headers, nested(99))
        .await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert_eq!(env.model_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_for_every_method_and_preflight_still_works() {
    let env = Env::up(GatewayConfig::default()).await;
    for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
        let r = env.gw.call(method, "/v1/nope", &[], "").await;
        assert_eq!(r.status, 404, "{method}: {}", r.body());
        let v = r.json();
        assert_eq!(v["error"]["code"], "unknown_url", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nope"));
    }
    for path in ["/v1/nope", "/", "/v1/chat/completions", "/models"] {
        let r = env.gw.call("OPTIONS", path, &[], "").await;
        assert_eq!(r.status, 204, "OPTIONS {path}");
        assert!(r.headers.contains_key("access-control-allow-origin"));
    }
    // A known path with another method: 405, also OpenAI-shaped.
    let r = env.gw.call("GET", "/v1/chat/completions", &[], "").await;
    assert_eq!(r.status, 405, "{}", r.body());
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    let r = env.gw.call("GET", "/healthz", &[], "").await;
    assert_eq!((r.status, r.body().as_str()), (200, "ok"));
}

/// An answer given before the body was read (here 401): the gateway reads the rest of the
/// body, so the stream ends normally once the client finishes, with no RST_STREAM (which curl
/// 7.88 reports as "(92) Stream error in the HTTP/2 framing layer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_http2_answer_ends_its_stream_without_a_reset() {
    let env = Env::up(GatewayConfig::default()).await;
    let mut c = H2Raw::open(&env.gw).await;
    c.request(
        1,
        &[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/v1/chat/completions"),
            (":authority", "localhost"),
            ("content-type", "application/json"),
        ],
        false,
    )
    .await;
    let (frames, _) = c
        .until(Duration::from_secs(5), |f| {
            f.stream == 1 && f.ty == frame::DATA && f.flags & frame::END_STREAM != 0
        })
        .await;
    let status = frames
        .iter()
        .find_map(|f| f.status().filter(|_| f.stream == 1));
    assert_eq!(status, Some(401), "{frames:?}");
    // The client sends its body only now, in two frames.
    c.send(frame::DATA, 0, 1, &CHAT.as_bytes()[..10]).await;
    c.send(frame::DATA, frame::END_STREAM, 1, &CHAT.as_bytes()[10..])
        .await;
    let (frames, _) = c.until(Duration::from_millis(700), |_| false).await;
    let resets: Vec<_> = frames
        .iter()
        .filter(|f| f.ty == frame::RST_STREAM && f.stream == 1)
        .collect();
    assert!(resets.is_empty(), "stream 1 was reset: {resets:?}");
    assert_eq!(env.model_requests(), 0);
}

/// A 431 for a head too large is readable: the gateway does not close the socket under the
/// client's still-arriving head (which made the kernel reset the connection over the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_431_for_a_huge_head_arrives_before_the_close() {
    let env = Env::up(GatewayConfig::default()).await;
    let filler = "x".repeat(1000);
    let mut head = String::from("POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n");
    for i in 0..300 {
        head.push_str(&format!("x-fill-{i}: {filler}\r\n"));
    }
    head.push_str("\r\n");
    let mut seen = Vec::new();
    for _ in 0..20 {
        let r = raw::h1(&env.gw, head.as_bytes(), Duration::from_secs(5)).await;
        // Answered, then closed with close_notify and FIN after the rest was read (a reset
        // would have been the kernel's answer to bytes arriving on a closed socket).
        seen.push((r.status, r.clean_close));
    }
    assert!(seen.iter().all(|s| *s == (Some(431), true)), "{seen:?}");
    assert_eq!(env.model_requests(), 0);
}
