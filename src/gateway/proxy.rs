//! The HTTP handlers. A POST to a model endpoint goes through named steps, each in its own
//! file: authenticate (`auth`) → read (`request`) → admit (`admission`: access policy, then the
//! key's limiter) → route and forward (`forward`: a replica, the fair-share queue, failover) → respond
//! (`body`: the answer streamed back, settled and audited when it ends). One [`AuditRecord`] per
//! request collects what the steps learn and is emitted once, refused or answered.
//!
//! Nothing reaches a model server before the key and its policy have said yes. The admission
//! is owned by a `Settlement` that settles it exactly once, whatever happens: the response body
//! ends, the client goes away, the upstream fails, or the request never got a response.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::audit::AuditRecord;
use super::body::{respond, Answer};
use super::error::ApiError;
use super::inbound::{self, BodyLimits};
use super::request::ClientRequest;
use super::{admission, auth, conn, forward, ClientAddr, GatewayState};
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
    let settings = &state.settings;
    let mut stages = Stages::start();
    let principal = match auth::authenticate(state, req.headers()) {
        Ok(p) => p,
        Err(e) => {
            // Answered before the body was read: let the client finish sending it.
            let (parts, body) = req.into_parts();
            inbound::drain_in_background(&parts.headers, body, BodyLimits::of(settings));
            return Err(e);
        }
    };
    record.authenticated(&principal);
    stages.mark(0);
    let phase = req.extensions().get::<conn::Phase>().cloned();
    let request = ClientRequest::read(req, endpoint, settings).await?;
    stages.mark(1);
    // Read: from now on the request is being answered (its connection is not closed to make
    // room for others).
    if let Some(p) = phase {
        p.busy();
    }
    record.read(request.len(), &request.model);
    let settlement = admission::admit(state, &principal, &request, record.client())?;
    let replicas = forward::route(&state.routes, &request.model)?;
    stages.mark(2);
    let forwarded = forward::forward(state, &principal.id, &request, replicas, record).await?;
    stages.mark(3);
    stages.emit(request.len());
    Ok(respond(
        forwarded,
        &request,
        settings.sse_keepalive,
        settlement,
        &state.drain,
    ))
}

/// Where a request's time goes before its answer starts, for `MODELGATE_STAGE_TRACE=1` (a
/// measuring aid for the benchmarks, off by default: one `modelgate::stages` info event per
/// answered request with the microseconds from the handler's start to the key check, the body
/// read, the admission and the upstream's response head).
struct Stages(Option<(Instant, [u32; 4])>);

impl Stages {
    fn start() -> Stages {
        static ON: OnceLock<bool> = OnceLock::new();
        let on =
            *ON.get_or_init(|| std::env::var_os("MODELGATE_STAGE_TRACE").is_some_and(|v| v == "1"));
        Stages(on.then(|| (Instant::now(), [0; 4])))
    }

    fn mark(&mut self, i: usize) {
        if let Some((t0, marks)) = &mut self.0 {
            marks[i] = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        }
    }

    fn emit(&self, body_bytes: usize) {
        if let Some((_, [auth, read, admit, head])) = self.0 {
            tracing::info!(target: "modelgate::stages", auth, read, admit, head, body_bytes, "stages (µs from the handler's start)");
        }
    }
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

/// Any path the router does not know: CORS preflight for OPTIONS, else OpenAI's 404.
pub async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method == Method::OPTIONS {
        return preflight(headers).await;
    }
    ApiError::NotFound(request_line(&method, &uri)).into_response()
}

/// A method a known path does not serve: OpenAI's 405.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(request_line(&method, &uri))
}

/// `METHOD /path` for an error message, the path cut at [`MAX_PATH_IN_MESSAGE`] characters
/// (the query string is left out: it may hold a key someone pasted there).
fn request_line(method: &Method, uri: &Uri) -> String {
    let path = uri.path();
    let cut = path
        .char_indices()
        .nth(MAX_PATH_IN_MESSAGE)
        .map_or(path, |(i, _)| &path[..i]);
    let more = if cut.len() < path.len() { "…" } else { "" };
    format!("{method} {cut}{more}")
}

/// Longest path quoted back in a 404 or 405 message.
const MAX_PATH_IN_MESSAGE: usize = 200;
