use super::edit::{add_peer, remove_peer, NewPeer};
use super::*;
use ipnet::IpNet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const K1: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const K2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
const K3: &str = "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=";

const GOOD: &str = r#"
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

fn errors(text: &str) -> Vec<FieldError> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors.0,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

/// Whether some error is about `key` and mentions `needle` (in its value, problem or fix).
fn has(errs: &[FieldError], key: &str, needle: &str) -> bool {
    errs.iter()
        .any(|e| e.key == key && e.to_string().contains(needle))
}

/// Asserts an error for each `(key, needle)` of `want` (see [`has`]).
fn assert_errors(errs: &[FieldError], want: &[(&str, &str)]) {
    for (key, needle) in want {
        assert!(
            has(errs, key, needle),
            "no error for {key} mentioning {needle:?} in {errs:#?}"
        );
    }
}

#[test]
fn example_config_parses_and_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/modelgate.toml");
    let c = Config::load(&path).expect("config/modelgate.toml must be valid");
    assert_eq!(c.wireguard.address.to_string(), "10.99.0.1/24");
    assert_eq!(
        c.wireguard.private_key_file,
        Path::new("/var/lib/modelgate/wg.key")
    );
    assert_eq!(c.peers.len(), 1);
    assert_eq!(c.peers[0].keepalive, Some(25));
    assert!(matches!(c.tls, Some(TlsConfig::SelfSigned { .. })));
    // The example spells out every [gateway] default.
    assert_eq!(c.gateway, GatewayConfig::default());
    assert_eq!(c.upstreams.len(), 1);
    let u = &c.upstreams[0];
    assert_eq!(u.url(), "http://10.20.0.5:8000/v1");
    assert_eq!(u.api_key_file, None);
    let (up, route) = c.upstream_for_model("coder").unwrap();
    assert_eq!(up.name, "vllm");
    assert_eq!(route.upstream, "Qwen/Qwen2.5-Coder-32B-Instruct");
}

#[test]
fn good_config_defaults_and_normalisation() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(c.server.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
    assert_eq!(c.wireguard.listen.to_string(), DEFAULT_WG_LISTEN);
    assert_eq!(c.wireguard.mtu, 1420);
    assert!(c.tls.is_none());
    let p = &c.peers[0];
    // Own /32 first, then the networks behind it truncated; the explicit own /32 is not doubled.
    let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
    assert_eq!(ips, ["10.99.0.2/32", "10.20.0.0/24"]);
    assert_eq!(p.networks_behind().count(), 1);
}

#[test]
fn every_error_is_reported_at_once() {
    let text = r#"
[server]
listen = "0.0.0.0"
metrics_listen = "localhost:9464"

[tls]
mode = "files"
cert = "c.pem"
acme_domain = "x.example.com"

[wireguard]
public_endpoint = "gw.example.com:0"
address = "10.99.0.0/24"
mtu = 100

[[peer]]
name = "Corp"
public_key = "nope"
tunnel_address = "10.98.0.2"
allowed_ips = ["10.20.0.0/33", "10.99.0.0/16"]
keepalive = 0
endpoint = "peer.example.com:51820"
"#;
    let errs = errors(text);
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    for want in [
        "server.listen",
        "server.metrics_listen",
        "tls.acme_domain",
        "tls.key",
        "wireguard.public_endpoint",
        "wireguard.address",
        "wireguard.mtu",
        "peer #1.name",
        "peer #1.public_key",
        "peer #1.allowed_ips",
        "peer #1.keepalive",
        "peer #1.endpoint",
    ] {
        assert!(
            keys.contains(&want),
            "missing error for {want}; got {keys:?}"
        );
    }
    // Every line names key, value, problem and fix.
    for e in &errs {
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("; fix: "), "{line}");
    }
    let mtu = errs.iter().find(|e| e.key == "wireguard.mtu").unwrap();
    assert_eq!(mtu.value, "100");
}

#[test]
fn peers_conflicts_are_reported() {
    let text = format!(
        r#"
[wireguard]
public_endpoint = "[2001:db8::1]:51820"
address = "10.99.0.1/24"

[[peer]]
name = "a"
public_key = "{K1}"
tunnel_address = "10.99.0.2"
allowed_ips = ["10.20.0.0/16"]

[[peer]]
name = "a"
public_key = "{K1}"
tunnel_address = "10.99.0.2"
allowed_ips = ["10.20.5.0/24"]

[[peer]]
name = "c"
public_key = "{K3}"
tunnel_address = "10.99.0.1"
allowed_ips = ["0.0.0.0/0"]

[[peer]]
name = "d"
public_key = "{K2}"
tunnel_address = "10.99.0.255"
"#
    );
    assert_errors(
        &errors(&text),
        &[
            ("peer \"a\".name", "also used by peer #1"),
            ("peer \"a\".public_key", "also used by peer #1"),
            ("peer \"a\".tunnel_address", "also used by peer #1"),
            (
                "peer \"a\".allowed_ips",
                "overlaps 10.20.0.0/16 of peer \"a\"",
            ),
            ("peer \"c\".tunnel_address", "appliance's own"),
            ("peer \"c\".allowed_ips", "overlaps the tunnel network"),
            ("peer \"d\".tunnel_address", "broadcast"),
        ],
    );
}

#[test]
fn peer_with_appliance_key_is_rejected() {
    let own: PublicKey = K1.parse().unwrap();
    let raw: raw::RawConfig = toml_edit::de::from_str(GOOD).unwrap();
    let errs = validate(raw, Path::new("x.toml"), Some(&own), &|_| Ok(())).unwrap_err();
    assert!(
        errs.0[0].problem.contains("appliance's own public key"),
        "{errs}"
    );
}

#[test]
fn syntax_and_unknown_keys_are_parse_errors_with_line() {
    let e = parse("[wireguard]\nmut = 1420\n").unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, ConfigError::Parse { .. }));
    assert!(s.contains("line 2") && s.contains("mut"), "{s}");
    let e = parse("[wireguard\n").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
}

#[test]
fn missing_file_is_a_read_error() {
    let e = Config::load(Path::new("/nonexistent/modelgate.toml")).unwrap_err();
    assert!(e.is_read_error());
    assert!(e.to_string().contains("modelgate init"));
}

#[test]
fn endpoints_and_names() {
    assert_eq!(
        parse_endpoint("gw.example.com:51820").unwrap(),
        ("gw.example.com".into(), 51820)
    );
    assert_eq!(parse_endpoint("[2001:db8::1]:1").unwrap().0, "2001:db8::1");
    assert_eq!(parse_endpoint("203.0.113.7:65535").unwrap().1, 65535);
    for bad in [
        "gw.example.com",
        "gw.example.com:0",
        "gw:65536",
        "2001:db8::1:51820",
        "-x.com:1",
        ":1",
        "a b:1",
    ] {
        assert!(parse_endpoint(bad).is_err(), "{bad}");
    }
    assert!(check_peer_name("corp-2").is_ok());
    assert!(check_peer_name("0").is_ok());
    for bad in ["", "-a", "Corp", "a_b", "a/b", &"a".repeat(33)] {
        assert!(check_peer_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn allocation_skips_reserved_and_used() {
    let net: IpNet = "10.99.0.1/24".parse().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(allocate_tunnel_address(&net, []), Some(ip("10.99.0.2")));
    assert_eq!(
        allocate_tunnel_address(&net, [ip("10.99.0.2"), ip("10.99.0.4")]),
        Some(ip("10.99.0.3"))
    );
    // Appliance in the middle of the range is skipped too.
    let mid: IpNet = "10.99.0.3/29".parse().unwrap();
    let used = [ip("10.99.0.1"), ip("10.99.0.2")];
    assert_eq!(allocate_tunnel_address(&mid, used), Some(ip("10.99.0.4")));
    // A /30 has two hosts: the appliance and one peer; then it is full (no broadcast handed out).
    let small: IpNet = "10.99.0.1/30".parse().unwrap();
    assert_eq!(allocate_tunnel_address(&small, []), Some(ip("10.99.0.2")));
    assert_eq!(allocate_tunnel_address(&small, [ip("10.99.0.2")]), None);
    let v6: IpNet = "fd00:99::1/64".parse().unwrap();
    assert_eq!(allocate_tunnel_address(&v6, []), Some(ip("fd00:99::2")));
}

#[test]
fn toml_edit_keeps_comments_and_formatting() {
    let text = "# operator's header comment\n[server]\nlisten   =   \"0.0.0.0:443\"   # odd spacing kept\n\n[wireguard]\npublic_endpoint = \"gw.example.com:51820\"\naddress = \"10.99.0.1/24\"\n\n# the first site\n[[peer]]\nname = \"corp\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\ntunnel_address = \"10.99.0.2\"\nallowed_ips = [\"10.20.0.0/24\"] # the model LAN\n";
    let added = add_peer(
        text,
        &NewPeer {
            name: "lab".into(),
            public_key: K2.into(),
            tunnel_address: "10.99.0.3".into(),
            allowed_ips: vec!["10.30.0.0/24".into()],
            keepalive: Some(15),
        },
        "added by test",
    )
    .unwrap();
    assert!(
        added.starts_with(text),
        "existing text must be kept verbatim:\n{added}"
    );
    assert!(
        added.contains("# added by test\n[[peer]]\nname = \"lab\""),
        "{added}"
    );
    let c = parse(&added).unwrap();
    assert_eq!(c.peers.len(), 2);
    assert_eq!(c.peers[1].keepalive, Some(15));

    let removed = remove_peer(&added, "corp").unwrap();
    assert!(removed.contains("# operator's header comment"));
    assert!(removed.contains("# odd spacing kept"));
    assert!(removed.contains("# added by test"));
    assert!(!removed.contains("the first site") && !removed.contains("model LAN"));
    assert_eq!(parse(&removed).unwrap().peers[0].name, "lab");

    let back = remove_peer(&removed, "lab").unwrap();
    assert!(!back.contains("[[peer]]"));
    assert!(parse(&back).unwrap().peers.is_empty());
    assert!(matches!(
        remove_peer(&back, "lab"),
        Err(edit::EditError::NoSuchPeer(_))
    ));
}

#[test]
fn initial_config_validates_and_roundtrips_odd_strings() {
    use super::edit::{render_initial, InitSettings, InitTls};
    let s = InitSettings {
        listen: DEFAULT_LISTEN.into(),
        state_dir: "/srv/mg \"state\"".into(),
        control_socket: DEFAULT_CONTROL_SOCKET.into(),
        metrics_listen: DEFAULT_METRICS_LISTEN.into(),
        tls: InitTls::Acme {
            domain: "gw.example.com".into(),
            email: Some("ops@example.com".into()),
            directory: None,
            ca_root: Some("ca.pem".into()),
        },
        wg_listen: DEFAULT_WG_LISTEN.into(),
        public_endpoint: "gw.example.com:51820".into(),
        tunnel_address: DEFAULT_TUNNEL_ADDRESS.into(),
        public_key: K1.into(),
        generated: "2025-01-01T00:00:00Z".into(),
    };
    let c = parse(&render_initial(&s)).unwrap();
    assert_eq!(c.server.state_dir, Path::new("/srv/mg \"state\""));
    assert_eq!(
        c.wireguard.private_key_file,
        Path::new("/srv/mg \"state\"/wg.key")
    );
    assert_eq!(
        c.tls,
        Some(TlsConfig::Acme {
            domain: "gw.example.com".into(),
            email: Some("ops@example.com".into()),
            directory: None,
            ca_root: Some(PathBuf::from("/etc/modelgate/ca.pem")),
        })
    );
}

#[test]
fn private_key_file_checks_mode_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wg.key");
    let wg = WireguardConfig {
        listen: DEFAULT_WG_LISTEN.parse().unwrap(),
        public_endpoint: "gw.example.com:51820".into(),
        address: DEFAULT_TUNNEL_ADDRESS.parse().unwrap(),
        private_key_file: file.clone(),
        mtu: DEFAULT_MTU,
    };
    let e = load_private_key(&wg).unwrap_err();
    assert!(e.contains("wg.key") && e.contains("fix:"), "{e}");

    let key = PrivateKey::generate();
    std::fs::write(&file, format!("{}\n", key.to_base64())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load_private_key(&wg).unwrap_err();
    assert!(e.contains(&format!("chmod 600 {}", file.display())), "{e}");
    assert!(!e.contains(&key.to_base64()));

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        load_private_key(&wg).unwrap().public_key(),
        key.public_key()
    );

    std::fs::write(&file, "not a key").unwrap();
    let e = load_private_key(&wg).unwrap_err();
    assert!(e.contains("wg genkey"), "{e}");
}

mod policies;
mod upstreams;

#[test]
fn compat_switches_default_on_and_each_turns_off() {
    assert_eq!(parse(GOOD).unwrap().gateway.compat, CompatConfig::default());
    let d = CompatConfig::default();
    assert!(d.responses_translation && d.empty_content && d.context_length_error);
    let c = parse(&format!(
        "{GOOD}\n[gateway]\ncompat_responses_translation = false\ncompat_context_length_error = false\n"
    ))
    .unwrap();
    assert_eq!(
        c.gateway.compat,
        CompatConfig {
            responses_translation: false,
            empty_content: true,
            context_length_error: false,
        }
    );
    let e = parse(&format!(
        "{GOOD}\n[gateway]\ncompat_empty_content = \"no\"\n"
    ))
    .unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("expected a boolean"), "{e}");
}
