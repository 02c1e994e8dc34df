//! `[[policy]]`: named key policies parsed with the `key create` parsers, and every bad field
//! reported at once.

use super::super::Config;
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
