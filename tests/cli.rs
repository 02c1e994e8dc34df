//! End-to-end tests of the `modelgate` binary on temporary directories: the operator workflow
//! (init → peer add → list → config → remove), exit codes 1/2/64, file modes, and (as root) that
//! the printed wg-quick file is accepted by `wg-quick strip` + `wg setconf` on a real
//! wireguard-go interface and that its PostUp/PostDown nftables commands run, in a throwaway
//! network namespace.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/cli_env.rs"]
mod cli_env;
use cli_env::{code, mode, stderr, stdout, Env};

use serde_json::Value;

impl Env {
    fn init(&self, endpoint: &str) -> Output {
        let state = self.state();
        let out = self.mg(&[
            "init",
            "--public-endpoint",
            endpoint,
            "--state-dir",
            state.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        out
    }
}

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
    let no = env.mg(&["peer", "remove", "corp"]);
    assert_eq!(code(&no), 2, "{}", stderr(&no));
    assert!(stderr(&no).contains("--yes"));
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

    let missing = env.mg(&["peer", "config", "nope"]);
    assert_eq!(code(&missing), 1);
    assert!(stderr(&missing).contains("peer list"));
}

#[test]
fn init_refuses_to_overwrite_without_force_and_keeps_the_key() {
    let env = Env::new();
    env.init("203.0.113.1:51820");
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
        let out = env.mg(&args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{args:?}: {}", stderr(&out));
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
        let out = env.mg(&args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
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
    let out = env.mg(&["peer", "add", "b", "--allowed-ips", "10.20.7.0/24"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("overlaps 10.20.0.0/16 of peer \"a\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(env.config()).unwrap(), before);
    assert!(!env.state().join("peers/b.key").exists());
    // A duplicate name is a conflict with existing state: exit 1.
    let dup = env.mg(&["peer", "add", "a", "--allowed-ips", "10.40.0.0/24"]);
    assert_eq!(code(&dup), 1, "{}", stderr(&dup));
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
        let out = env.mg(&args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        for key in [
            "server.listen",
            "wireguard.public_endpoint",
            "wireguard.mtu",
        ] {
            assert!(err.contains(key), "{args:?} missing {key}: {err}");
        }
    }
    fs::write(env.config(), "[wireguard]\nmut = 1\n").unwrap();
    let out = env.mg(&["peer", "list"]);
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));

    let gone = Env::new();
    let out = gone.mg(&["run"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("modelgate init"));
}

#[test]
fn peer_with_own_public_key_stores_no_private_key() {
    let env = Env::new();
    env.init("gw.example.com:51820");
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
    let out = env.mg(&[
        "peer",
        "add",
        "x",
        "--allowed-ips",
        "10.30.0.0/24",
        "--public-key",
        &own_pub.public_key().to_base64(),
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

// ---- root only: real WireGuard ------------------------------------------------------------

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Namespace + wireguard-go process, torn down by PID and name on drop (also on panic).
struct WgLab {
    ns: String,
    ifname: String,
    child: Option<Child>,
}

impl WgLab {
    fn sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "bash", "-c", script])
            .output()
            .unwrap()
    }
}

impl Drop for WgLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}

#[test]
fn printed_peer_file_works_with_wg_quick_strip_and_wireguard_go() {
    if !is_root() {
        println!("skipped: needs root (network namespaces, wireguard-go)");
        return;
    }
    for tool in ["wg", "wg-quick", "wireguard-go", "nft", "ip"] {
        if !have(tool) {
            println!("skipped: {tool} is not installed");
            return;
        }
    }
    let env = Env::new();
    // An IP endpoint: `wg setconf` resolves host names and a sandbox may have no DNS.
    env.init("203.0.113.1:51820");
    let out = env.mg(&[
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
        "--keepalive",
        "15",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed = stdout(&out);

    let tag = format!("{}", std::process::id() % 1_000_000);
    // wg-quick wants FILE to be named like an interface: [a-zA-Z0-9_=+.-]{1,15}.conf
    let file = env.dir.path().join(format!("mgc{tag}.conf"));
    fs::write(&file, &printed).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let strip = Command::new("wg-quick")
        .arg("strip")
        .arg(&file)
        .output()
        .unwrap();
    assert!(strip.status.success(), "wg-quick strip: {}", stderr(&strip));
    let stripped = env.dir.path().join("stripped.conf");
    fs::write(&stripped, &strip.stdout).unwrap();

    let ns = format!("mgt-cli-{tag}");
    let ifname = format!("mgt{tag}");
    let _ = fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let mut lab = WgLab {
        ns,
        ifname,
        child: None,
    };
    lab.child = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns,
                "env",
                "WG_PROCESS_FOREGROUND=1",
                "wireguard-go",
                "-f",
                &lab.ifname,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", lab.ifname));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let set = lab.sh(&format!("wg setconf {} {}", lab.ifname, stripped.display()));
    assert!(set.status.success(), "wg setconf: {}", stderr(&set));
    let show = lab.sh(&format!("wg show {} dump", lab.ifname));
    assert!(show.status.success(), "{}", stderr(&show));
    let dump = stdout(&show);
    let appliance = fs::read_to_string(env.state().join("wg.key")).unwrap();
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
            .unwrap()
            .replace("%i", &lab.ifname)
    };
    let up = lab.sh(&hook("PostUp"));
    assert!(up.status.success(), "PostUp: {}", stderr(&up));
    let up_again = lab.sh(&hook("PostUp"));
    assert!(
        up_again.status.success(),
        "PostUp twice: {}",
        stderr(&up_again)
    );
    let rules = lab.sh("nft -a list ruleset");
    let rules = stdout(&rules);
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
    let down = lab.sh(&hook("PostDown"));
    assert!(down.status.success(), "PostDown: {}", stderr(&down));
    assert!(!stdout(&lab.sh("nft list ruleset")).contains("mg_"));
    drop(lab);
}

#[test]
fn concurrent_peer_adds_lose_nothing() {
    let env = Env::new();
    env.init("gw.example.com:51820");
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
