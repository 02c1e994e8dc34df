//! What a conversation is, for cache affinity (`[[model]] balance = "affinity"`): the key, the
//! model and the conversation's leading messages, hashed. Every turn of one conversation
//! resends the same beginning (the system prompt and the first user message) and appends the
//! rest, so its turns hash alike, while another conversation of the same key differs in its
//! first user message. `balance::rendezvous` maps the hash to a replica.
//!
//! Owns only that hash. Reads at most [`MAX_LEADING`] messages of at most [`PREFIX_BYTES`] raw
//! bytes each and stops parsing the list after them, so the cost does not grow with the
//! history; keeps nothing per conversation. Never logs or stores the content it hashes.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::request::ClientRequest;

/// Bytes of each leading message (raw JSON) that go into the hash; conversations that agree on
/// this much of their beginning share a replica (and its cached prefix).
pub const PREFIX_BYTES: usize = 4096;
/// Most leading messages looked at: the system/developer messages, then the first other one.
pub const MAX_LEADING: usize = 4;

/// The conversation hash of `request` for `key_id`.
pub fn conversation(key_id: &str, request: &ClientRequest) -> u64 {
    conversation_of(key_id, &request.model, |f| request.field(f))
}

/// The conversation hash for `key_id` and `model`, of a body whose top-level fields `field`
/// returns: chat `messages`, else Responses/embeddings `input`, else completions `prompt`;
/// plus Responses `instructions`.
pub fn conversation_of<'a>(
    key_id: &str,
    model: &str,
    field: impl Fn(&str) -> Option<&'a RawValue>,
) -> u64 {
    let mut h = DefaultHasher::new();
    key_id.hash(&mut h);
    model.hash(&mut h);
    if let Some(i) = field("instructions") {
        prefix(i.get()).hash(&mut h);
    }
    let body = field("messages")
        .map(|m| ("messages", m))
        .or_else(|| field("input").map(|m| ("input", m)))
        .or_else(|| field("prompt").map(|m| ("prompt", m)));
    if let Some((name, v)) = body {
        name.hash(&mut h);
        for m in leading(v) {
            prefix(m).hash(&mut h);
        }
    }
    h.finish()
}

/// The first [`PREFIX_BYTES`] bytes of `s` (at a byte boundary: only hashed, never shown).
fn prefix(s: &str) -> &[u8] {
    &s.as_bytes()[..s.len().min(PREFIX_BYTES)]
}

/// The leading messages of a message list (raw), or the value itself when it is no list.
fn leading(v: &RawValue) -> Vec<&str> {
    let text = v.get();
    if !text.trim_start().starts_with('[') {
        return vec![text];
    }
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    // Stopping early leaves the list unfinished, which the deserializer reports as an error
    // after the visitor returns: what was collected is all we need.
    let _ = de.deserialize_seq(Leading { out: &mut out });
    out
}

struct Leading<'o, 'de> {
    out: &'o mut Vec<&'de str>,
}

impl<'de> Visitor<'de> for Leading<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while self.out.len() < MAX_LEADING {
            let Some(m) = seq.next_element::<&'de RawValue>()? else {
                break;
            };
            self.out.push(m.get());
            if !instruction(m.get()) {
                // The first message that is not an instruction starts the conversation proper.
                break;
            }
        }
        Ok(())
    }
}

/// True for a system or developer message.
fn instruction(m: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Role<'a> {
        #[serde(borrow, default)]
        role: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Role>(m)
        .ok()
        .and_then(|r| r.role)
        .is_some_and(|r| r == "system" || r == "developer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::compat::Fields;

    fn hash(key: &str, body: &serde_json::Value) -> u64 {
        let fields: Fields = serde_json::from_str(&body.to_string()).unwrap();
        conversation_of(key, "coder", |f| fields.get(f).map(|v| &**v))
    }

    fn msg(role: &str, content: &str) -> serde_json::Value {
        serde_json::json!({"role": role, "content": content})
    }

    fn chat(messages: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::json!({"model": "coder", "stream": true, "messages": messages})
    }

    #[test]
    fn turns_of_one_conversation_hash_alike_and_others_do_not() {
        let system = msg("system", "You are a coding agent.");
        let first = msg("user", "Rename step_1.");
        let turn1 = chat(vec![system.clone(), first.clone()]);
        let turn2 = chat(vec![
            system.clone(),
            first.clone(),
            msg("assistant", "Done."),
            msg("user", "Now step_2."),
        ]);
        let turn3 = chat(vec![
            system.clone(),
            first.clone(),
            msg("assistant", "Done."),
            msg("user", "Now step_2."),
            msg("assistant", "Done too."),
            msg("user", "And step_3."),
        ]);
        let c = hash("k1", &turn1);
        assert_eq!(hash("k1", &turn2), c);
        assert_eq!(hash("k1", &turn3), c);
        // Another first question, another key, or another system prompt: another conversation.
        let other = chat(vec![system.clone(), msg("user", "Fix the build.")]);
        assert_ne!(hash("k1", &other), c);
        assert_ne!(hash("k2", &turn1), c);
        assert_ne!(
            hash("k1", &chat(vec![msg("system", "Be brief."), first.clone()])),
            c
        );
        // No system prompt: the first user message alone starts the conversation.
        let bare1 = chat(vec![first.clone()]);
        let bare2 = chat(vec![first.clone(), msg("assistant", "x"), msg("user", "y")]);
        assert_eq!(hash("k1", &bare1), hash("k1", &bare2));
        assert_ne!(hash("k1", &bare1), c);
    }

    #[test]
    fn only_bounded_prefixes_are_read() {
        // Beyond PREFIX_BYTES of a message, differences do not count.
        let long = "x".repeat(PREFIX_BYTES + 10);
        let a = chat(vec![msg("system", &format!("{long}a")), msg("user", "q")]);
        let b = chat(vec![msg("system", &format!("{long}b")), msg("user", "q")]);
        assert_eq!(hash("k", &a), hash("k", &b));
        // At most MAX_LEADING instruction messages are read.
        let many: Vec<_> = (0..10).map(|i| msg("system", &format!("s{i}"))).collect();
        let mut other = many.clone();
        other[MAX_LEADING + 1] = msg("system", "different");
        assert_eq!(hash("k", &chat(many)), hash("k", &chat(other)));
        // A broken list or a non-list still hashes (to something), and never panics.
        let fields: Fields = serde_json::from_str(r#"{"messages": [1, {"role": 2}]}"#).unwrap();
        let _ = conversation_of("k", "m", |f| fields.get(f).map(|v| &**v));
    }

    #[test]
    fn responses_and_completions_bodies_have_conversations_too() {
        let r1 = serde_json::json!({"model": "m", "instructions": "Be a coder.",
            "input": [msg("user", "hi")]});
        let r2 = serde_json::json!({"model": "m", "instructions": "Be a coder.",
            "input": [msg("user", "hi"), msg("assistant", "yo"), msg("user", "more")]});
        assert_eq!(hash("k", &r1), hash("k", &r2));
        let r3 = serde_json::json!({"model": "m", "instructions": "Be brief.",
            "input": [msg("user", "hi")]});
        assert_ne!(hash("k", &r1), hash("k", &r3));
        let p1 = serde_json::json!({"model": "m", "prompt": "def f():"});
        let p2 = serde_json::json!({"model": "m", "prompt": "def g():"});
        assert_ne!(hash("k", &p1), hash("k", &p2));
    }
}
