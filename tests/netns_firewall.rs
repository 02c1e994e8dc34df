//! Root-only: `modelgate firewall` in network namespaces.
//!
//! Two namespaces joined by a veth pair, IPv4 and IPv6:
//!
//! ```text
//! [prober] 192.0.2.2, 2001:db8:f::2 ── 192.0.2.1, 2001:db8:f::1 [appliance]
//!                                         modelgate run: HTTPS tcp/443, WireGuard udp/51820,
//!                                         metrics tcp/9464 (bound to 0.0.0.0 on purpose)
//!                                         test listeners: tcp/22 (SSH stand-in), a random tcp
//!                                         port, a UDP echo on a random port (all dual-stack)
//!                                         a foreign table `inet foreign` + `ip legacy`
//! ```
//!
//! The prober runs this test binary again inside its namespace (`fw_helper_entry`, std only):
//! TCP probes report open/refused/timeout, UDP probes wait for an echo, and the WireGuard port is
//! probed with a **real WireGuard handshake** against the running daemon: boringtun, with the
//! corp peer's private key from `modelgate peer add`, sends a handshake initiation and must get
//! a valid handshake response (so the port "answers" in the WireGuard sense; a datagram to a
//! dropped port gets nothing, and a plain UDP echo could not share the daemon's port).
//!
//! Every probe first runs before `apply`, to prove the probe itself works (each port answers
//! without the firewall), then after. Namespaces and processes are removed in `Drop`, processes
//! by PID.

#[allow(dead_code)]
#[path = "netns/lab.rs"]
mod lab;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lab::{is_root, run_ok};

const APPL_V4: &str = "192.0.2.1";
const PROBE_V4: &str = "192.0.2.2";
const APPL_V6: &str = "2001:db8:f::1";
const PROBE_V6: &str = "2001:db8:f::2";
const HTTPS_PORT: u16 = 443;
const WG_PORT: u16 = 51820;
const METRICS_PORT: u16 = 9464;
const HELPER_ENV: &str = "MODELGATE_FW_HELPER";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_modelgate"))
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: network namespaces and nftables need root; run `sudo -E cargo test \
         --test netns_firewall` or run it in CI, which is root"
    );
    true
}

/// Not a test: the in-namespace helper's entry point (see the module docs).
#[test]
#[ignore = "not a test: the in-namespace helper's entry point, run with --ignored"]
fn fw_helper_entry() {
    if let Ok(cmd) = std::env::var(HELPER_ENV) {
        helper::run(&cmd);
    }
}

/// A child process stopped by its PID (SIGTERM, bounded wait, SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, ns: &str, cmd: &[&str], envs: &[(&str, &str)], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces and a veth pair; deleted on drop.
struct Pair {
    appl: String,
    probe: String,
    dir: tempfile::TempDir,
}

impl Pair {
    fn up() -> Pair {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 1_000_000, n % 100);
        let pair = Pair {
            appl: format!("mgfw-{tag}-a"),
            probe: format!("mgfw-{tag}-p"),
            dir: tempfile::Builder::new().prefix("mg-fw-").tempdir().unwrap(),
        };
        let (va, vp) = (format!("mgfw{tag}a"), format!("mgfw{tag}p"));
        for ns in [&pair.appl, &pair.probe] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run_ok(Command::new("ip").args(["netns", "add", ns]));
        }
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &va,
            "netns",
            &pair.appl,
            "type",
            "veth",
            "peer",
            "name",
            &vp,
            "netns",
            &pair.probe,
        ]));
        for (ns, dev, v4, v6) in [
            (&pair.appl, &va, APPL_V4, APPL_V6),
            (&pair.probe, &vp, PROBE_V4, PROBE_V6),
        ] {
            pair.ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", dev]);
            pair.ip(
                ns,
                &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
            );
            pair.ip(ns, &["link", "set", dev, "up"]);
            pair.ip(ns, &["link", "set", "lo", "up"]);
        }
        pair
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        run_ok(Command::new("ip").args(["-n", ns]).args(args));
    }

    fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {cmd:?}: {e}"))
    }

    fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        let out = run_ok(Command::new("ip").args(["netns", "exec", ns]).args(cmd));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nft -s list ruleset` in the appliance (stateless: no counter values).
    fn ruleset(&self) -> String {
        self.exec_ok(&self.appl, &["nft", "-s", "list", "ruleset"])
    }

    /// `modelgate --config CFG ARGS` inside the appliance namespace.
    fn modelgate(&self, cfg: &Path, args: &[&str]) -> Output {
        let b = bin();
        let mut cmd = vec![b.to_str().unwrap(), "--config", cfg.to_str().unwrap()];
        cmd.extend_from_slice(args);
        self.exec(&self.appl, &cmd)
    }

    fn modelgate_ok(&self, cfg: &Path, args: &[&str]) -> String {
        let out = self.modelgate(cfg, args);
        assert!(
            out.status.success(),
            "modelgate {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One helper command in `ns`; returns its `HELPER` lines.
    fn helper(&self, ns: &str, cmd: &str) -> Vec<String> {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(helper_args())
            .env(HELPER_ENV, cmd)
            .output()
            .expect("run helper");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helper {cmd:?} in {ns} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix("HELPER "))
            .map(str::to_string)
            .collect()
    }

    fn spawn_helper(&self, name: &str, ns: &str, cmd: &str) -> Proc {
        let exe = std::env::current_exe().unwrap();
        let mut argv = vec![exe.to_str().unwrap().to_string()];
        argv.extend(helper_args().iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        Proc::spawn(name, ns, &argv, &[(HELPER_ENV, cmd)], self.dir.path())
    }

    /// Probes from the prober namespace. Returns "open", "refused", "timeout", "reply" or
    /// "handshake".
    fn probe(&self, what: &str) -> String {
        self.helper(&self.probe, what)
            .into_iter()
            .next()
            .unwrap_or_default()
    }
}

fn helper_args() -> [&'static str; 6] {
    [
        "fw_helper_entry",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ]
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.appl, &self.probe] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
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

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} within {timeout:?}");
}

const FOREIGN: &str = "table inet foreign {\n\
    set blocked { type ipv4_addr; elements = { 203.0.113.66 } }\n\
    chain input { type filter hook input priority filter; policy accept; ip saddr @blocked drop; }\n\
}\n\
table ip legacy {\n    chain c {\n        counter\n    }\n}\n";

#[test]
fn firewall_lets_in_only_https_and_wireguard() {
    if skip_unless_root("firewall_lets_in_only_https_and_wireguard") {
        return;
    }
    let started = Instant::now();
    let pair = Pair::up();
    let (cfg, corp_private, appl_public) = init_appliance(&pair);

    // A table that belongs to someone else, present before and after.
    let foreign = pair.dir.path().join("foreign.nft");
    fs::write(&foreign, FOREIGN).unwrap();
    pair.exec_ok(&pair.appl, &["nft", "-f", foreign.to_str().unwrap()]);
    let before = pair.ruleset();
    assert!(before.contains("table inet foreign"), "{before}");

    let b = bin();
    let mut daemon = Proc::spawn(
        "modelgate-run",
        &pair.appl,
        &[
            b.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "run",
        ],
        &[("RUST_LOG", "info")],
        pair.dir.path(),
    );
    let https = format!("{APPL_V4}:{HTTPS_PORT}");
    wait_for(
        "modelgate run accepts on 443",
        Duration::from_secs(15),
        || {
            assert!(daemon.running(), "modelgate run exited:\n{}", daemon.log());
            pair.probe(&format!("tcp {https} 500")) == "open"
        },
    );
    // Test listeners: SSH stand-in, a random TCP port, the metrics port unless the daemon
    // already serves it, and a UDP echo.
    let rnd_tcp = 20_000 + (std::process::id() % 20_000) as u16;
    let rnd_udp = rnd_tcp + 1;
    let mut listeners = pair.spawn_helper(
        "listeners",
        &pair.appl,
        &format!("listen tcp:22 tcp:{METRICS_PORT} tcp:{rnd_tcp} udp:{rnd_udp}"),
    );
    wait_for("test listeners", Duration::from_secs(10), || {
        assert!(
            listeners.running(),
            "listeners exited:\n{}",
            listeners.log()
        );
        listeners.log().contains("HELPER ready")
    });

    let wg = format!("wg {APPL_V4}:{WG_PORT} {corp_private} {appl_public} 2000");
    let tcp = |addr: String| format!("tcp {addr} 800");
    let probes = |pair: &Pair| -> Vec<(String, String)> {
        [
            ("https".to_string(), tcp(https.clone())),
            ("wireguard".into(), wg.clone()),
            ("metrics".into(), tcp(format!("{APPL_V4}:{METRICS_PORT}"))),
            ("random-tcp".into(), tcp(format!("{APPL_V4}:{rnd_tcp}"))),
            ("random-udp".into(), format!("udp {APPL_V4}:{rnd_udp} 800")),
            ("ssh-v4".into(), tcp(format!("{APPL_V4}:22"))),
            ("ssh-v6".into(), tcp(format!("[{APPL_V6}]:22"))),
        ]
        .into_iter()
        .map(|(name, cmd)| (name, pair.probe(&cmd)))
        .collect()
    };
    let expect = |got: &[(String, String)], want: &[(&str, &str)], when: &str| {
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want.as_slice(), "probes {when}");
    };

    // Without the firewall every probe gets an answer (the probes work).
    let open_all = [
        ("https", "open"),
        ("wireguard", "handshake"),
        ("metrics", "open"),
        ("random-tcp", "open"),
        ("random-udp", "reply"),
        ("ssh-v4", "open"),
        ("ssh-v6", "open"),
    ];
    expect(&probes(&pair), &open_all, "before apply");
    let curl = |pair: &Pair| {
        pair.exec(
            &pair.probe,
            &[
                "curl",
                "-sk",
                "--max-time",
                "5",
                &format!("https://{https}/healthz"),
            ],
        )
    };
    assert_eq!(String::from_utf8_lossy(&curl(&pair).stdout).trim(), "ok");

    // apply: only HTTPS and WireGuard answer.
    let t = Instant::now();
    let out = pair.modelgate_ok(&cfg, &["firewall", "apply"]);
    let apply_ms = t.elapsed().as_millis();
    assert!(out.contains("created"), "{out}");
    let only_public = [
        ("https", "open"),
        ("wireguard", "handshake"),
        ("metrics", "timeout"),
        ("random-tcp", "timeout"),
        ("random-udp", "timeout"),
        ("ssh-v4", "timeout"),
        ("ssh-v6", "timeout"),
    ];
    expect(&probes(&pair), &only_public, "after apply");
    assert_eq!(
        String::from_utf8_lossy(&curl(&pair).stdout).trim(),
        "ok",
        "a real HTTPS request through the firewall"
    );
    let applied = pair.ruleset();
    assert!(applied.contains("table inet modelgate"), "{applied}");
    assert!(
        applied.contains(before.trim_end()),
        "the foreign tables are untouched:\nbefore:\n{before}\nafter:\n{applied}"
    );

    // apply again: the same ruleset, still the same answers.
    let out = pair.modelgate_ok(&cfg, &["firewall", "apply"]);
    assert!(out.contains("replaced"), "{out}");
    assert_eq!(pair.ruleset(), applied, "apply twice = the same ruleset");

    // --ssh-from the prober's addresses opens SSH to it, on both families, nothing else.
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
    let with_ssh = [
        ("https", "open"),
        ("wireguard", "handshake"),
        ("metrics", "timeout"),
        ("random-tcp", "timeout"),
        ("random-udp", "timeout"),
        ("ssh-v4", "open"),
        ("ssh-v6", "open"),
    ];
    expect(&probes(&pair), &with_ssh, "with --ssh-from the prober");
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
        pair.ruleset(),
        before,
        "remove restores the previous ruleset"
    );
    expect(&probes(&pair), &open_all, "after remove");
    let out = pair.modelgate_ok(&cfg, &["firewall", "remove"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(pair.ruleset(), before);

    assert!(daemon.running(), "modelgate run exited:\n{}", daemon.log());
    eprintln!(
        "netns_firewall: apply took {apply_ms} ms; whole test {} ms",
        started.elapsed().as_millis()
    );
}

/// `print` is valid nft input (`nft -c`), and loading it gives exactly what `apply` (the JSON
/// batch through the nftables crate) loads; `print --json` passes `nft -j -c`.
#[test]
fn print_is_what_apply_loads() {
    if skip_unless_root("print_is_what_apply_loads") {
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
    pair.exec_ok(
        &pair.probe,
        &["nft", "-c", "-f", text_file.to_str().unwrap()],
    );
    pair.exec_ok(
        &pair.probe,
        &["nft", "-j", "-c", "-f", json_file.to_str().unwrap()],
    );
    pair.exec_ok(&pair.probe, &["nft", "-f", text_file.to_str().unwrap()]);
    let mut cmd = vec!["firewall", "apply"];
    cmd.extend_from_slice(&args);
    pair.modelgate_ok(&cfg, &cmd);
    let from_text = pair.exec_ok(&pair.probe, &["nft", "-s", "list", "ruleset"]);
    let from_apply = pair.ruleset();
    assert_eq!(from_text, from_apply, "print and apply load the same table");
    assert!(from_apply.contains("tcp dport 2222 accept"), "{from_apply}");
    // Loading the printed file twice is idempotent too.
    pair.exec_ok(&pair.probe, &["nft", "-f", text_file.to_str().unwrap()]);
    assert_eq!(
        pair.exec_ok(&pair.probe, &["nft", "-s", "list", "ruleset"]),
        from_text
    );
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

/// The helper commands, run inside a namespace. Each prints `HELPER …` lines.
mod helper {
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::thread;
    use std::time::{Duration, Instant};

    fn say(s: &str) {
        println!("HELPER {s}");
        let _ = std::io::stdout().flush();
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("{s:?} is not IP:PORT"))
    }

    fn ms(s: &str) -> Duration {
        Duration::from_millis(s.parse().expect("milliseconds"))
    }

    pub fn run(cmd: &str) {
        let a: Vec<&str> = cmd.split_whitespace().collect();
        match a.as_slice() {
            ["listen", specs @ ..] => listen(specs),
            ["tcp", to, t] => say(tcp(addr(to), ms(t))),
            ["udp", to, t] => say(udp(addr(to), ms(t))),
            ["wg", to, private, public, t] => say(wg(addr(to), private, public, ms(t))),
            _ => panic!("unknown helper command {cmd:?}"),
        }
    }

    /// `tcp:PORT` listeners that accept and close, `udp:PORT` echo sockets; all on `[::]`
    /// (dual-stack). A TCP port already in use (the daemon's metrics listener) is skipped.
    /// Runs until killed.
    fn listen(specs: &[&str]) {
        for spec in specs {
            let (proto, port) = spec.split_once(':').expect("PROTO:PORT");
            let port: u16 = port.parse().unwrap();
            let bind = SocketAddr::from(([0u16; 8], port));
            match proto {
                "tcp" => match TcpListener::bind(bind) {
                    Ok(l) => {
                        thread::spawn(move || {
                            for s in l.incoming().flatten() {
                                drop(s);
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        say(&format!("in-use tcp:{port}"));
                    }
                    Err(e) => panic!("bind tcp {port}: {e}"),
                },
                "udp" => {
                    let s =
                        UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp {port}: {e}"));
                    thread::spawn(move || {
                        let mut buf = [0u8; 1500];
                        while let Ok((n, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&buf[..n], from);
                        }
                    });
                }
                _ => panic!("bad listener {spec}"),
            }
        }
        say("ready");
        // Bounded: the test kills it long before.
        thread::sleep(Duration::from_secs(600));
    }

    fn tcp(to: SocketAddr, timeout: Duration) -> &'static str {
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(_) => "open",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
            Err(e) => panic!("tcp {to}: {e}"),
        }
    }

    fn udp(to: SocketAddr, timeout: Duration) -> &'static str {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"probe", to).unwrap();
        let mut buf = [0u8; 64];
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == to && &buf[..n] == b"probe" => "reply",
            Ok(_) => "other",
            // An ICMP port unreachable surfaces as ECONNREFUSED on the next receive.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
            Err(_) => "timeout",
        }
    }

    /// A real WireGuard handshake: initiation with the corp peer's key, and a response that
    /// completes the handshake within `timeout`.
    fn wg(to: SocketAddr, private: &str, public: &str, timeout: Duration) -> &'static str {
        let private: modelgate::wgkey::PrivateKey = private.parse().expect("private key");
        let public: modelgate::wgkey::PublicKey = public.parse().expect("public key");
        let mut tunn =
            boringtun::noise::Tunn::new(private.to_dalek(), public.to_dalek(), None, None, 7, None);
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut out = vec![0u8; 2048];
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + timeout;
        if let boringtun::noise::TunnResult::WriteToNetwork(p) =
            tunn.format_handshake_initiation(&mut out, false)
        {
            s.send_to(p, to).unwrap();
        } else {
            panic!("no handshake initiation");
        }
        while Instant::now() < deadline {
            s.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                break;
            };
            if from != to {
                continue;
            }
            let mut dst = vec![0u8; 2048];
            let _ = tunn.decapsulate(Some(from.ip()), &buf[..n], &mut dst);
            if tunn.stats().0.is_some() {
                return "handshake";
            }
        }
        "timeout"
    }
}
