//! The upstream connection pool on its own, through a real tunnel (two netstacks over loopback
//! UDP) to a model server on the corp peer that counts its connections: keep-alive reuse, a
//! body dropped mid-answer closing its connection, a connection the server closed never
//! reused, concurrency and the idle expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use modelgate::demo::LoopbackPair;
use modelgate::gateway::upstream::{UpstreamClient, IDLE_TIMEOUT};
use modelgate::netstack::{TcpTuning, TunnelStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::CORP_MODEL;

/// What the model server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    requests: AtomicU64,
    /// Connections that ended (EOF or reset) while the server was reading or writing.
    ended: AtomicU64,
}

/// Reads one request head (and its Content-Length body); `None` at EOF or on an error.
async fn read_request(s: &mut TunnelStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if head.starts_with("POST /v1/early ") {
                // Answered before its body is read (the body is never read).
                buf.clear();
                return Some(head);
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves requests on one connection: `/v1/json` a small JSON answer, `/v1/stream` an SSE
/// stream of 50 events 20 ms apart (chunked), `/v1/close` an answer with `Connection: close`
/// and then the close.
async fn serve(mut s: TunnelStream, seen: Arc<Seen>) {
    seen.connections.fetch_add(1, Ordering::Relaxed);
    let mut buf = Vec::new();
    while let Some(head) = read_request(&mut s, &mut buf).await {
        seen.requests.fetch_add(1, Ordering::Relaxed);
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let host_ok = head
            .lines()
            .any(|l| l.to_ascii_lowercase() == format!("host: {CORP_MODEL}"));
        let body = if host_ok {
            "{\"ok\":true}"
        } else {
            "{\"host\":false}"
        };
        let res = match path.as_str() {
            "/v1/json" => {
                s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await
            }
            "/v1/close" => {
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                // Like close(2): our FIN after the answer, then wait for the client's (a
                // netstack stream dropped before that resets, discarding unsent bytes).
                let _ = s.shutdown().await;
                let mut rest = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await;
                seen.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
            "/v1/stream" => {
                let mut r = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for i in 0..50 {
                    if r.is_err() {
                        break;
                    }
                    let ev = format!("data: {{\"i\":{i}}}\n\n");
                    r = s
                        .write_all(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes())
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if r.is_ok() {
                    r = s.write_all(b"0\r\n\r\n").await;
                }
                r
            }
            "/v1/early" => {
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large")
                    .await;
                // Read nothing more: the client's body stays unsent. Wait for its close.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while s.read(&mut [0u8; 4096]).await.is_ok_and(|n| n > 0) {}
                })
                .await;
                seen.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // A chunked answer whose second chunk is malformed.
            "/v1/garbage" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
                    .await
            }
            // A complete answer followed by bytes nobody asked for (a second response head):
            // they must not become the answer to the next request.
            "/v1/extra" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
                    .await
            }
            _ => s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await,
        };
        if res.is_err() {
            break;
        }
    }
    seen.ended.fetch_add(1, Ordering::Relaxed);
}

struct Lab {
    client: UpstreamClient,
    seen: Arc<Seen>,
    _pair: LoopbackPair,
}

async fn lab() -> Lab {
    let pair = LoopbackPair::start(&[], true, TcpTuning::default()).unwrap();
    let seen = Arc::new(Seen::default());
    let mut listener = pair.corp.listen(8000).await.unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, s.clone()));
        }
    });
    let client = UpstreamClient::new(pair.appliance.clone());
    // The tunnel up (the corp peer's handshake confirmed), as the gateway tests wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pair.corp.stats().await.is_ok_and(|s| {
        s.peers
            .iter()
            .all(|p| p.health == modelgate::tunnel::PeerHealth::Up)
    }) {
        assert!(Instant::now() < deadline, "the tunnel up within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    Lab {
        client,
        seen,
        _pair: pair,
    }
}

fn get(path: &str) -> Request<Bytes> {
    Request::post(format!("http://{CORP_MODEL}/v1/{path}"))
        .body(Bytes::from_static(b"{}"))
        .unwrap()
}

async fn body(lab: &Lab, path: &str) -> String {
    let r = lab
        .client
        .send(get(path), Duration::from_secs(10))
        .await
        .unwrap_or_else(|f| panic!("{path}: {:?}", f.error));
    assert_eq!(r.status(), 200, "{path}");
    let b = r.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_connection_in_origin_form_with_host() {
    let lab = lab().await;
    for i in 0..20 {
        let path = if i % 2 == 0 { "json" } else { "stream" };
        let b = body(&lab, path).await;
        if path == "json" {
            assert_eq!(b, "{\"ok\":true}", "origin-form request with Host");
        } else {
            assert_eq!(b.matches("data: ").count(), 50, "whole stream: {b}");
        }
    }
    assert_eq!(lab.client.dialled(), 1, "one keep-alive connection");
    assert_eq!(lab.seen.connections.load(Ordering::Relaxed), 1);
    assert_eq!(lab.seen.requests.load(Ordering::Relaxed), 20);
    assert_eq!(lab.client.idle(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dropped_mid_answer_closes_its_connection() {
    let lab = lab().await;
    let r = lab
        .client
        .send(get("stream"), Duration::from_secs(10))
        .await
        .map_err(|f| f.error)
        .unwrap();
    let mut b = r.into_body();
    let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(b);
    // The server's writes fail once the reset arrived: its connection ends mid-stream.
    let seen = lab.seen.clone();
    eventually(
        "the server saw the connection end",
        Duration::from_secs(3),
        || seen.ended.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(lab.client.idle(), 0, "not returned to the pool");
    assert_eq!(body(&lab, "json").await, "{\"ok\":true}");
    assert_eq!(
        lab.client.dialled(),
        2,
        "a new connection for the next request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_closed_is_not_reused() {
    let lab = lab().await;
    assert_eq!(body(&lab, "close").await, "{\"ok\":true}");
    // Give the server's FIN time to cross the tunnel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        assert_eq!(body(&lab, "json").await, "{\"ok\":true}");
    }
    assert_eq!(
        lab.client.dialled(),
        2,
        "closed one dropped, a new one reused"
    );
    assert_eq!(lab.seen.requests.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_answers_return_their_connections_which_expire_when_idle() {
    let lab = lab().await;
    body(&lab, "json").await; // the tunnel is up
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = lab.client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .send(get("stream"), Duration::from_secs(10))
                .await
                .map_err(|f| f.error)
                .unwrap();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(b.to_vec())
                .unwrap()
                .matches("data: ")
                .count()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 50);
    }
    let dialled = lab.client.dialled();
    // The idle one from the first request, and seven more.
    assert_eq!(dialled, 8, "one connection per concurrent stream");
    assert_eq!(
        lab.client.idle() as u64,
        dialled,
        "every one back in the pool"
    );
    let client = lab.client.clone();
    eventually(
        "idle connections closed after the idle timeout",
        IDLE_TIMEOUT + Duration::from_secs(4),
        || client.idle() == 0,
    )
    .await;
    let seen = lab.seen.clone();
    eventually("the server saw them close", Duration::from_secs(3), || {
        seen.ended.load(Ordering::Relaxed) == dialled
    })
    .await;
}

/// A server that answers before it read the request's body (a 413 for a body it will not
/// take): the answer reaches the caller, and the connection, whose request was never written
/// to its end, is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_was_read_arrives_and_the_connection_is_dropped() {
    let lab = lab().await;
    assert_eq!(body(&lab, "json").await, "{\"ok\":true}");
    // Far more than the netstack buffers: the write cannot finish while the server reads nothing.
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    let req = Request::post(format!("http://{CORP_MODEL}/v1/early"))
        .body(big)
        .unwrap();
    let r = lab
        .client
        .send(req, Duration::from_secs(10))
        .await
        .map_err(|f| f.error)
        .unwrap();
    assert_eq!(r.status(), 413);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&b[..], b"too large");
    assert_eq!(
        lab.client.idle(),
        0,
        "a half-written request's connection is not reused"
    );
    assert_eq!(body(&lab, "json").await, "{\"ok\":true}");
    assert_eq!(lab.client.dialled(), 2);
}

/// A malformed chunk fails the body (with the reason) and closes its connection; bytes after
/// a complete answer are never taken for the next request's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_overlong_answers_never_reach_the_next_request() {
    let lab = lab().await;
    let r = lab
        .client
        .send(get("garbage"), Duration::from_secs(10))
        .await
        .map_err(|f| f.error)
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut b = r.into_body();
    assert_eq!(
        &b.frame().await.unwrap().unwrap().into_data().unwrap()[..],
        b"ok"
    );
    let e = b.frame().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("malformed chunk"), "{e}");
    drop(b);
    assert_eq!(lab.client.idle(), 0);

    assert_eq!(body(&lab, "extra").await, "hi");
    assert_eq!(
        lab.client.idle(),
        0,
        "a connection with unread bytes is not reused"
    );
    assert_eq!(
        body(&lab, "json").await,
        "{\"ok\":true}",
        "not the forged answer"
    );
    assert_eq!(lab.client.dialled(), 3);
}
