//! `[[policy]]`: named key policies. A key created with `--policy NAME` takes the policy's
//! models, endpoints, limits, budget and allowed sources; fields set on the key itself override
//! single fields ([`crate::policy::KeyPolicy::overlay`]). Editing a policy changes every key that
//! uses it, at the next reload.
//!
//! Values are written as the `key create` flags take them (`budget = "2000000/month"`, lists
//! as TOML arrays) and checked by the same parsers, so the two never disagree.

use std::collections::HashMap;

use super::raw::RawPolicy;
use super::validate::{unique_name, NameRule};
use super::ConfigErrors;
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

fn policy_key(i: usize, p: &RawPolicy, field: &str) -> String {
    match p.name.as_deref() {
        Some(n) if super::validate::check_peer_name(n).is_ok() => {
            format!("policy \"{n}\".{field}")
        }
        _ => format!("policy #{}.{field}", i + 1),
    }
}

/// Validates every `[[policy]]`, pushing one error per bad field.
pub(super) fn validate_policies(errs: &mut ConfigErrors, raw: &[RawPolicy]) -> Policies {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Policies::new();
    for (i, p) in raw.iter().enumerate() {
        let key = |f: &str| policy_key(i, p, f);
        let before = errs.len();
        let name = unique_name(
            errs,
            &NameRule {
                kind: "policy",
                check: super::validate::check_peer_name,
                example: "developers",
                examples: "\"developers\" or \"ci-bots\"",
            },
            key("name"),
            p.name.as_deref(),
            i,
            &mut names,
        );
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::policy::{Budget, BudgetPeriod, Endpoint};
    use std::path::Path;

    const BASE: &str = r#"
[wireguard]
public_endpoint = "gw.example.com:51820"
address = "10.99.0.1/24"
"#;

    #[test]
    fn named_policies_parse_with_the_key_create_parsers() {
        let text = format!(
            r#"{BASE}
[[policy]]
name = "developers"
models = ["coder", "qwen*"]
endpoints = ["chat_completions", "models"]
rpm = 60
tpm = 100_000
max_concurrent = 4
budget = "2_000_000/month"
allow_cidrs = ["203.0.113.0/24", "2001:db8::1"]

[[policy]]
name = "bots"
rpm = 10
"#
        );
        let c = Config::from_toml_str(&text, Path::new("/etc/modelgate/modelgate.toml")).unwrap();
        let d = &c.policies["developers"];
        assert_eq!(d.models, ["coder", "qwen*"]);
        assert_eq!(d.endpoints, [Endpoint::ChatCompletions, Endpoint::Models]);
        assert_eq!(
            (d.rpm, d.tpm, d.max_concurrent),
            (Some(60), Some(100_000), Some(4))
        );
        assert_eq!(
            d.budget,
            Some(Budget {
                tokens: 2_000_000,
                period: BudgetPeriod::Month
            })
        );
        assert_eq!(d.allow_cidrs.len(), 2);
        assert_eq!(c.policies["bots"].rpm, Some(10));
    }

    #[test]
    fn every_bad_policy_field_is_reported_at_once() {
        let text = format!(
            r#"{BASE}
[[policy]]
name = "dev"
rpm = 0
budget = "lots"
allow_cidrs = ["not-a-net"]
endpoints = ["chat"]

[[policy]]
name = "dev"

[[policy]]
rpm = 5
"#
        );
        let e = Config::from_toml_str(&text, Path::new("/x/modelgate.toml"))
            .unwrap_err()
            .to_string();
        for needle in [
            "policy \"dev\".rpm",
            "policy \"dev\".budget",
            "policy \"dev\".allow_cidrs",
            "policy \"dev\".endpoints",
            "also used by policy #1",
            "policy #3.name",
        ] {
            assert!(e.contains(needle), "{needle} missing in:\n{e}");
        }
    }
}
