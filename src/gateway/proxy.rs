//! The HTTP handlers. A POST to a model endpoint goes through named steps, each in its own
//! file: authenticate (`auth`) → read (`request`) → admit (`admission`: access policy, then the
//! key's limiter) → route and forward (`forward`: the upstream, its fair-share queue) → respond
//! (`body`: the answer streamed back, settled and audited when it ends). One [`AuditRecord`] per
//! request collects what the steps learn and is emitted once, refused or answered.
//!
//! Nothing reaches a model server before the key and its policy have said yes. The admission
//! is owned by a `Settlement` that settles it exactly once, whatever happens: the response body
//! ends, the client goes away, the upstream fails, or the request never got a response.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};

use super::audit::AuditRecord;
use super::body::{respond, Answer};
use super::error::ApiError;
use super::request::ClientRequest;
use super::{admission, auth, forward, ClientAddr, GatewayState};
use crate::policy::{self, Endpoint};

/// The POST endpoints: chat/completions, completions, embeddings, responses.
pub async fn forward(
    State(state): State<Arc<GatewayState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    Extension(endpoint): Extension<Endpoint>,
    req: Request<Body>,
) -> Response {
    let mut record = AuditRecord::start(&state.metrics, client.ip(), endpoint);
    // A request still waiting for the model server when a shutdown's drain period ends gets
    // a 503 the SDKs retry (the next process takes it), not a dropped connection.
    let handled = tokio::select! {
        r = handle(&state, &mut record, endpoint, req) => r,
        () = state.drain.cancelled() => Err(ApiError::ShuttingDown),
    };
    match handled {
        Ok(answer) => answer.into_response(record),
        Err(e) => {
            record.refused(&e, &state.routes);
            e.into_response()
        }
    }
}

/// The steps of one request, each noting in `record` what it learnt.
async fn handle(
    state: &GatewayState,
    record: &mut AuditRecord,
    endpoint: Endpoint,
    req: Request<Body>,
) -> Result<Answer, ApiError> {
    let principal = auth::authenticate(state, req.headers())?;
    record.authenticated(&principal);
    let settings = &state.settings;
    let request =
        ClientRequest::read(req, endpoint, settings.max_body_bytes, &settings.compat).await?;
    record.read(request.len(), &request.model);
    let settlement = admission::admit(state, &principal, &request, record.client())?;
    let (upstream, upstream_model) = forward::route(&state.routes, &request.model)?;
    record.routed(&upstream);
    let forwarded =
        forward::forward(state, &principal.id, &request, &upstream, &upstream_model).await?;
    Ok(respond(
        forwarded,
        &request,
        settings.sse_keepalive,
        settlement,
        &state.drain,
    ))
}

/// `GET /v1/models`: only the models this key may use.
pub async fn list_models(
    State(state): State<Arc<GatewayState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
) -> Response {
    let principal = match auth::authenticate(&state, &headers) {
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
