//! `[[model]]`: per-model settings, today how a model's requests are spread over the upstreams
//! that serve it (its replicas): `balance = "least_loaded"` (default) or `"affinity"`.
//!
//! A table names a public model name (what clients send as `model`), once. The name is not
//! required to be routed statically: a discovered model (`GET /v1/models`) is only known at
//! run time, and a table for a model no upstream serves simply never applies. Never looks at
//! upstreams beyond that.

use std::collections::HashMap;

use super::fields::q;
use super::names::NameRule;
use super::upstreams::check_public_model_name;
use crate::config::raw::RawModel;
use crate::config::{Balance, ConfigErrors, ModelConfig};

const NAMES: NameRule = NameRule {
    kind: "model",
    check: check_public_model_name,
    example: "coder",
    examples: "\"coder\" or \"qwen2.5-coder\"",
};

/// Validates every `[[model]]`, pushing one error per bad field.
pub(super) fn validate(errs: &mut ConfigErrors, raw: &[RawModel]) -> Vec<ModelConfig> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let before = errs.len();
        let name = NAMES.unique(errs, i, m.name.as_deref(), &mut names);
        let balance = match m.balance.as_deref() {
            None => Balance::default(),
            Some(v) => Balance::parse(v).unwrap_or_else(|| {
                let all: Vec<String> = Balance::ALL.iter().map(|b| q(b.as_str())).collect();
                errs.push(
                    NAMES.key(i, m.name.as_deref(), "balance"),
                    q(v),
                    format!("is not a balancing rule (one of {})", all.join(", ")),
                    "write balance = \"least_loaded\" (the fewest requests in flight) or balance = \"affinity\" (one conversation on one replica, for its prompt cache)",
                );
                Balance::default()
            }),
        };
        if let (Some(name), true) = (name, errs.len() == before) {
            out.push(ModelConfig { name, balance });
        }
    }
    out
}
