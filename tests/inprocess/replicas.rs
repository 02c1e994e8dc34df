//! One model on several servers (replicas) through the real gateway and tunnel: replicas are
//! ports of the corp peer, each with its own server. A replica that refuses connections is
//! skipped and ejected while its requests succeed on the others; a 502 or 503 from a server
//! ejects it (backoff doubling on the next failure) and the request is retried elsewhere; a
//! replica that dies mid-stream is NOT retried (the client sees the cut); the model-wide queue
//! spans the replicas; affinity keeps a conversation on one replica.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use modelgate::config::{Balance, ModelConfig};
use modelgate::demo::model::EchoModel;
use modelgate::gateway::upstream::{Upstream, UpstreamSpec};
use modelgate::netstack::TunnelStream;
use modelgate::policy::KeyPolicy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::harness::{key, serve, Serve, Stack, StackOptions};

/// A replica of the model `echo` on port `port` of the corp peer.
fn replica(name: &str, port: u16) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        addr: format!("10.99.0.2:{port}").parse().unwrap(),
        base_path: "/v1".into(),
        api_key: None,
        models: vec![("echo".into(), "echo".into())],
        max_concurrent: None,
    }
}

fn echo(delay_ms: u64) -> EchoModel {
    EchoModel::new("echo", Duration::from_millis(delay_ms))
}

fn serve_echo(m: &EchoModel) -> Serve {
    let m = m.clone();
    serve(move |s| m.clone().serve_connection(s))
}

/// Reads one whole request (head and Content-Length body) from `s` into `buf`; false at EOF.
async fn read_request(s: &mut TunnelStream) -> bool {
    read_request_line(s).await.is_some()
}

/// Reads one whole request from `s` and returns its request line (`None` at EOF or error).
async fn read_request_line(s: &mut TunnelStream) -> Option<String> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |r: &[u8]| {
        let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        r.len() >= end + 4 + len
    };
    while !complete(&req) && req.len() < 1 << 20 {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    Some(String::from_utf8_lossy(line).into_owned())
}

/// Closes `s` gently: dropping a tunnel stream resets it, which could overtake what was
/// written, so wait (bounded) for the gateway to close its side first.
async fn close(mut s: TunnelStream) {
    let _ = s.shutdown().await;
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// An HTTP/1.1 answer with a JSON `body` and the extra header line `header`.
fn answer(status_line: &str, header: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{header}\r\n\r\n{body}",
        body.len()
    )
}

/// A server that answers every request with `status` and closes (a model server that is
/// loading or whose own proxy has no backend); counts the requests.
fn serve_status(status: u16, count: Arc<AtomicU64>) -> Serve {
    serve(move |mut s: TunnelStream| {
        let count = count.clone();
        async move {
            if !read_request(&mut s).await {
                return;
            }
            count.fetch_add(1, Ordering::Relaxed);
            let body = format!("{{\"error\":{{\"message\":\"status {status}\"}}}}");
            let reply = answer(&format!("{status} Unavailable"), "connection: close", &body);
            let _ = s.write_all(reply.as_bytes()).await;
            close(s).await;
        }
    })
}

/// A server that answers the first request of each connection (saying keep-alive) and closes
/// the connection when a second one arrives on it, unanswered: the keep-alive race of a server
/// that closes after answering (llama.cpp does after every stream). Counts answered requests.
fn serve_one_per_connection(count: Arc<AtomicU64>) -> Serve {
    serve(move |mut s: TunnelStream| {
        let count = count.clone();
        async move {
            let Some(line) = read_request_line(&mut s).await else {
                return;
            };
            // The gateway's own `GET /models` probe (sent when the peer comes up) is answered
            // the same way but not counted: the test counts the clients' requests.
            if line.starts_with("POST ") {
                count.fetch_add(1, Ordering::Relaxed);
            }
            let body = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
            let reply = answer("200 OK", "keep-alive: timeout=5", body);
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            // The next request on this connection is read, then left unanswered.
            if read_request(&mut s).await {
                close(s).await;
            }
        }
    })
}

/// A connection whose writes fail once `budget` bytes went out: the server "dies" mid-answer
/// (hyper drops the connection; the tunnel resets it).
struct Breaking {
    inner: TunnelStream,
    budget: usize,
}

impl AsyncRead for Breaking {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Breaking {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.budget);
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(n)) = r {
            self.budget -= n;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gateway over `upstreams`, the corp peer serving `ports`, one key without limits.
async fn stack(
    upstreams: Vec<UpstreamSpec>,
    ports: Vec<(u16, Serve)>,
    models: Vec<ModelConfig>,
) -> (Stack, String) {
    let (secret, principal) = key("k", KeyPolicy::default());
    let mut o = StackOptions::new(vec![(secret.clone(), principal)], upstreams);
    o.models = models;
    (Stack::start_ports(o, ports).await, secret)
}

fn body(stream: bool, text: &str) -> String {
    serde_json::json!({"model": "echo", "stream": stream,
        "messages": [{"role": "user", "content": text}]})
    .to_string()
}

async fn post(gw: &Stack, secret: &str, body: &str) -> crate::harness::Reply {
    let auth = format!("Bearer {secret}");
    gw.call(
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Bytes::copy_from_slice(body.as_bytes()),
    )
    .await
}

/// The live upstream named `name`.
fn upstream(gw: &Stack, name: &str) -> Arc<Upstream> {
    gw.handle
        .load()
        .routes
        .upstreams()
        .iter()
        .find(|u| u.spec.name == name)
        .cloned()
        .unwrap()
}

fn requests(m: &EchoModel) -> u64 {
    m.stats.requests.load(Ordering::Relaxed)
}

/// A replica that refuses connections (nothing listens on its port): every request succeeds
/// on the two others, split evenly; the refusing one is tried once, retried elsewhere and
/// ejected. When every replica refuses, the client gets today's 502 at once.
#[tokio::test]
async fn a_refusing_replica_is_skipped_and_requests_succeed_on_the_others() {
    let (b, c) = (echo(0), echo(0));
    let (gw, secret) = stack(
        vec![replica("a", 8001), replica("b", 8002), replica("c", 8003)],
        vec![(8002, serve_echo(&b)), (8003, serve_echo(&c))],
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    for i in 0..20 {
        let r = post(&gw, &secret, &body(i % 2 == 0, "hello there")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body());
    }
    let a = upstream(&gw, "a");
    assert_eq!(requests(&b) + requests(&c), 20, "each request served once");
    assert!(
        requests(&b).abs_diff(requests(&c)) <= 2,
        "b {} / c {}",
        requests(&b),
        requests(&c)
    );
    assert!(
        a.retries() >= 1,
        "the refused request was retried elsewhere"
    );
    assert!(a.health.ejections() >= 1);
    assert!(
        a.retries() <= a.health.ejections() * 2,
        "a refusing replica gets no traffic while ejected: {} retries, {} ejections",
        a.retries(),
        a.health.ejections()
    );
    let last = a.health.view(Instant::now()).last_error.unwrap().0;
    assert!(last.contains("refused"), "{last}");

    // Every replica down: the real error, as with a single server, and fast.
    let (gw, secret) = stack(
        vec![replica("x", 8001), replica("y", 8002)],
        Vec::new(),
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    for _ in 0..3 {
        let t = Instant::now();
        let r = post(&gw, &secret, &body(false, "hi")).await;
        assert_eq!(r.status, 502, "{}", r.body());
        assert_eq!(r.json()["error"]["code"], "upstream_error");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}

/// 503 and 502 answers eject their servers and the requests are retried on the healthy one;
/// after the ejection ends the next try of the 503 server fails again and ejects it for twice
/// as long.
#[tokio::test]
async fn a_502_or_503_replica_is_ejected_and_traffic_moves() {
    let good = echo(0);
    let (n503, n502) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (gw, secret) = stack(
        vec![
            replica("busy", 8001),
            replica("proxy", 8002),
            replica("good", 8003),
        ],
        vec![
            (8001, serve_status(503, n503.clone())),
            (8002, serve_status(502, n502.clone())),
            (8003, serve_echo(&good)),
        ],
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    let t = Instant::now();
    for i in 0..10 {
        let r = post(&gw, &secret, &body(i % 2 == 1, "one two")).await;
        assert_eq!(r.status, 200, "{}", r.body());
    }
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "still inside the 1 s ejection"
    );
    assert_eq!(requests(&good), 10);
    // Each bad server got exactly one try, then it was ejected (its probes answer 503/502
    // as well, which re-admits nothing).
    let (busy, proxy) = (upstream(&gw, "busy"), upstream(&gw, "proxy"));
    assert_eq!((busy.retries(), proxy.retries()), (1, 1));
    assert_eq!((busy.health.ejections(), proxy.health.ejections()), (1, 1));
    assert!(!busy.health.available(Instant::now()));
    let last = |u: &Upstream| u.health.view(Instant::now()).last_error.unwrap().0;
    assert_eq!(last(&busy), "answered 503 Service Unavailable");
    assert_eq!(last(&proxy), "answered 502 Bad Gateway");

    // The 1 s ejection ends: the next request tries the least recently used replica again,
    // fails over, and that server is ejected for 2 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&gw, &secret, &body(false, "again")).await;
    assert_eq!(r.status, 200);
    let now = Instant::now();
    let left = [&busy, &proxy]
        .iter()
        .filter_map(|u| u.health.ejected_until(now))
        .map(|t| t - now)
        .max()
        .unwrap();
    assert!(
        left > Duration::from_millis(1500) && left <= Duration::from_secs(2),
        "doubled backoff: {left:?}"
    );
    assert_eq!(requests(&good), 11);
}

/// A replica that dies after its answer began streaming: the client sees the cut and the
/// request is NOT retried on the other replica.
#[tokio::test]
async fn a_replica_dying_mid_stream_is_not_retried() {
    let (dying, other) = (echo(20), echo(0));
    let d = dying.clone();
    let (gw, secret) = stack(
        vec![replica("dying", 8001), replica("other", 8002)],
        vec![
            (
                8001,
                serve(move |s| {
                    d.clone().serve_connection(Breaking {
                        inner: s,
                        budget: 1200,
                    })
                }),
            ),
            (8002, serve_echo(&other)),
        ],
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    // The first pick on an idle model is the first replica: `dying`.
    let (mut send, _conn) = gw.connect().await;
    let req = Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {secret}"))
        .body(Full::new(Bytes::from(body(true, &"word ".repeat(200)))))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    let mut text = String::new();
    let mut ended_by_error = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, b.frame()).await {
            Err(_) => panic!("the cut stream never ended: {text}"),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                ended_by_error = true;
                break;
            }
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(&String::from_utf8_lossy(&d));
                }
            }
        }
    }
    assert!(
        text.contains("data: {"),
        "events arrived before the cut: {text}"
    );
    assert!(
        !text.contains("[DONE]"),
        "the stream was cut, not finished: {text}"
    );
    assert!(
        ended_by_error || !text.ends_with("[DONE]\n\n"),
        "the client sees the cut"
    );
    assert_eq!(requests(&dying), 1);
    assert_eq!(
        requests(&other),
        0,
        "never retried after bytes reached the client"
    );
    assert_eq!(upstream(&gw, "dying").retries(), 0);
}

/// Two replicas with one slot each: the model's queue spans both, every waiting request
/// takes the first slot freed on either, and none runs beyond a replica's capacity.
#[tokio::test]
async fn the_queue_spans_the_replicas_and_respects_each_capacity() {
    let (r1, r2) = (echo(10), echo(10));
    let (mut s1, mut s2) = (replica("r1", 8001), replica("r2", 8002));
    s1.max_concurrent = Some(1);
    s2.max_concurrent = Some(1);
    let (gw, secret) = stack(
        vec![s1, s2],
        vec![(8001, serve_echo(&r1)), (8002, serve_echo(&r2))],
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    let gw = Arc::new(gw);
    let peak = Arc::new(AtomicU64::new(0));
    let watch = {
        let (gw, peak) = (gw.clone(), peak.clone());
        tokio::spawn(async move {
            let ups = gw.handle.load().routes.upstreams().to_vec();
            for _ in 0..400 {
                for u in &ups {
                    peak.fetch_max(u.in_flight(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (gw, secret) = (gw.clone(), secret.clone());
            tokio::spawn(async move { post(&gw, &secret, &body(true, "a b c d e f g h")).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.events().1, "every stream ends with [DONE]");
    }
    watch.abort();
    assert_eq!(requests(&r1) + requests(&r2), 6);
    assert!(
        requests(&r1) >= 1 && requests(&r2) >= 1,
        "both replicas served"
    );
    assert!(
        peak.load(Ordering::Relaxed) <= 1,
        "a replica exceeded its capacity"
    );
    assert_eq!(gw.handle.load().scheduler.waiting(), 0);
}

/// `balance = "affinity"`: every turn of one conversation goes to the same replica, and
/// several conversations use more than one replica.
#[tokio::test]
async fn affinity_keeps_a_conversation_on_one_replica() {
    let models: Vec<EchoModel> = (0..3).map(|_| echo(0)).collect();
    let (gw, secret) = stack(
        vec![replica("a", 8001), replica("b", 8002), replica("c", 8003)],
        models
            .iter()
            .enumerate()
            .map(|(i, m)| (8001 + i as u16, serve_echo(m)))
            .collect(),
        vec![ModelConfig {
            name: "echo".into(),
            balance: Balance::Affinity,
        }],
    )
    .await;
    gw.wait_tunnel().await;
    let mut homes = std::collections::BTreeSet::new();
    for conv in 0..8 {
        let first = format!("conversation {conv}: rename step_1");
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "You are a coding agent."}),
            serde_json::json!({"role": "user", "content": first}),
        ];
        let before: Vec<u64> = models.iter().map(requests).collect();
        for turn in 0..4 {
            let b =
                serde_json::json!({"model": "echo", "stream": turn % 2 == 0, "messages": messages})
                    .to_string();
            assert_eq!(post(&gw, &secret, &b).await.status, 200);
            messages.push(serde_json::json!({"role": "assistant", "content": "done"}));
            messages.push(serde_json::json!({"role": "user", "content": format!("turn {turn}")}));
        }
        let got: Vec<u64> = models
            .iter()
            .zip(&before)
            .map(|(m, b)| requests(m) - b)
            .collect();
        let home: Vec<usize> = (0..3).filter(|&i| got[i] > 0).collect();
        assert_eq!(home.len(), 1, "conversation {conv} spread over {got:?}");
        assert_eq!(got[home[0]], 4);
        homes.insert(home[0]);
    }
    assert!(
        homes.len() >= 2,
        "8 conversations all on one replica: {homes:?}"
    );
}

/// A server that closes a keep-alive connection as it is reused: the request is retried once
/// on a fresh connection (even with a single replica) and the server is not ejected.
#[tokio::test]
async fn a_reused_connection_closed_by_the_server_is_retried_without_ejecting() {
    let answered = Arc::new(AtomicU64::new(0));
    let (gw, secret) = stack(
        vec![replica("only", 8001)],
        vec![(8001, serve_one_per_connection(answered.clone()))],
        Vec::new(),
    )
    .await;
    gw.wait_tunnel().await;
    for i in 0..4 {
        let r = post(&gw, &secret, &body(false, "hi")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body());
    }
    assert_eq!(answered.load(Ordering::Relaxed), 4);
    let only = upstream(&gw, "only");
    assert_eq!(
        only.health.ejections(),
        0,
        "a keep-alive race ejects nobody"
    );
    assert!(
        only.retries() >= 1,
        "the reused connection's request was retried"
    );
}
