//! `modelgate doctor` on the whole chain of `harness::chain`, with `[tls] mode = "files"` and a
//! leaf signed by a test CA made here with rcgen. Doctor runs inside the edge namespace, like an
//! operator on the appliance; `gw.test` resolves to 192.0.2.1 there (`lab.sh hosts`).
//!
//! One lab, faults injected one at a time, each undone before the next: with nothing broken
//! doctor passes (with `--ca-file` for the test CA; without it the certificate is "not publicly
//! trusted" while the later hops still pass); then wrong public name, expired certificate,
//! upstream stopped, corp peer stopped, daemon stopped, listener port taken. Each time doctor
//! must name THAT hop as the first failure and exit non-zero. Every throwaway key it created is
//! revoked at the end. Without root only `invalid_config_is_hop_one_exit_64` runs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::harness::chain::{Chain, Spec, MODEL, NAME};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{bin, text};

/// A test CA that issues leaves into the appliance's tls.cert / tls.key files, and those files.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// (year, month, day) `offset` days from today (UTC).
fn ymd(offset: i64) -> (i32, u8, u8) {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400
        + offset;
    let (y, m, d) = modelgate::civil::civil_from_days(days);
    (y as i32, m as u8, d as u8)
}

impl TestCa {
    /// A CA in `dir` and a leaf for gw.test valid from yesterday for 90 days.
    fn new(dir: &Path) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "modelgate doctor test CA");
        let cert = p.self_signed(&key).unwrap();
        let pem = dir.join("test-ca.pem");
        fs::write(&pem, cert.pem()).unwrap();
        let ca = TestCa {
            issuer: rcgen::Issuer::new(p, key),
            pem,
            cert: dir.join("fullchain.pem"),
            key: dir.join("privkey.pem"),
        };
        ca.issue(NAME, -1, 90);
        ca
    }

    /// Writes a leaf for `name`, valid from `from` to `until` days relative to today, to the
    /// cert and key files (key first, both renamed into place, like a renewal tool does).
    fn issue(&self, name: &str, from: i64, until: i64) {
        let (cert, key) = (&self.cert, &self.key);
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let (y, m, d) = ymd(from);
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = ymd(until);
        p.not_after = rcgen::date_time_ymd(y, m, d);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let leaf = p.signed_by(&k, &self.issuer).unwrap();
        let tmp = key.with_extension("tmp");
        fs::write(&tmp, k.serialize_pem()).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&tmp, key).unwrap();
        let tmp = cert.with_extension("tmp");
        fs::write(&tmp, leaf.pem()).unwrap();
        fs::rename(&tmp, cert).unwrap();
    }
}

impl Chain {
    /// `modelgate reload` (new certificate files, a discovery round at once).
    fn reload(&self) {
        let out = self.app.cli(&["reload"]);
        assert!(out.starts_with("reloaded"), "{out}");
    }

    /// `modelgate doctor --json --name gw.test ARGS…` inside the edge namespace: (exit code,
    /// report, wall time).
    fn doctor(&self, args: &[&str]) -> (i32, Value, Duration) {
        self.doctor_named(NAME, args)
    }

    fn doctor_named(&self, name: &str, args: &[&str]) -> (i32, Value, Duration) {
        let t = Instant::now();
        let out = self.doctor_cmd(name, true, args);
        let took = t.elapsed();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --json printed no JSON ({e}):\n{}\n{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        });
        eprintln!(
            "doctor {args:?}: exit {:?} in {took:?}, first failure {}",
            out.status.code(),
            v["first_failure"]
        );
        (out.status.code().unwrap_or(-1), v, took)
    }

    fn doctor_raw(&self, json: bool, args: &[&str]) -> Output {
        self.doctor_cmd(NAME, json, args)
    }

    fn doctor_argv<'a>(&'a self, name: &'a str, json: bool, args: &[&'a str]) -> Vec<&'a str> {
        let mut cmd = vec![
            self.app.bin.to_str().unwrap(),
            "--config",
            self.app.cfg.to_str().unwrap(),
            "doctor",
            "--name",
            name,
        ];
        if json {
            cmd.push("--json");
        }
        cmd.extend_from_slice(args);
        cmd
    }

    fn doctor_cmd(&self, name: &str, json: bool, args: &[&str]) -> Output {
        self.lab
            .exec(&self.lab.edge, &self.doctor_argv(name, json, args))
    }
}

fn hop<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["hops"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["hop"] == id))
        .unwrap_or_else(|| panic!("no hop {id} in {report}"))
}

/// Asserts doctor exited 1 and named `id` as the first failing hop, with `needle` in its detail.
fn assert_first_failure(run: &(i32, Value, Duration), id: &str, needle: &str) {
    let (code, v, _) = run;
    assert_eq!(*code, 1, "{v:#}");
    assert_eq!(v["ok"], false, "{v:#}");
    assert_eq!(v["first_failing_hop"], id, "{v:#}");
    let f = &v["first_failure"];
    assert_eq!(f["hop"], id);
    assert_eq!(f["ok"], false);
    let detail = f["detail"].as_str().unwrap();
    assert!(
        detail.contains(needle),
        "{id}: {needle:?} not in {detail:?}"
    );
    assert!(
        f["fix"].as_str().is_some_and(|s| !s.is_empty()),
        "no fix: {f}"
    );
    // Every hop before it passed (or was skipped for a reason that is not a failure).
    for h in v["hops"].as_array().unwrap() {
        if h["hop"] == id {
            break;
        }
        assert_ne!(h["ok"], false, "an earlier hop failed first: {h}");
    }
}

#[test]
fn doctor_passes_then_names_each_injected_fault() {
    if check(
        "doctor::doctor_passes_then_names_each_injected_fault",
        Needs::LAB,
    )
    .is_none()
    {
        return;
    }
    let started = Instant::now();
    // Declared first, dropped last: the certificate files outlive the daemon that reads them.
    let tls_dir = tempfile::Builder::new()
        .prefix("mg-doctor-tls-")
        .tempdir()
        .unwrap();
    let test_ca = TestCa::new(tls_dir.path());
    let mut c = Chain::up(Spec {
        tls: &[
            "--tls-cert",
            test_ca.cert.to_str().unwrap(),
            "--tls-key",
            test_ca.key.to_str().unwrap(),
        ],
        ..Spec::default()
    });
    c.wait_upstream("vllm", true);
    eprintln!("lab up in {:?}", started.elapsed());

    // Nothing broken (the test CA trusted): every hop passes, exit 0.
    let ca_pem = test_ca.pem.to_str().unwrap().to_string();
    let ca = ["--ca-file", ca_pem.as_str()];
    let healthy = c.doctor(&ca);
    let (code, v, took) = &healthy;
    assert_eq!(*code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    assert!(v["first_failure"].is_null());
    let ids: Vec<&str> = v["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["hop"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "config",
            "listener",
            "certificate",
            "dns",
            "peers",
            "upstreams",
            "models",
            "completion"
        ]
    );
    for h in v["hops"].as_array().unwrap() {
        assert_eq!(h["ok"], true, "{h}");
        assert_eq!(h["status"], "pass", "{h}");
        assert!(h["fix"].is_null());
    }
    assert!(hop(v, "dns")["detail"]
        .as_str()
        .unwrap()
        .contains("192.0.2.1"));
    assert!(hop(v, "models")["detail"].as_str().unwrap().contains(MODEL));
    assert!(hop(v, "completion")["detail"]
        .as_str()
        .unwrap()
        .contains("[DONE]"));
    assert_eq!(v["throwaway_key"]["revoked"], true, "{v}");
    eprintln!(
        "healthy doctor: {took:?} wall, {} ms inside",
        v["elapsed_ms"]
    );

    // The human checklist of the same.
    let human = c.doctor_raw(false, &ca);
    let out = text(&human.stdout);
    eprintln!("{out}");
    assert!(human.status.success(), "{out}");
    assert!(out.contains("✓ 3 certificate"), "{out}");
    assert!(out.contains("✓ 8 completion"), "{out}");
    assert!(out.contains("OK: 8 hops pass"), "{out}");

    // Without the test CA: not publicly trusted (hop 3), while the probes still run and pass.
    let untrusted = c.doctor(&[]);
    assert_first_failure(&untrusted, "certificate", "not publicly trusted");
    assert_eq!(
        hop(&untrusted.1, "completion")["ok"],
        true,
        "{}",
        untrusted.1
    );
    let human = c.doctor_raw(false, &[]);
    let out = text(&human.stdout);
    eprintln!("{out}");
    assert_eq!(human.status.code(), Some(1));
    assert!(out.contains("✗ 3 certificate"), "{out}");
    assert!(out.contains("      fix: "), "{out}");
    assert!(out.contains("FAILED at hop 3 (certificate)"), "{out}");
    assert!(text(&human.stderr).contains("hop 3 (certificate) failed"));

    // A config that is not the one the daemon on that socket runs: hop 2 says so.
    let copy = c.app.cfg.with_file_name("copy.toml");
    fs::copy(&c.app.cfg, &copy).unwrap();
    let out = c.lab.exec(
        &c.lab.edge,
        &[
            c.app.bin.to_str().unwrap(),
            "--config",
            copy.to_str().unwrap(),
            "doctor",
            "--json",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["first_failing_hop"], "listener", "{v:#}");
    assert!(
        v["first_failure"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("runs {}, not", c.app.cfg.display())),
        "{v:#}"
    );

    // A name no resolver can answer for (the edge namespace has no way to a DNS server): hop 4
    // is skipped, not failed; hop 3 fails because the certificate is for gw.test.
    let (code, v, took) = c.doctor_named("nowhere.test", &ca);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["first_failing_hop"], "certificate", "{v:#}");
    let dns = hop(&v, "dns");
    assert_eq!(dns["status"], "skip", "{dns}");
    assert_eq!(dns["ok"], Value::Null);
    assert!(
        dns["detail"]
            .as_str()
            .unwrap()
            .contains("DNS is not reachable"),
        "{dns}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");

    // Certificate faults, each a leaf (name, valid from, until: days from today) and what hop 3
    // must say: wrong public name, expired, near expiry (the default --min-days 14).
    for (fault, name, from, until, needle) in [
        (
            "wrong public name",
            "other.test",
            -1,
            90,
            "not valid for gw.test: it covers other.test",
        ),
        ("expired", NAME, -60, -2, "EXPIRED"),
        ("near expiry", NAME, -60, 5, "less than --min-days 14"),
    ] {
        eprintln!("fault: {fault}");
        test_ca.issue(name, from, until);
        c.reload();
        assert_first_failure(&c.doctor(&ca), "certificate", needle);
    }
    // The near-expiry leaf passes a lower --min-days.
    let (code, v, _) = c.doctor(&[ca[0], ca[1], "--min-days", "3"]);
    assert_eq!(code, 0, "{v:#}");
    test_ca.issue(NAME, -1, 90);
    c.reload();

    // Fault: upstream stopped (the fake model killed by PID). The reload starts a discovery
    // round at once instead of waiting up to 30 s for the next one.
    c.model.kill9();
    c.reload();
    c.wait_upstream("vllm", false);
    let r = c.doctor(&ca);
    assert_first_failure(&r, "upstreams", "vllm at http://10.20.0.5:8000/v1");
    assert_eq!(hop(&r.1, "completion")["ok"], false, "{}", r.1);
    assert_eq!(r.1["throwaway_key"]["revoked"], true);
    c.model = c.lab.start_fake_vllm(
        &c.lab.dir.path().join("fake-vllm2.jsonl"),
        &["--models", MODEL],
    );
    c.reload();
    c.wait_upstream("vllm", true);
    let (code, v, _) = c.doctor(&ca);
    assert_eq!(code, 0, "{v:#}");

    // Fault: corp peer stopped (wireguard-go killed by PID). Its handshake ages from here on;
    // --handshake-max-age = its age now + 2 s passes before the kill and fails 3 s after it.
    let age = c.status()["peers"][0]["latest_handshake_seconds_ago"]
        .as_u64()
        .unwrap();
    let max_age = (age + 2).to_string();
    let (code, v, _) = c.doctor(&[ca[0], ca[1], "--handshake-max-age", &max_age]);
    assert_eq!(code, 0, "{v:#}");
    c.corp.kill9();
    // No handshake can complete from here on: the age only grows.
    let age = c.status()["peers"][0]["latest_handshake_seconds_ago"]
        .as_u64()
        .unwrap();
    let max_age = (age + 2).to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status();
        if s["peers"][0]["latest_handshake_seconds_ago"]
            .as_u64()
            .unwrap()
            > age + 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "handshake age never grew: {s}");
        thread::sleep(Duration::from_millis(250));
    }
    // --timeout 5s: a request into the dead tunnel may hang (see the README); keep it short.
    let r = c.doctor(&[
        ca[0],
        ca[1],
        "--handshake-max-age",
        &max_age,
        "--timeout",
        "5s",
    ]);
    assert_first_failure(&r, "peers", "corp: latest handshake");
    let h8 = hop(&r.1, "completion");
    eprintln!("completion with the corp peer dead: {h8}");
    assert_eq!(h8["ok"], false, "{}", r.1);
    assert!(
        r.1["first_failure"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("(more than {max_age} s)")),
        "{}",
        r.1
    );

    // SIGTERM while the probe hangs in the dead tunnel: doctor stops, still revokes its key,
    // prints its report (interrupted) and exits 1.
    let mut slow = c.lab.spawn(
        "doctor-interrupted",
        Some(&c.lab.edge),
        &c.doctor_argv(NAME, true, &[ca[0], ca[1], "--handshake-max-age", &max_age]),
        &[],
    );
    thread::sleep(Duration::from_secs(3));
    assert!(
        slow.is_running(),
        "doctor ended before the signal:\n{}",
        slow.log()
    );
    let t = Instant::now();
    slow.stop(); // SIGTERM by PID, SIGKILL only after 5 s
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "doctor ignored SIGTERM"
    );
    let log = slow.log();
    let json_text = &log[log.find('{').unwrap()..=log.rfind("\n}").unwrap() + 1];
    let v: Value = serde_json::from_str(json_text).unwrap_or_else(|e| panic!("{e}:\n{log}"));
    assert_eq!(v["interrupted"], true, "{v:#}");
    assert_eq!(v["throwaway_key"]["revoked"], true, "{v:#}");
    assert_eq!(v["first_failing_hop"], "peers", "{v:#}");
    assert_eq!(hop(&v, "models")["status"], "pass", "{v:#}");
    assert_eq!(hop(&v, "completion")["status"], "skip", "{v:#}");
    assert!(log.contains("doctor: hop 5 (peers) failed"), "{log}");

    // Daemon stopped, port free: hop 2 says it is not running; later hops are skipped.
    c.mg.stop();
    let r = c.doctor(&ca);
    assert_first_failure(&r, "listener", "daemon is not running");
    for id in ["certificate", "peers", "upstreams", "models", "completion"] {
        assert_eq!(hop(&r.1, id)["status"], "skip", "{}", r.1);
    }

    // Fault: listener port taken (daemon stopped, another program on 192.0.2.1:443).
    let squatter = c.lab.spawn(
        "squatter",
        Some(&c.lab.edge),
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('192.0.2.1',443))\ns.listen()\nprint('listening',flush=True)\ntime.sleep(120)",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !squatter.log().contains("listening") {
        assert!(Instant::now() < deadline, "squatter did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    let r = c.doctor(&ca);
    assert_first_failure(&r, "listener", "listener port taken");
    let detail = r.1["first_failure"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("python3"),
        "the holder is not named: {detail}"
    );
    drop(squatter);

    // Every throwaway key doctor created is revoked.
    let keys: Value = serde_json::from_str(&c.app.cli(&["key", "list", "--json"])).unwrap();
    let doctor_keys: Vec<&Value> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"].as_str().unwrap().starts_with("doctor-"))
        .collect();
    assert!(doctor_keys.len() >= 8, "{keys:#}");
    for k in doctor_keys {
        assert_eq!(k["status"], "revoked", "{k}");
    }
    eprintln!("whole doctor lab test: {:?}", started.elapsed());
}

/// No root needed: an invalid config is hop 1 and exit 64 (JSON and human), the other hops are
/// skipped, and `--help` documents the hops and exit codes.
#[test]
fn invalid_config_is_hop_one_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("modelgate.toml");
    fs::write(&cfg, "[server]\nlisten = \"nope\"\n").unwrap();
    let bin = bin();
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["first_failing_hop"], "config", "{v:#}");
    assert!(v["first_failure"]["fix"].as_str().is_some(), "{v:#}");
    let statuses: Vec<&str> = v["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["fail", "skip", "skip", "skip", "skip", "skip", "skip", "skip"]
    );
    assert!(text(&out.stderr).contains("doctor: hop 1 (config) failed"));
    let human = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("doctor")
        .output()
        .unwrap();
    assert_eq!(human.status.code(), Some(64));
    let t = text(&human.stdout);
    assert!(t.contains("✗ 1 config") && t.contains("      fix: "), "{t}");
    assert!(t.contains("- 2 listener"), "{t}");

    let help = Command::new(&bin)
        .args(["doctor", "--help"])
        .output()
        .unwrap();
    let h = text(&help.stdout);
    for want in [
        "3 certificate",
        "listener port taken",
        "--ca-file",
        "--min-days",
        "64 invalid config",
    ] {
        assert!(h.contains(want), "--help lacks {want:?}:\n{h}");
    }
    assert!(
        !h.contains("--handshake-max-age"),
        "the test flag is hidden"
    );
}
