//! The namespace lab as seen from Rust: builds the topology with `scripts/lab.sh` (the one source
//! of truth for namespaces, links, routes and nftables, shared with `scripts/bench-tunnel.sh`),
//! starts processes inside it and tears everything down in `Drop`; and the [`Appliance`]
//! configured in it with the real `modelgate` binary.
//!
//! Every process is a [`Proc`] stopped by its own PID; nothing is ever killed by name. Each
//! [`Lab`] has a unique tag (PID and counter), so tests run in parallel.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use super::helper::{self, HelperOutput};
use super::netns::unique_tag;
use super::proc::{self, bin, manifest_path, run_ok, Proc};

pub const EDGE_PUBLIC: &str = "192.0.2.1";
pub const WG_PORT: u16 = 51820;
pub const MODEL_ADDR: &str = "10.20.0.5";
pub const MODEL_PORT: u16 = 8000;
pub const LAN_NET: &str = "10.20.0.0/24";
/// The appliance's address inside the tunnel (`init --tunnel-address`).
pub const TUNNEL_ADDRESS: &str = "10.99.0.1/24";

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

impl Lab {
    pub fn up() -> Lab {
        // lab.sh wants [a-z0-9]{1,10}: "t" + the 8 digits of the unique tag.
        let tag = format!("t{}", unique_tag());
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
        proc::exec(ns, cmd)
    }

    /// Runs a command inside `ns` and panics when it fails; returns stdout.
    pub fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        proc::exec_ok(ns, cmd)
    }

    /// Starts `cmd` inside `ns` (or the test's own namespace for `None`), logging to the lab's
    /// directory.
    pub fn spawn(&self, name: &str, ns: Option<&str>, cmd: &[&str], envs: &[(&str, &str)]) -> Proc {
        proc::spawn(self.dir.path(), name, ns, cmd, envs)
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

    /// Waits (bounded: 10 s) for the corp wireguard-go's first handshake with the appliance.
    pub fn assert_corp_handshake(&self) {
        assert!(
            self.wait_handshake(&self.corp, &self.wg_corp, 0, Duration::from_secs(10)),
            "corp wireguard-go did not complete a handshake with modelgate within 10 s"
        );
    }

    /// Makes `name` resolve to `ip` inside namespace `ns` (`lab.sh hosts`; removed on drop).
    pub fn add_host(&self, ns: &str, ip: &str, name: &str) {
        self.sh(&["hosts", ns, &format!("{ip} {name}")]);
    }

    /// Runs the in-namespace helper command `args` inside `ns` (see `helper.rs`).
    pub fn helper(&self, ns: &str, args: &[&str]) -> HelperOutput {
        helper::run(ns, args)
    }

    /// Starts the helper in `ns` in the background (for traffic that must run meanwhile).
    pub fn spawn_helper(&self, name: &str, ns: &str, args: &[&str]) -> Proc {
        helper::spawn(self.dir.path(), name, ns, args)
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
        Appliance::init_tls(lab, "127.0.0.1:8443", &["--self-signed", "gw.test"])
    }

    /// `init` with the HTTPS gateway on `listen` and the TLS options `tls` (e.g.
    /// `--self-signed gw.test`, `--acme-domain …`, `--tls-cert … --tls-key …`).
    pub fn init_tls(lab: &Lab, listen: &str, tls: &[&str]) -> Appliance {
        let bin = bin();
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

    /// `modelgate --config CFG ARGS…` to completion, whatever its exit status.
    pub fn mg(&self, args: &[&str]) -> Output {
        proc::modelgate(&self.cfg, args)
    }

    /// `modelgate --config CFG ARGS…`, which must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.cfg)
                .args(args),
        );
        proc::text(&out.stdout)
    }

    /// `status --json`, which must succeed.
    pub fn status(&self) -> serde_json::Value {
        proc::status_json(&self.cfg)
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
