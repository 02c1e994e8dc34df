//! OpenAI-shaped errors: one enum for everything a client can be told, one mapping to status,
//! type and code. Messages are short and safe; causes go to the operator's log, not the client.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::keys::AuthError;
use crate::netstack::NetError;
use crate::policy::limits::{go_duration, Refusal as LimitRefusal, RefusalKind};
use crate::policy::Deny;

/// `Retry-After` for [`ApiError::ModelBusy`]: a slot frees when some stream ends, typically
/// within seconds; longer than the 1 s of a full gateway so retries do not feed the queue.
pub const MODEL_BUSY_RETRY_SECS: u64 = 5;

/// Every refusal or failure the gateway answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No, malformed, unknown, revoked or expired key.
    Unauthorized(AuthError),
    /// Missing `Authorization: Bearer` header.
    MissingKey,
    Forbidden(Deny),
    ModelNotFound(String),
    /// The body is not JSON or lacks a required field.
    BadRequest(String),
    /// The model server said the prompt does not fit its context window (its message kept).
    ContextLengthExceeded(String),
    PayloadTooLarge(u64),
    /// The request head is larger than `max_header_bytes` (HTTP/2; hyper answers HTTP/1.1).
    HeadersTooLarge(usize),
    /// The request body did not arrive in time: `body_read_timeout`, extended by one second per
    /// `body_min_rate` bytes.
    RequestTimeout(Duration, usize),
    /// No such path (`METHOD /path`).
    NotFound(String),
    /// The path exists, the method does not (`METHOD /path`).
    MethodNotAllowed(String),
    /// The tunnel to the upstream's peer is down or never came up.
    TunnelDown,
    /// The model list is not known yet (no upstream that discovers models has answered).
    ModelsUnavailable,
    /// The upstream refused, reset, or answered with garbage.
    BadGateway(String),
    /// The upstream did not connect or answer in time.
    GatewayTimeout,
    /// The gateway is at its connection or capacity limit.
    Overloaded,
    /// The model server is at its `max_concurrent` and the request could not get a slot: the
    /// wait queue was full (`queue_full`) or the wait timed out.
    ModelBusy {
        queue_full: bool,
    },
    /// The key's RPM or TPM bucket is empty for now (or only in-flight reservations stand in
    /// the way of its budget).
    RateLimited(LimitRefusal),
    /// The key already has `max_concurrent` requests in flight.
    TooManyConcurrent(LimitRefusal),
    /// The request's reservation alone exceeds the key's TPM or budget: waiting cannot help.
    RequestTooLarge(LimitRefusal),
    /// The key's day or month token budget cannot cover the request.
    InsufficientQuota(LimitRefusal),
    /// The drain period of a shutdown ended before the model server answered.
    ShuttingDown,
}

impl ApiError {
    pub fn from_net(e: NetError) -> ApiError {
        match e {
            NetError::NoHandshake | NetError::PeerSilent | NetError::Stopped => {
                ApiError::TunnelDown
            }
            NetError::TimedOut => ApiError::GatewayTimeout,
            NetError::TooManyConnections => ApiError::Overloaded,
            NetError::NoRoute => ApiError::BadGateway("no route to the model server".into()),
            NetError::Refused => {
                ApiError::BadGateway("the model server refused the connection".into())
            }
            NetError::Reset | NetError::AddrInUse => {
                ApiError::BadGateway("the connection to the model server was reset".into())
            }
        }
    }

    /// The response to a limiter refusal.
    pub fn from_limit(r: LimitRefusal) -> ApiError {
        match r.kind {
            RefusalKind::RateLimitExceeded => ApiError::RateLimited(r),
            RefusalKind::TooManyConcurrent => ApiError::TooManyConcurrent(r),
            RefusalKind::TooLarge => ApiError::RequestTooLarge(r),
            RefusalKind::InsufficientQuota => ApiError::InsufficientQuota(r),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) | ApiError::MissingKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(Deny::Expired) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::ContextLengthExceeded(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(..) => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TunnelDown
            | ApiError::ModelsUnavailable
            | ApiError::Overloaded
            | ApiError::ModelBusy { .. }
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RateLimited(_)
            | ApiError::TooManyConcurrent(_)
            | ApiError::RequestTooLarge(_)
            | ApiError::InsufficientQuota(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// (message, type, code) as OpenAI spells them.
    fn parts(&self) -> (String, &'static str, Option<&'static str>) {
        match self {
            ApiError::MissingKey => (
                "You didn't provide an API key. Send it as 'Authorization: Bearer mg_…'.".into(),
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            ApiError::Unauthorized(_) | ApiError::Forbidden(Deny::Expired) => (
                "Incorrect API key provided. Ask your administrator for a valid modelgate key."
                    .into(),
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            ApiError::Forbidden(d) => (d.to_string(), "invalid_request_error", Some("permission_denied")),
            ApiError::ModelNotFound(m) => (
                format!("The model `{m}` does not exist or you do not have access to it."),
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ApiError::BadRequest(m) => (m.clone(), "invalid_request_error", None),
            ApiError::ContextLengthExceeded(m) => (
                m.clone(),
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ApiError::PayloadTooLarge(limit) => (
                format!("Request body too large: the limit is {limit} bytes."),
                "invalid_request_error",
                Some("request_too_large"),
            ),
            ApiError::HeadersTooLarge(limit) => (
                format!("Request header fields too large: the limit is {limit} bytes."),
                "invalid_request_error",
                Some("request_header_fields_too_large"),
            ),
            ApiError::RequestTimeout(timeout, rate) => (
                format!(
                    "The request body did not arrive in time (the gateway allows {}{}). Send the whole body without pauses.",
                    humantime::format_duration(*timeout),
                    match rate {
                        0 => String::new(),
                        r => format!(", plus one second per {r} bytes received"),
                    }
                ),
                "invalid_request_error",
                Some("request_timeout"),
            ),
            ApiError::NotFound(line) => (
                format!("Invalid URL ({line})."),
                "invalid_request_error",
                Some("unknown_url"),
            ),
            ApiError::MethodNotAllowed(line) => (
                format!("Invalid method for URL ({line})."),
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            ApiError::TunnelDown => (
                "The model is unreachable right now: the tunnel to the model network is down. Try again shortly.".into(),
                "server_error",
                Some("tunnel_unavailable"),
            ),
            ApiError::ModelsUnavailable => (
                "The model list is unavailable right now: the model server has not been reached through the tunnel yet. Try again shortly.".into(),
                "server_error",
                Some("tunnel_unavailable"),
            ),
            ApiError::BadGateway(m) => (format!("Upstream error: {m}."), "server_error", Some("upstream_error")),
            ApiError::GatewayTimeout => (
                "The model server did not answer in time.".into(),
                "server_error",
                Some("upstream_timeout"),
            ),
            ApiError::Overloaded => (
                "The gateway is overloaded. Try again shortly.".into(),
                "server_error",
                Some("overloaded"),
            ),
            ApiError::ModelBusy { queue_full } => (
                if *queue_full {
                    "The model is at capacity and its wait queue is full. Try again shortly.".into()
                } else {
                    "The model is at capacity: no slot came free in time. Try again shortly.".into()
                },
                "server_error",
                Some("model_overloaded"),
            ),
            ApiError::RateLimited(r) => (
                format!(
                    "Rate limit reached for this API key. Please try again in {}.",
                    go_duration(r.retry_after)
                ),
                // OpenAI names the dimension that ran out.
                if r.headers.requests.is_some_and(|t| t.remaining == 0) {
                    "requests"
                } else {
                    "tokens"
                },
                Some("rate_limit_exceeded"),
            ),
            ApiError::TooManyConcurrent(_) => (
                "Too many requests in flight for this API key. Wait for one to finish and try again.".into(),
                "requests",
                Some("rate_limit_exceeded"),
            ),
            ApiError::RequestTooLarge(_) => (
                "Request too large for this API key's token limit: send a shorter prompt or a smaller max_tokens.".into(),
                "tokens",
                Some("rate_limit_exceeded"),
            ),
            ApiError::InsufficientQuota(_) => (
                "You exceeded this API key's token budget. Ask your administrator to raise it, or wait for the next period.".into(),
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            ApiError::ShuttingDown => (
                "The gateway is restarting and the model server had not answered yet. Retry the request.".into(),
                "server_error",
                Some("server_shutting_down"),
            ),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) | ApiError::Forbidden(Deny::ModelNotAllowed(_)) => {
                Some("model")
            }
            ApiError::ContextLengthExceeded(_) => Some("messages"),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, where that helps.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::TunnelDown | ApiError::ModelsUnavailable => Some(5),
            ApiError::Overloaded | ApiError::ShuttingDown => Some(1),
            ApiError::ModelBusy { .. } => Some(MODEL_BUSY_RETRY_SECS),
            ApiError::RateLimited(r)
            | ApiError::TooManyConcurrent(r)
            | ApiError::RequestTooLarge(r)
            | ApiError::InsufficientQuota(r) => r.retry_after_header(),
            _ => None,
        }
    }

    /// The limiter's `x-ratelimit-*` headers, for refusals that carry them.
    fn rate_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::RateLimited(r)
            | ApiError::TooManyConcurrent(r)
            | ApiError::RequestTooLarge(r)
            | ApiError::InsufficientQuota(r) => r.headers.pairs(),
            _ => Vec::new(),
        }
    }

    /// The JSON body, `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> String {
        let (message, kind, code) = self.parts();
        serde_json::json!({
            "error": {
                "message": message,
                "type": kind,
                "param": self.param(),
                "code": code,
            }
        })
        .to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        insert_rate_headers(h, self.rate_headers());
        resp
    }
}

/// Adds the limiter's `x-ratelimit-*` headers (refusals and answers alike).
pub fn insert_rate_headers(h: &mut HeaderMap, pairs: Vec<(&'static str, String)>) {
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_openai() {
        let e = ApiError::Unauthorized(AuthError::Unknown);
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());

        let e = ApiError::ModelNotFound("x".into());
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");

        let r = ApiError::TunnelDown.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
    }

    #[test]
    fn limiter_refusals_are_429_with_headers() {
        use crate::policy::limits::{HeaderTriple, RateHeaders};
        use std::time::Duration;
        let r = LimitRefusal {
            kind: RefusalKind::RateLimitExceeded,
            retry_after: Duration::from_millis(1500),
            headers: RateHeaders {
                requests: Some(HeaderTriple {
                    limit: 2,
                    remaining: 0,
                    reset: Duration::from_secs(30),
                }),
                tokens: None,
            },
        };
        let resp = ApiError::from_limit(r).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(resp.headers()["x-ratelimit-reset-requests"], "30s");
        let v: serde_json::Value = serde_json::from_str(&ApiError::from_limit(r).body()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");

        let large = LimitRefusal {
            kind: RefusalKind::TooLarge,
            ..r
        };
        let resp = ApiError::from_limit(large).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());

        let quota = LimitRefusal {
            kind: RefusalKind::InsufficientQuota,
            ..r
        };
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::from_limit(quota).body()).unwrap();
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(v["error"]["type"], "insufficient_quota");
        let concurrent = LimitRefusal {
            kind: RefusalKind::TooManyConcurrent,
            ..r
        };
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::from_limit(concurrent).body()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    }

    #[test]
    fn tunnel_errors_map_to_the_contract() {
        assert_eq!(
            ApiError::from_net(NetError::NoHandshake).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from_net(NetError::Refused).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ApiError::from_net(NetError::Reset).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ApiError::from_net(NetError::TimedOut).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
