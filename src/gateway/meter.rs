//! Reads a streamed Chat Completions / Completions answer event by event, as it passes through:
//! counts the tokens the model produces, takes the `usage` from the final chunk, strips that
//! chunk when the gateway (not the client) asked for it, and writes the clean ending of a stream
//! that a budget or TPM limit cut short.
//!
//! Pure and synchronous: bytes in, whole SSE events out. The response body (`body`) owns the
//! timing and the limiter. The same event parser reads the usage of unmetered streams
//! ([`Meter::usage_in`]), and `UsageView` is the one shape of every answer's usage. Memory is bounded: an event larger than [`MAX_EVENT_BYTES`] switches the meter
//! to pass-through (bytes forwarded unchanged, no more counting; the response then settles on
//! an estimate).
//!
//! Token counting while streaming: one completion token per event whose choices carry content,
//! a tool-call fragment, reasoning content or completion text. That is exact for vLLM and
//! llama.cpp with their default stream interval of one token per chunk, and an under-count when
//! a server batches several tokens into one chunk (vLLM `--stream-interval N`); the final
//! `usage` chunk, when present, replaces the count at settlement.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest SSE event the meter buffers while waiting for its end.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The shape of the events, which decides how a cut stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `/v1/chat/completions`: `chat.completion.chunk` objects with `delta`.
    Chat,
    /// `/v1/completions`: `text_completion` objects with `text`.
    Completion,
}

/// One SSE event, whole, with what the meter learnt from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's bytes including its terminating blank line.
    pub bytes: Bytes,
    /// Completion tokens this event carries (0 or 1, see the module doc).
    pub tokens: u64,
    /// Forward it to the client (false only for a usage chunk the client did not ask for).
    pub forward: bool,
}

/// Per-response state.
#[derive(Debug)]
pub struct Meter {
    kind: StreamKind,
    /// The gateway added `stream_options.include_usage`; the usage-only chunk is not forwarded.
    strip_usage: bool,
    buf: BytesMut,
    /// Bytes of `buf` already searched for a boundary.
    scanned: usize,
    passthrough: bool,
    /// `(prompt_tokens, completion_tokens)` from the stream's usage chunk.
    pub usage: Option<(u64, u64)>,
    /// Completion tokens counted so far.
    pub tokens: u64,
    /// `data: [DONE]` seen.
    pub done: bool,
    id: Option<String>,
    created: Option<u64>,
    model: Option<String>,
    /// Highest choice index seen (a cut ends every choice).
    max_index: u64,
}

/// One chunk as the meter reads it: borrowed from the event where it can be (no allocation per
/// event for `id` and `model`, which are kept once per stream).
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default, borrow)]
    model: Option<&'a RawValue>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default)]
    usage: Option<UsageView>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning_content: Option<&'a RawValue>,
}

/// An OpenAI `usage` object: the one shape every answer's usage is read with.
#[derive(Deserialize)]
pub(super) struct UsageView {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl UsageView {
    /// `(prompt_tokens, completion_tokens)`.
    pub(super) fn pair(&self) -> (u64, u64) {
        (self.prompt_tokens, self.completion_tokens)
    }
}

/// A JSON string's value (None for any other JSON value).
fn string_of(v: &RawValue) -> Option<String> {
    serde_json::from_str(v.get()).ok()
}

/// A JSON value that carries something: not null, not `""`, not `[]`.
fn carries(v: Option<&RawValue>) -> bool {
    v.is_some_and(|v| !matches!(v.get().trim(), "null" | "\"\"" | "[]"))
}

impl Meter {
    pub fn new(kind: StreamKind, strip_usage: bool) -> Meter {
        Meter {
            kind,
            strip_usage,
            buf: BytesMut::new(),
            scanned: 0,
            passthrough: false,
            usage: None,
            tokens: 0,
            done: false,
            id: None,
            created: None,
            model: None,
            max_index: 0,
        }
    }

    /// No partial event is buffered: a keep-alive comment may go out now.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty()
    }

    /// The meter gave up on an oversized event and forwards bytes unchanged.
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// Feeds upstream bytes; returns the whole events now complete, in order.
    pub fn push(&mut self, data: &[u8]) -> Vec<Event> {
        if self.passthrough {
            return vec![Event {
                bytes: Bytes::copy_from_slice(data),
                tokens: 0,
                forward: true,
            }];
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(end) = self.boundary() {
            let raw = self.buf.split_to(end).freeze();
            self.scanned = 0;
            out.push(self.inspect(raw));
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            tracing::warn!(
                bytes = self.buf.len(),
                "SSE event larger than the meter's limit; forwarding the rest of the stream unmetered"
            );
            self.passthrough = true;
            self.scanned = 0;
            out.push(Event {
                bytes: self.buf.split().freeze(),
                tokens: 0,
                forward: true,
            });
        }
        out
    }

    /// The end of the upstream body: whatever is buffered (an unterminated last event) goes out
    /// as it is.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            None
        } else {
            self.scanned = 0;
            Some(self.buf.split().freeze())
        }
    }

    /// The last usage reported in `events`, a run of SSE events such as the tail of a stream
    /// that was not metered (a partial first event is skipped): the same parser as a metered
    /// stream, run once.
    pub fn usage_in(events: &[u8]) -> Option<(u64, u64)> {
        let mut m = Meter::new(StreamKind::Chat, false);
        m.push(events);
        if let Some(rest) = m.finish() {
            m.inspect(rest);
        }
        m.usage
    }

    /// Offset just past the first event boundary (`\n\n` or `\r\n\r\n`) in the buffer.
    fn boundary(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        // Restart a little before where the last search stopped: a boundary may straddle it.
        let from = self.scanned.saturating_sub(3);
        let mut i = from;
        while i + 1 < b.len() {
            if b[i] == b'\n' {
                if b[i + 1] == b'\n' {
                    return Some(i + 2);
                }
                if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                    return Some(i + 3);
                }
            }
            i += 1;
        }
        self.scanned = b.len();
        None
    }

    fn inspect(&mut self, raw: Bytes) -> Event {
        let mut ev = Event {
            bytes: raw,
            tokens: 0,
            forward: true,
        };
        let Ok(text) = std::str::from_utf8(&ev.bytes) else {
            return ev;
        };
        // The data lines of the event, joined (SSE allows a payload over several lines); the
        // usual one-line event is borrowed, not copied.
        let mut data: Cow<'_, str> = Cow::Borrowed("");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("data:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                if data.is_empty() {
                    data = Cow::Borrowed(rest);
                } else {
                    let d = data.to_mut();
                    d.push('\n');
                    d.push_str(rest);
                }
            }
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return ev;
        }
        let Ok(chunk) = serde_json::from_str::<ChunkView<'_>>(&data) else {
            return ev;
        };
        if self.id.is_none() {
            self.id = chunk.id.and_then(string_of);
            self.created = chunk.created;
            self.model = chunk.model.and_then(string_of);
        }
        let choices = chunk.choices.unwrap_or_default();
        for c in &choices {
            self.max_index = self.max_index.max(c.index.unwrap_or(0));
            let produced = carries(c.text)
                || c.delta.as_ref().is_some_and(|d| {
                    carries(d.content) || carries(d.tool_calls) || carries(d.reasoning_content)
                });
            if produced {
                ev.tokens += 1;
            }
        }
        self.tokens += ev.tokens;
        if let Some(u) = chunk.usage {
            self.usage = Some(u.pair());
            if self.strip_usage && choices.is_empty() {
                ev.forward = false;
            }
        }
        ev
    }

    /// The events that end a stream the gateway cuts: a final chunk per choice with
    /// `finish_reason: "length"`, then (if the client asked for usage) a usage chunk with
    /// `prompt_tokens` and `completion_tokens` as given (the tokens the client received), then
    /// `data: [DONE]`.
    pub fn cut_tail(
        &self,
        client_wants_usage: bool,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Bytes {
        let id = self.id.as_deref().unwrap_or("modelgate-cut");
        let created = self.created.unwrap_or(0);
        let model = self.model.as_deref().unwrap_or("");
        let object = match self.kind {
            StreamKind::Chat => "chat.completion.chunk",
            StreamKind::Completion => "text_completion",
        };
        let mut out = String::new();
        let head = |choices: serde_json::Value| {
            serde_json::json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": choices,
            })
        };
        let choices: Vec<serde_json::Value> = (0..=self.max_index.min(127))
            .map(|index| match self.kind {
                StreamKind::Chat => serde_json::json!({
                    "index": index, "delta": {}, "logprobs": null, "finish_reason": "length"
                }),
                StreamKind::Completion => serde_json::json!({
                    "index": index, "text": "", "logprobs": null, "finish_reason": "length"
                }),
            })
            .collect();
        out.push_str(&format!(
            "data: {}\n\n",
            head(serde_json::Value::from(choices))
        ));
        if client_wants_usage {
            let mut u = head(serde_json::json!([]));
            u["usage"] = serde_json::json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            });
            out.push_str(&format!("data: {u}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests;
