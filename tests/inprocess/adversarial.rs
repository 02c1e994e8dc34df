//! Hostile requests against the real gateway (in-process, TLS on loopback, the echo model
//! behind the tunnel), table-driven: authentication tricks, policy, path and request-line
//! tricks, framing and smuggling, sizes and slow clients over HTTP/1.1 written as raw bytes;
//! HTTP/2 abuse frame by frame. Every case asserts its status or the connection's outcome, and
//! that the model's own request count did not move; after every table a legitimate request
//! still gets its answer (and is the one request the model sees).

use std::time::Duration;

use modelgate::config::GatewayConfig;
use modelgate::policy::{Endpoint, KeyPolicy};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::harness::{corp_upstream, key, Stack, StackOptions};
use crate::raw::{self, frame, H1Reply, H2Raw};
use modelgate::demo::model::EchoModel;
use std::sync::atomic::Ordering;

const CHAT: &str = r#"{"model":"echo","messages":[{"role":"user","content":"hi there"}]}"#;
const MAX_BODY: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;

/// The gateway under attack: short timeouts, small limits, keys `good`, `limited` (models
/// `other-*`), `expired` and `models-only` (endpoint `models`), static routes `echo` and
/// `coder` (= upstream id `qwen-7b`).
struct Target {
    gw: Stack,
    model: EchoModel,
    good: String,
    limited: String,
    expired: String,
    models_only: String,
}

async fn target() -> Target {
    let policies = [
        ("good", KeyPolicy::default()),
        (
            "limited",
            KeyPolicy {
                models: vec!["other-*".into()],
                ..KeyPolicy::default()
            },
        ),
        (
            "expired",
            KeyPolicy {
                expires_at: Some(std::time::SystemTime::now() - Duration::from_secs(1)),
                ..KeyPolicy::default()
            },
        ),
        (
            "models-only",
            KeyPolicy {
                endpoints: vec![Endpoint::Models],
                ..KeyPolicy::default()
            },
        ),
    ];
    let ring: Vec<_> = policies.into_iter().map(|(n, p)| key(n, p)).collect();
    let secrets: Vec<String> = ring.iter().map(|(s, _)| s.clone()).collect();
    let mut o = StackOptions::new(
        ring,
        vec![corp_upstream(
            "static",
            &[("echo", "echo"), ("coder", "qwen-7b")],
        )],
    );
    o.config = GatewayConfig {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        body_min_rate: 1024,
        max_body_bytes: MAX_BODY,
        max_header_bytes: MAX_HEAD,
        max_headers: 50,
        ..GatewayConfig::default()
    };
    let model = EchoModel::new("echo", Duration::from_millis(1));
    let m = model.clone();
    let gw = Stack::start(o, move |s| m.clone().serve_connection(s)).await;
    Target {
        gw,
        model,
        good: secrets[0].clone(),
        limited: secrets[1].clone(),
        expired: secrets[2].clone(),
        models_only: secrets[3].clone(),
    }
}

impl Target {
    fn model_requests(&self) -> u64 {
        self.model.stats.requests.load(Ordering::Relaxed)
    }

    /// A legitimate request is still answered, and it is the one the model sees.
    async fn still_serves(&self, before: u64) {
        let auth = format!("Bearer {}", self.good);
        let r = raw::h1(
            &self.gw,
            post("/v1/chat/completions", &[("authorization", &auth)], CHAT).as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            r.status,
            Some(200),
            "legitimate request after the attacks: {r:?}"
        );
        assert_eq!(self.model_requests(), before + 1);
    }
}

/// What a case must end with.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status.
    Status(u16),
    /// One of these statuses (where the exact one is the HTTP library's choice).
    OneOf(&'static [u16]),
    /// This status, then the connection is closed (nothing after it is read).
    StatusThenClose(u16),
    /// No answer; the connection is closed within the case's wait.
    Closed,
}

impl Expect {
    fn check(self, name: &str, r: &H1Reply) {
        let ok = match self {
            Expect::Status(s) => r.status == Some(s),
            Expect::OneOf(all) => r.status.is_some_and(|s| all.contains(&s)),
            Expect::StatusThenClose(s) => r.status == Some(s) && r.closed,
            Expect::Closed => r.status.is_none() && r.closed,
        };
        assert!(ok, "{name}: expected {self:?}, got {r:?}");
    }
}

/// A well-formed `POST` with `headers`, `host` and a `content-length`.
fn post(path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s =
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    s
}

/// A `POST /v1/chat/completions` with `authorization: AUTH`, the raw header `lines` (CRLF
/// between them) and `body` as it is.
fn keyed(auth: &str, lines: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\n{lines}\r\n\r\n{body}"
    )
    .into_bytes()
}

fn chunked(path: &str, headers: &[(&str, &str)], chunks: &str) -> String {
    let mut s = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("transfer-encoding: chunked\r\n\r\n");
    s.push_str(chunks);
    s
}

fn chunk(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

fn nested(levels: usize) -> String {
    format!(
        r#"{{"model":"echo","messages":[],"x":{}{}}}"#,
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

/// Runs HTTP/1.1 cases (name, bytes, expectation), each on a fresh connection; the model sees
/// none of them.
async fn run_h1(t: &Target, cases: Vec<(&str, Vec<u8>, Expect)>) -> usize {
    let before = t.model_requests();
    let n = cases.len();
    for (name, bytes, expect) in cases {
        let r = raw::h1(&t.gw, &bytes, Duration::from_secs(4)).await;
        expect.check(name, &r);
        assert_eq!(t.model_requests(), before, "{name} reached the model");
    }
    t.still_serves(before).await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_policy_tricks_never_reach_the_model() {
    let t = target().await;
    let good = format!("Bearer {}", t.good);
    let p = |headers: &[(&str, &str)], body: &str| {
        post("/v1/chat/completions", headers, body).into_bytes()
    };
    let a = |v: &str| vec![("authorization".to_string(), v.to_string())];
    let with = |h: &[(String, String)], body: &str| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        p(&h, body)
    };
    let huge_key = format!("Bearer mg_{}", "a".repeat(8000));
    let mut wrong_sum = t.good.clone();
    let last = wrong_sum.pop().unwrap();
    wrong_sum.push(if last == 'a' { 'b' } else { 'a' });
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("no key", p(&[], CHAT), Expect::Status(401)),
        ("basic scheme", with(&a("Basic Zm9vOmJhcg=="), CHAT), Expect::Status(401)),
        ("bearer without key", with(&a("Bearer"), CHAT), Expect::Status(401)),
        ("bearer glued to key", with(&a(&format!("Bearer{}", t.good)), CHAT), Expect::Status(401)),
        (
            "two keys, first valid",
            p(&[("authorization", &good), ("authorization", "Bearer mg_nope")], CHAT),
            Expect::Status(400),
        ),
        (
            "two keys, second valid",
            p(&[("authorization", "Bearer mg_nope"), ("authorization", &good)], CHAT),
            Expect::Status(400),
        ),
        (
            "key in the query string",
            post(&format!("/v1/chat/completions?api_key={}", t.good), &[], CHAT).into_bytes(),
            Expect::Status(401),
        ),
        ("key in x-api-key", p(&[("x-api-key", &t.good)], CHAT), Expect::Status(401)),
        ("8 KB key", with(&a(&huge_key), CHAT), Expect::Status(401)),
        (
            "NUL in the key",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\0x\r\ncontent-length: {}\r\n\r\n{CHAT}",
                t.good,
                CHAT.len()
            )
            .into_bytes(),
            Expect::Status(400),
        ),
        ("key plus trailing word", with(&a(&format!("{good} extra")), CHAT), Expect::Status(401)),
        ("expired key", with(&a(&format!("Bearer {}", t.expired)), CHAT), Expect::Status(401)),
        (
            "revoked or unknown well-formed key",
            with(&a(&format!("Bearer {}", modelgate::keys::format::generate().expose())), CHAT),
            Expect::Status(401),
        ),
        ("wrong checksum", with(&a(&format!("Bearer {wrong_sum}")), CHAT), Expect::Status(401)),
        ("an OpenAI-style key", with(&a("Bearer sk-proj-abcdef0123456789"), CHAT), Expect::Status(401)),
        (
            "key folded onto a continuation line",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer\r\n {}\r\ncontent-length: {}\r\n\r\n{CHAT}",
                t.good,
                CHAT.len()
            )
            .into_bytes(),
            Expect::Status(400),
        ),
        (
            "disallowed model",
            with(&a(&format!("Bearer {}", t.limited)), CHAT),
            Expect::Status(403),
        ),
        (
            "endpoint not allowed",
            with(&a(&format!("Bearer {}", t.models_only)), CHAT),
            Expect::Status(403),
        ),
        ("model as a number", with(&a(&good), r#"{"model":7,"messages":[]}"#), Expect::Status(400)),
        ("model as an object", with(&a(&good), r#"{"model":{"id":"echo"},"messages":[]}"#), Expect::Status(400)),
        ("model null", with(&a(&good), r#"{"model":null,"messages":[]}"#), Expect::Status(400)),
        ("model missing", with(&a(&good), r#"{"messages":[]}"#), Expect::Status(400)),
        (
            "model given twice",
            with(&a(&good), r#"{"model":"other-x","model":"echo","messages":[]}"#),
            Expect::Status(400),
        ),
        ("unknown model", with(&a(&good), r#"{"model":"gpt-9","messages":[]}"#), Expect::Status(404)),
        (
            "upstream id of an alias",
            with(&a(&good), r#"{"model":"qwen-7b","messages":[]}"#),
            Expect::Status(404),
        ),
        ("model with a NUL", with(&a(&good), r#"{"model":"echo\u0000","messages":[]}"#), Expect::Status(404)),
        (
            "60 KB model name",
            with(&a(&good), &format!(r#"{{"model":"{}","messages":[]}}"#, "e".repeat(60_000))),
            Expect::Status(404),
        ),
        ("body is an array", with(&a(&good), r#"[{"model":"echo"}]"#), Expect::Status(400)),
        ("body is not JSON", with(&a(&good), "model=echo"), Expect::Status(400)),
        ("empty body", with(&a(&good), ""), Expect::Status(400)),
        ("nested 20,000 deep", with(&a(&good), &nested(20_000)), Expect::Status(400)),
        ("nested one level too deep", with(&a(&good), &nested(100)), Expect::Status(400)),
        (
            "trailing garbage after the object",
            with(&a(&good), &format!("{CHAT} {{\"model\":\"x\"}}")),
            Expect::Status(400),
        ),
    ];
    assert!(run_h1(&t, cases).await >= 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_request_line_tricks_never_reach_the_model() {
    let t = target().await;
    let good = format!("Bearer {}", t.good);
    let key = [("authorization", good.as_str())];
    let line =
        |l: &str| format!("{l}\r\nhost: localhost\r\ncontent-length: 0\r\n\r\n").into_bytes();
    // With a valid key: none of these is a model path (no normalisation, no decoding).
    let unknown = [
        ("dot-dot to admin", "/v1/../admin"),
        ("dot-dot back to a model path", "/v1/../v1/chat/completions"),
        ("double slash", "//v1/chat/completions"),
        ("encoded slash", "/v1/chat%2Fcompletions"),
        ("encoded letters", "/v1/ch%61t/completions"),
        ("other case", "/v1/Chat/Completions"),
        ("trailing slash", "/v1/chat/completions/"),
        ("encoded NUL", "/v1/chat/completions%00"),
        ("admin path", "/admin"),
    ];
    let mut cases: Vec<(&str, Vec<u8>, Expect)> = unknown
        .into_iter()
        .map(|(name, path)| {
            (
                name,
                post(path, &key, CHAT).into_bytes(),
                Expect::Status(404),
            )
        })
        .collect();
    cases.extend(vec![
        (
            "absolute form, our host, no key",
            post("https://localhost/v1/chat/completions", &[], CHAT).into_bytes(),
            Expect::Status(401),
        ),
        (
            "absolute form, another host, no key",
            post("http://evil.example/v1/chat/completions", &[], CHAT).into_bytes(),
            Expect::Status(401),
        ),
        (
            "100 KB path",
            line(&format!("GET /{} HTTP/1.1", "a".repeat(100_000))),
            Expect::OneOf(&[400, 414, 431]),
        ),
        (
            "unknown method",
            line("FOO /v1/chat/completions HTTP/1.1"),
            Expect::Status(405),
        ),
        (
            "GET on a POST endpoint",
            line("GET /v1/chat/completions HTTP/1.1"),
            Expect::Status(405),
        ),
        (
            "DELETE models",
            line("DELETE /v1/models HTTP/1.1"),
            Expect::Status(405),
        ),
        ("TRACE", line("TRACE / HTTP/1.1"), Expect::Status(404)),
        (
            "CONNECT",
            line("CONNECT localhost:443 HTTP/1.1"),
            Expect::OneOf(&[400, 404, 405]),
        ),
        (
            "asterisk form",
            line("POST * HTTP/1.1"),
            Expect::OneOf(&[400, 404]),
        ),
        (
            "HTTP/1.0 without host or key",
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\ncontent-length: {}\r\n\r\n{CHAT}",
                CHAT.len()
            )
            .into_bytes(),
            Expect::Status(401),
        ),
        (
            "bare LF line ends, no key",
            format!(
                "POST /v1/chat/completions HTTP/1.1\nhost: localhost\ncontent-length: {}\n\n{CHAT}",
                CHAT.len()
            )
            .into_bytes(),
            Expect::OneOf(&[400, 401]),
        ),
        (
            "HTTP/2.0 in an HTTP/1 request line",
            line("POST /v1/chat/completions HTTP/2.0"),
            Expect::OneOf(&[400, 505]),
        ),
        (
            "HTTP/9.9",
            line("POST /v1/chat/completions HTTP/9.9"),
            Expect::OneOf(&[400, 505]),
        ),
        (
            "models with a traversal query, no key",
            line("GET /v1/models?x=../../etc/passwd HTTP/1.1"),
            Expect::Status(401),
        ),
        (
            "garbage instead of a request",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n".to_vec(),
            Expect::Status(400),
        ),
    ]);
    assert!(run_h1(&t, cases).await >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_smuggling_and_size_tricks_never_reach_the_model() {
    let t = target().await;
    let good = format!("Bearer {}", t.good);
    let key = [("authorization", good.as_str())];
    let path = "/v1/chat/completions";
    let smuggled = post(path, &key, CHAT);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            // Chunked wins over Content-Length (RFC 9112 §6.3) and the connection closes after
            // the answer, so the request hidden behind the body is never read.
            "CL + TE, a smuggled request behind",
            format!(
                "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n{}{smuggled}",
                chunk(CHAT)
            )
            .into_bytes(),
            Expect::StatusThenClose(401),
        ),
        (
            "TE + CL, a smuggled request behind",
            format!(
                "POST {path} HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n{}{smuggled}",
                chunk(CHAT)
            )
            .into_bytes(),
            Expect::StatusThenClose(401),
        ),
        (
            "two different Content-Lengths",
            keyed(&good, &format!("content-length: 5\r\ncontent-length: {}", CHAT.len()), CHAT),
            Expect::Status(400),
        ),
        (
            "Content-Length with a sign",
            keyed(&good, &format!("content-length: +{}", CHAT.len()), CHAT),
            Expect::Status(400),
        ),
        (
            "negative Content-Length",
            keyed(&good, "content-length: -1", CHAT),
            Expect::Status(400),
        ),
        ("chunk size not hex", chunked(path, &key, "zz\r\nabc\r\n0\r\n\r\n").into_bytes(), Expect::Status(400)),
        (
            "chunk size overflowing",
            chunked(path, &key, "fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n").into_bytes(),
            Expect::Status(400),
        ),
        (
            "20 KB chunk extension",
            chunked(path, &key, &format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(20_000))).into_bytes(),
            Expect::Status(400),
        ),
        (
            "transfer-encoding gzip",
            keyed(&good, "transfer-encoding: gzip", &chunk(CHAT)),
            Expect::Status(400),
        ),
        (
            "chunked not the last coding",
            keyed(&good, "transfer-encoding: chunked, gzip", &chunk(CHAT)),
            Expect::Status(400),
        ),
        (
            "space before the colon",
            keyed(&good, "transfer-encoding : chunked", &chunk(CHAT)),
            Expect::Status(400),
        ),
        (
            "chunked on HTTP/1.0",
            format!("POST {path} HTTP/1.0\r\nauthorization: {good}\r\ntransfer-encoding: chunked\r\n\r\n{}", chunk(CHAT)).into_bytes(),
            Expect::Status(400),
        ),
        (
            "obs-fold in another header",
            keyed(&good, &format!("x-a: 1\r\n 2\r\ncontent-length: {}", CHAT.len()), CHAT),
            Expect::Status(400),
        ),
        (
            "header name with a space",
            keyed(&good, &format!("x bad: 1\r\ncontent-length: {}", CHAT.len()), CHAT),
            Expect::Status(400),
        ),
        (
            "NUL in a header name",
            keyed(&good, &format!("x\0y: 1\r\ncontent-length: {}", CHAT.len()), CHAT),
            Expect::Status(400),
        ),
        (
            "body over max_body_bytes, announced",
            keyed(&good, &format!("content-length: {}", MAX_BODY + 1), "{"),
            Expect::Status(413),
        ),
        (
            "body over max_body_bytes, chunked",
            chunked(path, &key, &format!("{:x}\r\n{}\r\n0\r\n\r\n", MAX_BODY + 10, "x".repeat(MAX_BODY + 10))).into_bytes(),
            Expect::Status(413),
        ),
        (
            "100 KB head",
            format!("POST {path} HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\n\r\n", "h".repeat(100_000)).into_bytes(),
            Expect::Status(431),
        ),
        (
            "a header just over max_header_bytes",
            format!("POST {path} HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\n\r\n", "h".repeat(MAX_HEAD + 10)).into_bytes(),
            Expect::Status(431),
        ),
        (
            "60 headers (max_headers 50)",
            {
                let mut s = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\n");
                for i in 0..60 {
                    s.push_str(&format!("x-h{i}: {i}\r\n"));
                }
                s.push_str("\r\n");
                s.into_bytes()
            },
            Expect::Status(431),
        ),
    ];
    assert!(run_h1(&t, cases).await >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_their_deadlines() {
    let t = target().await;
    let before = t.model_requests();
    let good = format!("Bearer {}", t.good);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: {good}\r\ncontent-length: 2000\r\n\r\n"
    );
    // (name, what is written at once, expectation, seconds it may take at most)
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "slowloris head",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: loc".to_vec(),
            Expect::Closed,
        ),
        ("nothing after the handshake", Vec::new(), Expect::Closed),
        (
            "stalled body",
            format!("{head}{{\"model\":").into_bytes(),
            Expect::StatusThenClose(408),
        ),
    ];
    let mut n = 0;
    for (name, bytes, expect) in cases {
        let t0 = Instant::now();
        let r = raw::h1(&t.gw, &bytes, Duration::from_secs(5)).await;
        expect.check(name, &r);
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "{name}: {:?}",
            t0.elapsed()
        );
        n += 1;
    }
    // A trickling body: one byte every 300 ms earns 0.3 ms of time each (1024 B/s): 408.
    let mut io = raw::tls(&t.gw, &[]).await;
    io.write_all(head.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let trickle = async {
        for b in b"{\"model\":\"echo\",\"messages\":[]"
            .iter()
            .cycle()
            .take(100)
        {
            if io.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    let r = raw::read_h1(&mut io, Duration::from_secs(3)).await;
    Expect::StatusThenClose(408).check("trickling body", &r);
    assert!(t0.elapsed() < Duration::from_secs(6));
    n += 1;
    assert_eq!(t.model_requests(), before);
    t.still_serves(before).await;
    assert_eq!(n, 4);
}

/// An HTTP/2 case answered on its stream: name, extra fields, body, status.
type StatusCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);

/// The request header fields of a POST to the chat endpoint over HTTP/2.
fn h2_post<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut f = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/v1/chat/completions"),
        (":authority", "localhost"),
        ("content-type", "application/json"),
    ];
    f.extend_from_slice(extra);
    f
}

/// The status of `stream` and whether it or the connection was reset, within `wait`.
async fn h2_outcome(
    c: &mut H2Raw,
    stream: u32,
    wait: Duration,
) -> (Option<u16>, Vec<raw::Frame>, bool) {
    let (frames, eof) = c
        .until(wait, |f| {
            (f.stream == stream
                && (f.ty == frame::RST_STREAM
                    || (f.flags & frame::END_STREAM != 0 && f.ty != frame::HEADERS)))
                || f.ty == frame::GOAWAY
        })
        .await;
    let status = frames
        .iter()
        .filter(|f| f.stream == stream)
        .find_map(|f| f.status());
    (status, frames, eof)
}

/// One request over a fresh HTTP/2 connection: HEADERS (with `extra`), then `body` in DATA
/// frames (END_STREAM on the last). The status and whether the stream was reset.
async fn h2_request(
    t: &Target,
    extra: &[(&str, &str)],
    body: &[u8],
) -> (Option<u16>, Vec<raw::Frame>) {
    let mut c = H2Raw::open(&t.gw).await;
    c.request(1, &h2_post(extra), body.is_empty()).await;
    let chunks: Vec<&[u8]> = body.chunks(16_000).collect();
    for (i, piece) in chunks.iter().enumerate() {
        let end = if i + 1 == chunks.len() {
            frame::END_STREAM
        } else {
            0
        };
        c.send(frame::DATA, end, 1, piece).await;
    }
    let (status, frames, _) = h2_outcome(&mut c, 1, Duration::from_secs(5)).await;
    (status, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_abuse_never_reaches_the_model() {
    let t = target().await;
    let before = t.model_requests();
    let good = format!("Bearer {}", t.good);
    let mut n = 0;
    let mut case = |name: &str, ok: bool, seen: String| {
        assert!(ok, "{name}: {seen}");
        assert_eq!(t.model_requests(), before, "{name} reached the model");
        n += 1;
    };

    // Requests answered on their stream.
    let status_cases: Vec<StatusCase> = vec![
        ("no key", vec![], CHAT.as_bytes().to_vec(), 401),
        (
            "two authorization fields",
            vec![
                ("authorization", good.as_str()),
                ("authorization", "Bearer mg_x"),
            ],
            CHAT.as_bytes().to_vec(),
            400,
        ),
        (
            "deeply nested body",
            vec![("authorization", good.as_str())],
            nested(20_000).into_bytes(),
            400,
        ),
        (
            "body over max_body_bytes",
            vec![("authorization", good.as_str())],
            vec![b'x'; MAX_BODY + 100],
            413,
        ),
        (
            "unknown path",
            vec![(":path", "/v1/../admin")],
            Vec::new(),
            404,
        ),
        (
            "head over max_header_bytes",
            vec![(
                "x-big",
                &*Box::leak("h".repeat(MAX_HEAD + 100).into_boxed_str()),
            )],
            CHAT.as_bytes().to_vec(),
            431,
        ),
    ];
    for (name, extra, body, want) in status_cases {
        // A `:path` in `extra` replaces the chat path.
        let (status, frames) = if let Some(p) = extra.iter().find(|(k, _)| *k == ":path") {
            let mut c = H2Raw::open(&t.gw).await;
            let fields: Vec<(&str, &str)> = h2_post(&[])
                .into_iter()
                .map(|(k, v)| if k == ":path" { (k, p.1) } else { (k, v) })
                .collect();
            c.request(1, &fields, true).await;
            let (s, frames, _) = h2_outcome(&mut c, 1, Duration::from_secs(5)).await;
            (s, frames)
        } else {
            h2_request(&t, &extra, &body).await
        };
        case(
            name,
            status == Some(want),
            format!("{status:?}, wanted {want}: {frames:?}"),
        );
    }

    // Malformed requests: the stream is reset (or the connection ends), nothing answered.
    let malformed: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "connection-specific field",
            vec![("connection", "keep-alive")],
        ),
        ("upper-case field name", vec![("X-Upper", "1")]),
        (
            "transfer-encoding field",
            vec![("transfer-encoding", "chunked")],
        ),
    ];
    for (name, extra) in malformed {
        let mut c = H2Raw::open(&t.gw).await;
        c.request(1, &h2_post(&extra), true).await;
        let (status, frames, eof) = h2_outcome(&mut c, 1, Duration::from_secs(5)).await;
        let reset = frames
            .iter()
            .any(|f| f.ty == frame::RST_STREAM || f.ty == frame::GOAWAY);
        case(
            name,
            status.is_none() && (reset || eof),
            format!("{status:?} {frames:?}"),
        );
    }
    {
        let mut c = H2Raw::open(&t.gw).await;
        c.request(
            1,
            &[
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "localhost"),
            ],
            true,
        )
        .await;
        let (status, frames, eof) = h2_outcome(&mut c, 1, Duration::from_secs(5)).await;
        let reset = frames
            .iter()
            .any(|f| f.ty == frame::RST_STREAM || f.ty == frame::GOAWAY);
        case(
            "no :path",
            status.is_none() && (reset || eof),
            format!("{frames:?}"),
        );
    }
    {
        // More DATA than content-length says.
        let mut c = H2Raw::open(&t.gw).await;
        c.request(
            1,
            &h2_post(&[("authorization", &good), ("content-length", "10")]),
            false,
        )
        .await;
        c.send(frame::DATA, frame::END_STREAM, 1, CHAT.as_bytes())
            .await;
        let (status, frames, eof) = h2_outcome(&mut c, 1, Duration::from_secs(5)).await;
        let reset = frames
            .iter()
            .any(|f| f.ty == frame::RST_STREAM || f.ty == frame::GOAWAY);
        case(
            "DATA beyond content-length",
            status == Some(400) || reset || eof,
            format!("{status:?} {frames:?}"),
        );
    }
    {
        // A stalled body: 408 at body_read_timeout.
        let mut c = H2Raw::open(&t.gw).await;
        c.request(1, &h2_post(&[("authorization", &good)]), false)
            .await;
        c.send(frame::DATA, 0, 1, b"{\"model\":").await;
        let (status, _, _) = h2_outcome(&mut c, 1, Duration::from_secs(4)).await;
        case("stalled body", status == Some(408), format!("{status:?}"));
    }

    // Connection-level abuse: the connection ends (GOAWAY or EOF) or the frames are answered,
    // and the gateway keeps serving.
    {
        // 300 streams at once, each waiting for its body: beyond 200 they are refused.
        let mut c = H2Raw::open(&t.gw).await;
        for i in 0..300u32 {
            c.request(2 * i + 1, &h2_post(&[]), false).await;
        }
        let (frames, _) = c.until(Duration::from_secs(3), |_| false).await;
        let refused = frames
            .iter()
            .filter(|f| f.ty == frame::RST_STREAM && f.error_code() == Some(frame::REFUSED_STREAM))
            .count();
        case(
            "300 concurrent streams",
            refused >= 100,
            format!("{refused} refused"),
        );
    }
    {
        // Rapid reset: open and cancel, many times.
        let mut c = H2Raw::open(&t.gw).await;
        for i in 0..500u32 {
            let id = 2 * i + 1;
            if !c.request(id, &h2_post(&[]), false).await
                || !c
                    .send(frame::RST_STREAM, 0, id, &frame::CANCEL.to_be_bytes())
                    .await
            {
                break;
            }
        }
        let (frames, eof) = c
            .until(Duration::from_secs(3), |f| f.ty == frame::GOAWAY)
            .await;
        let goaway = frames.iter().any(|f| f.ty == frame::GOAWAY);
        case(
            "rapid reset flood",
            goaway || eof,
            format!("{} frames", frames.len()),
        );
    }
    {
        // SETTINGS and PING floods: answered (acknowledged) or the connection is ended.
        for (name, ty, payload) in [
            ("SETTINGS flood", frame::SETTINGS, Vec::new()),
            ("PING flood", frame::PING, vec![1u8; 8]),
        ] {
            let mut c = H2Raw::open(&t.gw).await;
            let mut sent = 0;
            for _ in 0..5000 {
                if !c.send(ty, 0, 0, &payload).await {
                    break;
                }
                sent += 1;
            }
            let (frames, eof) = c
                .until(Duration::from_secs(3), |f| f.ty == frame::GOAWAY)
                .await;
            let acks = frames
                .iter()
                .filter(|f| f.ty == ty && f.flags & frame::ACK != 0)
                .count();
            let goaway = frames.iter().any(|f| f.ty == frame::GOAWAY);
            case(
                name,
                goaway || eof || acks >= sent,
                format!("{acks} acks of {sent}"),
            );
        }
    }
    {
        // A header block that never ends, CONTINUATION after CONTINUATION.
        let mut c = H2Raw::open(&t.gw).await;
        let mut block = raw::hpack_literals(&h2_post(&[]));
        block.extend(raw::hpack_literals(&[("x-a", "b")]));
        c.send(frame::HEADERS, 0, 1, &block).await;
        let filler = raw::hpack_literals(&[("x-fill", &"f".repeat(16_000))]);
        for _ in 0..200 {
            if !c.send(frame::CONTINUATION, 0, 1, &filler).await {
                break;
            }
        }
        let (frames, eof) = c
            .until(Duration::from_secs(3), |f| f.ty == frame::GOAWAY)
            .await;
        let goaway = frames.iter().any(|f| f.ty == frame::GOAWAY);
        case("CONTINUATION flood", goaway || eof, format!("{frames:?}"));
    }
    {
        // A header block that stops half-way: no request, closed after header_read_timeout.
        let mut c = H2Raw::open(&t.gw).await;
        c.send(
            frame::HEADERS,
            0,
            1,
            &raw::hpack_literals(&[(":method", "POST")]),
        )
        .await;
        let (_, eof) = c.until(Duration::from_secs(4), |_| false).await;
        case("CONTINUATION never sent", eof, String::new());
    }
    {
        // Flow-control window overflow on the connection.
        let mut c = H2Raw::open(&t.gw).await;
        c.send(frame::WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())
            .await;
        let (frames, eof) = c
            .until(Duration::from_secs(3), |f| f.ty == frame::GOAWAY)
            .await;
        let goaway = frames.iter().any(|f| f.ty == frame::GOAWAY);
        case("window overflow", goaway || eof, format!("{frames:?}"));
    }
    {
        // A stream id the client may not use (even), and DATA on stream 0.
        for (name, ty, stream) in [
            ("even stream id", frame::HEADERS, 2u32),
            ("DATA on stream 0", frame::DATA, 0),
        ] {
            let mut c = H2Raw::open(&t.gw).await;
            let payload = if ty == frame::HEADERS {
                raw::hpack_literals(&h2_post(&[]))
            } else {
                b"x".to_vec()
            };
            c.send(ty, frame::END_HEADERS | frame::END_STREAM, stream, &payload)
                .await;
            let (frames, eof) = c
                .until(Duration::from_secs(3), |f| f.ty == frame::GOAWAY)
                .await;
            let goaway = frames.iter().any(|f| f.ty == frame::GOAWAY);
            case(name, goaway || eof, format!("{frames:?}"));
        }
    }
    assert!(n >= 20, "{n} cases");
    t.still_serves(before).await;
}
