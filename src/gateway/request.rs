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
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;

use super::compat::{self, CompatConfig, Fields};
use super::error::ApiError;
use super::inbound::{self, BodyLimits};
use super::meter::StreamKind;
use crate::config::GatewayConfig;
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
    /// Reads and parses the body of `req`: 413 over `max_body_bytes`, 408 when it does not
    /// arrive in time (`inbound`), 400 when it is not a JSON object with a model or nests
    /// deeper than `max_json_depth`.
    pub async fn read(
        req: Request<Body>,
        endpoint: Endpoint,
        settings: &GatewayConfig,
    ) -> Result<ClientRequest, ApiError> {
        let (parts, body) = req.into_parts();
        let accept = parts.headers.get(header::ACCEPT).cloned();
        let body = inbound::read(&parts.headers, body, BodyLimits::of(settings)).await?;
        ClientRequest::parse(
            endpoint,
            body,
            accept,
            &settings.compat,
            settings.max_json_depth,
        )
    }

    fn parse(
        endpoint: Endpoint,
        body: Bytes,
        accept: Option<HeaderValue>,
        compat: &CompatConfig,
        max_depth: usize,
    ) -> Result<ClientRequest, ApiError> {
        // The top level is parsed into raw values, which serde_json checks for syntax but not
        // for depth; this pass bounds the depth of every byte that may go upstream as it came.
        if !nesting_within(&body, max_depth) {
            return Err(ApiError::BadRequest(format!(
                "The request body nests arrays and objects more than {max_depth} levels deep."
            )));
        }
        let UniqueFields(mut fields) = serde_json::from_slice(&body).map_err(|e| {
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

    /// The raw value of the top-level field `name` (after any compat translation).
    pub fn field(&self, name: &str) -> Option<&RawValue> {
        self.fields.get(name).map(|v| &**v)
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

/// Whether the arrays and objects of `json` nest at most `max` deep (`{}` is 1 deep). Only
/// brackets outside strings count; everything else about the syntax is the parser's to check.
/// One pass over the bytes, no allocation: a string is skipped to its closing quote with
/// `memchr` (a quote after an odd run of backslashes is escaped).
pub fn nesting_within(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let mut from = i + 1;
                loop {
                    let Some(k) = memchr::memchr(b'"', &json[from..]) else {
                        return true; // unterminated: the parser refuses it
                    };
                    let q = from + k;
                    let slashes = json[..q].iter().rev().take_while(|&&b| b == b'\\').count();
                    from = q + 1;
                    if slashes % 2 == 0 {
                        break;
                    }
                }
                i = from;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    true
}

/// The top-level fields of a body, refusing a field given twice: the gateway decides on
/// `model`, `stream` and the token limits, and a model server whose parser picked the other
/// copy would run a request the gateway did not check.
struct UniqueFields(Fields);

impl<'de> serde::Deserialize<'de> for UniqueFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
                let mut out = Fields::with_capacity(m.size_hint().unwrap_or(8));
                while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "the field `{k}` is given more than once"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(out)
            }
        }
        d.deserialize_map(Visit).map(UniqueFields)
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
        ClientRequest::parse(endpoint, Bytes::from(body.to_string()), None, &cfg, 128).unwrap()
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
    fn nesting_is_bounded_and_brackets_in_strings_do_not_count() {
        assert!(nesting_within(b"{}", 1));
        assert!(!nesting_within(br#"{"a":[]}"#, 1));
        assert!(nesting_within(br#"{"a":[]}"#, 2));
        assert!(nesting_within(br#"{"a":"[[[{{\"[[\\"}"#, 1));
        assert!(!nesting_within(br#"{"a":"\\",  "b":[[]]}"#, 2));
        // Unterminated strings and stray closers are the parser's to refuse.
        assert!(nesting_within(br#"{"a":"[[[["#, 1));
        assert!(nesting_within(b"]]]]{}", 1));
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(nesting_within(deep(100_000).as_bytes(), 100_000));
        assert!(!nesting_within(deep(100_000).as_bytes(), 128));
    }

    /// The depth pass costs a fraction of the top-level parse it precedes, on a Cursor-sized
    /// body (400 KB of history, strings with escapes and brackets in them): best of 5 rounds
    /// of each, in the same build, so the comparison holds in debug and release alike.
    #[test]
    fn the_depth_pass_is_cheap_next_to_the_parse() {
        // Like Cursor's: long texts (code, with the odd escaped quote, newline and bracket)
        // in a few levels of messages and tool calls.
        let text = "let v = vec![1, 2]; // the [x] and {y} of it ".repeat(20) + "\\\"q\\\" \\n";
        let turn = format!(
            r#"{{"role":"assistant","content":null,"tool_calls":[{{"id":"c","type":"function","function":{{"name":"edit","arguments":"{text}"}}}}]}},{{"role":"tool","tool_call_id":"c","content":"{text}"}},"#
        );
        let mut body = String::from(r#"{"model":"m","stream":true,"messages":["#);
        while body.len() < 400_000 {
            body.push_str(&turn);
        }
        body.push_str(r#"{"role":"user","content":"end"}]}"#);
        let best = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let depth = best(&|| assert!(nesting_within(body.as_bytes(), 100)));
        // The real fixture, when a run points at it (scripts and the README's figure).
        if let Some(path) = std::env::var_os("MODELGATE_DEPTH_BODY") {
            let real = std::fs::read(path).unwrap();
            let d = best(&|| assert!(nesting_within(&real, 100)));
            let p = best(&|| {
                serde_json::from_slice::<UniqueFields>(&real).unwrap();
            });
            eprintln!(
                "{} bytes: depth pass {d:?}, top-level parse {p:?}",
                real.len()
            );
        }
        let parse = best(&|| {
            serde_json::from_slice::<UniqueFields>(body.as_bytes()).unwrap();
        });
        eprintln!("400 KB body: depth pass {depth:?}, top-level parse {parse:?}");
        assert!(depth < parse, "depth pass {depth:?} vs parse {parse:?}");
    }

    #[test]
    fn a_body_at_the_depth_limit_is_one_the_gateway_can_parse_and_rewrite() {
        let cfg = CompatConfig::default();
        // model object (1) + messages (2) + message (3) + content nested to depth `max`.
        let body = |levels: usize| {
            let inner = "[".repeat(levels) + &"]".repeat(levels);
            format!(
                r#"{{"model":"m","stream":true,"messages":[{{"role":"assistant","content":[],"x":{inner}}}]}}"#
            )
        };
        let max = crate::config::MAX_JSON_DEPTH;
        let ok = body(max - 3);
        let r = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(ok), None, &cfg, max)
            .expect("at the limit");
        // The empty content was normalised (the messages parsed as values) and the usage
        // request added: the re-encoded body is valid JSON of the same depth.
        assert!(r.translated);
        let out = r.encode("m2").unwrap();
        assert!(nesting_within(&out, max) && !nesting_within(&out, max - 1));
        serde_json::from_slice::<Fields>(&out).unwrap();
        let over = body(max - 2);
        let e = ClientRequest::parse(
            Endpoint::ChatCompletions,
            Bytes::from(over),
            None,
            &cfg,
            max,
        );
        assert!(matches!(e, Err(ApiError::BadRequest(ref m)) if m.contains("levels deep")));
    }

    #[test]
    fn a_body_without_a_model_or_not_an_object_is_400() {
        let cfg = CompatConfig::default();
        for body in [
            "[1]",
            "{\"messages\":[]}",
            "{\"model\":7}",
            "{\"model\":\"m\",\"model\":\"other\"}",
        ] {
            let e = ClientRequest::parse(
                Endpoint::ChatCompletions,
                Bytes::from(body),
                None,
                &cfg,
                128,
            );
            assert!(matches!(e, Err(ApiError::BadRequest(_))), "{body}");
        }
    }
}
