//! The route and forward steps: which replicas serve the model, then tries at them until one
//! answers — a slot at a replica (`fair`: least loaded or the conversation's replica, or a wait
//! in the model's fair-share queue), the upstream request built from scratch, sent through the
//! tunnel, and an upstream error answered as OpenAI would (`compat`).
//!
//! Failover: a try that fails before its answer began (connect failure, reset, timeout before
//! the first response byte, a 502 or 503 from the server) ejects that replica (`health`) and,
//! while the request's own deadline (`upstream_response_timeout`, from its first try) allows,
//! is retried on another healthy replica, each replica at most once. Nothing has reached the
//! client then: the answer's head is only handed on once a try succeeded, so a stream that
//! breaks later is never retried (`body` cuts it). When no replica is healthy, the one whose
//! ejection ends first is tried anyway, once, so the client gets the real error (502, 503 or
//! 504, as with a single server) and a recovered server is found at once. A try that broke on a
//! reused keep-alive connection (the server closed it as it was reused) is retried once without
//! ejecting anyone: the race says nothing about the server.
//!
//! Must never send the client's credentials or headers upstream: only `Content-Type`, `Accept`
//! and the upstream's own key. The request is kept (not consumed) by every try.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderValue, Method, StatusCode};
use bytes::Bytes;

use super::audit::AuditRecord;
use super::error::ApiError;
use super::fair::{QueueError, QueueLimits, Slot, Want};
use super::health::Failed;
use super::request::{api_path, ClientRequest};
use super::upstream::{failure_reason, Replica, Routes, SendFailure, Upstream};
use super::{affinity, balance, compat, upstream, GatewayState};
use crate::config::Balance;

/// The replicas serving `model`, with the model's id at each.
pub fn route(routes: &Routes, model: &str) -> Result<Vec<Replica>, ApiError> {
    let replicas = routes.replicas(model);
    if !replicas.is_empty() {
        return Ok(replicas);
    }
    // Before the first successful discovery we cannot tell "no such model" from "cannot reach
    // the server that has it": say unavailable (503, retry), not 404.
    if routes.incomplete() {
        Err(ApiError::ModelsUnavailable)
    } else {
        Err(ApiError::ModelNotFound(model.to_string()))
    }
}

/// An upstream's answer (its head is in; the body streams) and the slot it holds there.
pub struct Forwarded {
    pub response: hyper::Response<upstream::UpstreamBody>,
    /// The replica's concurrency slot (fair share), held until the body ends.
    pub slot: Option<Slot>,
}

/// Forwards `request` for the key `key_id` to one of `replicas` (see the module doc) and waits
/// for the response head. `record` learns each replica tried and every retry.
pub async fn forward(
    state: &GatewayState,
    key_id: &str,
    request: &ClientRequest,
    replicas: Vec<Replica>,
    record: &mut AuditRecord,
) -> Result<Forwarded, ApiError> {
    let settings = &state.settings;
    let limits = QueueLimits {
        max_queued: settings.max_queued,
        timeout: settings.queue_timeout,
    };
    let conversation = match state.routes.balance(&request.model) {
        Balance::Affinity if replicas.len() > 1 => Some(affinity::conversation(key_id, request)),
        _ => None,
    };
    let mut tried = vec![false; replicas.len()];
    let mut deadline: Option<Instant> = None;
    // One try that broke on a reused keep-alive connection is retried without blame.
    let mut stale_retried = false;
    loop {
        let now = Instant::now();
        let first = deadline.is_none();
        let Some((pool, any_health)) = pool(&replicas, &tried, now, first) else {
            // Unreachable: a retry is only made when some replica is left.
            return Err(ApiError::BadGateway("no replica left to try".into()));
        };
        let candidates: Vec<Arc<Upstream>> =
            pool.iter().map(|&i| replicas[i].upstream.clone()).collect();
        let preferred = conversation.and_then(|c| {
            let usable = candidates
                .iter()
                .map(|u| (any_health || u.health.available(now)).then_some(u.name_hash));
            balance::rendezvous(c, usable)
        });
        let want = Want {
            key: key_id,
            model: &request.model,
            candidates: &candidates,
            preferred,
            any_health,
            now,
        };
        // A saturated model: wait for a slot, round-robin across keys. The key's own admission
        // (concurrency, reservation) is held meanwhile and returned if the wait fails.
        let (c, slot) =
            state
                .scheduler
                .acquire(&want, limits)
                .await
                .map_err(|e| ApiError::ModelBusy {
                    queue_full: e == QueueError::Full,
                })?;
        let i = pool[c];
        let replica = &replicas[i];
        let upstream = &replica.upstream;
        record.routed(upstream);
        let deadline =
            *deadline.get_or_insert_with(|| Instant::now() + settings.upstream_response_timeout);
        let req = upstream_request(upstream, request, request.encode(&replica.model_id)?)?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let failure = match upstream::send_counted(&state.client, req, timeout).await {
            Ok(r)
                if !matches!(
                    r.status(),
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ) =>
            {
                if upstream.health.succeeded() {
                    tracing::info!(upstream = %upstream.spec.name, "upstream answered: re-admitted");
                    state.scheduler.readmitted(upstream);
                }
                // An upstream context-length 400 becomes OpenAI's context_length_exceeded.
                let response = compat::upstream_error(r, &settings.compat).await?;
                return Ok(Forwarded {
                    response,
                    slot: Some(slot),
                });
            }
            Ok(r) => Err(r),
            Err(SendFailure {
                error: ApiError::BadGateway(m),
                reused: true,
            }) if !stale_retried && Instant::now() < deadline => {
                // The server closed (or reset) a pooled connection just as it was reused: a
                // keep-alive race, not a failure of the server. Try again (a fresh connection
                // or another replica), once, without ejecting it.
                tracing::debug!(upstream = %upstream.spec.name, reason = %m, "retrying a request whose reused connection was closed");
                stale_retried = true;
                upstream.retried();
                record.retried();
                continue;
            }
            Err(SendFailure {
                error:
                    e @ (ApiError::BadGateway(_) | ApiError::TunnelDown | ApiError::GatewayTimeout),
                ..
            }) => Ok(e),
            Err(SendFailure { error, .. }) => return Err(error),
        };
        let reason = match &failure {
            Err(r) => format!("answered {}", r.status()),
            Ok(e) => failure_reason(e),
        };
        let now = Instant::now();
        if let Failed::Ejected(d) = upstream.health.failed(now, &reason) {
            tracing::warn!(upstream = %upstream.spec.name, reason = %reason, ejected_for = ?d, "upstream ejected");
        }
        tried[i] = true;
        let retry = now < deadline && pool_of_healthy(&replicas, &tried, now);
        if !retry {
            // The last try's answer, as a single server would give it.
            return match failure {
                Err(response) => Ok(Forwarded {
                    response,
                    slot: Some(slot),
                }),
                Ok(e) => Err(e),
            };
        }
        tracing::info!(upstream = %upstream.spec.name, reason = %reason, "retrying the request on another replica");
        upstream.retried();
        record.retried();
        drop(slot);
    }
}

/// The replicas a try may use (indices into `replicas`) and whether they may be ejected: the
/// untried healthy ones; on the first try, when none is healthy, the one whose ejection ends
/// first. `None` when nothing is left.
fn pool(
    replicas: &[Replica],
    tried: &[bool],
    now: Instant,
    first: bool,
) -> Option<(Vec<usize>, bool)> {
    let untried = || (0..replicas.len()).filter(|&i| !tried[i]);
    let healthy: Vec<usize> = untried()
        .filter(|&i| replicas[i].upstream.health.available(now))
        .collect();
    if !healthy.is_empty() {
        return Some((healthy, false));
    }
    if !first {
        return None;
    }
    untried()
        .min_by_key(|&i| replicas[i].upstream.health.ejected_until(now))
        .map(|i| (vec![i], true))
}

/// True while some untried replica is healthy.
fn pool_of_healthy(replicas: &[Replica], tried: &[bool], now: Instant) -> bool {
    replicas
        .iter()
        .zip(tried)
        .any(|(r, t)| !t && r.upstream.health.available(now))
}

/// The request to the model server: built from scratch, never from the client's headers.
fn upstream_request(
    upstream: &Upstream,
    request: &ClientRequest,
    body: Bytes,
) -> Result<hyper::Request<Bytes>, ApiError> {
    let accept = request
        .accept
        .clone()
        .unwrap_or(HeaderValue::from_static("*/*"));
    let mut up = hyper::Request::builder()
        .method(Method::POST)
        .uri(upstream.uri(api_path(request.endpoint))?)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, accept);
    if let Some(k) = &upstream.spec.api_key {
        up = up.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    up.body(body)
        .map_err(|_| ApiError::BadRequest("bad request".into()))
}
