//! Token usage of an answer that is not metered event by event (a JSON body, an SSE stream of
//! another endpoint, an error): the last bytes of the body, where the `usage` object sits, and
//! for SSE an event count (the completion estimate when no usage is reported).
//!
//! Memory is bounded: at most [`TAIL_BYTES`] per response.

/// Bytes kept from the end of an unmetered body.
pub const TAIL_BYTES: usize = 4096;

/// The last [`TAIL_BYTES`] of a body and, for SSE, how many events it had.
#[derive(Debug)]
pub struct Tail {
    bytes: Vec<u8>,
    sse: bool,
    /// SSE events seen (a completion-token estimate when the stream reports no usage).
    events: u64,
}

impl Tail {
    pub fn new(sse: bool) -> Tail {
        Tail {
            bytes: Vec::new(),
            sse,
            events: 0,
        }
    }

    /// Notes `data`, the next bytes of the body.
    pub fn push(&mut self, data: &[u8]) {
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
        find_usage(&self.bytes)
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

/// `(prompt_tokens, completion_tokens)` of the last `"usage"` object in `tail`, if any.
pub fn find_usage(tail: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(tail).ok().or_else(|| {
        // The tail may start mid-character; skip to the first valid boundary.
        (1..4).find_map(|i| std::str::from_utf8(tail.get(i..)?).ok())
    })?;
    let at = text.rfind("\"usage\"")?;
    let rest = &text[at..];
    let num = |field: &str| -> Option<u64> {
        let i = rest.find(field)? + field.len();
        let after = rest[i..].trim_start().strip_prefix(':')?.trim_start();
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        after[..end].parse().ok()
    };
    Some((
        num("\"prompt_tokens\"")?,
        num("\"completion_tokens\"").unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_in_sse_and_json_tails() {
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\ndata: [DONE]\n\n";
        assert_eq!(find_usage(sse), Some((12, 7)));
        let json = br#"{"id":"x","usage": {"prompt_tokens": 3, "total_tokens": 3}}"#;
        assert_eq!(find_usage(json), Some((3, 0)));
        assert_eq!(find_usage(b"data: [DONE]\n\n"), None);
        assert_eq!(find_usage(&[0xff, 0xfe, b'x']), None);
    }
}
