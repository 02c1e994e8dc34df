//! The SSE meter sees the same stream however it is cut: any chunking of the same bytes gives
//! the same events (bytes, tokens, forwarding), the same usage and token count; arbitrary bytes
//! never make it panic.

use modelgate::gateway::meter::{Meter, StreamKind};
use proptest::prelude::*;

/// One event of a Chat Completions stream, as a model server writes it.
fn event() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,30}".prop_map(|t| format!(
            r#"data: {{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":{}}}}}]}}"#,
            serde_json::to_string(&t).unwrap()
        )),
        Just(r#"data: {"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]}"#.to_string()),
        Just(r#"data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}"#.to_string()),
        (0u64..5000, 0u64..5000).prop_map(|(p, c)| format!(
            r#"data: {{"id":"c1","choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
            p + c
        )),
        Just(": keep-alive".to_string()),
        Just("data: [DONE]".to_string()),
        "[ -~]{0,40}",
    ]
}

/// What the meter made of a stream: every event (bytes, tokens, forward), then the state.
type Seen = (
    Vec<(Vec<u8>, u64, bool)>,
    Option<Vec<u8>>,
    Option<(u64, u64)>,
    u64,
    bool,
);

fn run(kind: StreamKind, strip: bool, chunks: &[&[u8]]) -> Seen {
    let mut m = Meter::new(kind, strip);
    let mut events = Vec::new();
    for c in chunks {
        for e in m.push(c) {
            events.push((e.bytes.to_vec(), e.tokens, e.forward));
        }
    }
    let rest = m.finish().map(|b| b.to_vec());
    (events, rest, m.usage, m.tokens, m.done)
}

/// `bytes` cut at `cuts` (positions taken modulo the length).
fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut from = 0;
    for a in at {
        out.push(&bytes[from..a]);
        from = a;
    }
    out.push(&bytes[from..]);
    out
}

proptest! {
    #![proptest_config(crate::cases())]

    #[test]
    fn any_chunking_gives_the_same_events_and_tokens(
        events in proptest::collection::vec(event(), 0..20),
        crlf in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
        strip in any::<bool>(),
        completion in any::<bool>(),
    ) {
        let sep = if crlf { "\r\n\r\n" } else { "\n\n" };
        let stream: String = events.iter().map(|e| format!("{e}{sep}")).collect();
        let bytes = stream.as_bytes();
        let kind = if completion { StreamKind::Completion } else { StreamKind::Chat };
        let whole = run(kind, strip, &[bytes]);
        let pieces = cut(bytes, &cuts);
        let chunked = run(kind, strip, &pieces);
        prop_assert_eq!(&whole, &chunked);
        // Byte by byte too (the worst chunking).
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(&whole, &run(kind, strip, &bytewise));
        // Nothing is lost or invented: the events (and an unterminated rest) are the input.
        let mut again: Vec<u8> = whole.0.iter().flat_map(|e| e.0.clone()).collect();
        again.extend(whole.1.clone().unwrap_or_default());
        prop_assert_eq!(again, bytes.to_vec());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let pieces = cut(&data, &cuts);
        let (events, rest, _, _, _) = run(StreamKind::Chat, true, &pieces);
        let forwarded: usize = events.iter().map(|e| e.0.len()).sum::<usize>()
            + rest.map_or(0, |r| r.len());
        prop_assert_eq!(forwarded, data.len());
    }
}
