//! Restarts without an outage, in process: the appliance's netstack restarted on its port while
//! the corp netstack (which dials it, keepalive 25 s) is left alone — with the endpoint store
//! the tunnel is back at once, without it the corp side stays on its dead session — and answers
//! cut short: a stream whose model connection dies ends with an OpenAI-shaped error event and a
//! clean close, a non-streaming answer cut short is an incomplete body, and the end of a
//! shutdown's drain period cuts open streams (error event), aborts other answers and answers
//! requests still waiting for the model with 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use modelgate::config::GatewayConfig;
use modelgate::netstack::{NetError, Netstack, NetstackConfig, TcpTuning, TunnelStream};
use modelgate::policy::KeyPolicy;
use modelgate::tunnel::endpoints::EndpointStore;
use modelgate::tunnel::PeerSpec;
use modelgate::wgkey::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{corp_upstream, key, Stack, StackOptions};

const MODEL: &str = "10.99.0.2:8000";

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// The appliance's netstack on `listen`: the corp peer (no endpoint: it dials in).
fn appliance(
    key: &PrivateKey,
    corp: &PrivateKey,
    listen: SocketAddr,
    store: Option<EndpointStore>,
) -> Netstack {
    Netstack::start_with_store(
        NetstackConfig {
            private_key: key.clone(),
            listen,
            addresses: vec![net("10.99.0.1/24")],
            peers: vec![PeerSpec {
                name: "corp".into(),
                public_key: corp.public_key(),
                allowed_ips: vec![net("10.99.0.2/32")],
                keepalive: None,
                endpoint: None,
            }],
            mtu: 1420,
            tcp: TcpTuning::default(),
        },
        store,
    )
    .unwrap()
}

/// Dials the corp model until it answers (bounded by `limit`): how long it took, or `None`.
async fn reachable_within(ns: &Netstack, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        match ns.dial(MODEL.parse().unwrap()).await {
            Ok(mut s) => {
                s.write_all(b"ping").await.unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"ping");
                return Some(start.elapsed());
            }
            Err(NetError::NoHandshake) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => panic!("dial through the tunnel: {e}"),
        }
    }
    None
}

/// The appliance restarts on its port (SIGTERM-like: the driver stops; the store was written
/// a second after the endpoint was learned) with the corp peer untouched: with the endpoint
/// store it handshakes the corp peer's last endpoint at start and the tunnel carries traffic
/// again within 1 s; a restart without the store gets nothing for 3 s (the corp peer keeps
/// sending keepalives on its dead session and would wait for its own rekey).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_restart_is_back_at_once_from_the_stored_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = EndpointStore::in_dir(dir.path());
    let (ka, kc) = (PrivateKey::generate(), PrivateKey::generate());
    let first = appliance(
        &ka,
        &kc,
        "127.0.0.1:0".parse().unwrap(),
        Some(store.clone()),
    );
    let listen = first.udp_addr();
    let corp = Netstack::start(NetstackConfig {
        private_key: kc.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        addresses: vec![net("10.99.0.2/24")],
        peers: vec![PeerSpec {
            name: "appliance".into(),
            public_key: ka.public_key(),
            allowed_ips: vec![net("10.99.0.1/32")],
            keepalive: Some(25),
            endpoint: Some(listen),
        }],
        mtu: 1420,
        tcp: TcpTuning::default(),
    })
    .unwrap();
    let mut model = corp.listen(8000).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = model.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4];
                while s.read_exact(&mut b).await.is_ok() {
                    if s.write_all(&b).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    assert!(
        reachable_within(&first, Duration::from_secs(5))
            .await
            .is_some(),
        "the corp peer dialled in"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.load().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the endpoint was never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = store.load().unwrap();
    assert_eq!(stored[0].endpoint, corp.udp_addr());
    first.shutdown().await;

    let mut times = Vec::new();
    for round in 0..3 {
        let again = appliance(&ka, &kc, listen, Some(store.clone()));
        let took = reachable_within(&again, Duration::from_secs(3)).await;
        eprintln!("restart {round} with the endpoint store: tunnel back after {took:?}");
        let took = took.expect("no traffic within 3 s of the restart");
        assert!(took < Duration::from_secs(1), "took {took:?}, target 1 s");
        times.push(took);
        again.shutdown().await;
    }
    eprintln!("recovery after restart (in process): {times:?}");

    let blind = appliance(&ka, &kc, listen, None);
    assert_eq!(
        reachable_within(&blind, Duration::from_secs(3)).await,
        None,
        "without the store the corp peer stays on its old session"
    );
    blind.shutdown().await;
    corp.shutdown().await;
}

/// What the raw model does with a chat request.
#[derive(Clone, Copy)]
enum Act {
    /// SSE head and two events, then the connection dies (reset).
    StreamThenDie,
    /// SSE head and one event, then silence for a minute.
    StreamThenStall,
    /// A JSON head with Content-Length 200 and 20 bytes of it, then the connection dies.
    ShortBodyThenDie,
    /// A chunked JSON head and one chunk, then silence for a minute.
    BodyThenStall,
    /// Reads the request and never answers.
    NeverAnswer,
}

/// Reads one HTTP/1.1 request (head and Content-Length body) from `s`; false at EOF.
async fn read_request(s: &mut TunnelStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut b).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&b[..n]);
            }
            return Some(head);
        }
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
}

fn event(i: usize) -> String {
    let ev = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]});
    let data = format!("data: {ev}\n\n");
    format!("{:x}\r\n{data}\r\n", data.len())
}

async fn raw_model(mut s: TunnelStream, act: Act) {
    let Some(head) = read_request(&mut s).await else {
        return;
    };
    if head.starts_with("get") {
        let body = r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#;
        let _ = s
            .write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                    .as_bytes(),
            )
            .await;
        return;
    }
    const SSE: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let out = match act {
        Act::StreamThenDie => format!("{SSE}{}{}", event(0), event(1)),
        Act::StreamThenStall => format!("{SSE}{}", event(0)),
        Act::ShortBodyThenDie => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"id\":\"c\",\"choices\":".into(),
        Act::BodyThenStall => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"id\"\r\n".into(),
        Act::NeverAnswer => String::new(),
    };
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.flush().await;
    match act {
        // Dropping the stream resets the connection, as a killed model or a dead peer does.
        Act::StreamThenDie | Act::ShortBodyThenDie => {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        _ => tokio::time::sleep(Duration::from_secs(60)).await,
    }
}

/// The gateway in front of a raw model that does `act` with every chat request.
async fn stack(act: Act, drain_timeout: Duration) -> (Stack, String) {
    let (secret, principal) = key("good", KeyPolicy::default());
    let mut o = StackOptions::new(
        vec![(secret.clone(), principal)],
        vec![corp_upstream("raw", &[("m", "m")])],
    );
    o.config = GatewayConfig {
        drain_timeout,
        ..GatewayConfig::default()
    };
    let gw = Stack::start(o, move |s| raw_model(s, act)).await;
    gw.wait_tunnel().await;
    (gw, secret)
}

/// What a client got: status, the body bytes that arrived, and how the body ended.
struct Got {
    status: u16,
    retry_after: Option<String>,
    body: String,
    /// `Err` when the body broke off (an incomplete body), `Ok` when it ended cleanly.
    end: Result<(), String>,
    ended_at: Instant,
}

async fn post(gw: &Stack, secret: &str, stream: bool) -> Got {
    let (mut send, _conn) = gw.connect().await;
    let body = serde_json::json!({"model": "m", "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let req = Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("a response head within 20 s")
        .expect("a response head");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let mut b = resp.into_body();
    let mut body = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), b.frame()).await {
            Err(_) => panic!("body neither ended nor failed within 20 s"),
            Ok(None) => break Ok(()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    body.extend_from_slice(&d);
                }
            }
            Ok(Some(Err(e))) => break Err(e.to_string()),
        }
    };
    Got {
        status,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
        end,
        ended_at: Instant::now(),
    }
}

/// The `data:` events of an SSE body, parsed (comments skipped).
fn events(body: &str) -> Vec<serde_json::Value> {
    body.split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad event {e:?}"));
            serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"))
        })
        .collect()
}

fn assert_error_event(ev: &serde_json::Value, code: &str) {
    let err = &ev["error"];
    assert_eq!(err["code"], code, "{ev}");
    assert_eq!(err["type"], "server_error", "{ev}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("incomplete")),
        "{ev}"
    );
}

/// The model's connection dies mid-stream: the client gets the events so far, then one error
/// event (`upstream_disconnected`), then a clean end of the body — every event parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_model_dies_ends_with_an_error_event() {
    let (gw, secret) = stack(Act::StreamThenDie, Duration::from_secs(30)).await;
    let got = post(&gw, &secret, true).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.end, Ok(()), "the stream closes cleanly: {}", got.body);
    let evs = events(&got.body);
    assert_eq!(evs.len(), 3, "{}", got.body);
    assert_eq!(evs[1]["choices"][0]["delta"]["content"], "tok1 ");
    assert_error_event(&evs[2], "upstream_disconnected");
    assert!(
        !got.body.contains("[DONE]"),
        "a cut stream is not a finished one"
    );
}

/// A non-streaming answer cut short is an incomplete body for the client (never a short body
/// that looks complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_non_streaming_answer_is_an_incomplete_body() {
    let (gw, secret) = stack(Act::ShortBodyThenDie, Duration::from_secs(30)).await;
    let got = post(&gw, &secret, false).await;
    assert_eq!(got.status, 200);
    assert!(
        got.end.is_err(),
        "an incomplete body error, got a clean end after {:?}",
        got.body
    );
    assert!(got.body.len() < 200, "{}", got.body);
}

/// The drain period ends: an open stream ends with `server_shutting_down` and a clean close,
/// an open non-streaming body is aborted, and a request still waiting for the model gets 503
/// `server_shutting_down` with `Retry-After: 1` — all within the drain timeout plus 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_drain_cuts_what_is_still_open() {
    let drain = Duration::from_millis(500);
    let mut running = Vec::new();
    let mut stacks = Vec::new();
    for (act, stream) in [
        (Act::StreamThenStall, true),
        (Act::BodyThenStall, false),
        (Act::NeverAnswer, true),
    ] {
        let (gw, secret) = stack(act, drain).await;
        let gw = Arc::new(gw);
        stacks.push(gw.clone());
        running.push(tokio::spawn(
            async move { post(&gw, &secret, stream).await },
        ));
    }
    // Let the three requests reach their model, then stop the three gateways.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (i, t) in running.iter_mut().enumerate() {
        if t.is_finished() {
            let g = t.await.unwrap();
            panic!("request {i} ended before the stop: {} {}", g.status, g.body);
        }
    }
    let stopped = Instant::now();
    for gw in &stacks {
        gw.stop();
    }
    let mut got = Vec::new();
    for t in running {
        got.push(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for g in &got {
        let after = g.ended_at.duration_since(stopped);
        assert!(
            after >= drain - Duration::from_millis(50) && after < drain + Duration::from_secs(1),
            "ended {after:?} after the stop (drain {drain:?}): {}",
            g.body
        );
    }
    let (stream, body, waiting) = (&got[0], &got[1], &got[2]);
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.end,
        Ok(()),
        "the stream closes cleanly: {}",
        stream.body
    );
    let evs = events(&stream.body);
    assert_eq!(evs.len(), 2, "{}", stream.body);
    assert_error_event(&evs[1], "server_shutting_down");

    assert_eq!(body.status, 200);
    assert!(
        body.end.is_err(),
        "aborted, not a short clean body: {:?}",
        body.body
    );

    assert_eq!(waiting.status, 503, "{}", waiting.body);
    assert_eq!(waiting.retry_after.as_deref(), Some("1"));
    let e: serde_json::Value = serde_json::from_str(&waiting.body).unwrap();
    assert_eq!(e["error"]["code"], "server_shutting_down", "{e}");
}

/// A connection accepted just before the stop, whose request arrives after it, is still
/// answered (then closed): closing it unanswered is a reset the client sees as a failure, as
/// the boot test's restart under load once did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_before_the_stop_gets_its_answer() {
    let (gw, _secret) = stack(Act::NeverAnswer, Duration::from_secs(5)).await;
    let (mut send, conn) = gw.connect().await;
    gw.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let req = Request::get("/healthz")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("an answer within 5 s")
        .expect("answered, not reset");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // The stop closes it after that answer.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection closes after its answer")
        .unwrap()
        .unwrap();
}
