//! The read step: the client's request body, bounded by `max_body_bytes`, parsed once at its
//! top level into a [`ClientRequest`] (Cursor's shapes translated in place, see `compat`), and
//! encoded for the upstream it is routed to.
//!
//! Must never: read more than the limit, or change the client's bytes when nothing needs
//! changing (no translation, no model alias, no usage request): they then go upstream as they
//! came.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;

use super::compat::{self, CompatConfig, Fields};
use super::error::ApiError;
use super::meter::StreamKind;
use crate::policy::Endpoint;

/// The endpoint's path under the API base (`chat/completions`, …): the audit line's endpoint
/// and the upstream's URL suffix.
pub fn api_path(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat/completions",
        Endpoint::Completions => "completions",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Responses => "responses",
        Endpoint::Models => "models",
    }
}

/// A POST to a model endpoint, read and parsed.
pub struct ClientRequest {
    pub endpoint: Endpoint,
    /// The client's bytes, forwarded as they are when nothing needs changing.
    body: Bytes,
    /// The top-level fields, raw values (unknown fields pass through untouched).
    fields: Fields,
    /// `compat` changed the fields: the body must be re-encoded.
    translated: bool,
    pub model: String,
    /// The client's `Accept`, passed upstream.
    pub accept: Option<HeaderValue>,
    /// A stream of chat/completions or completions (`stream: true`): metered event by event.
    pub stream: Option<StreamKind>,
    /// The client set `stream_options.include_usage`.
    pub client_wants_usage: bool,
}

impl ClientRequest {
    /// Reads and parses the body of `req`: 413 over `limit` bytes, 400 when it is not a JSON
    /// object with a model.
    pub async fn read(
        req: Request<Body>,
        endpoint: Endpoint,
        limit: usize,
        compat: &CompatConfig,
    ) -> Result<ClientRequest, ApiError> {
        let accept = req.headers().get(header::ACCEPT).cloned();
        let body = read_body(req, limit).await?;
        ClientRequest::parse(endpoint, body, accept, compat)
    }

    fn parse(
        endpoint: Endpoint,
        body: Bytes,
        accept: Option<HeaderValue>,
        compat: &CompatConfig,
    ) -> Result<ClientRequest, ApiError> {
        let mut fields: Fields = serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!("The request body is not a JSON object: {e}"))
        })?;
        // Cursor compatibility (Responses-shaped bodies, empty content lists), in place.
        let translated = compat::translate_fields(endpoint, &mut fields, compat)?;
        let model = fields
            .get("model")
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .ok_or_else(|| ApiError::BadRequest("you must provide a model parameter".into()))?;
        let stream = match endpoint {
            Endpoint::ChatCompletions => Some(StreamKind::Chat),
            Endpoint::Completions => Some(StreamKind::Completion),
            _ => None,
        }
        .filter(|_| raw_bool(fields.get("stream").map(|v| &**v)) == Some(true));
        let client_wants_usage = stream_options(&fields)
            .and_then(|v| v.get("include_usage").and_then(|b| b.as_bool()))
            .unwrap_or(false);
        Ok(ClientRequest {
            endpoint,
            body,
            fields,
            translated,
            model,
            accept,
            stream,
            client_wants_usage,
        })
    }

    /// Bytes of the client's body.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// The request's `max_tokens`, `max_completion_tokens` (chat) or `max_output_tokens`
    /// (responses).
    pub fn max_tokens(&self) -> Option<u64> {
        max_tokens_field(&self.fields)
    }

    /// The upstream is asked for the final usage chunk the client did not ask for; the
    /// gateway strips it again, so the client gets exactly what it asked for.
    pub fn inject_usage(&self) -> bool {
        self.stream.is_some() && !self.client_wants_usage
    }

    /// The body for an upstream that knows the model as `upstream_model`. Re-encodes only for
    /// a translation, an alias or the usage request; otherwise the client's bytes. Leaves the
    /// request as it is, so it can be encoded again for another upstream.
    pub fn encode(&self, upstream_model: &str) -> Result<Bytes, ApiError> {
        let alias = upstream_model != self.model;
        let inject = self.inject_usage();
        if !(self.translated || alias || inject) {
            return Ok(self.body.clone());
        }
        let bad = |_| ApiError::BadRequest("bad model or stream_options".into());
        let mut overrides: Vec<(&str, Box<RawValue>)> = Vec::new();
        if alias {
            let v = serde_json::to_string(upstream_model).map_err(bad)?;
            overrides.push(("model", RawValue::from_string(v).map_err(bad)?));
        }
        if inject {
            let mut opts = stream_options(&self.fields)
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({}));
            opts["include_usage"] = serde_json::Value::Bool(true);
            overrides.push((
                "stream_options",
                RawValue::from_string(opts.to_string()).map_err(bad)?,
            ));
        }
        let out = Overridden {
            fields: &self.fields,
            overrides: &overrides,
        };
        Ok(Bytes::from(serde_json::to_vec(&out).unwrap_or_default()))
    }
}

/// The body of `req`, at most `limit` bytes (a `Content-Length` over it is refused unread).
async fn read_body(req: Request<Body>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge(limit as u64);
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large);
        }
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large)
        }
        Err(_) => Err(ApiError::BadRequest(
            "could not read the request body".into(),
        )),
    }
}

/// The fields with some values replaced (or appended, when absent), serialised as if they had
/// been inserted into the map: a replaced field keeps its place.
struct Overridden<'a> {
    fields: &'a Fields,
    overrides: &'a [(&'a str, Box<RawValue>)],
}

impl Serialize for Overridden<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let find = |k: &str| self.overrides.iter().find(|(o, _)| *o == k).map(|o| &o.1);
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.fields {
            map.serialize_entry(k, find(k).unwrap_or(v))?;
        }
        for (k, v) in self.overrides {
            if !self.fields.contains_key(*k) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// The request's `stream_options`, parsed.
fn stream_options(fields: &Fields) -> Option<serde_json::Value> {
    fields
        .get("stream_options")
        .and_then(|v| serde_json::from_str::<serde_json::Value>(v.get()).ok())
}

/// A raw JSON boolean (`None` when absent or not a boolean).
fn raw_bool(v: Option<&RawValue>) -> Option<bool> {
    v.and_then(|v| serde_json::from_str::<bool>(v.get()).ok())
}

fn max_tokens_field(raw: &Fields) -> Option<u64> {
    ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| {
            raw.get(*f)
                .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> ClientRequest {
        let cfg = CompatConfig::default();
        ClientRequest::parse(endpoint, Bytes::from(body.to_string()), None, &cfg).unwrap()
    }

    #[test]
    fn max_tokens_is_read_from_the_raw_fields() {
        let raw: Fields =
            serde_json::from_str(r#"{"model":"m","max_completion_tokens":64}"#).unwrap();
        assert_eq!(max_tokens_field(&raw), Some(64));
        let raw: Fields = serde_json::from_str(r#"{"model":"m","max_tokens":"lots"}"#).unwrap();
        assert_eq!(max_tokens_field(&raw), None);
    }

    #[test]
    fn the_clients_bytes_go_upstream_unless_something_changes() {
        let body = r#"{"model":"m",  "messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse(Endpoint::ChatCompletions, body);
        assert_eq!(r.encode("m").unwrap(), body.as_bytes());
        // An alias replaces the model in its place; nothing else changes.
        assert_eq!(
            r.encode("org/m-7b").unwrap(),
            r#"{"model":"org/m-7b","messages":[{"role":"user","content":"hi"}]}"#.as_bytes()
        );
        // A stream without include_usage asks for it, keeping the client's other options.
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"stream_options":{"x":1},"model":"m","stream":true}"#,
        );
        assert!(r.inject_usage());
        let once = r.encode("m2").unwrap();
        assert_eq!(
            once,
            r#"{"stream_options":{"include_usage":true,"x":1},"model":"m2","stream":true}"#
                .as_bytes()
        );
        // Encoding leaves the request as it was: again for another upstream.
        assert_eq!(
            r.encode("m").unwrap(),
            r#"{"stream_options":{"include_usage":true,"x":1},"model":"m","stream":true}"#
                .as_bytes()
        );
        let r = parse(Endpoint::Completions, r#"{"model":"m","stream":true}"#);
        assert_eq!(
            r.encode("m").unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#.as_bytes()
        );
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        assert!(r.client_wants_usage && !r.inject_usage());
        // Embeddings never stream-meter.
        let r = parse(Endpoint::Embeddings, r#"{"model":"m","stream":true}"#);
        assert_eq!((r.stream, r.inject_usage()), (None, false));
    }

    #[test]
    fn a_body_without_a_model_or_not_an_object_is_400() {
        let cfg = CompatConfig::default();
        for body in ["[1]", "{\"messages\":[]}", "{\"model\":7}"] {
            let e = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body), None, &cfg);
            assert!(matches!(e, Err(ApiError::BadRequest(_))), "{body}");
        }
    }
}
