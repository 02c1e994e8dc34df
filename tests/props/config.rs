//! The config parser and validator never panic, and refuse with a list: every error names a
//! key, and a `[gateway]` value out of its range is reported under that key.

use std::path::Path;

use modelgate::config::{Config, ConfigError};
use proptest::prelude::*;

const BASE: &str = r#"
[server]
listen = "0.0.0.0:8443"
state_dir = "/var/lib/modelgate"

[wireguard]
public_endpoint = "gw.example.com:51820"
address = "10.99.0.1/24"

[[peer]]
name = "corp"
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
tunnel_address = "10.99.0.2"
allowed_ips = ["10.20.0.5/24", "10.99.0.2/32"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("/etc/modelgate/modelgate.toml"))
}

/// The `[gateway]` keys that take a number, and the range each accepts.
const COUNTS: &[(&str, i64, i64)] = &[
    ("max_body_bytes", 1024, 1 << 30),
    ("max_connections", 1, 1_000_000),
    ("max_header_bytes", 8192, 1 << 20),
    ("max_headers", 1, 10_000),
    ("max_queued", 0, 1_000_000),
    ("default_max_tokens", 1, 10_000_000),
    ("body_min_rate", 0, 1 << 30),
    ("max_json_depth", 8, 100),
];

const DURATIONS: &[&str] = &[
    "tls_handshake_timeout",
    "header_read_timeout",
    "idle_timeout",
    "body_read_timeout",
    "sse_keepalive",
    "drain_timeout",
    "queue_timeout",
];

fn check_errors(e: &ConfigError) {
    if let ConfigError::Invalid { errors, .. } = e {
        assert!(!errors.is_empty(), "Invalid without errors");
        for f in errors.iter() {
            assert!(
                !f.key.is_empty() && !f.problem.is_empty() && !f.fix.is_empty(),
                "{f}"
            );
        }
        assert_eq!(e.to_string().lines().count(), errors.len() + 1, "{e}");
    }
}

proptest! {
    #![proptest_config(crate::cases())]

    /// Any text: a config or an error, never a panic.
    #[test]
    fn any_text_parses_or_is_refused(text in ".{0,400}") {
        if let Err(e) = parse(&text) {
            check_errors(&e);
        }
    }

    /// TOML-ish lines appended to a good config (keys, tables, values of every kind).
    #[test]
    fn appended_lines_parse_or_are_refused(lines in proptest::collection::vec(
        prop_oneof![
            Just("[gateway]".to_string()),
            Just("[[upstream]]".to_string()),
            Just("[[policy]]".to_string()),
            Just("[tls]".to_string()),
            "[a-z_]{1,20} = (-?[0-9]{1,12}|\"[ -~]{0,20}\"|true|false|\\[\\]|\\[\"[a-z*]{0,8}\"\\])",
        ],
        0..12,
    )) {
        let text = format!("{BASE}\n{}\n", lines.join("\n"));
        if let Err(e) = parse(&text) {
            check_errors(&e);
        }
    }

    /// `[gateway]` numbers and durations: in range they are taken, out of range each is
    /// reported under its own key (every bad value at once).
    #[test]
    fn gateway_values_are_taken_or_reported_by_key(
        counts in proptest::collection::vec((0..COUNTS.len(), any::<i64>()), 0..6),
        durations in proptest::collection::vec((0..DURATIONS.len(), "(0|[1-9][0-9]{0,3})(ms|s|m|h)|[a-z]{1,4}"), 0..4),
    ) {
        let mut seen = std::collections::HashSet::new();
        let mut table = String::from("[gateway]\n");
        let mut bad = Vec::new();
        for (i, v) in counts {
            let (key, lo, hi) = COUNTS[i];
            if seen.insert(key) {
                table.push_str(&format!("{key} = {v}\n"));
                if v < lo || v > hi {
                    bad.push(format!("gateway.{key}"));
                }
            }
        }
        for (i, v) in durations {
            let key = DURATIONS[i];
            if seen.insert(key) {
                table.push_str(&format!("{key} = \"{v}\"\n"));
                if humantime::parse_duration(&v).map_or(true, |d| d.is_zero()) {
                    bad.push(format!("gateway.{key}"));
                }
            }
        }
        match parse(&format!("{BASE}\n{table}")) {
            Ok(_) => prop_assert!(bad.is_empty(), "accepted {bad:?}:\n{table}"),
            Err(ConfigError::Invalid { errors, .. }) => {
                let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
                for b in &bad {
                    prop_assert!(keys.contains(&b.as_str()), "{b} not reported: {keys:?}\n{table}");
                }
                prop_assert!(keys.iter().all(|k| bad.iter().any(|b| b == k)), "{keys:?} vs {bad:?}");
            }
            Err(e) => prop_assert!(false, "{e}\n{table}"),
        }
    }
}
