//! The request path: authenticate, check policy, route, forward, stream the answer back.
//!
//! Nothing reaches a model server before the key and its policy have said yes. The response
//! body is passed through frame by frame (no buffering), SSE keep-alive comments fill silences
//! at event boundaries, and dropping the client's response drops the upstream connection at
//! once (the netstack resets it, so the model stops generating).
//!
//! Order: auth → access policy (expiry, source network, endpoint, model) → the key's limiter
//! (`policy::limits`: RPM, TPM, concurrency, budget) → route → the upstream's fair-share queue
//! (`fair`) → upstream. The limiter comes before routing so that a key out of budget is told
//! `insufficient_quota` even while the model is unreachable (a refusal with a reason beats a
//! 503 the client would retry forever); a request refused later (unknown model, tunnel down)
//! has still used one request of its RPM, as with OpenAI. The admission is owned by a
//! [`Settlement`] that settles it exactly once, whatever happens: the response body ends, the
//! client goes away, the upstream fails, or the request never got a response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::value::RawValue;
use tokio::time::Sleep;

use super::compat::Fields;
use super::error::ApiError;
use super::fair::{QueueError, Slot};
use super::meter::{Meter, StreamKind};
use super::{ClientAddr, GatewayState};
use crate::keys::ledger::{LedgerWriter, UsageEvent};
use crate::policy::limits::{Admission, Estimate, Limiter};
use crate::policy::{self, Endpoint, Principal};

/// The `Authorization: Bearer` key, or why there is none.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let v = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::MissingKey)?
        .to_str()
        .map_err(|_| ApiError::MissingKey)?;
    let (scheme, key) = v.split_once(' ').ok_or(ApiError::MissingKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::MissingKey);
    }
    Ok(key.trim())
}

fn authenticate(state: &GatewayState, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
    let key = bearer(headers)?;
    state
        .keys
        .current()
        .authenticate(key, SystemTime::now())
        .map_err(ApiError::Unauthorized)
}

/// `GET /v1/models`: only the models this key may use.
pub async fn list_models(
    State(state): State<Arc<GatewayState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
) -> Response {
    let principal = match authenticate(&state, &headers) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(d) = policy::check_access(
        &principal,
        Endpoint::Models,
        None,
        client.ip(),
        SystemTime::now(),
    ) {
        return ApiError::Forbidden(d).into_response();
    }
    let data: Vec<serde_json::Value> = state
        .routes
        .models()
        .into_iter()
        .filter(|(m, _)| policy::model_allowed(&principal.policy, m))
        .map(|(id, _)| {
            serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "modelgate"})
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"object": "list", "data": data}).to_string(),
    )
        .into_response()
}

/// Which upstream path each endpoint maps to.
fn suffix(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat/completions",
        Endpoint::Completions => "completions",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Responses => "responses",
        Endpoint::Models => "models",
    }
}

/// What one request looked like, for the audit line. Never the prompt or completion.
struct Audit {
    started: Instant,
    key_id: String,
    key_name: String,
    client: SocketAddr,
    endpoint: Endpoint,
    model: String,
    upstream: String,
    status: u16,
    bytes_in: usize,
    bytes_out: u64,
    ttfb: Option<Duration>,
    /// Tail of the response, where usage sits (last SSE chunk or end of the JSON).
    tail: Vec<u8>,
    flight: crate::telemetry::Flight,
}

const AUDIT_TAIL: usize = 4096;

impl Audit {
    fn finish(&self, outcome: &str, usage: Option<(u64, u64)>) {
        let elapsed = self.started.elapsed();
        self.flight
            .finish(&self.model, self.status, usage, self.ttfb, elapsed);
        tracing::info!(
            target: "audit",
            key_id = %self.key_id,
            key = %self.key_name,
            client = %self.client.ip(),
            endpoint = suffix(self.endpoint),
            model = %self.model,
            upstream = %self.upstream,
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            prompt_tokens = usage.map(|u| u.0),
            completion_tokens = usage.map(|u| u.1),
            ttfb_ms = self.ttfb.map(|t| t.as_secs_f64() * 1000.0),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            outcome,
            "request"
        );
    }
}

/// `(prompt_tokens, completion_tokens)` of the last `"usage"` object in `tail`, if any.
pub fn find_usage(tail: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(tail).ok().or_else(|| {
        // The tail may start mid-character; skip to the first valid boundary.
        (1..4).find_map(|i| std::str::from_utf8(tail.get(i..)?).ok())
    })?;
    let at = text.rfind("\"usage\"")?;
    let rest = &text[at..];
    let num = |field: &str| -> Option<u64> {
        let i = rest.find(field)? + field.len();
        let after = rest[i..].trim_start().strip_prefix(':')?.trim_start();
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        after[..end].parse().ok()
    };
    Some((
        num("\"prompt_tokens\"")?,
        num("\"completion_tokens\"").unwrap_or(0),
    ))
}

/// The POST endpoints: chat/completions, completions, embeddings, responses.
pub async fn forward(
    State(state): State<Arc<GatewayState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    Extension(endpoint): Extension<Endpoint>,
    req: Request<Body>,
) -> Response {
    let started = Instant::now();
    match forward_inner(&state, client, endpoint, req, started).await {
        Ok(r) => r,
        Err((e, principal, model)) => {
            crate::telemetry::record_refusal(&state, principal.as_deref(), &model, &e, started);
            // Refusals are logged like any request, with what we know.
            tracing::info!(
                target: "audit",
                key_id = principal.as_ref().map(|p| p.id.as_str()).unwrap_or("-"),
                client = %client.ip(),
                endpoint = suffix(endpoint),
                model = model.as_deref().unwrap_or("-"),
                status = e.status().as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                outcome = ?e,
                "request refused"
            );
            e.into_response()
        }
    }
}

type Refusal = (ApiError, Option<Arc<Principal>>, Option<String>);

async fn forward_inner(
    state: &GatewayState,
    client: SocketAddr,
    endpoint: Endpoint,
    req: Request<Body>,
    started: Instant,
) -> Result<Response, Refusal> {
    let principal = authenticate(state, req.headers()).map_err(|e| (e, None, None))?;
    let limit = state.settings.max_body_bytes;
    let refuse = |e: ApiError, model: Option<String>| (e, Some(principal.clone()), model);
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(refuse(ApiError::PayloadTooLarge(limit as u64), None));
        }
    }
    let accept = req.headers().get(header::ACCEPT).cloned();
    let body = match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let err = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::PayloadTooLarge(limit as u64)
            } else {
                ApiError::BadRequest("could not read the request body".into())
            };
            return Err(refuse(err, None));
        }
    };
    // Parse the top level only, once: values stay raw, so unknown fields pass through untouched.
    let mut raw: Fields = serde_json::from_slice(&body).map_err(|e| {
        refuse(
            ApiError::BadRequest(format!("The request body is not a JSON object: {e}")),
            None,
        )
    })?;
    // Cursor compatibility (Responses-shaped bodies, empty content lists), in place.
    let translated = super::compat::translate_fields(endpoint, &mut raw, &state.settings.compat)
        .map_err(|e| refuse(e, None))?;
    let model = raw
        .get("model")
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        .ok_or_else(|| {
            refuse(
                ApiError::BadRequest("you must provide a model parameter".into()),
                None,
            )
        })?;
    if let Err(d) = policy::check_access(
        &principal,
        endpoint,
        Some(&model),
        client.ip(),
        SystemTime::now(),
    ) {
        return Err(refuse(ApiError::Forbidden(d), Some(model)));
    }
    // Admission: the key's limits, budget and concurrency, before routing, so that a key out
    // of budget hears `insufficient_quota` even while the model is unreachable. Dropping
    // `settlement` on any early return below releases the slot and the reservation.
    let raw_limits = max_tokens_field(&raw);
    let est = estimate(endpoint, &body, raw_limits);
    let admitted = state
        .limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(
            &principal.id,
            &principal.policy,
            est,
            Instant::now(),
            SystemTime::now(),
        );
    let admission = admitted.map_err(|r| refuse(ApiError::from_limit(r), Some(model.clone())))?;
    let rate_headers = admission.headers.pairs();
    let metered = admission.metered();
    let settlement = Settlement {
        limiter: state.limiter.clone(),
        ledger: state.ledger.clone(),
        admission: Some(admission),
        estimate: est,
    };
    let Some((upstream, upstream_model)) = state.routes.route(&model) else {
        // Before the first successful discovery we cannot tell "no such model" from "cannot
        // reach the server that has it": say unavailable (503, retry), not 404.
        let e = if state.routes.incomplete() {
            ApiError::ModelsUnavailable
        } else {
            ApiError::ModelNotFound(model.clone())
        };
        return Err(refuse(e, Some(model)));
    };
    let flight = crate::telemetry::Flight::start(&state.metrics, &principal, &upstream);
    // Streams of chat/completions and completions are metered event by event. The upstream is
    // always asked for the final usage chunk; when the client did not ask for it, the gateway
    // strips it again, so the client gets exactly what it asked for.
    let stream_kind = match endpoint {
        Endpoint::ChatCompletions => Some(StreamKind::Chat),
        Endpoint::Completions => Some(StreamKind::Completion),
        _ => None,
    }
    .filter(|_| raw_bool(raw.get("stream").map(|v| &**v)) == Some(true));
    let client_wants_usage = raw
        .get("stream_options")
        .and_then(|v| serde_json::from_str::<serde_json::Value>(v.get()).ok())
        .and_then(|v| v.get("include_usage").and_then(|b| b.as_bool()))
        .unwrap_or(false);
    let inject_usage = stream_kind.is_some() && !client_wants_usage;
    // Re-encode only for a translation, an alias or the usage request; otherwise forward the
    // client's bytes as they are.
    let out_body = if translated || upstream_model != model || inject_usage {
        let mut raw = raw;
        let bad = || {
            refuse(
                ApiError::BadRequest("bad model or stream_options".into()),
                Some(model.clone()),
            )
        };
        if upstream_model != model {
            let v =
                RawValue::from_string(serde_json::to_string(&upstream_model).unwrap_or_default())
                    .map_err(|_| bad())?;
            raw.insert("model".to_string(), v);
        }
        if inject_usage {
            let mut opts = raw
                .get("stream_options")
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v.get()).ok())
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({}));
            opts["include_usage"] = serde_json::Value::Bool(true);
            let v = RawValue::from_string(opts.to_string()).map_err(|_| bad())?;
            raw.insert("stream_options".to_string(), v);
        }
        Bytes::from(serde_json::to_vec(&raw).unwrap_or_default())
    } else {
        body.clone()
    };

    // A saturated model server: wait for a slot, round-robin across keys. The key's own
    // admission (concurrency, reservation) is held meanwhile and returned if the wait fails.
    let slot = match &upstream.queue {
        Some(q) => Some(q.acquire(&principal.id).await.map_err(|e| {
            refuse(
                ApiError::ModelBusy {
                    queue_full: e == QueueError::Full,
                },
                Some(model.clone()),
            )
        })?),
        None => None,
    };

    let uri = upstream
        .uri(suffix(endpoint))
        .map_err(|e| refuse(e, Some(model.clone())))?;
    let mut up = hyper::Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::ACCEPT,
            accept.unwrap_or(HeaderValue::from_static("*/*")),
        );
    if let Some(k) = &upstream.spec.api_key {
        up = up.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let up = up.body(Full::new(out_body)).map_err(|_| {
        refuse(
            ApiError::BadRequest("bad request".into()),
            Some(model.clone()),
        )
    })?;
    let resp = super::upstream::send(&state.client, up, state.settings.upstream_response_timeout)
        .await
        .map_err(|e| refuse(e, Some(model.clone())))?;
    // An upstream context-length 400 becomes OpenAI's context_length_exceeded (Cursor).
    let resp = super::compat::upstream_error(resp, &state.settings.compat)
        .await
        .map_err(|e| refuse(e, Some(model.clone())))?;

    let status = resp.status();
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut builder = Response::builder().status(status);
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = resp.headers().get(&name) {
            builder = builder.header(name, v);
        }
    }
    if sse {
        // Ask reverse proxies in front of us (and Cursor's) not to buffer the stream.
        builder = builder.header("x-accel-buffering", "no");
    }
    for (name, value) in rate_headers {
        builder = builder.header(name, value);
    }

    let audit = Audit {
        started,
        key_id: principal.id.clone(),
        key_name: principal.name.clone(),
        client,
        endpoint,
        model,
        upstream: upstream.spec.name.clone(),
        status: status.as_u16(),
        bytes_in: body.len(),
        bytes_out: 0,
        ttfb: None,
        tail: Vec::new(),
        flight,
    };
    // Only successful streams are metered (an error body is JSON, not events).
    let meter = stream_kind
        .filter(|_| sse && status.is_success())
        .map(|k| Meter::new(k, inject_usage));
    let body = ProxyBody {
        inner: Some(resp.into_body()),
        meter,
        metered,
        client_wants_usage,
        prompt_charged: false,
        cut: false,
        slot,
        keepalive: if sse {
            Some(state.settings.sse_keepalive)
        } else {
            None
        },
        timer: None,
        at_boundary: true,
        audit: Some(audit),
        settlement: Some(settlement),
        success: status.is_success(),
        sse,
        events: 0,
        done: false,
    };
    builder
        .body(Body::new(body))
        .map_err(|_| (ApiError::BadGateway("bad response".into()), None, None))
}

/// Bytes per prompt token for the admission estimate: OpenAI's rule of thumb (about four
/// characters of English text per token). Counting the whole JSON body over-counts a little
/// (field names, quotes), which errs towards refusing early, never towards over-admitting;
/// settling corrects the charge with the upstream's reported usage.
const BYTES_PER_TOKEN: u64 = 4;

/// A raw JSON boolean (`None` when absent or not a boolean).
fn raw_bool(v: Option<&RawValue>) -> Option<bool> {
    v.and_then(|v| serde_json::from_str::<bool>(v.get()).ok())
}

/// The request's `max_tokens`, `max_completion_tokens` (chat) or `max_output_tokens`
/// (responses), read from the raw top-level fields.
fn max_tokens_field(raw: &Fields) -> Option<u64> {
    ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| {
            raw.get(*f)
                .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        })
}

/// What a request is expected to cost before it goes upstream.
fn estimate(endpoint: Endpoint, body: &[u8], max_tokens: Option<u64>) -> Estimate {
    Estimate {
        prompt_tokens: body.len() as u64 / BYTES_PER_TOKEN,
        // Embeddings generate nothing: reserve no completion tokens for them.
        max_tokens: if matches!(endpoint, Endpoint::Embeddings) {
            Some(0)
        } else {
            max_tokens
        },
    }
}

/// Owns an [`Admission`] and settles it exactly once: explicitly when the response body ends
/// ([`ProxyBody`]), or on drop with nothing charged (the request failed before the upstream
/// answered). Either way the concurrency slot and the unused reservation come back.
struct Settlement {
    limiter: Arc<Mutex<Limiter>>,
    ledger: Option<LedgerWriter>,
    admission: Option<Admission>,
    estimate: Estimate,
}

impl Settlement {
    /// Settles with `used = (prompt, completion, estimated)`; `None` charges nothing and
    /// records nothing (no model work was done, as far as we can tell).
    fn settle(&mut self, used: Option<(u64, u64, bool)>) {
        let Some(adm) = self.admission.take() else {
            return;
        };
        let key_id: Arc<str> = Arc::from(adm.key_id());
        let (prompt, completion, estimated) = used.unwrap_or((0, 0, false));
        let wall = SystemTime::now();
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settle(adm, prompt.saturating_add(completion), Instant::now(), wall);
        if let (Some(ledger), Some(_)) = (&self.ledger, used) {
            let ev = UsageEvent {
                key_id: key_id.clone(),
                at: wall,
                prompt_tokens: prompt,
                completion_tokens: completion,
                estimated,
            };
            if !ledger.record(ev) {
                tracing::warn!(key_id = %key_id, "usage ledger queue full; usage event dropped");
            }
        }
    }

    /// Completion tokens reserved at admission (the cap for an estimate).
    fn reserved_completion(&self) -> u64 {
        self.admission.as_ref().map_or(0, |a| {
            a.reserved().saturating_sub(self.estimate.prompt_tokens)
        })
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(None);
    }
}

/// The upstream body on its way to the client: counts bytes, remembers the tail for usage,
/// inserts SSE comments during silences, and writes the audit line when it ends or is dropped.
///
/// A metered stream (chat/completions or completions, `stream: true`, 2xx) goes through a
/// [`Meter`] and reaches the client in whole events: each event's tokens are charged to the
/// key as they come, and when its TPM or budget is overdrawn the stream ends cleanly (a final
/// chunk with `finish_reason: "length"`, usage if the client asked for it, `[DONE]`) and the
/// upstream connection is dropped, which resets it so the model stops generating.
struct ProxyBody {
    /// `None` once the gateway cut the stream.
    inner: Option<Incoming>,
    meter: Option<Meter>,
    /// The key has TPM or a budget: charge tokens as they stream.
    metered: bool,
    client_wants_usage: bool,
    /// The prompt estimate has been charged with the first token.
    prompt_charged: bool,
    /// The stream was cut by a limit.
    cut: bool,
    /// The upstream concurrency slot (fair share), freed when the body ends.
    slot: Option<Slot>,
    keepalive: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The bytes sent so far end at an SSE event boundary (a blank line).
    at_boundary: bool,
    audit: Option<Audit>,
    /// The request's admission, settled when the body ends or is dropped.
    settlement: Option<Settlement>,
    /// The upstream answered 2xx (otherwise a body without usage charges nothing).
    success: bool,
    sse: bool,
    /// SSE events seen (a completion-token estimate when the stream reports no usage).
    events: u64,
    done: bool,
}

impl ProxyBody {
    fn record(&mut self, data: &Bytes) {
        if let Some(a) = &mut self.audit {
            if a.ttfb.is_none() {
                a.ttfb = Some(a.started.elapsed());
            }
            a.bytes_out += data.len() as u64;
            // A metered stream's usage and token count come from its meter; only unmetered
            // bodies keep a tail to find the usage in.
            if self.meter.is_none() {
                if data.len() >= AUDIT_TAIL {
                    a.tail.clear();
                    a.tail.extend_from_slice(&data[data.len() - AUDIT_TAIL..]);
                } else {
                    let overflow = (a.tail.len() + data.len()).saturating_sub(AUDIT_TAIL);
                    a.tail.drain(..overflow);
                    a.tail.extend_from_slice(data);
                }
            }
        }
        if !data.is_empty() {
            self.at_boundary = data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
        }
        if self.sse && self.meter.is_none() {
            self.events += data.windows(2).filter(|w| w == b"\n\n").count() as u64;
        }
    }

    /// Settles the admission (with the usage in the tail, or an estimate marked as such) and
    /// writes the audit line. Runs once; later calls do nothing.
    fn finish(&mut self, outcome: &str) {
        // Free the model server's slot first: the upstream connection is done with.
        self.slot = None;
        let outcome = if self.cut { "limit_cut" } else { outcome };
        let metered_usage = self.meter.as_ref().and_then(|m| m.usage);
        let mut usage =
            metered_usage.or_else(|| self.audit.as_ref().and_then(|a| find_usage(&a.tail)));
        if let Some(mut s) = self.settlement.take() {
            let used = match usage {
                // A cut stream never saw the upstream's usage chunk: the prompt estimate and
                // the tokens counted so far.
                _ if self.cut => {
                    let counted = self.meter.as_ref().map_or(0, |m| m.tokens);
                    Some((s.estimate.prompt_tokens, counted, true))
                }
                Some((p, c)) => Some((p, c, false)),
                // An error answer without usage: the model generated nothing we can count.
                None if !self.success => None,
                None => {
                    // No usage reported (client left, or no include_usage): one token per SSE
                    // event (how vLLM and llama.cpp stream), or bytes / 4 for a JSON body,
                    // never more than was reserved.
                    let bytes = self.audit.as_ref().map_or(0, |a| a.bytes_out);
                    let guess = if let Some(m) = &self.meter {
                        m.tokens
                    } else if self.sse {
                        self.events
                    } else {
                        bytes / BYTES_PER_TOKEN
                    };
                    let completion = guess.min(s.reserved_completion());
                    Some((s.estimate.prompt_tokens, completion, true))
                }
            };
            // The audit line and metrics carry reported usage; for a cut stream, the counted
            // tokens it was charged for.
            if self.cut {
                usage = used.map(|(p, c, _)| (p, c));
            }
            s.settle(used);
        }
        if let Some(a) = self.audit.take() {
            a.finish(outcome, usage);
        }
    }
}

impl ProxyBody {
    /// Charges `tokens` completion tokens (plus the prompt estimate with the first) to the
    /// key. False: its TPM or budget is overdrawn and the stream must end.
    fn charge(&mut self, tokens: u64) -> bool {
        let Some(s) = self.settlement.as_mut() else {
            return true;
        };
        let n = if self.prompt_charged {
            tokens
        } else {
            self.prompt_charged = true;
            tokens.saturating_add(s.estimate.prompt_tokens)
        };
        let Some(adm) = s.admission.as_mut() else {
            return true;
        };
        s.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .charge_mid_stream(adm, n, Instant::now())
    }

    /// Runs a metered frame through the meter: whole events out, tokens charged, and the
    /// clean ending when a limit runs out (after which the upstream is dropped).
    fn meter_frame(&mut self, data: &[u8]) -> Bytes {
        let Some(meter) = self.meter.as_mut() else {
            return Bytes::copy_from_slice(data);
        };
        let events = meter.push(data);
        let mut out = bytes::BytesMut::new();
        for ev in events {
            if ev.tokens > 0 && self.metered && !self.charge(ev.tokens) {
                let prompt = self
                    .settlement
                    .as_ref()
                    .map_or(0, |s| s.estimate.prompt_tokens);
                if let Some(m) = &self.meter {
                    // The usage the client sees counts what it received; the event that
                    // overdrew the limit is charged (the model made it) but not delivered.
                    let delivered = m.tokens.saturating_sub(ev.tokens);
                    out.extend_from_slice(&m.cut_tail(self.client_wants_usage, prompt, delivered));
                }
                self.cut = true;
                // Dropping the upstream body resets its connection: the model stops.
                self.inner = None;
                break;
            }
            if ev.forward {
                out.extend_from_slice(&ev.bytes);
            }
        }
        out.freeze()
    }

    fn rearm_keepalive(&mut self) {
        if let Some(k) = self.keepalive {
            // Re-arm the one timer of this body instead of allocating one per frame.
            let deadline = tokio::time::Instant::now() + k;
            match self.timer.as_mut() {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
    }
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let Some(inner) = self.inner.as_mut() else {
                // Cut by a limit: the ending went out with the last frame.
                self.done = true;
                self.finish("ok");
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if self.meter.is_none() {
                        if let Some(data) = frame.data_ref() {
                            let data = data.clone();
                            self.record(&data);
                        }
                        self.rearm_keepalive();
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // Metered: only data matters (trailers do not occur in SSE over HTTP/1.1).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let out = self.meter_frame(&data);
                    if out.is_empty() {
                        // Half an event, or a stripped usage chunk: nothing to send yet.
                        continue;
                    }
                    self.record(&out);
                    self.rearm_keepalive();
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    self.finish("upstream_error");
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    // An unterminated last event goes out as it is.
                    let rest = self.meter.as_mut().and_then(|m| m.finish());
                    if let Some(rest) = rest {
                        self.record(&rest);
                        self.finish("ok");
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    self.finish("ok");
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let Some(k) = self.keepalive else {
                        return Poll::Pending;
                    };
                    let at_boundary = match &self.meter {
                        Some(m) => m.at_boundary() && self.at_boundary,
                        None => self.at_boundary,
                    };
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(k)));
                    if timer.as_mut().poll(cx).is_ready() {
                        timer.as_mut().reset(tokio::time::Instant::now() + k);
                        if at_boundary {
                            // An SSE comment line: clients ignore it, proxies see traffic.
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                                b": keep-alive\n\n",
                            )))));
                        }
                        // Mid-event: a comment here would corrupt the event; wait for its end.
                        let _ = self.timer.as_mut().map(|t| t.as_mut().poll(cx));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.keepalive, &self.meter) {
            (Some(inner), None, None) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Dropping `inner` closes the upstream connection; the netstack resets it.
        self.finish("client_disconnected");
    }
}

/// `GET /healthz`, no auth.
pub async fn healthz() -> &'static str {
    "ok"
}

/// CORS preflight, no auth (browsers and some clients send it before the real request).
pub async fn preflight(headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    let origin = headers
        .get(header::ORIGIN)
        .cloned()
        .unwrap_or(HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static("authorization, content-type")),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    resp
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_in_sse_and_json_tails() {
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\ndata: [DONE]\n\n";
        assert_eq!(find_usage(sse), Some((12, 7)));
        let json = br#"{"id":"x","usage": {"prompt_tokens": 3, "total_tokens": 3}}"#;
        assert_eq!(find_usage(json), Some((3, 0)));
        assert_eq!(find_usage(b"data: [DONE]\n\n"), None);
        assert_eq!(find_usage(&[0xff, 0xfe, b'x']), None);
    }

    #[test]
    fn admission_estimate_reads_max_tokens_and_counts_bytes() {
        let raw: Fields =
            serde_json::from_str(r#"{"model":"m","max_completion_tokens":64}"#).unwrap();
        assert_eq!(max_tokens_field(&raw), Some(64));
        let raw: Fields = serde_json::from_str(r#"{"model":"m","max_tokens":"lots"}"#).unwrap();
        assert_eq!(max_tokens_field(&raw), None);
        let e = estimate(Endpoint::ChatCompletions, &[b'x'; 400], Some(64));
        assert_eq!((e.prompt_tokens, e.max_tokens), (100, Some(64)));
        let e = estimate(Endpoint::Embeddings, &[b'x'; 40], None);
        assert_eq!((e.prompt_tokens, e.max_tokens), (10, Some(0)));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(ApiError::MissingKey));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mg_abc"),
        );
        assert_eq!(bearer(&h), Ok("mg_abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  mg_abc "),
        );
        assert_eq!(bearer(&h), Ok("mg_abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        assert_eq!(bearer(&h), Err(ApiError::MissingKey));
    }
}
