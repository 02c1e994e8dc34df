//! The route and forward steps: which upstream serves the model, then one attempt at it — a
//! fair-share slot (`fair`) at a saturated model server, the upstream request built from
//! scratch, sent through the tunnel, and an upstream error answered as OpenAI would (`compat`).
//!
//! One [`forward`] call is one attempt at one upstream and consumes nothing of the request:
//! a caller may try another upstream with the same request. Must never send the client's
//! credentials or headers upstream: only `Content-Type`, `Accept` and the upstream's own key.

use std::sync::Arc;

use axum::http::{header, HeaderValue, Method};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;

use super::error::ApiError;
use super::fair::{QueueError, Slot};
use super::request::{api_path, ClientRequest};
use super::upstream::{Routes, Upstream};
use super::{compat, upstream, GatewayState};

/// The upstream serving `model` and the model's id there.
pub fn route(routes: &Routes, model: &str) -> Result<(Arc<Upstream>, String), ApiError> {
    routes.route(model).ok_or_else(|| {
        // Before the first successful discovery we cannot tell "no such model" from "cannot
        // reach the server that has it": say unavailable (503, retry), not 404.
        if routes.incomplete() {
            ApiError::ModelsUnavailable
        } else {
            ApiError::ModelNotFound(model.to_string())
        }
    })
}

/// An upstream's answer (its head is in; the body streams) and the slot it holds there.
pub struct Forwarded {
    pub response: hyper::Response<Incoming>,
    /// The upstream's concurrency slot (fair share), held until the body ends.
    pub slot: Option<Slot>,
}

/// Forwards `request` to `upstream`, which knows the model as `upstream_model`, for the key
/// `key_id`, and waits for the response head.
pub async fn forward(
    state: &GatewayState,
    key_id: &str,
    request: &ClientRequest,
    upstream: &Upstream,
    upstream_model: &str,
) -> Result<Forwarded, ApiError> {
    let body = request.encode(upstream_model)?;
    // A saturated model server: wait for a slot, round-robin across keys. The key's own
    // admission (concurrency, reservation) is held meanwhile and returned if the wait fails.
    let slot = match &upstream.queue {
        Some(q) => Some(q.acquire(key_id).await.map_err(|e| ApiError::ModelBusy {
            queue_full: e == QueueError::Full,
        })?),
        None => None,
    };
    let req = upstream_request(upstream, request, body)?;
    let settings = &state.settings;
    let response = upstream::send(&state.client, req, settings.upstream_response_timeout).await?;
    // An upstream context-length 400 becomes OpenAI's context_length_exceeded (Cursor).
    let response = compat::upstream_error(response, &settings.compat).await?;
    Ok(Forwarded { response, slot })
}

/// The request to the model server: built from scratch, never from the client's headers.
fn upstream_request(
    upstream: &Upstream,
    request: &ClientRequest,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, ApiError> {
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
    up.body(Full::new(body))
        .map_err(|_| ApiError::BadRequest("bad request".into()))
}
