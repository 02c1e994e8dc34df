//! Token usage of an answer that is not metered event by event (a JSON body, an SSE stream of
//! another endpoint, an error): the last bytes of the body, where the `usage` object sits, and
//! for SSE an event count (the completion estimate when no usage is reported).
//!
//! One way to find usage: the tail of an SSE stream goes through the meter's own event parser
//! once the body ends, and a JSON body's `usage` object is parsed with the same serde shape
//! (`meter::UsageView`), from the whole body when it fits the tail, else from the last
//! `"usage"` key of the tail. Per frame only a bounded copy and a boundary count; memory at
//! most [`TAIL_BYTES`] per response.

use serde::Deserialize;

use super::meter::{Meter, UsageView};

/// Bytes kept from the end of an unmetered body.
pub const TAIL_BYTES: usize = 4096;

/// The last [`TAIL_BYTES`] of a body and, for SSE, how many events it had.
#[derive(Debug)]
pub struct Tail {
    bytes: Vec<u8>,
    sse: bool,
    /// Bytes of the body seen (the tail is the whole body while this fits).
    seen: u64,
    /// SSE events seen (a completion-token estimate when the stream reports no usage).
    events: u64,
}

impl Tail {
    pub fn new(sse: bool) -> Tail {
        Tail {
            bytes: Vec::new(),
            sse,
            seen: 0,
            events: 0,
        }
    }

    /// Notes `data`, the next bytes of the body.
    pub fn push(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        if data.len() >= TAIL_BYTES {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&data[data.len() - TAIL_BYTES..]);
        } else {
            let overflow = (self.bytes.len() + data.len()).saturating_sub(TAIL_BYTES);
            self.bytes.drain(..overflow);
            self.bytes.extend_from_slice(data);
        }
        if self.sse {
            self.events += data.windows(2).filter(|w| w == b"\n\n").count() as u64;
        }
    }

    /// `(prompt_tokens, completion_tokens)` the body reported.
    pub fn usage(&self) -> Option<(u64, u64)> {
        if self.sse {
            Meter::usage_in(&self.bytes)
        } else {
            json_usage(&self.bytes, self.seen <= TAIL_BYTES as u64)
        }
    }

    /// The completion tokens of a body that reported none: one per SSE event (how vLLM and
    /// llama.cpp stream), or `bytes_out / bytes_per_token` for anything else.
    pub fn estimate(&self, bytes_out: u64, bytes_per_token: u64) -> u64 {
        if self.sse {
            self.events
        } else {
            bytes_out / bytes_per_token
        }
    }
}

/// The top level of a JSON answer, as far as usage goes.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    usage: Option<UsageView>,
}

/// The usage of a JSON body from its tail: the body's own `usage` field when the tail is the
/// `whole` body, else the last `"usage"` key of the tail followed by a usage object.
fn json_usage(tail: &[u8], whole: bool) -> Option<(u64, u64)> {
    if whole {
        if let Ok(a) = serde_json::from_slice::<Answer>(tail) {
            return a.usage.map(|u| u.pair());
        }
    }
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        let value = tail[at + KEY.len()..].trim_ascii_start().strip_prefix(b":");
        if let Some(value) = value {
            // Reads one value and ignores what follows (the rest of the body).
            let mut de = serde_json::Deserializer::from_slice(value);
            if let Ok(u) = UsageView::deserialize(&mut de) {
                return Some(u.pair());
            }
        }
        end = at;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(body: &[u8], sse: bool) -> Option<(u64, u64)> {
        let mut t = Tail::new(sse);
        // In awkward pieces, as frames come.
        for piece in body.chunks(5) {
            t.push(piece);
        }
        t.usage()
    }

    #[test]
    fn usage_is_found_in_sse_and_json_tails() {
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(sse, true), Some((12, 7)));
        let json = br#"{"id":"x","usage": {"prompt_tokens": 3, "total_tokens": 3}}"#;
        assert_eq!(usage(json, false), Some((3, 0)));
        assert_eq!(usage(b"data: [DONE]\n\n", true), None);
        for sse in [true, false] {
            assert_eq!(usage(&[0xff, 0xfe, b'x'], sse), None);
            assert_eq!(usage(b"", sse), None);
        }
        // No usage object, or one without prompt_tokens (the Responses API's shape).
        assert_eq!(usage(br#"{"id":"x","choices":[]}"#, false), None);
        assert_eq!(
            usage(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#, false),
            None
        );
    }

    #[test]
    fn the_last_usage_wins_and_a_long_body_is_read_from_its_tail() {
        // vLLM's continuous usage stats: usage on every chunk, the last one counts.
        let mut sse = Vec::new();
        for i in 1..=3 {
            sse.extend_from_slice(
                format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"x\"}}}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{i}}}}}\n\n").as_bytes(),
            );
        }
        assert_eq!(usage(&sse, true), Some((5, 3)));
        // A JSON body longer than the tail, whose tail starts in the middle of a character
        // and of a string: the usage at its end is still found, and a "usage" in the text
        // (escaped inside a string) is not mistaken for it.
        let filler = "é \\\"usage\\\": {\\\"prompt_tokens\\\": 999} ".repeat(400);
        // The pad moves where the tail starts, across every byte of the filler's pattern.
        for pad in 0..40 {
            let pad = "x".repeat(pad);
            let json = format!(
                r#"{{"choices":[{{"message":{{"content":"{filler}"}}}}],"pad":"{pad}","usage":{{"prompt_tokens":40,"completion_tokens":2}}}}"#
            );
            assert!(json.len() > 2 * TAIL_BYTES);
            assert_eq!(usage(json.as_bytes(), false), Some((40, 2)), "pad {pad}");
        }
        // Invalid UTF-8 before the usage does not hide it.
        let mut raw = vec![0xff; 10];
        raw.extend_from_slice(br#","usage":{"prompt_tokens":8,"completion_tokens":1}}"#);
        assert_eq!(usage(&raw, false), Some((8, 1)));
    }

    #[test]
    fn events_are_counted_for_the_estimate() {
        let mut t = Tail::new(true);
        t.push(b"data: a\n\ndata: b\n\n");
        t.push(b"data: c\n\n");
        assert_eq!(t.estimate(999, 4), 3);
        assert_eq!(Tail::new(false).estimate(400, 4), 100);
    }
}
