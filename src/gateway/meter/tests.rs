use super::*;

fn chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
        serde_json::to_string(content).unwrap()
    )
}
const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n";
const ROLE: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
const FINISH: &str =
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";

#[test]
fn counts_content_events_and_strips_only_the_injected_usage_chunk() {
    let stream = format!(
        "{ROLE}{}{}{FINISH}{USAGE}data: [DONE]\n\n",
        chunk("Hel"),
        chunk("lo")
    );
    for strip in [false, true] {
        let mut m = Meter::new(StreamKind::Chat, strip);
        // Feed in awkward pieces: 7 bytes at a time, boundaries split across pushes.
        let mut events = Vec::new();
        for piece in stream.as_bytes().chunks(7) {
            events.extend(m.push(piece));
        }
        assert_eq!(m.finish(), None);
        assert_eq!(events.len(), 6);
        assert_eq!(m.tokens, 2, "role and finish chunks carry no token");
        assert_eq!(m.usage, Some((11, 2)));
        assert!(m.done);
        let forwarded: Vec<u8> = events
            .iter()
            .filter(|e| e.forward)
            .flat_map(|e| e.bytes.to_vec())
            .collect();
        let expect = if strip {
            stream.replace(USAGE, "")
        } else {
            stream.clone()
        };
        assert_eq!(String::from_utf8(forwarded).unwrap(), expect);
    }
}

#[test]
fn a_usage_field_on_a_content_chunk_is_kept() {
    // vLLM's continuous usage stats put usage on every chunk; those chunks carry content
    // and must reach the client.
    let ev = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
    let mut m = Meter::new(StreamKind::Chat, true);
    let out = m.push(ev.as_bytes());
    assert!(out[0].forward);
    assert_eq!((m.tokens, m.usage), (1, Some((3, 1))));
}

#[test]
fn crlf_boundaries_tool_calls_text_and_garbage() {
    let mut m = Meter::new(StreamKind::Completion, false);
    let out = m.push(b"data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\r\n\r\n: comment\n\ndata: not json\n\n");
    assert_eq!(out.len(), 3);
    assert_eq!(m.tokens, 1);
    let mut m = Meter::new(StreamKind::Chat, false);
    m.push(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\"}}]}}]}\n\n");
    assert_eq!(m.tokens, 1);
    // An unterminated last event is flushed as it is.
    m.push(b"data: {\"choices\":[]}");
    assert_eq!(m.finish().as_deref(), Some(&b"data: {\"choices\":[]}"[..]));
}

#[test]
fn oversized_event_switches_to_passthrough_with_bounded_buffer() {
    let mut m = Meter::new(StreamKind::Chat, true);
    let big = vec![b'x'; MAX_EVENT_BYTES + 10];
    let out = m.push(&big);
    assert!(m.is_passthrough());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].bytes.len(), big.len());
    assert!(m.at_boundary());
    let out = m.push(USAGE.as_bytes());
    assert!(out[0].forward, "pass-through forwards everything");
}

#[test]
fn cut_tail_is_valid_sse_with_length_usage_and_done() {
    let mut m = Meter::new(StreamKind::Chat, false);
    m.push(chunk("a").as_bytes());
    m.push(chunk("b").as_bytes());
    let tail = m.cut_tail(true, 40, m.tokens);
    let text = std::str::from_utf8(&tail).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3);
    let fin: serde_json::Value =
        serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(fin["id"], "c1");
    assert_eq!(fin["model"], "m");
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    let usage: serde_json::Value =
        serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(usage["usage"]["total_tokens"], 42);
    assert_eq!(events[2], "data: [DONE]");
    // Without include_usage: no usage chunk.
    let t = m.cut_tail(false, 40, 2);
    assert_eq!(
        std::str::from_utf8(&t).unwrap().matches("data: ").count(),
        2
    );
    let c = Meter::new(StreamKind::Completion, false).cut_tail(false, 0, 0);
    assert!(std::str::from_utf8(&c)
        .unwrap()
        .contains("\"text_completion\""));
}
