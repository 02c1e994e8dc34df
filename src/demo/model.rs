//! A small OpenAI-compatible "echo" model that streams like vLLM: a role chunk, one content
//! chunk per word, a finish chunk, an optional usage chunk, then `[DONE]`.
//!
//! It is the model test double (the only one the project allows) and the demo's model. It
//! serves any `AsyncRead + AsyncWrite` connection, so it runs inside the tunnel (on a
//! [`crate::netstack::TunnelListener`]) as well as on a loopback TCP port. It records how many
//! generation requests reached it and how many streams ended early, so tests can prove that
//! refused requests never arrive and that disconnects cancel generation.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// What the echo model has seen.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Generation requests (chat/completions, completions, embeddings, responses).
    pub requests: AtomicU64,
    /// Streams whose client went away before `[DONE]`.
    pub cancelled: AtomicU64,
    /// Streams that ran to `[DONE]`.
    pub completed: AtomicU64,
    /// Streaming requests that asked for the final usage chunk (`stream_options.include_usage`).
    pub usage_requested: AtomicU64,
    /// The `Authorization` header of the last generation request (to prove the client's key
    /// never travels upstream).
    pub last_authorization: std::sync::Mutex<Option<String>>,
    /// The `model` field of the last generation request (to check alias rewriting).
    pub last_model: std::sync::Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct EchoModel {
    pub name: String,
    /// Pause between streamed words, like a model generating tokens.
    pub token_delay: Duration,
    pub stats: Arc<ModelStats>,
}

impl EchoModel {
    pub fn new(name: &str, token_delay: Duration) -> EchoModel {
        EchoModel {
            name: name.to_string(),
            token_delay,
            stats: Arc::new(ModelStats::default()),
        }
    }

    /// Serves HTTP/1.1 on one connection until the client closes it.
    pub async fn serve_connection<S>(self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| {
            let m = self.clone();
            async move { Ok::<_, Infallible>(m.handle(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
        let path = req.uri().path().to_string();
        if req.method() == hyper::Method::GET && path.ends_with("/models") {
            let body = serde_json::json!({
                "object": "list",
                "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "echo"}]
            });
            return json(StatusCode::OK, body);
        }
        if req.method() != hyper::Method::POST {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"message": "not found"}}),
            );
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": {"message": "bad body"}}),
            );
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": {"message": "invalid JSON"}}),
            );
        };
        *self
            .stats
            .last_model
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = v["model"].as_str().map(str::to_string);
        if v["model"].as_str() != Some(self.name.as_str()) {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"message": format!("The model `{}` does not exist.", v["model"]), "type": "NotFoundError", "code": 404}}),
            );
        }
        let text = last_user_text(&v);
        let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        let prompt_tokens = (body.len() / 4) as u64;
        let completion_tokens = words.len() as u64;
        let stream = v["stream"].as_bool().unwrap_or(false);
        let include_usage = v["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        if stream && include_usage {
            self.stats.usage_requested.fetch_add(1, Ordering::Relaxed);
        }
        let id = format!(
            "chatcmpl-echo-{}",
            self.stats.requests.load(Ordering::Relaxed)
        );
        if !stream {
            let reply = words.join(" ");
            return json(
                StatusCode::OK,
                serde_json::json!({
                    "id": id, "object": "chat.completion", "created": 0, "model": self.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
                }),
            );
        }
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let model = self.name.clone();
        let delay = self.token_delay;
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let chunk = |delta: serde_json::Value, finish: Option<&str>| {
                let c = serde_json::json!({
                    "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
                });
                Bytes::from(format!("data: {c}\n\n"))
            };
            let mut events = vec![chunk(
                serde_json::json!({"role": "assistant", "content": ""}),
                None,
            )];
            for (i, w) in words.iter().enumerate() {
                let piece = if i == 0 { w.clone() } else { format!(" {w}") };
                events.push(chunk(serde_json::json!({"content": piece}), None));
            }
            events.push(chunk(serde_json::json!({}), Some("stop")));
            if include_usage {
                let u = serde_json::json!({
                    "id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
                });
                events.push(Bytes::from(format!("data: {u}\n\n")));
            }
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            let n = events.len();
            for (i, e) in events.into_iter().enumerate() {
                if tx.send(e).await.is_err() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if i + 2 < n && !delay.is_zero() {
                    // Notice a vanished client while "generating", as vLLM does.
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = tx.closed() => {
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
            stats.completed.fetch_add(1, Ordering::Relaxed);
        });
        let body = ChannelBody(rx);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream; charset=utf-8")
            .header("cache-control", "no-cache")
            .body(BodyExt::boxed(body))
            .unwrap_or_else(|_| Response::new(BodyExt::boxed(Full::new(Bytes::new()))))
    }
}

/// The text of the last user message (string or content parts), or the prompt.
fn last_user_text(v: &serde_json::Value) -> String {
    if let Some(msgs) = v["messages"].as_array() {
        for m in msgs.iter().rev() {
            if m["role"] == "user" {
                return match &m["content"] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => String::new(),
                };
            }
        }
    }
    v["prompt"].as_str().unwrap_or("").to_string()
}

fn json(
    status: StatusCode,
    v: serde_json::Value,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(v.to_string()))))
        .unwrap_or_else(|_| Response::new(BodyExt::boxed(Full::new(Bytes::new()))))
}

/// The body of a streamed answer: whatever the generator task sends, as it sends it.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
