//! The authenticate step: the client's `Authorization: Bearer` key, checked against the key
//! store. Owns reading that header; never logs or forwards the key (the upstream gets its own).

use std::sync::Arc;
use std::time::SystemTime;

use axum::http::{header, HeaderMap};

use super::error::ApiError;
use super::GatewayState;
use crate::policy::Principal;

/// The `Authorization: Bearer` key, or why there is none. More than one `Authorization`
/// header is refused (400) rather than guessed at: a proxy in front and the gateway could pick
/// different ones, and the request would run as a client that did not send it.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let v = all.next().ok_or(ApiError::MissingKey)?;
    if all.next().is_some() {
        return Err(ApiError::BadRequest(
            "The request has more than one Authorization header; send exactly one \
             ('Authorization: Bearer mg_…')."
                .into(),
        ));
    }
    let v = v.to_str().map_err(|_| ApiError::MissingKey)?;
    let (scheme, key) = v.split_once(' ').ok_or(ApiError::MissingKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::MissingKey);
    }
    Ok(key.trim())
}

/// The key's principal (id, name, policy), or 401.
pub fn authenticate(state: &GatewayState, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
    let key = bearer(headers)?;
    state
        .keys
        .current()
        .authenticate(key, SystemTime::now())
        .map_err(ApiError::Unauthorized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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
        // Two headers, even with the first one valid: ambiguous, 400.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mg_abc"),
        );
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        let e = bearer(&h).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(ref m) if m.contains("more than one")));
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
    }
}
