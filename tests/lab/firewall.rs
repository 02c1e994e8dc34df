//! `modelgate firewall` in network namespaces (root), and its errors without root or nft.
//!
//! Two namespaces joined by a veth pair, IPv4 and IPv6 (`harness::netns::Pair`):
//!
//! ```text
//! [probe] 192.0.2.2, 2001:db8:f::2 ── 192.0.2.1, 2001:db8:f::1 [appl]
//!                                         modelgate run: HTTPS tcp/443, WireGuard udp/51820,
//!                                         metrics tcp/9464 (bound to 0.0.0.0 on purpose)
//!                                         test listeners: tcp/22 (SSH stand-in), a random tcp
//!                                         port, a UDP echo on a random port (all dual-stack)
//!                                         a foreign table `inet foreign` + `ip legacy`
//! ```
//!
//! The prober runs this test binary again inside its namespace (`harness::helper`, std only):
//! TCP probes report open/refused/timeout, UDP probes wait for an echo, and the WireGuard port is
//! probed with a **real WireGuard handshake** against the running daemon: boringtun, with the
//! corp peer's private key from `modelgate peer add`, sends a handshake initiation and must get
//! a valid handshake response (so the port "answers" in the WireGuard sense; a datagram to a
//! dropped port gets nothing, and a plain UDP echo could not share the daemon's port).
//!
//! Every probe first runs before `apply`, to prove the probe itself works (each port answers
//! without the firewall), then after. Namespaces and processes are removed in `Drop`, processes
//! by PID.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::harness::helper;
use crate::harness::netns::{Pair, APPL_V4, APPL_V6, PROBE_V4, PROBE_V6};
use crate::harness::prereq::{check, is_root, Needs};
use crate::harness::proc::{self, bin, exec_ok, run_ok, text, wait_for, Proc};

const HTTPS_PORT: u16 = 443;
const WG_PORT: u16 = 51820;
const METRICS_PORT: u16 = 9464;

/// The firewall tests build their own two namespaces, not the lab.
const NEEDS: Needs = Needs::tools(&["ip", "nft", "curl"]);

impl Pair {
    /// `modelgate --config CFG ARGS` inside the appliance namespace, which must succeed.
    fn modelgate_ok(&self, cfg: &Path, args: &[&str]) -> String {
        let b = bin();
        let mut cmd = vec![b.to_str().unwrap(), "--config", cfg.to_str().unwrap()];
        cmd.extend_from_slice(args);
        exec_ok(&self.appl.name, &cmd)
    }

    /// One probe from the prober namespace: "open", "refused", "timeout", "reply" or
    /// "handshake".
    fn probe(&self, what: &str) -> String {
        let args: Vec<&str> = what.split_whitespace().collect();
        helper::run(&self.probe.name, &args).first().to_string()
    }

    fn spawn(&self, name: &str, cmd: &[&str], envs: &[(&str, &str)]) -> Proc {
        proc::spawn(self.dir.path(), name, Some(&self.appl.name), cmd, envs)
    }
}

/// Writes a config with `modelgate init` + `peer add corp`; returns (config path, corp peer's
/// private key, appliance public key).
fn init_appliance(pair: &Pair) -> (PathBuf, String, String) {
    let dir = pair.dir.path();
    let cfg = dir.join("modelgate.toml");
    run_ok(
        Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args([
                "init",
                "--public-endpoint",
                &format!("{APPL_V4}:{WG_PORT}"),
                "--wg-listen",
                &format!("0.0.0.0:{WG_PORT}"),
                "--listen",
                &format!("0.0.0.0:{HTTPS_PORT}"),
                "--metrics-listen",
                &format!("0.0.0.0:{METRICS_PORT}"),
                "--self-signed",
                "gw.test",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--control-socket")
            .arg(dir.join("control.sock")),
    );
    let out = run_ok(Command::new(bin()).arg("--config").arg(&cfg).args([
        "peer",
        "add",
        "corp",
        "--allowed-ips",
        "10.20.0.0/24",
    ]));
    let conf = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        conf.lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in the peer file:\n{conf}"))
    };
    (cfg, field("PrivateKey"), field("PublicKey"))
}

const FOREIGN: &str = "table inet foreign {\n\
    set blocked { type ipv4_addr; elements = { 203.0.113.66 } }\n\
    chain input { type filter hook input priority filter; policy accept; ip saddr @blocked drop; }\n\
}\n\
table ip legacy {\n    chain c {\n        counter\n    }\n}\n";

#[test]
fn firewall_lets_in_only_https_and_wireguard() {
    if check("firewall::firewall_lets_in_only_https_and_wireguard", NEEDS).is_none() {
        return;
    }
    let started = Instant::now();
    let pair = Pair::up();
    let (cfg, corp_private, appl_public) = init_appliance(&pair);

    // A table that belongs to someone else, present before and after.
    let foreign = pair.dir.path().join("foreign.nft");
    fs::write(&foreign, FOREIGN).unwrap();
    exec_ok(&pair.appl.name, &["nft", "-f", foreign.to_str().unwrap()]);
    let before = pair.appl.ruleset();
    assert!(before.contains("table inet foreign"), "{before}");

    let b = bin();
    let mut daemon = pair.spawn(
        "modelgate-run",
        &[
            b.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "run",
        ],
        &[("RUST_LOG", "info")],
    );
    let https = format!("{APPL_V4}:{HTTPS_PORT}");
    wait_for(
        "modelgate run accepts on 443",
        Duration::from_secs(15),
        || {
            assert!(
                daemon.is_running(),
                "modelgate run exited:\n{}",
                daemon.log()
            );
            pair.probe(&format!("probe-tcp {https} 500")) == "open"
        },
    );
    // Test listeners: SSH stand-in, a random TCP port, the metrics port unless the daemon
    // already serves it, and a UDP echo.
    let rnd_tcp = 20_000 + (std::process::id() % 20_000) as u16;
    let rnd_udp = rnd_tcp + 1;
    let mut listeners = helper::spawn(
        pair.dir.path(),
        "listeners",
        &pair.appl.name,
        &[
            "listen",
            "tcp:22",
            &format!("tcp:{METRICS_PORT}"),
            &format!("tcp:{rnd_tcp}"),
            &format!("udp:{rnd_udp}"),
        ],
    );
    wait_for("test listeners", Duration::from_secs(10), || {
        assert!(
            listeners.is_running(),
            "listeners exited:\n{}",
            listeners.log()
        );
        listeners.log().contains("HELPER ready")
    });

    let tcp = |addr: String| format!("probe-tcp {addr} 800");
    // Each probe and what it must see: without the firewall (every probe answers: the probes
    // work), after `apply` (only HTTPS and WireGuard), after `apply --ssh-from` the prober (SSH
    // too, on both families, nothing else).
    let table = [
        ("https", tcp(https.clone()), "open", "open", "open"),
        (
            "wireguard",
            format!("probe-wg {APPL_V4}:{WG_PORT} {corp_private} {appl_public} 2000"),
            "handshake",
            "handshake",
            "handshake",
        ),
        (
            "metrics",
            tcp(format!("{APPL_V4}:{METRICS_PORT}")),
            "open",
            "timeout",
            "timeout",
        ),
        (
            "random-tcp",
            tcp(format!("{APPL_V4}:{rnd_tcp}")),
            "open",
            "timeout",
            "timeout",
        ),
        (
            "random-udp",
            format!("probe-udp {APPL_V4}:{rnd_udp} 800"),
            "reply",
            "timeout",
            "timeout",
        ),
        (
            "ssh-v4",
            tcp(format!("{APPL_V4}:22")),
            "open",
            "timeout",
            "open",
        ),
        (
            "ssh-v6",
            tcp(format!("[{APPL_V6}]:22")),
            "open",
            "timeout",
            "open",
        ),
    ];
    #[derive(Clone, Copy)]
    enum When {
        Open,
        Applied,
        Ssh,
    }
    let expect = |when: When, what: &str| {
        let (got, want): (Vec<_>, Vec<_>) = table
            .iter()
            .map(|(name, cmd, open, applied, ssh)| {
                let want = match when {
                    When::Open => open,
                    When::Applied => applied,
                    When::Ssh => ssh,
                };
                ((*name, pair.probe(cmd)), (*name, want.to_string()))
            })
            .unzip();
        assert_eq!(got, want, "probes {what}");
    };

    expect(When::Open, "before apply");
    let curl = || {
        text(
            &proc::exec(
                &pair.probe.name,
                &[
                    "curl",
                    "-sk",
                    "--max-time",
                    "5",
                    &format!("https://{https}/healthz"),
                ],
            )
            .stdout,
        )
    };
    assert_eq!(curl().trim(), "ok");

    // apply: only HTTPS and WireGuard answer.
    let t = Instant::now();
    let out = pair.modelgate_ok(&cfg, &["firewall", "apply"]);
    let apply_ms = t.elapsed().as_millis();
    assert!(out.contains("created"), "{out}");
    expect(When::Applied, "after apply");
    assert_eq!(
        curl().trim(),
        "ok",
        "a real HTTPS request through the firewall"
    );
    let applied = pair.appl.ruleset();
    assert!(applied.contains("table inet modelgate"), "{applied}");
    assert!(
        applied.contains(before.trim_end()),
        "the foreign tables are untouched:\nbefore:\n{before}\nafter:\n{applied}"
    );

    // apply again: the same ruleset, still the same answers.
    let out = pair.modelgate_ok(&cfg, &["firewall", "apply"]);
    assert!(out.contains("replaced"), "{out}");
    assert_eq!(
        pair.appl.ruleset(),
        applied,
        "apply twice = the same ruleset"
    );

    // --ssh-from the prober's addresses.
    let ssh_v4 = format!("{PROBE_V4}/32");
    let ssh_v6 = format!("{PROBE_V6}/128");
    let out = pair.modelgate_ok(
        &cfg,
        &[
            "firewall",
            "apply",
            "--ssh-from",
            &ssh_v4,
            "--ssh-from",
            &ssh_v6,
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ssh_from"], serde_json::json!([ssh_v4, ssh_v6]));
    expect(When::Ssh, "with --ssh-from the prober");
    // Another network's SSH permission does not let the prober in.
    pair.modelgate_ok(
        &cfg,
        &["firewall", "apply", "--ssh-from", "198.51.100.0/24"],
    );
    assert_eq!(pair.probe(&tcp(format!("{APPL_V4}:22"))), "timeout");

    // remove: exactly the previous ruleset, every port answers again.
    let out = pair.modelgate_ok(&cfg, &["firewall", "remove"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(
        pair.appl.ruleset(),
        before,
        "remove restores the previous ruleset"
    );
    expect(When::Open, "after remove");
    let out = pair.modelgate_ok(&cfg, &["firewall", "remove"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(pair.appl.ruleset(), before);

    assert!(
        daemon.is_running(),
        "modelgate run exited:\n{}",
        daemon.log()
    );
    eprintln!(
        "netns_firewall: apply took {apply_ms} ms; whole test {} ms",
        started.elapsed().as_millis()
    );
}

/// `print` is valid nft input (`nft -c`), and loading it gives exactly what `apply` (the JSON
/// batch through the nftables crate) loads; `print --json` passes `nft -j -c`.
#[test]
fn print_is_what_apply_loads() {
    if check("firewall::print_is_what_apply_loads", NEEDS).is_none() {
        return;
    }
    let pair = Pair::up();
    let (cfg, _, _) = init_appliance(&pair);
    let args = [
        "--ssh-from",
        "203.0.113.0/24,2001:db8::/48",
        "--ssh-port",
        "2222",
    ];
    let text = run_ok(
        Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args(["firewall", "print"])
            .args(args),
    );
    let json = run_ok(
        Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args(["firewall", "print", "--json"])
            .args(args),
    );
    let text_file = pair.dir.path().join("print.nft");
    let json_file = pair.dir.path().join("print.json");
    fs::write(&text_file, &text.stdout).unwrap();
    fs::write(&json_file, &json.stdout).unwrap();
    // Check mode needs no namespace of its own, but the loads below do.
    exec_ok(
        &pair.probe.name,
        &["nft", "-c", "-f", text_file.to_str().unwrap()],
    );
    exec_ok(
        &pair.probe.name,
        &["nft", "-j", "-c", "-f", json_file.to_str().unwrap()],
    );
    exec_ok(
        &pair.probe.name,
        &["nft", "-f", text_file.to_str().unwrap()],
    );
    let mut cmd = vec!["firewall", "apply"];
    cmd.extend_from_slice(&args);
    pair.modelgate_ok(&cfg, &cmd);
    let from_text = pair.probe.ruleset();
    let from_apply = pair.appl.ruleset();
    assert_eq!(from_text, from_apply, "print and apply load the same table");
    assert!(from_apply.contains("tcp dport 2222 accept"), "{from_apply}");
    // Loading the printed file twice is idempotent too.
    exec_ok(
        &pair.probe.name,
        &["nft", "-f", text_file.to_str().unwrap()],
    );
    assert_eq!(pair.probe.ruleset(), from_text);
}

/// Without privileges or without nft, `apply`/`remove` fail with exit 1 and say what to do;
/// `print` needs neither.
#[test]
fn firewall_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("modelgate.toml");
    run_ok(
        Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args([
                "init",
                "--public-endpoint",
                "gw.example.com:51820",
                "--self-signed",
                "gw.test",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--control-socket")
            .arg(dir.path().join("c.sock")),
    );
    let run = |envs: &[(&str, &str)], unprivileged: bool, args: &[&str]| -> Output {
        let mut c = if unprivileged && is_root() {
            // Drop every capability the way a normal user has none (util-linux setpriv).
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(bin());
            c
        } else {
            Command::new(bin())
        };
        c.arg("--config").arg(&cfg).args(args);
        c.envs(envs.iter().copied()).output().unwrap()
    };
    // The config must be readable by `nobody` for the privilege case.
    for p in [dir.path(), cfg.as_path()] {
        run_ok(Command::new("chmod").arg("a+rX").arg(p));
    }

    let out = run(
        &[("MODELGATE_NFT", "/nonexistent/nft")],
        false,
        &["firewall", "apply"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install nftables"), "{err}");

    for verb in ["apply", "remove"] {
        let out = run(&[], true, &["firewall", verb]);
        let err = String::from_utf8_lossy(&out.stderr);
        if is_root() || !err.contains("not found") {
            assert_eq!(out.status.code(), Some(1), "{verb}: {err}");
            assert!(
                err.contains("needs root") && err.contains("sudo"),
                "{verb}: {err}"
            );
        }
    }
    let out = run(&[], true, &["firewall", "print"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(&[], false, &["firewall", "print", "--ssh-from", "office"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fix:"));
    // The systemd unit passes networks through the environment.
    let out = run(
        &[("MODELGATE_SSH_FROM", "198.51.100.0/24,2001:db8::/48")],
        false,
        &["firewall", "print"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ip saddr 198.51.100.0/24 tcp dport 22 accept"),
        "{text}"
    );
    assert!(
        text.contains("ip6 saddr 2001:db8::/48 tcp dport 22 accept"),
        "{text}"
    );
    // An empty variable (a firewall.env that opens no SSH) is no network, not an error.
    let out = run(&[("MODELGATE_SSH_FROM", "")], false, &["firewall", "print"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("dport 22"));
}
