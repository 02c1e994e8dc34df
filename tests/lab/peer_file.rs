//! The wg-quick file `peer add` prints, on a real wireguard-go interface in a namespace of its
//! own: `wg-quick strip` + `wg setconf` accept it and configure the appliance as the peer, and
//! its PostUp (twice: idempotent) and PostDown nftables commands run as wg-quick runs them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::netns::{unique_tag, Netns};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{self, bin, run_ok, text, wait_for};

/// Removes a file on drop: wireguard-go's control socket, should it be killed before it can.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn printed_peer_file_works_with_wg_quick_strip_and_wireguard_go() {
    let needs = Needs::tools(&["ip", "nft", "wg", "wg-quick", "wireguard-go"]);
    if check(
        "peer_file::printed_peer_file_works_with_wg_quick_strip_and_wireguard_go",
        needs,
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("mg-peerfile-")
        .tempdir()
        .unwrap();
    let cfg = dir.path().join("modelgate.toml");
    let state = dir.path().join("state");
    let mg = |args: &[&str]| {
        text(&run_ok(Command::new(bin()).arg("--config").arg(&cfg).args(args)).stdout)
    };
    // An IP endpoint: `wg setconf` resolves host names and a sandbox may have no DNS.
    mg(&[
        "init",
        "--public-endpoint",
        "203.0.113.1:51820",
        "--state-dir",
        state.to_str().unwrap(),
        "--control-socket",
        dir.path().join("control.sock").to_str().unwrap(),
    ]);
    let printed = mg(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--keepalive",
        "15",
    ]);

    let tag = unique_tag();
    let ifname = format!("mgpf{tag}");
    // wg-quick wants FILE to be named like an interface: [a-zA-Z0-9_=+.-]{1,15}.conf
    let file = dir.path().join(format!("{ifname}.conf"));
    fs::write(&file, &printed).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let strip = run_ok(Command::new("wg-quick").arg("strip").arg(&file));
    let stripped = dir.path().join("stripped.conf");
    fs::write(&stripped, &strip.stdout).unwrap();

    // Dropped in reverse: wireguard-go (by PID), its socket, then the namespace.
    let ns = Netns::new(format!("mgpf-{tag}"));
    let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
    let _ = fs::remove_file(&sock);
    let _sock = RemoveOnDrop(sock.clone());
    let _wg = proc::spawn(
        dir.path(),
        "wireguard-go",
        Some(&ns.name),
        &["wireguard-go", "-f", &ifname],
        &[("WG_PROCESS_FOREGROUND", "1")],
    );
    wait_for(
        &format!("wireguard-go creates {}", sock.display()),
        Duration::from_secs(10),
        || sock.exists(),
    );
    let sh = |script: &str| proc::exec(&ns.name, &["bash", "-c", script]);

    let set = sh(&format!("wg setconf {ifname} {}", stripped.display()));
    assert!(set.status.success(), "wg setconf: {}", text(&set.stderr));
    let show = sh(&format!("wg show {ifname} dump"));
    assert!(show.status.success(), "{}", text(&show.stderr));
    let dump = text(&show.stdout);
    let appliance = fs::read_to_string(state.join("wg.key")).unwrap();
    let appliance: modelgate::wgkey::PrivateKey = appliance.trim().parse().unwrap();
    let peer_line = dump.lines().nth(1).unwrap_or_default();
    let fields: Vec<&str> = peer_line.split('\t').collect();
    assert_eq!(
        fields.first().copied(),
        Some(appliance.public_key().to_base64().as_str()),
        "{dump}"
    );
    assert_eq!(fields.get(2).copied(), Some("203.0.113.1:51820"), "{dump}");
    assert_eq!(fields.get(3).copied(), Some("10.99.0.1/32"), "{dump}");
    assert_eq!(fields.last().copied(), Some("15"), "{dump}");

    // PostUp / PostDown exactly as wg-quick runs them: bash eval with %i replaced.
    let hook = |key: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in the peer file:\n{printed}"))
            .replace("%i", &ifname)
    };
    for round in ["PostUp", "PostUp twice"] {
        let up = sh(&hook("PostUp"));
        assert!(up.status.success(), "{round}: {}", text(&up.stderr));
    }
    let rules = text(&sh("nft -a list ruleset").stdout);
    assert!(rules.contains("ip saddr 10.99.0.1 masquerade"), "{rules}");
    assert!(
        rules.contains("tcp option maxseg size set rt mtu"),
        "{rules}"
    );
    assert_eq!(
        rules.matches("masquerade").count(),
        1,
        "PostUp must be idempotent: {rules}"
    );
    let down = sh(&hook("PostDown"));
    assert!(down.status.success(), "PostDown: {}", text(&down.stderr));
    assert!(!text(&sh("nft list ruleset").stdout).contains("mg_"));
}
