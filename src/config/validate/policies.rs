//! `[[policy]]`: named key policies. A key created with `--policy NAME` takes the policy's
//! models, endpoints, limits, budget and allowed sources; fields set on the key itself override
//! single fields ([`crate::policy::KeyPolicy::overlay`]). Editing a policy changes every key that
//! uses it, at the next reload.
//!
//! Values are written as the `key create` flags take them (`budget = "2000000/month"`, lists
//! as TOML arrays) and checked by the same parsers ([`crate::policy::parse`]), so the two never
//! disagree; this file never parses a value itself.

use std::collections::HashMap;

use super::names::{check_peer_name, NameRule};
use crate::config::raw::RawPolicy;
use crate::config::ConfigErrors;
use crate::policy::parse::{parse_budget, parse_cidr, parse_endpoints, parse_limit, parse_models};
use crate::policy::{KeyPolicy, Policies};

/// Splits a parser's "problem; fix: how" message.
fn split_fix(msg: &str) -> (String, String) {
    match msg.split_once("; fix: ") {
        Some((p, f)) => (p.to_string(), f.to_string()),
        None => (
            msg.to_string(),
            "see config/modelgate.toml for the format".to_string(),
        ),
    }
}

/// Policy names follow the peer name rules.
const NAMES: NameRule = NameRule {
    kind: "policy",
    check: check_peer_name,
    example: "developers",
    examples: "\"developers\" or \"ci-bots\"",
};

/// Validates every `[[policy]]`, pushing one error per bad field.
pub(super) fn validate(errs: &mut ConfigErrors, raw: &[RawPolicy]) -> Policies {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Policies::new();
    for (i, p) in raw.iter().enumerate() {
        let key = |f: &str| NAMES.key(i, p.name.as_deref(), f);
        let before = errs.len();
        let name = NAMES.unique(errs, i, p.name.as_deref(), &mut names);
        let mut pol = KeyPolicy::default();
        let field = |errs: &mut ConfigErrors, f: &str, shown: String, r: Result<(), String>| {
            if let Err(m) = r {
                let (problem, fix) = split_fix(&m);
                errs.push(key(f), shown, problem, fix);
            }
        };
        if let Some(models) = &p.models {
            let r = parse_models(&models.join(",")).map(|m| pol.models = m);
            field(errs, "models", format!("{models:?}"), r);
        }
        if let Some(eps) = &p.endpoints {
            let r = parse_endpoints(&eps.join(",")).map(|e| pol.endpoints = e);
            field(errs, "endpoints", format!("{eps:?}"), r);
        }
        for (f, v, slot) in [
            ("rpm", p.rpm, &mut pol.rpm),
            ("tpm", p.tpm, &mut pol.tpm),
            ("max_concurrent", p.max_concurrent, &mut pol.max_concurrent),
        ] {
            if let Some(n) = v {
                let r = parse_limit(&n.to_string()).map(|n| *slot = Some(n));
                field(errs, f, n.to_string(), r);
            }
        }
        if let Some(b) = &p.budget {
            let r = parse_budget(b).map(|b| pol.budget = Some(b));
            field(errs, "budget", format!("{b:?}"), r);
        }
        for c in p.allow_cidrs.iter().flatten() {
            let r = parse_cidr(c).map(|n| pol.allow_cidrs.push(n));
            field(errs, "allow_cidrs", format!("{c:?}"), r);
        }
        if let (Some(name), true) = (name, errs.len() == before) {
            out.insert(name, pol);
        }
    }
    out
}
