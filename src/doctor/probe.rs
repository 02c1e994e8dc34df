//! Hops 7 and 8: real requests through the public listener with a throwaway API key.
//!
//! The key ([`ThrowawayKey`]) is created in the daemon's key store as `doctor-<8 hex>`, may only
//! call `models` and `chat_completions`, expires after 10 minutes on its own, and is revoked as
//! soon as the probes end: explicitly on every path, again from `Drop` (an early return or a
//! panic unwinding), and the CLI revokes it on SIGINT/SIGTERM as well. Only a SIGKILL leaves it
//! to its 10-minute expiry. Revoked keys stay listed (`key list`) like every revoked key, so
//! each doctor run is visible afterwards.
//!
//! The HTTPS connection trusts only the leaf certificate hop 3 saw ([`PinnedLeaf`]), so the
//! probes work with a self-signed or expired certificate too, and nothing else can answer them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use super::cert::{connect_pinned, PinnedLeaf};
use crate::keys::{KeyStore, NewKey, Secret};
use crate::policy::{Endpoint, KeyPolicy};

/// How long the throwaway key lives if it is never revoked (SIGKILL).
pub const KEY_LIFETIME: Duration = Duration::from_secs(600);
/// How long the daemon may take to see a new key (it watches the store every 250 ms and
/// promises a second).
pub const KEY_PROPAGATION: Duration = Duration::from_secs(3);
/// Largest answer read (a model list or a 1-token stream is a few KiB).
const MAX_ANSWER: usize = 1 << 20;

/// A key that exists only for this doctor run.
pub struct ThrowawayKey {
    state_dir: PathBuf,
    store_cfg: crate::keys::StoreConfig,
    pub id: String,
    pub name: String,
    secret: Secret,
    revoked: bool,
}

impl ThrowawayKey {
    /// Creates `doctor-<random>` in `<state_dir>/keys.db`.
    pub fn create(
        state_dir: &Path,
        store_cfg: &crate::keys::StoreConfig,
    ) -> Result<ThrowawayKey, String> {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|e| format!("random name: {e}"))?;
        let name = format!(
            "doctor-{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let new = NewKey {
            name: name.clone(),
            policy: KeyPolicy {
                endpoints: vec![Endpoint::Models, Endpoint::ChatCompletions],
                expires_at: Some(SystemTime::now() + KEY_LIFETIME),
                rpm: Some(30),
                max_concurrent: Some(2),
                ..KeyPolicy::default()
            },
        };
        let created =
            off_runtime(|| KeyStore::open_in(state_dir, store_cfg).and_then(|mut s| s.create(new)))
                .map_err(|e| e.to_string())?;
        Ok(ThrowawayKey {
            state_dir: state_dir.to_path_buf(),
            store_cfg: store_cfg.clone(),
            id: created.id,
            name,
            secret: created.secret,
            revoked: false,
        })
    }

    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    /// Revokes the key (once; later calls do nothing).
    pub fn revoke(&mut self) -> Result<(), String> {
        if self.revoked {
            return Ok(());
        }
        off_runtime(|| {
            KeyStore::open_in(&self.state_dir, &self.store_cfg).and_then(|mut s| s.revoke(&self.id))
        })
        .map_err(|e| e.to_string())?;
        self.revoked = true;
        Ok(())
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked
    }
}

/// Runs `f` on a plain thread: doctor calls the key store from async code, and a PostgreSQL
/// store's synchronous client cannot run on a thread that drives a tokio runtime.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

impl Drop for ThrowawayKey {
    fn drop(&mut self) {
        if let Err(e) = self.revoke() {
            eprintln!(
                "modelgate doctor: could not revoke the throwaway key {} ({}): {e}; it expires by itself within 10 minutes, or run `modelgate key revoke {} --yes`",
                self.name, self.id, self.id
            );
        }
    }
}

/// Where and how to reach the public listener.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// SNI and Host header.
    pub name: String,
    pub pin: PinnedLeaf,
    pub timeout: Duration,
}

impl Target {
    fn host_header(&self) -> String {
        let host = if self.name.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{}]", self.name)
        } else {
            self.name.clone()
        };
        if self.addr.port() == 443 {
            host
        } else {
            format!("{host}:{}", self.addr.port())
        }
    }
}

/// A failed probe: what happened, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    pub detail: String,
    pub fix: String,
}

fn fail(detail: impl Into<String>, fix: impl Into<String>) -> ProbeFailure {
    ProbeFailure {
        detail: detail.into(),
        fix: fix.into(),
    }
}

type Answer = hyper::Response<hyper::body::Incoming>;

async fn send(
    t: &Target,
    method: Method,
    path: &str,
    body: Option<String>,
    secret: &str,
) -> Result<Answer, String> {
    let tls = connect_pinned(t.addr, &t.name, &t.pin).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP/1.1 to {}: {e}", t.addr))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, t.host_header())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {secret}"))
        .header(hyper::header::USER_AGENT, "modelgate-doctor");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("request to {}: {e}", t.addr))
}

async fn read_all(resp: Answer) -> Result<Vec<u8>, String> {
    http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .map_err(|e| format!("reading the answer: {e}"))
}

/// The `error.message` (and code) of an OpenAI-shaped error body, else the body's start.
fn error_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let e = &v["error"];
        if let Some(m) = e["message"].as_str() {
            return match e["code"].as_str() {
                Some(c) => format!("{c}: {m}"),
                None => m.to_string(),
            };
        }
    }
    let t = String::from_utf8_lossy(body);
    t.chars().take(200).collect()
}

/// The fix for an HTTP error status from the gateway.
fn fix_for_status(status: u16, model: Option<&str>) -> String {
    match status {
        401 => "the daemon did not accept a key created in the key store of this config: check that the running daemon uses this config's server.state_dir (`modelgate status` shows its config), then `journalctl -u modelgate`".into(),
        403 => "a policy refused the throwaway key: check the config's [[policy]] and [gateway] settings".into(),
        404 => format!("no upstream serves {}: `modelgate upstream list`; add the model with `modelgate upstream add NAME --url URL --model PUBLIC=UPSTREAM_ID` or check the server's GET /v1/models", model.unwrap_or("that model")),
        429 => "the gateway refused for limits (rate or queue): retry later, or raise [gateway] max_queued / the upstream's max_concurrent".into(),
        502..=504 => "the gateway could not get an answer from the model through the tunnel: see hops 5 and 6, the model server's log and `journalctl -u modelgate`".into(),
        _ => "read `journalctl -u modelgate` for this request".into(),
    }
}

/// Hop 7: `GET /v1/models`; returns the model ids. Retries a 401 while the daemon may not have
/// seen the new key yet.
pub async fn models(t: &Target, secret: &str) -> Result<Vec<String>, ProbeFailure> {
    let start = Instant::now();
    let work = async {
        loop {
            let resp = send(t, Method::GET, "/v1/models", None, secret)
                .await
                .map_err(|e| fail(e, "the listener answered the TLS check but not this request: read `journalctl -u modelgate`"))?;
            let status = resp.status().as_u16();
            let body = read_all(resp)
                .await
                .map_err(|e| fail(e, "read `journalctl -u modelgate`"))?;
            if status == 401 && start.elapsed() < KEY_PROPAGATION {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if status != 200 {
                return Err(fail(
                    format!("GET /v1/models answered {status}: {}", error_text(&body)),
                    fix_for_status(status, None),
                ));
            }
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                fail(
                    format!("GET /v1/models answered 200 but not JSON: {e}"),
                    "read `journalctl -u modelgate`",
                )
            })?;
            let ids: Vec<String> = v["data"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m["id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            return Ok(ids);
        }
    };
    tokio::time::timeout(t.timeout, work).await.map_err(|_| {
        fail(
            format!("GET /v1/models: no answer within {:?}", t.timeout),
            "read `journalctl -u modelgate`",
        )
    })?
}

/// What one streamed completion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// SSE events with a non-empty `choices` array.
    pub chunks: usize,
    pub first_chunk_ms: u128,
    pub total_ms: u128,
}

/// Hop 8: one streamed chat completion of at most 1 token, read to `data: [DONE]`.
pub async fn completion(t: &Target, secret: &str, model: &str) -> Result<Streamed, ProbeFailure> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Reply with OK."}],
        "max_tokens": 1,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let start = Instant::now();
    let work = async {
        let resp = send(t, Method::POST, "/v1/chat/completions", Some(body), secret)
            .await
            .map_err(|e| fail(e, "read `journalctl -u modelgate`"))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = read_all(resp).await.unwrap_or_default();
            return Err(fail(
                format!(
                    "POST /v1/chat/completions ({model}) answered {status}: {}",
                    error_text(&body)
                ),
                fix_for_status(status, Some(model)),
            ));
        }
        read_stream(resp, model, start).await
    };
    tokio::time::timeout(t.timeout, work).await.map_err(|_| {
        fail(
            format!("the streamed completion did not finish within {:?}", t.timeout),
            "no answer in time: if hops 5 and 6 pass, the model is slow or stuck (check its load and log; raise --timeout if it is just slow); otherwise fix those first (a dead tunnel stalls requests)",
        )
    })?
}

/// Reads the SSE stream of hop 8 to `data: [DONE]`, counting the chunks that carry choices;
/// at most [`MAX_ANSWER`] bytes.
async fn read_stream(resp: Answer, model: &str, start: Instant) -> Result<Streamed, ProbeFailure> {
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    let mut out = Streamed {
        chunks: 0,
        first_chunk_ms: 0,
        total_ms: 0,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            fail(
                format!("the stream broke after {} chunks: {e}", out.chunks),
                fix_for_status(502, Some(model)),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > MAX_ANSWER {
            return Err(fail(
                "the stream of a 1-token completion exceeded 1 MiB",
                "check the model server: it ignores max_tokens",
            ));
        }
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            match sse_event(&event) {
                Event::Done => {
                    out.total_ms = start.elapsed().as_millis();
                    if out.chunks == 0 {
                        return Err(fail(
                            "the stream ended with [DONE] but carried no choices",
                            "check the model server's streaming (it must send chat.completion.chunk events)",
                        ));
                    }
                    return Ok(out);
                }
                Event::Choice => {
                    if out.chunks == 0 {
                        out.first_chunk_ms = start.elapsed().as_millis();
                    }
                    out.chunks += 1;
                }
                Event::Error(m) => {
                    return Err(fail(
                        format!("the stream carried an error: {m}"),
                        fix_for_status(502, Some(model)),
                    ))
                }
                Event::Other => {}
            }
        }
    }
    Err(fail(
        format!(
            "the stream ended without data: [DONE] after {} chunks",
            out.chunks
        ),
        fix_for_status(502, Some(model)),
    ))
}

enum Event {
    Done,
    Choice,
    Error(String),
    Other,
}

fn sse_event(event: &[u8]) -> Event {
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    if data == "[DONE]" {
        return Event::Done;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
        return Event::Other;
    };
    if v.get("error").is_some() {
        return Event::Error(error_text(data.as_bytes()));
    }
    if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
        return Event::Choice;
    }
    Event::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_classified() {
        assert!(matches!(sse_event(b"data: [DONE]\n\n"), Event::Done));
        assert!(matches!(
            sse_event(b"data: {\"choices\":[{\"delta\":{\"content\":\"O\"}}]}\n\n"),
            Event::Choice
        ));
        assert!(matches!(
            sse_event(b"data: {\"choices\":[],\"usage\":{}}\n\n"),
            Event::Other
        ));
        assert!(matches!(sse_event(b": keepalive\n\n"), Event::Other));
        match sse_event(
            b"data: {\"error\":{\"message\":\"upstream gone\",\"code\":\"upstream_error\"}}\n\n",
        ) {
            Event::Error(m) => assert_eq!(m, "upstream_error: upstream gone"),
            _ => panic!("not an error"),
        }
    }

    #[test]
    fn error_bodies_are_summarised() {
        assert_eq!(
            error_text(br#"{"error":{"message":"bad key","type":"x","code":"invalid_api_key"}}"#),
            "invalid_api_key: bad key"
        );
        assert_eq!(error_text(b"plain"), "plain");
        assert!(fix_for_status(404, Some("m")).contains("no upstream serves m"));
    }

    #[test]
    fn throwaway_key_is_revoked_on_drop_and_explicitly() {
        let dir = tempfile::tempdir().unwrap();
        let (id, name) = {
            let k = ThrowawayKey::create(dir.path(), &Default::default()).unwrap();
            assert!(
                k.name.starts_with("doctor-") && k.name.len() == 15,
                "{}",
                k.name
            );
            assert!(k.secret().starts_with("mg_"));
            (k.id.clone(), k.name.clone())
        };
        let store = KeyStore::open(dir.path()).unwrap();
        let rec = store.get(&id).unwrap();
        assert_eq!(rec.name, name);
        assert!(rec.revoked_at.is_some(), "dropped key not revoked");
        let left = rec
            .expires_at
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left <= KEY_LIFETIME && left > KEY_LIFETIME - Duration::from_secs(60));

        let mut k = ThrowawayKey::create(dir.path(), &Default::default()).unwrap();
        k.revoke().unwrap();
        assert!(k.is_revoked());
        k.revoke().unwrap();
        assert!(store.get(&k.id).unwrap().revoked_at.is_some());
        // A panic unwinding through the probe still revokes.
        let dir2 = dir.path().to_path_buf();
        let id = std::thread::spawn(move || {
            let k = ThrowawayKey::create(&dir2, &Default::default()).unwrap();
            let id = k.id.clone();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _k = k;
                panic!("probe blew up");
            }));
            assert!(r.is_err());
            id
        })
        .join()
        .unwrap();
        assert!(store.get(&id).unwrap().revoked_at.is_some());
    }
}
