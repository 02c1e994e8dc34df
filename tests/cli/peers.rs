//! `modelgate init` and `peer …` on temporary directories: the operator workflow
//! (init → peer add → list → config → remove), exit codes 1/2/64 and file modes. (That the
//! printed wg-quick file works on a real wireguard-go is a lab test: it needs root.)

use std::fs;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::env::{code, mode, stderr, stdout, Env};

/// The lines of a wg-quick file that are settings (comments carry a timestamp).
fn settings(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn operator_workflow_init_add_list_config_remove() {
    let env = Env::new();
    let out = env.init("gw.example.com:51820");
    let init: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let appliance_pub = init["public_key"].as_str().unwrap().to_string();
    assert_eq!(init["endpoint"], "gw.example.com:51820");
    assert!(init["config"]
        .as_str()
        .unwrap()
        .ends_with("etc/modelgate.toml"));
    assert_eq!(mode(&env.state()), 0o700);
    assert_eq!(mode(&env.state().join("wg.key")), 0o600);

    // An operator comment must survive every CLI edit.
    let mut text = fs::read_to_string(env.config()).unwrap();
    text.push_str("\n# operator note: ticket OPS-42\n");
    fs::write(env.config(), &text).unwrap();

    let add = env.mg(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24,10.21.0.9/16",
    ]);
    assert_eq!(code(&add), 0, "{}", stderr(&add));
    let file = stdout(&add);
    assert!(
        file.contains("[Interface]\nAddress = 10.99.0.2/32\nPrivateKey = "),
        "{file}"
    );
    assert!(file.contains(&format!("PublicKey = {appliance_pub}\nEndpoint = gw.example.com:51820\nAllowedIPs = 10.99.0.1/32\nPersistentKeepalive = 25\n")));
    assert!(file.contains("PostUp = sysctl -q -w net.ipv4.ip_forward=1; nft '"));
    assert!(file.contains("PostDown = nft delete table ip mg_%i\n"));
    assert_eq!(mode(&env.state().join("peers/corp.key")), 0o600);
    assert_eq!(mode(&env.state().join("peers")), 0o700);

    let add2 = env.mg(&[
        "peer",
        "add",
        "lab",
        "--allowed-ips",
        "10.30.0.0/24",
        "--keepalive",
        "10",
        "--json",
    ]);
    assert_eq!(code(&add2), 0, "{}", stderr(&add2));
    let v: Value = serde_json::from_str(&stdout(&add2)).unwrap();
    assert_eq!(v["tunnel_address"], "10.99.0.3");
    assert!(v["wg_quick"]
        .as_str()
        .unwrap()
        .contains("PersistentKeepalive = 10\n"));

    let list = env.mg(&["peer", "list", "--json"]);
    assert_eq!(code(&list), 0);
    let peers: Value = serde_json::from_str(&stdout(&list)).unwrap();
    let peers = peers.as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0]["name"], "corp");
    assert_eq!(
        peers[0]["allowed_ips"],
        serde_json::json!(["10.99.0.2/32", "10.20.0.0/24", "10.21.0.0/16"])
    );
    assert_eq!(peers[0]["private_key_stored"], true);
    let table = stdout(&env.mg(&["peer", "list"]));
    assert!(
        table.starts_with("NAME") && table.contains("lab"),
        "{table}"
    );

    // `peer config` reprints the same file (only the timestamp comment differs).
    let again = env.mg(&["peer", "config", "corp"]);
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(settings(&stdout(&again)), settings(&file));

    let show = env.mg(&["peer", "show", "lab", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(v["keepalive"], 10);

    // Removal needs --yes when stdin is not a terminal.
    env.fails(&["peer", "remove", "corp"], 2, &["--yes"]);
    let rm = env.mg(&["peer", "remove", "corp", "--yes"]);
    assert_eq!(code(&rm), 0, "{}", stderr(&rm));
    assert!(!env.state().join("peers/corp.key").exists());
    let peers: Value = serde_json::from_str(&stdout(&env.mg(&["peer", "list", "--json"]))).unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 1);
    let text = fs::read_to_string(env.config()).unwrap();
    assert!(text.contains("# operator note: ticket OPS-42"));
    assert!(text.contains("# Keys and state live here"));

    // The freed address is handed out again (lowest free first).
    let add3 = env.mg(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&add3)).unwrap();
    assert_eq!(v["tunnel_address"], "10.99.0.2");

    env.fails(&["peer", "config", "nope"], 1, &["peer list"]);
}

#[test]
fn init_refuses_to_overwrite_without_force_and_keeps_the_key() {
    let env = Env::initialised("203.0.113.1:51820");
    let key = fs::read(env.state().join("wg.key")).unwrap();
    let state = env.state();
    let again = env.mg(&[
        "init",
        "--public-endpoint",
        "203.0.113.1:51820",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code(&again), 1);
    let err = stderr(&again);
    assert!(
        err.contains("--force") && err.contains("modelgate.toml"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let forced = env.mg(&[
        "init",
        "--public-endpoint",
        "203.0.113.9:51820",
        "--state-dir",
        state.to_str().unwrap(),
        "--force",
        "--acme-domain",
        "gw.example.com",
        "--acme-email",
        "ops@example.com",
    ]);
    assert_eq!(code(&forced), 0, "{}", stderr(&forced));
    assert_eq!(fs::read(env.state().join("wg.key")).unwrap(), key);
    let text = fs::read_to_string(env.config()).unwrap();
    assert!(text.contains("mode = \"acme\"") && text.contains("203.0.113.9:51820"));
}

#[test]
fn bad_flag_values_exit_2_naming_flag_and_fix() {
    let env = Env::new();
    let state = env.state();
    let s = state.to_str().unwrap();
    for (args, flag) in [
        (
            vec![
                "init",
                "--public-endpoint",
                "gw.example.com",
                "--state-dir",
                s,
            ],
            "--public-endpoint",
        ),
        (
            vec![
                "init",
                "--public-endpoint",
                "gw.example.com:0",
                "--state-dir",
                s,
            ],
            "--public-endpoint",
        ),
        (
            vec![
                "init",
                "--public-endpoint",
                "gw:1",
                "--tunnel-address",
                "10.99.0.0/24",
                "--state-dir",
                s,
            ],
            "--tunnel-address",
        ),
        (
            vec![
                "init",
                "--public-endpoint",
                "gw:1",
                "--listen",
                "localhost:443",
                "--state-dir",
                s,
            ],
            "--listen",
        ),
        (
            vec![
                "init",
                "--public-endpoint",
                "gw:1",
                "--tls-cert",
                "c.pem",
                "--state-dir",
                s,
            ],
            "--tls-key",
        ),
        (
            vec![
                "init",
                "--public-endpoint",
                "gw:1",
                "--self-signed",
                "a",
                "--acme-domain",
                "b",
                "--state-dir",
                s,
            ],
            "--acme-domain",
        ),
        (vec!["init"], "--public-endpoint"),
    ] {
        env.fails(&args, 2, &[flag]);
    }
    assert!(
        !env.config().exists(),
        "nothing may be written on a usage error"
    );

    env.init("gw.example.com:51820");
    for (args, needle) in [
        (
            vec!["peer", "add", "Corp", "--allowed-ips", "10.20.0.0/24"],
            "<NAME>",
        ),
        (
            vec!["peer", "add", "corp", "--allowed-ips", "10.20.0.0/33"],
            "--allowed-ips",
        ),
        (
            vec![
                "peer",
                "add",
                "corp",
                "--allowed-ips",
                "10.20.0.0/24",
                "--public-key",
                "abc",
            ],
            "--public-key",
        ),
        (
            vec![
                "peer",
                "add",
                "corp",
                "--allowed-ips",
                "10.20.0.0/24",
                "--keepalive",
                "0",
            ],
            "--keepalive",
        ),
        (vec!["peer", "add", "corp"], "--allowed-ips"),
        (
            vec!["peer", "add", "corp", "--allowed-ips", "10.99.0.0/16"],
            "overlaps the tunnel network",
        ),
        (vec!["run", "--forward", "127.0.0.1:80"], "--forward"),
    ] {
        let err = env.fails(&args, 2, &[needle]);
        assert!(
            err.contains("fix") || err.contains("Usage"),
            "{args:?}: {err}"
        );
    }
    // Overlap with another peer's networks is refused and nothing is written.
    assert_eq!(
        code(&env.mg(&["peer", "add", "a", "--allowed-ips", "10.20.0.0/16"])),
        0
    );
    let before = fs::read_to_string(env.config()).unwrap();
    env.fails(
        &["peer", "add", "b", "--allowed-ips", "10.20.7.0/24"],
        2,
        &["overlaps 10.20.0.0/16 of peer \"a\""],
    );
    assert_eq!(fs::read_to_string(env.config()).unwrap(), before);
    assert!(!env.state().join("peers/b.key").exists());
    // A duplicate name is a conflict with existing state: exit 1.
    env.fails(
        &["peer", "add", "a", "--allowed-ips", "10.40.0.0/24"],
        1,
        &[],
    );
}

#[test]
fn invalid_config_exits_64_with_every_error() {
    let env = Env::new();
    fs::create_dir_all(env.config().parent().unwrap()).unwrap();
    fs::write(
        env.config(),
        "[server]\nlisten = \"0.0.0.0\"\n[wireguard]\npublic_endpoint = \"gw.example.com\"\naddress = \"10.99.0.1/24\"\nmtu = 100\n",
    )
    .unwrap();
    for args in [
        vec!["peer", "list"],
        vec!["run"],
        vec!["peer", "add", "x", "--allowed-ips", "10.1.0.0/24"],
    ] {
        env.fails(
            &args,
            64,
            &[
                "server.listen",
                "wireguard.public_endpoint",
                "wireguard.mtu",
            ],
        );
    }
    fs::write(env.config(), "[wireguard]\nmut = 1\n").unwrap();
    env.fails(&["peer", "list"], 64, &["line 2"]);

    Env::new().fails(&["run"], 1, &["modelgate init"]);
}

#[test]
fn peer_with_own_public_key_stores_no_private_key() {
    let env = Env::initialised("gw.example.com:51820");
    let key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    let out = env.mg(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--public-key",
        key,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stdout(&out).contains("\nPrivateKey ="));
    assert!(!env.state().join("peers/corp.key").exists());
    let v: Value =
        serde_json::from_str(&stdout(&env.mg(&["peer", "show", "corp", "--json"]))).unwrap();
    assert_eq!(v["public_key"], key);
    assert_eq!(v["private_key_stored"], false);
    // The appliance's own key is refused.
    let own = fs::read_to_string(env.state().join("wg.key")).unwrap();
    let own_pub: modelgate::wgkey::PrivateKey = own.trim().parse().unwrap();
    env.fails(
        &[
            "peer",
            "add",
            "x",
            "--allowed-ips",
            "10.30.0.0/24",
            "--public-key",
            &own_pub.public_key().to_base64(),
        ],
        2,
        &[],
    );
}

#[test]
fn concurrent_peer_adds_lose_nothing() {
    let env = Env::initialised("gw.example.com:51820");
    let children: Vec<Child> = (0..6)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_modelgate"))
                .args([
                    "peer",
                    "add",
                    &format!("site-{i}"),
                    "--allowed-ips",
                    &format!("10.{}.0.0/24", 40 + i),
                ])
                .env("MODELGATE_CONFIG", env.config())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let peers: Value = serde_json::from_str(&stdout(&env.mg(&["peer", "list", "--json"]))).unwrap();
    let mut addrs: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["tunnel_address"].as_str().unwrap())
        .collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 6, "{peers}");
}

/// One corp router for two appliances: each appliance (its own tunnel network) prints a
/// complete wg-quick file for its own corp interface (`--interface`); both files pass
/// `wg-quick strip`, their addresses and keys differ, and their PostUp rules live in a table
/// per interface (`mg_%i`), so bringing up the second does not replace the first's rules.
#[test]
fn one_corp_router_two_appliances_one_interface_each() {
    let a = Env::new();
    a.init("a.example.com:51820");
    let b = Env::new();
    let state = b.state();
    let out = b.mg(&[
        "init",
        "--public-endpoint",
        "b.example.com:51820",
        "--tunnel-address",
        "10.98.0.1/24",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let fa = a.ok(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--interface",
        "modelgate-a",
    ]);
    let fb = b.ok(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--interface",
        "modelgate-b",
    ]);
    assert!(
        fa.contains("/etc/wireguard/modelgate-a.conf") && fa.contains("wg-quick up modelgate-a")
    );
    assert!(
        fb.contains("/etc/wireguard/modelgate-b.conf") && fb.contains("wg-quick up modelgate-b")
    );
    // `peer config` reprints it for the same interface.
    assert_eq!(
        settings(&b.ok(&["peer", "config", "corp", "--interface", "modelgate-b"])),
        settings(&fb)
    );
    let line = |f: &str, k: &str| {
        f.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("no {k} in {f}"))
            .to_string()
    };
    assert_eq!(line(&fa, "Address"), "Address = 10.99.0.2/32");
    assert_eq!(line(&fb, "Address"), "Address = 10.98.0.2/32");
    assert_ne!(line(&fa, "PrivateKey"), line(&fb, "PrivateKey"));
    assert!(line(&fa, "PostUp").contains("ip saddr 10.99.0.1 masquerade"));
    assert!(line(&fb, "PostUp").contains("ip saddr 10.98.0.1 masquerade"));
    for f in [&fa, &fb] {
        assert!(
            line(f, "PostUp").contains("mg_%i"),
            "PostUp table is not per interface"
        );
    }
    // Bad interface names are refused naming the fix.
    let bad = a.mg(&["peer", "config", "corp", "--interface", "has space"]);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("fix:"));
    // wg-quick itself takes both files (it needs the file named after the interface).
    if Command::new("wg-quick").arg("-h").output().is_err() {
        crate::skip::missing(
            "one_corp_router_two_appliances_one_interface_each (wg-quick part)",
            "wg-quick not found; fix: apt-get install wireguard-tools",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("modelgate-a", &fa), ("modelgate-b", &fb)] {
        let p = dir.path().join(format!("{name}.conf"));
        fs::write(&p, text).unwrap();
        let o = Command::new("wg-quick")
            .arg("strip")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "wg-quick strip {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stripped = String::from_utf8_lossy(&o.stdout);
        assert!(
            stripped.contains("[Peer]") && stripped.contains("PrivateKey"),
            "{stripped}"
        );
    }
}
