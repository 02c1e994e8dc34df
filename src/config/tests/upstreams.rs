//! `[gateway]` and `[[upstream]]`: defaults, durations, the no-open-proxy rule, model routes,
//! API key files and the comment-preserving CLI edits.

use super::super::edit::{add_upstream, remove_upstream, EditError, NewUpstream};
use super::super::*;
use super::{assert_errors, errors, parse, GOOD};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn with(extra: &str) -> String {
    format!("{GOOD}\n{extra}")
}

#[test]
fn gateway_defaults_and_overrides() {
    let c = parse(GOOD).unwrap();
    let d = GatewayConfig::default();
    assert_eq!(c.gateway, d);
    assert_eq!(d.max_body_bytes, 33_554_432);
    assert_eq!(d.idle_timeout, Duration::from_secs(600));
    assert_eq!(d.sse_keepalive, Duration::from_secs(15));
    assert_eq!(d.body_read_timeout, Duration::from_secs(20));
    assert_eq!((d.body_min_rate, d.max_json_depth), (16384, 100));

    let c = parse(&with(
        "[gateway]\nmax_body_bytes = 1048576\nidle_timeout = \"1h 30m\"\nsse_keepalive = \"500ms\"\n",
    ))
    .unwrap();
    assert_eq!(c.gateway.max_body_bytes, 1 << 20);
    assert_eq!(c.gateway.idle_timeout, Duration::from_secs(5400));
    assert_eq!(c.gateway.sse_keepalive, Duration::from_millis(500));
    assert_eq!(c.gateway.drain_timeout, d.drain_timeout);
}

#[test]
fn gateway_errors_are_all_reported() {
    let errs = errors(&with(
        "[gateway]\nmax_body_bytes = 0\nmax_connections = -1\ntls_handshake_timeout = \"10\"\n\
         idle_timeout = \"0s\"\nmax_header_bytes = 4096\nmax_headers = 100000\ndrain_timeout = \"soon\"\n\
         body_read_timeout = \"0s\"\nbody_min_rate = -5\nmax_json_depth = 500\n",
    ));
    assert_errors(
        &errs,
        &[
            ("gateway.max_body_bytes", "1024..="),
            ("gateway.max_connections", "1..=1000000"),
            ("gateway.tls_handshake_timeout", "not a duration"),
            ("gateway.idle_timeout", "longer than zero"),
            ("gateway.max_header_bytes", "at least 8192"),
            ("gateway.max_headers", "1..=10000"),
            ("gateway.drain_timeout", "not a duration"),
            ("gateway.body_read_timeout", "longer than zero"),
            ("gateway.body_min_rate", "0..="),
            ("gateway.max_json_depth", "8..=100"),
            (
                "gateway.tls_handshake_timeout",
                "fix: write a number with a unit, e.g. \"10s\"",
            ),
        ],
    );
    let e = parse("[gateway]\nmax_body = 1\n[wireguard]\n").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
}

#[test]
fn upstream_urls() {
    let ok = |v: &str| parse_upstream_url(v).map(|(a, p)| (a.to_string(), p));
    assert_eq!(
        ok("http://10.20.0.5:8000").unwrap(),
        ("10.20.0.5:8000".into(), "/v1".into())
    );
    assert_eq!(ok("http://10.20.0.5:8000/").unwrap().1, "/v1");
    assert_eq!(ok("http://10.20.0.5:8000/v1/").unwrap().1, "/v1");
    assert_eq!(
        ok("http://10.20.0.5:8000/openai/v1").unwrap().1,
        "/openai/v1"
    );
    assert_eq!(
        ok("http://[fd00::5]:8000").unwrap().0,
        "[fd00::5]:8000".to_string()
    );
    for (bad, needle) in [
        ("https://10.20.0.5:8000", "already encrypts"),
        ("10.20.0.5:8000", "must start with http://"),
        ("http://model.corp:8000", "no DNS"),
        ("http://10.20.0.5", "no port"),
        ("http://10.20.0.5:0", "port 0"),
        ("http://10.20.0.5:99999", "IP:PORT"),
        ("http://fd00::5:8000", "brackets"),
        ("http://u:p@10.20.0.5:8000", "user:password"),
        ("http://10.20.0.5:8000/v1?x=1", "query"),
        ("http://10.20.0.5:8000/a//b", "segment"),
        ("http://10.20.0.5:8000/../v1", "segment"),
    ] {
        let (problem, fix) = parse_upstream_url(bad).unwrap_err();
        assert!(problem.contains(needle), "{bad}: {problem}");
        assert!(!fix.is_empty());
    }
}

#[test]
fn model_routes() {
    let r = parse_model_route("gpt-4o=Qwen/Qwen2.5-Coder-32B").unwrap();
    assert_eq!(
        (r.public.as_str(), r.upstream.as_str()),
        ("gpt-4o", "Qwen/Qwen2.5-Coder-32B")
    );
    let r = parse_model_route("Qwen/Qwen2.5-Coder-32B").unwrap();
    assert_eq!(r.public, r.upstream);
    for bad in ["", "=x", "coder=", "a b", "a,b=c", "coder=x y"] {
        assert!(parse_model_route(bad).is_err(), "{bad}");
    }
}

#[test]
fn upstreams_validate_and_route() {
    let c = parse(&with(
        r#"
[[upstream]]
name = "vllm"
url = "http://10.20.0.5:8000"
models = ["coder=Qwen/Qwen2.5-Coder", "Qwen/Qwen2.5-7B"]
max_concurrent = 8

# A model server on the corp WireGuard host itself, at its tunnel address.
[[upstream]]
name = "on-peer"
url = "http://10.99.0.2:8080/api/v1"
"#,
    ))
    .unwrap();
    assert_eq!(c.upstreams.len(), 2);
    let v = c.upstream("vllm").unwrap();
    assert_eq!(v.base_path, "/v1");
    assert_eq!(v.max_concurrent, Some(8));
    assert!(!v.discovers_models());
    let p = c.upstream("on-peer").unwrap();
    assert!(p.discovers_models());
    assert_eq!(p.url(), "http://10.99.0.2:8080/api/v1");
    let (u, r) = c.upstream_for_model("coder").unwrap();
    assert_eq!(
        (u.name.as_str(), r.upstream.as_str()),
        ("vllm", "Qwen/Qwen2.5-Coder")
    );
    assert_eq!(
        c.upstream_for_model("Qwen/Qwen2.5-7B").unwrap().0.name,
        "vllm"
    );
    assert!(c.upstream_for_model("Coder").is_none());
    assert!(c.upstream_for_model("gpt-4o").is_none());
}

#[test]
fn upstream_outside_every_peer_is_refused_no_open_proxy() {
    let errs = errors(&with(
        r#"
[[upstream]]
name = "public"
url = "http://1.1.1.1:80"

[[upstream]]
name = "self"
url = "http://10.99.0.1:8000"

[[upstream]]
name = "tunnel"
url = "http://10.99.0.9:8000"

[[upstream]]
name = "loop"
url = "http://127.0.0.1:8000"
"#,
    ));
    assert_errors(
        &errs,
        &[
            ("upstream \"public\".url", "1.1.1.1 is not inside any peer's allowed networks (peers route corp: 10.99.0.2/32, corp: 10.20.0.0/24"),
            ("upstream \"public\".url", "--allowed-ips 1.1.1.1/32"),
            ("upstream \"self\".url", "appliance's own tunnel address"),
            ("upstream \"tunnel\".url", "not inside any peer"),
            ("upstream \"loop\".url", "loopback"),
        ],
    );

    // Without peers nothing is reachable.
    let no_peers = "[wireguard]\npublic_endpoint = \"gw.example.com:51820\"\naddress = \"10.99.0.1/24\"\n\n[[upstream]]\nname = \"x\"\nurl = \"http://10.20.0.5:8000\"\n";
    assert_errors(
        &errors(no_peers),
        &[("upstream \"x\".url", "there are no peers")],
    );
}

#[test]
fn upstream_conflicts_and_bad_fields_are_all_reported() {
    let errs = errors(&with(
        r#"
[[upstream]]
name = "a"
url = "http://10.20.0.5:8000"
models = ["coder=x", "coder=y"]

[[upstream]]
name = "a"
url = "http://10.20.0.5:8000/v1"
models = ["coder"]

[[upstream]]
name = "Bad_Name"
url = "http://10.20.0.7:8000"
models = []
max_concurrent = 0
api_key_file = ""

[[upstream]]
url = "http://10.20.0.8:8000"
"#,
    ));
    assert_errors(
        &errs,
        &[
            ("upstream \"a\".models", "listed twice"),
            ("upstream \"a\".name", "also used by upstream #1"),
            (
                "upstream \"a\".models",
                "already routed by upstream \"a\" at the same URL (http://10.20.0.5:8000/v1)",
            ),
            ("upstream #3.name", "1-32 characters"),
            ("upstream #3.models", "remove the key to discover"),
            ("upstream #3.max_concurrent", "1..=100000"),
            ("upstream #3.api_key_file", "is empty"),
            ("upstream #4.name", "needs a name"),
        ],
    );
    for e in &errs {
        assert!(e.to_string().contains("; fix: "), "{e}");
    }
}

#[test]
fn api_key_file_is_resolved_against_the_config_folder_and_must_be_0600() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("modelgate.toml");
    let text = with("[[upstream]]\nname = \"vllm\"\nurl = \"http://10.20.0.5:8000\"\napi_key_file = \"vllm.key\"\n");
    let key = dir.path().join("vllm.key");

    let e = Config::from_toml_str(&text, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("upstream \"vllm\".api_key_file: \"vllm.key\""),
        "{e}"
    );
    assert!(e.contains("chmod 600"), "{e}");

    std::fs::write(&key, "  sk-local-123\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Config::from_toml_str(&text, &cfg).unwrap_err().to_string();
    assert!(e.contains("mode 0644"), "{e}");
    assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
    assert!(
        !e.contains("sk-local"),
        "the key never appears in errors: {e}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Config::from_toml_str(&text, &cfg).unwrap();
    assert_eq!(c.upstreams[0].api_key_file.as_deref(), Some(key.as_path()));
    assert_eq!(read_api_key_file(&key).unwrap(), "sk-local-123");

    std::fs::write(&key, "two words\n").unwrap();
    let e = read_api_key_file(&key).unwrap_err();
    assert!(
        e.contains("more than one token") && !e.contains("words"),
        "{e}"
    );
    std::fs::write(&key, "\n").unwrap();
    assert!(read_api_key_file(&key).unwrap_err().contains("is empty"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(read_api_key_file(&key).unwrap_err().contains("chmod 600"));
}

#[test]
fn upstream_edits_keep_comments() {
    let text = format!("# header\n{GOOD}\n# my model box\n[[upstream]]\nname = \"old\"\nurl = \"http://10.20.0.9:8000\" # keep me\n");
    let added = add_upstream(
        &text,
        &NewUpstream {
            name: "vllm".into(),
            url: "http://10.20.0.5:8000".into(),
            api_key_file: None,
            models: vec!["coder=Qwen/Qwen2.5-Coder".into()],
            max_concurrent: Some(4),
        },
        "added by test",
    )
    .unwrap();
    assert!(added.starts_with(&text), "{added}");
    assert!(
        added.ends_with("\n# added by test\n[[upstream]]\nname = \"vllm\"\nurl = \"http://10.20.0.5:8000\"\nmodels = [\"coder=Qwen/Qwen2.5-Coder\"]\nmax_concurrent = 4\n"),
        "{added}"
    );
    assert_eq!(parse(&added).unwrap().upstreams.len(), 2);

    let removed = remove_upstream(&added, "old").unwrap();
    assert!(removed.contains("# header") && removed.contains("# added by test"));
    assert!(!removed.contains("my model box") && !removed.contains("keep me"));
    let gone = remove_upstream(&removed, "vllm").unwrap();
    assert!(!gone.contains("[[upstream]]"));
    assert!(matches!(
        remove_upstream(&gone, "vllm"),
        Err(EditError::NoSuchUpstream(_))
    ));
    assert!(matches!(
        add_upstream(
            "upstream = 1\n",
            &NewUpstream {
                name: "x".into(),
                url: "http://10.20.0.5:1".into(),
                api_key_file: None,
                models: vec![],
                max_concurrent: None
            },
            "c"
        ),
        Err(EditError::UpstreamNotTables)
    ));
}

/// Several upstreams may route one public model (its replicas, even behind different peers),
/// each with its own id there; `[[model]]` sets how they are balanced.
#[test]
fn replicas_of_one_model_and_their_balance_are_accepted() {
    let c = parse(&with(
        r#"
[[peer]]
name = "site2"
public_key = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="
tunnel_address = "10.99.0.3"
allowed_ips = ["10.30.0.0/24"]

[[upstream]]
name = "a"
url = "http://10.20.0.5:8000"
models = ["coder=Qwen/Coder"]
max_concurrent = 4

[[upstream]]
name = "b"
url = "http://10.30.0.5:8000"
models = ["coder=Qwen/Coder-AWQ", "small"]

[[model]]
name = "coder"
balance = "affinity"

[[model]]
name = "small"
"#,
    ))
    .unwrap();
    let replicas: Vec<(&str, &str)> = c
        .upstreams_for_model("coder")
        .map(|(u, r)| (u.name.as_str(), r.upstream.as_str()))
        .collect();
    assert_eq!(replicas, [("a", "Qwen/Coder"), ("b", "Qwen/Coder-AWQ")]);
    assert_eq!(c.upstream_for_model("coder").unwrap().0.name, "a");
    assert_eq!(c.model("coder").unwrap().balance, Balance::Affinity);
    assert_eq!(c.model("small").unwrap().balance, Balance::LeastLoaded);
    assert!(c.model("other").is_none());
}

#[test]
fn bad_model_tables_are_all_reported() {
    let errs = errors(&with(
        r#"
[[model]]
name = "coder"
balance = "round_robin"

[[model]]
name = "coder"

[[model]]
name = "bad name"

[[model]]
balance = "affinity"
"#,
    ));
    assert_errors(
        &errs,
        &[
            (
                "model \"coder\".balance",
                "\"round_robin\": is not a balancing rule (one of \"least_loaded\", \"affinity\")",
            ),
            (
                "model \"coder\".balance",
                "write balance = \"least_loaded\"",
            ),
            ("model \"coder\".name", "also used by model #1"),
            ("model #3.name", "without spaces, commas or '='"),
            ("model #4.name", "every model needs a name"),
        ],
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    for e in &errs {
        assert!(e.to_string().contains("; fix: "), "{e}");
    }
    // An unknown key in the table is refused too (a misspelt setting is not applied silently).
    let e = parse(&with(
        "[[model]]\nname = \"coder\"\nbalanse = \"affinity\"\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("balanse"), "{e}");
}
