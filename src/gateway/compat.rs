//! Cursor compatibility: the request shapes Cursor's backend really sends, adapted to what an
//! OpenAI-compatible model server (vLLM) accepts, and the one error Cursor acts upon.
//!
//! Owns three pure rewrites, each switchable in `[gateway]` ([`CompatConfig`]):
//! - **Responses → Chat** (`compat_responses_translation`): for `gpt-*` names Cursor POSTs a
//!   Responses-API body (`input`, `instructions`, `reasoning`, flat or custom tools,
//!   `max_output_tokens`) to `/chat/completions`. Detected by shape (`input` and no
//!   `messages`), whatever the model name, and translated to Chat Completions. The answer
//!   needs no translation: the upstream already streams Chat Completions chunks.
//! - **Empty content** (`compat_empty_content`): an assistant turn with `content: []` gets
//!   `content: null` when it carries tool calls (OpenAI's own form of a tool-call turn, which
//!   vLLM maps to an empty text for chat templates and skips on its gpt-oss path, where `[]`
//!   fails validation) and `""` otherwise; a tool turn with `content: []` gets `""`; an
//!   assistant `tool_calls: []` is removed (Llama templates assert one call when the key is
//!   present, vllm-project/vllm#13978).
//! - **Context length** (`compat_context_length_error`): an upstream 400 whose message says
//!   the prompt does not fit (vLLM: "This model's maximum context length is N tokens…";
//!   llama.cpp: `exceed_context_size_error`; TGI: "`inputs` tokens + `max_new_tokens` must
//!   be…") becomes OpenAI's `context_length_exceeded` (400, `invalid_request_error`), which
//!   makes Cursor summarise the conversation and retry.
//!
//! Must never: change a body that needs no change (the client's bytes go upstream as they
//! are), log prompt content, or read more than [`MAX_ERROR_BODY`] of an upstream error.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::StatusCode;
use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::ApiError;
use super::upstream::UpstreamBody;
pub use crate::config::CompatConfig;
use crate::policy::Endpoint;

/// Top-level fields with raw values, in the client's order.
/// A request's top-level JSON object with raw values, in the client's order, so re-serialising
/// changes nothing but what was edited. The proxy parses a body into this once.
pub type Fields = IndexMap<String, Box<RawValue>>;

/// Most bytes of an upstream error body read to classify it.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// Deadline for reading an upstream error body.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Rewrites a parsed `/chat/completions` body in place: a Responses-shaped body becomes Chat
/// Completions, then empty content lists are normalised. Returns whether anything changed
/// (when not, the proxy forwards the client's bytes untouched). Other endpoints are never
/// touched, even a Responses-shaped body at `/v1/responses`.
pub fn translate_fields(
    endpoint: Endpoint,
    fields: &mut Fields,
    cfg: &CompatConfig,
) -> Result<bool, ApiError> {
    if !matches!(endpoint, Endpoint::ChatCompletions) {
        return Ok(false);
    }
    let mut changed = false;
    if cfg.responses_translation && is_responses_shaped(fields) {
        *fields = responses_to_chat(std::mem::take(fields))?;
        changed = true;
    }
    if cfg.empty_content {
        if let Some(messages) = fields.get("messages") {
            if let Some(fixed) = normalise_messages(messages)? {
                fields.insert("messages".into(), fixed);
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// [`translate_fields`] on raw bytes (tests and measurements): `Ok(None)` when nothing changes,
/// also for a body that is not a JSON object.
pub fn translate(body: &[u8], cfg: &CompatConfig) -> Result<Option<Vec<u8>>, ApiError> {
    let Ok(mut fields) = serde_json::from_slice::<Fields>(body) else {
        return Ok(None);
    };
    if !translate_fields(Endpoint::ChatCompletions, &mut fields, cfg)? {
        return Ok(None);
    }
    serde_json::to_vec(&fields)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("cannot re-encode the request: {e}")))
}

/// A Responses-API body: it has `input` and no `messages`.
pub fn is_responses_shaped(fields: &Fields) -> bool {
    fields.contains_key("input") && !fields.contains_key("messages")
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

fn raw(v: &Value) -> Box<RawValue> {
    // Serialising a `Value` cannot fail (its keys are strings).
    RawValue::from_string(v.to_string())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

fn parse<T: serde::de::DeserializeOwned>(v: &RawValue, what: &str) -> Result<T, ApiError> {
    serde_json::from_str(v.get()).map_err(|e| bad(format!("invalid '{what}': {e}")))
}

/// Responses-only fields that have no Chat Completions meaning for a stateless upstream.
const RESPONSES_ONLY: &[&str] = &[
    "include",
    "store",
    "truncation",
    "previous_response_id",
    "prompt_cache_key",
    "safety_identifier",
    "background",
    "max_tool_calls",
    "prompt",
    "conversation",
    "service_tier",
];

/// Translates a Responses-API request to Chat Completions. Fields both APIs share (model,
/// stream, stream_options, temperature, top_p, user, parallel_tool_calls, …) and unknown ones
/// pass through unchanged.
fn responses_to_chat(fields: Fields) -> Result<Fields, ApiError> {
    let mut out = Fields::new();
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = fields.get("instructions") {
        match parse::<Value>(i, "instructions")? {
            Value::String(s) if !s.is_empty() => {
                messages.push(json!({"role": "system", "content": s}))
            }
            Value::Null | Value::String(_) => {}
            _ => return Err(bad("invalid 'instructions': expected a string")),
        }
    }
    match parse::<Value>(&fields["input"], "input")? {
        Value::String(s) => messages.push(json!({"role": "user", "content": s})),
        Value::Array(items) => {
            for item in items {
                input_item(&mut messages, item)?;
            }
        }
        _ => {
            return Err(bad(
                "invalid 'input': expected a string or an array of items",
            ))
        }
    }
    for (k, v) in fields {
        match k.as_str() {
            "input" | "instructions" => {}
            // Placed where the model field is, so the body reads naturally.
            "model" => {
                out.insert(k, v);
                out.insert(
                    "messages".into(),
                    raw(&Value::Array(std::mem::take(&mut messages))),
                );
            }
            "tools" => {
                let tools = parse::<Vec<Value>>(&v, "tools")?;
                let tools: Vec<Value> = tools.into_iter().filter_map(tool).collect();
                if !tools.is_empty() {
                    out.insert(k, raw(&Value::Array(tools)));
                }
            }
            "tool_choice" => {
                if let Some(c) = tool_choice(parse(&v, "tool_choice")?) {
                    out.insert(k, raw(&c));
                }
            }
            "max_output_tokens" => {
                out.insert("max_tokens".into(), v);
            }
            "reasoning" => {
                // Chat Completions' reasoning_effort; vLLM accepts low, medium and high.
                let r = parse::<Value>(&v, "reasoning")?;
                if let Some(e @ ("low" | "medium" | "high")) =
                    r.get("effort").and_then(Value::as_str)
                {
                    out.insert("reasoning_effort".into(), raw(&json!(e)));
                }
            }
            "text" => {
                let t = parse::<Value>(&v, "text")?;
                if let Some(f) = t.get("format").and_then(response_format) {
                    out.insert("response_format".into(), raw(&f));
                }
            }
            k if RESPONSES_ONLY.contains(&k) => {}
            _ => {
                out.insert(k, v);
            }
        }
    }
    if !messages.is_empty() || !out.contains_key("messages") {
        // No `model` field (the proxy answers that): still give the upstream its messages.
        out.insert("messages".into(), raw(&Value::Array(messages)));
    }
    Ok(out)
}

/// One `input` item appended to `messages`.
fn input_item(messages: &mut Vec<Value>, item: Value) -> Result<(), ApiError> {
    let Value::Object(mut o) = item else {
        return Err(bad("invalid 'input' item: expected an object"));
    };
    let kind = o
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
        .to_string();
    let call_id = |o: &serde_json::Map<String, Value>| {
        o.get("call_id")
            .or_else(|| o.get("id"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    match kind.as_str() {
        "message" => {
            let role = match o.get("role").and_then(Value::as_str) {
                // Chat templates know "system"; not all know "developer".
                Some("developer") | Some("system") => "system",
                Some("user") => "user",
                Some("assistant") => "assistant",
                Some(r) => return Err(bad(format!("invalid 'input' message role {r:?}"))),
                None => return Err(bad("invalid 'input' message: no role")),
            };
            let content = content(o.remove("content").unwrap_or(Value::Null));
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call = json!({
                "id": call_id(&o),
                "type": "function",
                "function": {
                    "name": o.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": o.get("arguments").cloned().unwrap_or_else(|| json!("{}")),
                },
            });
            push_tool_call(messages, call);
        }
        "custom_tool_call" => {
            // A custom tool is offered to the upstream as a function taking `input` (see `tool`).
            let input = o.get("input").and_then(Value::as_str).unwrap_or_default();
            let call = json!({
                "id": call_id(&o),
                "type": "function",
                "function": {
                    "name": o.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": json!({"input": input}).to_string(),
                },
            });
            push_tool_call(messages, call);
        }
        "function_call_output" | "custom_tool_call_output" => {
            let output = match o.remove("output").unwrap_or(Value::Null) {
                Value::String(s) => s,
                Value::Array(parts) => text_of(&parts),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            messages.push(json!({
                "role": "tool",
                "tool_call_id": o.get("call_id").cloned().unwrap_or(Value::Null),
                "content": output,
            }));
        }
        // Encrypted reasoning and references to stored items mean nothing to the upstream.
        "reasoning" | "item_reference" => {}
        other => {
            tracing::debug!(
                item = other,
                "Responses input item without a Chat equivalent dropped"
            );
        }
    }
    Ok(())
}

/// Adds a tool call to the assistant turn it belongs to: the last message when that is an
/// assistant turn (its text, or earlier parallel calls), else a new assistant turn.
fn push_tool_call(messages: &mut Vec<Value>, call: Value) {
    if let Some(Value::Object(last)) = messages.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some("assistant") {
            match last.get_mut("tool_calls") {
                Some(Value::Array(calls)) => calls.push(call),
                _ => {
                    last.insert("tool_calls".into(), json!([call]));
                }
            }
            if last.get("content").is_some_and(|c| c == "") {
                last.insert("content".into(), Value::Null);
            }
            return;
        }
    }
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
}

/// The text of Responses content parts (`input_text`, `output_text`, `text`, `refusal`).
fn text_of(parts: &[Value]) -> String {
    parts
        .iter()
        .filter_map(|p| {
            p.get("text")
                .or_else(|| p.get("refusal"))
                .and_then(Value::as_str)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Message content: a string stays; parts become one string when they are all text (joined
/// with "\n", as vLLM joins text parts), or Chat parts when there are images.
fn content(c: Value) -> Value {
    let Value::Array(parts) = c else {
        return match c {
            Value::Null => json!(""),
            other => other,
        };
    };
    let has_image = parts
        .iter()
        .any(|p| p.get("type").and_then(Value::as_str) == Some("input_image"));
    if !has_image {
        return json!(text_of(&parts));
    }
    let chat: Vec<Value> = parts
        .iter()
        .filter_map(|p| match p.get("type").and_then(Value::as_str) {
            Some("input_image") => {
                let url = p.get("image_url").and_then(Value::as_str)?;
                let mut image = json!({"url": url});
                if let Some(d) = p.get("detail") {
                    image["detail"] = d.clone();
                }
                Some(json!({"type": "image_url", "image_url": image}))
            }
            _ => {
                let t = p.get("text").or_else(|| p.get("refusal"))?.as_str()?;
                Some(json!({"type": "text", "text": t}))
            }
        })
        .collect();
    Value::Array(chat)
}

/// A Responses tool in Chat shape; built-in tools (web search, file search, …) are dropped.
fn tool(t: Value) -> Option<Value> {
    let kind = t.get("type").and_then(Value::as_str)?;
    match kind {
        // Already Chat-shaped.
        "function" if t.get("function").is_some() => Some(t),
        "function" => {
            let mut f = serde_json::Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k) {
                    f.insert(k.into(), v.clone());
                }
            }
            f.entry("parameters")
                .or_insert_with(|| json!({"type": "object", "properties": {}}));
            Some(json!({"type": "function", "function": f}))
        }
        "custom" => {
            // Chat Completions servers have no free-form tools: offer a function with one
            // string argument, and describe the expected format (e.g. a grammar) in it.
            let name = t.get("name")?.clone();
            let mut input = "The raw input for this tool.".to_string();
            if let Some(fmt) = t.get("format") {
                if let Some(def) = fmt.get("definition").and_then(Value::as_str) {
                    let syntax = fmt
                        .get("syntax")
                        .and_then(Value::as_str)
                        .unwrap_or("grammar");
                    input = format!(
                        "The raw input for this tool; it must match this {syntax} grammar:\n{def}"
                    );
                }
            }
            let mut f = json!({
                "name": name,
                "parameters": {
                    "type": "object",
                    "properties": {"input": {"type": "string", "description": input}},
                    "required": ["input"],
                },
            });
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            Some(json!({"type": "function", "function": f}))
        }
        other => {
            tracing::debug!(
                tool = other,
                "built-in Responses tool without a Chat equivalent dropped"
            );
            None
        }
    }
}

/// `tool_choice` in Chat shape; `None` drops it (the upstream's default, "auto").
fn tool_choice(c: Value) -> Option<Value> {
    match &c {
        Value::String(_) => Some(c),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") | Some("custom") => {
                let name = o.get("name").or_else(|| o.get("function")?.get("name"))?;
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            _ => None,
        },
        _ => None,
    }
}

/// `text.format` as Chat's `response_format`.
fn response_format(f: &Value) -> Option<Value> {
    match f.get("type").and_then(Value::as_str)? {
        "json_schema" => {
            let mut s = serde_json::Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = f.get(k) {
                    s.insert(k.into(), v.clone());
                }
            }
            Some(json!({"type": "json_schema", "json_schema": s}))
        }
        "json_object" => Some(json!({"type": "json_object"})),
        _ => None,
    }
}

/// Normalises assistant and tool turns with `content: []` and assistant `tool_calls: []`.
/// `Ok(None)` when no message needed it; only the affected messages are re-encoded.
fn normalise_messages(messages: &RawValue) -> Result<Option<Box<RawValue>>, ApiError> {
    // Fast path: no `[` followed (after whitespace) by `]` anywhere, so no empty list. A match
    // inside a string only costs the slow path, which then finds nothing to change.
    let text = messages.get();
    if !has_empty_list(text) {
        return Ok(None);
    }
    let Ok(list) = serde_json::from_str::<Vec<Box<RawValue>>>(text) else {
        return Ok(None); // Not an array: the upstream reports it.
    };
    let mut changed = false;
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        match normalise_message(&m) {
            Some(fixed) => {
                out.push(fixed);
                changed = true;
            }
            None => out.push(m),
        }
    }
    if !changed {
        return Ok(None);
    }
    serde_json::value::to_raw_value(&out)
        .map(Some)
        .map_err(|e| bad(format!("cannot re-encode messages: {e}")))
}

/// True when `text` contains `[` followed by optional whitespace and `]`.
fn has_empty_list(text: &str) -> bool {
    let b = text.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'['
            && b[i + 1..]
                .iter()
                .find(|c| !c.is_ascii_whitespace())
                .is_some_and(|&c| c == b']')
    })
}

fn is_empty_list(v: &RawValue) -> bool {
    let t = v.get().trim();
    t.starts_with('[') && t.ends_with(']') && t[1..t.len() - 1].trim().is_empty()
}

fn normalise_message(m: &RawValue) -> Option<Box<RawValue>> {
    let mut fields: Fields = serde_json::from_str(m.get()).ok()?;
    let role: String = fields
        .get("role")
        .and_then(|r| serde_json::from_str(r.get()).ok())?;
    let mut changed = false;
    if role == "assistant" && fields.get("tool_calls").is_some_and(|t| is_empty_list(t)) {
        fields.shift_remove("tool_calls");
        changed = true;
    }
    let empty_content = fields.get("content").is_some_and(|c| is_empty_list(c));
    if empty_content && (role == "assistant" || role == "tool") {
        let has_calls = fields.contains_key("tool_calls");
        let v = if role == "assistant" && has_calls {
            "null"
        } else {
            "\"\""
        };
        fields.insert(
            "content".into(),
            RawValue::from_string(v.into()).expect("literal JSON"),
        );
        changed = true;
    }
    if !changed {
        return None;
    }
    serde_json::value::to_raw_value(&fields).ok()
}

/// Passes the upstream's response through, except a 400 (when `context_length_error` is on):
/// its body is read (bounded) and answered as [`ApiError::ContextLengthExceeded`] when it is
/// about the context window, otherwise as an OpenAI-shaped 400 with the upstream's message.
pub async fn upstream_error(
    resp: hyper::Response<UpstreamBody>,
    cfg: &CompatConfig,
) -> Result<hyper::Response<UpstreamBody>, ApiError> {
    if !cfg.context_length_error || resp.status() != StatusCode::BAD_REQUEST {
        return Ok(resp);
    }
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
    let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return Err(ApiError::BadGateway(
                "the model server rejected the request with an unreadable error".into(),
            ))
        }
    };
    let message = upstream_message(&body);
    if is_context_length(&message) {
        tracing::info!("upstream context-length error answered as context_length_exceeded");
        Err(ApiError::ContextLengthExceeded(message))
    } else {
        Err(ApiError::BadRequest(message))
    }
}

/// The message of an upstream error body: OpenAI's `{"error":{"message"}}`, vLLM's older
/// `{"object":"error","message"}`, llama.cpp's and FastAPI's `detail`, or the text itself.
pub fn upstream_message(body: &[u8]) -> String {
    let text = || {
        let t = String::from_utf8_lossy(body);
        let t = t.trim();
        let mut end = t.len().min(1024);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t[..end].to_string()
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return text();
    };
    let found = [
        v.pointer("/error/message"),
        v.get("message"),
        v.get("detail"),
        v.get("error"),
    ]
    .into_iter()
    .flatten()
    .find_map(Value::as_str);
    found.map_or_else(text, str::to_string)
}

/// True when an upstream error message says the request does not fit the context window.
pub fn is_context_length(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        // vLLM (every wording since 0.2), OpenAI, and most OpenAI-compatible servers.
        "maximum context length",
        // llama.cpp server.
        "exceed_context_size",
        "exceeds the available context size",
        // Hugging Face TGI.
        "`inputs` tokens + `max_new_tokens` must be",
        "context_length_exceeded",
    ]
    .iter()
    .any(|p| m.contains(p))
}

#[cfg(test)]
mod tests;
