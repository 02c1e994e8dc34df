//! OpenAI-shaped errors: one enum for everything a client can be told, one mapping to status,
//! type and code. Messages are short and safe; causes go to the operator's log, not the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::keys::AuthError;
use crate::netstack::NetError;
use crate::policy::Deny;

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
    PayloadTooLarge(u64),
    NotFound,
    MethodNotAllowed,
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
}

impl ApiError {
    pub fn from_net(e: NetError) -> ApiError {
        match e {
            NetError::NoHandshake | NetError::Stopped => ApiError::TunnelDown,
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) | ApiError::MissingKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(Deny::Expired) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TunnelDown | ApiError::ModelsUnavailable | ApiError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
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
            ApiError::PayloadTooLarge(limit) => (
                format!("Request body too large: the limit is {limit} bytes."),
                "invalid_request_error",
                Some("request_too_large"),
            ),
            ApiError::NotFound => ("Unknown URL.".into(), "invalid_request_error", Some("unknown_url")),
            ApiError::MethodNotAllowed => (
                "Method not allowed for this URL.".into(),
                "invalid_request_error",
                None,
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
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) | ApiError::Forbidden(Deny::ModelNotAllowed(_)) => {
                Some("model")
            }
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, where that helps.
    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::TunnelDown | ApiError::ModelsUnavailable => Some(5),
            ApiError::Overloaded => Some(1),
            _ => None,
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
        resp
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
