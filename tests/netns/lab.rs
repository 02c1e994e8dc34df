//! The namespace lab as seen from Rust: builds the topology with `scripts/lab.sh` (the one source
//! of truth for namespaces, links, routes and nftables, shared with `scripts/bench-tunnel.sh`),
//! starts processes inside it and tears everything down in `Drop`.
//!
//! Every process is a [`Proc`] that is stopped by its own PID (SIGTERM, bounded wait, SIGKILL);
//! nothing is ever killed by name. Each [`Lab`] has a unique tag, so tests run in parallel.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const EDGE_PUBLIC: &str = "192.0.2.1";
pub const WG_PORT: u16 = 51820;
pub const MODEL_ADDR: &str = "10.20.0.5";
pub const MODEL_PORT: u16 = 8000;
pub const LAN_NET: &str = "10.20.0.0/24";
/// The appliance's address inside the tunnel (`init --tunnel-address`).
pub const TUNNEL_ADDRESS: &str = "10.99.0.1/24";

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// True when the effective UID is 0. Read from `/proc` to keep the test free of `unsafe`/libc.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Returns true (after printing why) when the test must be skipped: namespaces need root.
/// As root, missing tools are a broken CI image, so that panics instead of skipping.
pub fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        // Written to the stderr handle, not with eprintln!, so libtest's capture does not hide it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: the namespace lab needs root (ip netns, TUN, nftables); \
             run `sudo -E cargo test --test netns` or run it in CI, which is root"
        );
        return true;
    }
    for tool in ["ip", "nft", "wg", "wg-quick", "wireguard-go", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "{test}: `{tool}` is not installed; apt-get install wireguard-go wireguard-tools \
             nftables iproute2 python3"
        );
    }
    false
}

/// Runs a command to completion and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A process started by a test, stopped by PID when dropped. Its stdout+stderr go to a log file
/// that is printed when the test is failing.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by PID (no chance to clean up, like a crash or `kill -9`) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM by PID, wait up to 5 s, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Output lines of one in-namespace helper run (see `helper.rs`), without the `HELPER ` prefix.
#[derive(Debug)]
pub struct HelperOutput {
    pub lines: Vec<String>,
}

impl HelperOutput {
    pub fn first(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }
}

/// One instance of the topology in `scripts/lab.sh`, removed (namespaces, stale wireguard-go
/// sockets, temp dir) on drop.
pub struct Lab {
    pub tag: String,
    pub client: String,
    pub edge: String,
    pub corp: String,
    pub model: String,
    pub wg_corp: String,
    pub wg_edge: String,
    pub wg_rogue: String,
    pub dir: tempfile::TempDir,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub fn up() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // [a-z0-9]{1,10}: "t" + pid (6 digits at most) + counter.
        let tag = format!("t{}{}", std::process::id() % 1_000_000, n % 100);
        let lab = Lab {
            client: format!("mg-{tag}-client"),
            edge: format!("mg-{tag}-edge"),
            corp: format!("mg-{tag}-corp"),
            model: format!("mg-{tag}-model"),
            wg_corp: format!("mg{tag}c"),
            wg_edge: format!("mg{tag}e"),
            wg_rogue: format!("mg{tag}r"),
            dir: tempfile::Builder::new()
                .prefix("mg-netns-")
                .tempdir()
                .expect("temp dir"),
            tag,
        };
        // Labs left behind by a SIGKILLed run (no Drop) go first; the new one is owned by this
        // process (lab.sh records its caller's PID).
        lab.sh(&["gc"]);
        lab.sh(&["up", &lab.tag]);
        lab
    }

    /// Runs `scripts/lab.sh ARGS`.
    pub fn sh(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new("bash")
                .arg(manifest_path("scripts/lab.sh"))
                .args(args),
        )
    }

    /// Runs a command inside namespace `ns` to completion (does not check the exit status).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {cmd:?}: {e}"))
    }

    /// Runs a command inside `ns` and panics when it fails; returns stdout.
    pub fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        let out = run_ok(Command::new("ip").args(["netns", "exec", ns]).args(cmd));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` inside `ns` (or the test's own namespace for `None`). `ip netns exec` execs
    /// the command in place, so the child's PID is the program's.
    pub fn spawn(&self, name: &str, ns: Option<&str>, cmd: &[&str], envs: &[(&str, &str)]) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(cmd);
                c
            }
            None => {
                let mut c = Command::new(cmd[0]);
                c.args(&cmd[1..]);
                c
            }
        };
        c.envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Starts wireguard-go `ifname` in `ns` and configures it from wg-quick text `conf` exactly as
    /// given (`lab.sh wg-conf`: `wg-quick strip` + `wg setconf`, Address, MTU, AllowedIPs routes).
    pub fn start_wg(&self, ns: &str, ifname: &str, conf: &str) -> Proc {
        self.start_wg_with(ns, ifname, conf, false)
    }

    /// [`Lab::start_wg`], and with `post_up` the file's PostUp commands run too, replacing the
    /// lab's own tunnel → LAN masquerade on the corp router (`lab.sh wg-conf … --post-up`).
    pub fn start_wg_with(&self, ns: &str, ifname: &str, conf: &str, post_up: bool) -> Proc {
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        let _ = fs::remove_file(&sock);
        let p = self.spawn(
            &format!("wireguard-go-{ifname}"),
            Some(ns),
            &["wireguard-go", "-f", ifname],
            &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "verbose")],
        );
        self.sh(&["wg-wait-sock", ifname]);
        let file = self.dir.path().join(format!("{ifname}.conf"));
        fs::write(&file, conf).expect("write wg-quick file");
        let file = file.to_str().unwrap();
        if post_up {
            self.sh(&["wg-conf", ns, ifname, file, "--post-up"]);
        } else {
            self.sh(&["wg-conf", ns, ifname, file]);
        }
        p
    }

    /// `wg show IFNAME WHAT` inside `ns`.
    pub fn wg_show(&self, ns: &str, ifname: &str, what: &str) -> String {
        self.exec_ok(ns, &["wg", "show", ifname, what])
    }

    /// Latest handshake (UNIX seconds) of the first peer of `ifname`, 0 when none yet.
    pub fn latest_handshake(&self, ns: &str, ifname: &str) -> u64 {
        self.wg_show(ns, ifname, "latest-handshakes")
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    /// Waits (bounded) for `ifname` to complete a handshake newer than `after`.
    pub fn wait_handshake(&self, ns: &str, ifname: &str, after: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.latest_handshake(ns, ifname) > after {
                return true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Starts `model_server.py` on 10.20.0.5:8000 in the model namespace and waits until it listens.
    pub fn start_model_server(&self) -> Proc {
        let script = manifest_path("tests/netns/model_server.py");
        let port = MODEL_PORT.to_string();
        let p = self.spawn(
            "model-server",
            Some(&self.model),
            &["python3", "-u", script.to_str().unwrap(), MODEL_ADDR, &port],
            &[],
        );
        self.wait_model_listen(p)
    }

    /// Starts `fake_vllm.py` (a vLLM-like OpenAI server) on 10.20.0.5:8000 in the model
    /// namespace, logging requests to `log` (JSON lines), with extra arguments `args`; waits
    /// until it listens.
    pub fn start_fake_vllm(&self, log: &Path, args: &[&str]) -> Proc {
        let script = manifest_path("tests/netns/fake_vllm.py");
        let port = MODEL_PORT.to_string();
        let mut cmd = vec![
            "python3",
            "-u",
            script.to_str().unwrap(),
            MODEL_ADDR,
            &port,
            "--log",
            log.to_str().unwrap(),
        ];
        cmd.extend_from_slice(args);
        let p = self.spawn("fake-vllm", Some(&self.model), &cmd, &[]);
        self.wait_model_listen(p)
    }

    fn wait_model_listen(&self, p: Proc) -> Proc {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{MODEL_PORT}");
        while Instant::now() < deadline {
            let out = self.exec(&self.model, &["ss", "-Htln", &filter]);
            if !out.stdout.is_empty() {
                return p;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not listen within 10 s:\n{}", p.name, p.log());
    }

    /// Makes `name` resolve to `ip` inside namespace `ns` (`lab.sh hosts`; removed on drop).
    pub fn add_host(&self, ns: &str, ip: &str, name: &str) {
        self.sh(&["hosts", ns, &format!("{ip} {name}")]);
    }

    /// Runs this test binary's helper entry point inside `ns` (see `helper.rs`): `args` is the
    /// helper command. Panics when the helper itself fails.
    pub fn helper(&self, ns: &str, args: &[&str]) -> HelperOutput {
        let out = self.helper_cmd(ns, args).output().expect("run helper");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helper {args:?} in {ns} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        HelperOutput {
            lines: stdout
                .lines()
                .filter_map(|l| l.strip_prefix("HELPER "))
                .map(str::to_string)
                .collect(),
        }
    }

    /// Starts the helper in `ns` in the background (for traffic that must run meanwhile).
    pub fn spawn_helper(&self, name: &str, ns: &str, args: &[&str]) -> Proc {
        let exe = std::env::current_exe().expect("current exe");
        let joined = args.join(" ");
        self.spawn(
            name,
            Some(ns),
            &[
                exe.to_str().unwrap(),
                "netns_helper_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ],
            &[("MODELGATE_NETNS_HELPER", &joined)],
        )
    }

    fn helper_cmd(&self, ns: &str, args: &[&str]) -> Command {
        let exe = std::env::current_exe().expect("current exe");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(exe)
            .args([
                "netns_helper_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ])
            .env("MODELGATE_NETNS_HELPER", args.join(" "));
        c
    }

    /// The (source address, source port) pairs WireGuard traffic reached the edge from, as
    /// recorded by the edge's nft set `inet lab wgsrc`.
    pub fn edge_wg_sources(&self) -> Vec<(String, u16)> {
        let text = self.exec_ok(&self.edge, &["nft", "list", "set", "inet", "lab", "wgsrc"]);
        let Some(start) = text.find("elements = {") else {
            return Vec::new();
        };
        let rest = &text[start + "elements = {".len()..];
        let body = &rest[..rest.find('}').unwrap_or(rest.len())];
        body.split(',')
            .filter_map(|e| {
                let (addr, port) = e.split_once(" . ")?;
                Some((addr.trim().to_string(), port.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(manifest_path("scripts/lab.sh"))
            .args(["down", &self.tag])
            .status();
        // MODELGATE_LAB_KEEP=1 keeps the logs, configs and keys of every lab for debugging.
        if std::env::var_os("MODELGATE_LAB_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("temp dir"));
            eprintln!("lab {}: files kept in {}", self.tag, dir.keep().display());
        } else if thread::panicking() {
            eprintln!(
                "lab {} torn down; its files were in {}",
                self.tag,
                self.dir.path().display()
            );
        }
    }
}

/// A configured modelgate appliance (config + state in the lab's temp dir) and the corp peer's
/// wg-quick text printed by `peer add`.
pub struct Appliance {
    pub bin: PathBuf,
    pub cfg: PathBuf,
    /// `--state-dir`: keys, the self-signed certificate (`self-signed.crt`).
    pub state: PathBuf,
    /// `--listen`: the HTTPS gateway's address.
    pub listen: String,
    pub corp_conf: String,
}

impl Appliance {
    /// `modelgate init` + `modelgate peer add corp --allowed-ips 10.20.0.0/24`, HTTPS on
    /// 127.0.0.1:8443 (unused by the `--forward` tests).
    pub fn init(lab: &Lab) -> Appliance {
        Appliance::init_with(lab, "127.0.0.1:8443")
    }

    /// [`Appliance::init`] with the HTTPS gateway on `listen` (self-signed for gw.test).
    pub fn init_with(lab: &Lab, listen: &str) -> Appliance {
        Appliance::init_tls(lab, listen, &["--self-signed", "gw.test"])
    }

    /// [`Appliance::init_with`] with the `init` TLS options `tls` (e.g. `--acme-domain …`).
    pub fn init_tls(lab: &Lab, listen: &str, tls: &[&str]) -> Appliance {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_modelgate"));
        let dir = lab.dir.path().join("modelgate");
        fs::create_dir_all(dir.join("state")).unwrap();
        let cfg = dir.join("modelgate.toml");
        let endpoint = format!("{EDGE_PUBLIC}:{WG_PORT}");
        run_ok(
            Command::new(&bin)
                .arg("--config")
                .arg(&cfg)
                .args([
                    "init",
                    "--public-endpoint",
                    &endpoint,
                    "--wg-listen",
                    &endpoint,
                ])
                .args(["--tunnel-address", TUNNEL_ADDRESS])
                .arg("--state-dir")
                .arg(dir.join("state"))
                .args(["--listen", listen])
                .args(tls)
                // The default /run/modelgate/control.sock would be shared by parallel tests.
                .arg("--control-socket")
                .arg(dir.join("control.sock")),
        );
        let out = run_ok(Command::new(&bin).arg("--config").arg(&cfg).args([
            "peer",
            "add",
            "corp",
            "--allowed-ips",
            LAN_NET,
        ]));
        let corp_conf = String::from_utf8(out.stdout).expect("peer add prints UTF-8");
        assert!(
            corp_conf.contains("[Interface]") && corp_conf.contains("[Peer]"),
            "`peer add` did not print a wg-quick file:\n{corp_conf}"
        );
        Appliance {
            bin,
            cfg,
            state: dir.join("state"),
            listen: listen.to_string(),
            corp_conf,
        }
    }

    /// `modelgate --config CFG ARGS…`, which must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.cfg)
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `modelgate run` (no forwards) in the edge; returns once the HTTPS listener accepts
    /// connections from the client namespace (bounded: 15 s).
    pub fn run_gateway(&self, lab: &Lab) -> Proc {
        let mut p = self.run(lab, &[]);
        for _ in 0..15 {
            assert!(p.is_running(), "modelgate run exited:\n{}", p.log());
            if lab
                .helper(&lab.client, &["wait-accept", &self.listen, "1000"])
                .first()
                .starts_with("ok")
            {
                return p;
            }
        }
        panic!("modelgate run: {} did not accept within 15 s", self.listen);
    }

    /// `modelgate run --forward …` in the edge namespace; returns once every forward's listen
    /// address accepts (bounded: 15 s).
    pub fn run(&self, lab: &Lab, forwards: &[&str]) -> Proc {
        let mut cmd: Vec<&str> = vec![
            self.bin.to_str().unwrap(),
            "--config",
            self.cfg.to_str().unwrap(),
            "run",
        ];
        for f in forwards {
            cmd.extend(["--forward", f]);
        }
        let mut p = lab.spawn(
            "modelgate",
            Some(&lab.edge),
            &cmd,
            &[("RUST_LOG", "modelgate=debug,info")],
        );
        for f in forwards {
            let listen = f.split('=').next().unwrap();
            // 1 s helper runs, so an exited daemon fails the test at once.
            let mut accepted = false;
            for _ in 0..15 {
                assert!(p.is_running(), "modelgate run exited:\n{}", p.log());
                if lab
                    .helper(&lab.edge, &["wait-accept", listen, "1000"])
                    .first()
                    .starts_with("ok")
                {
                    accepted = true;
                    break;
                }
            }
            assert!(
                accepted,
                "modelgate run: {listen} did not accept within 15 s"
            );
        }
        p
    }
}
