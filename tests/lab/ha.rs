//! Two appliances on one shared PostgreSQL store, in one lab, with one corp router serving both
//! (issue 12):
//!
//! ```text
//! [client] curl ─ https://gw.test:443 ──┐           ┌─ A: modelgate run, WireGuard :51820, tunnel 10.99.0.1
//!                 https://gw.test:8443 ─┴─ [edge] ──┴─ B: modelgate run, WireGuard :51821, tunnel 10.98.0.1
//!                                             │
//!                        [corp] wireguard-go, one interface per appliance, each configured
//!                               from that appliance's `peer add corp --interface IF` file
//!                                             │
//!                        [model] fake_vllm.py 10.20.0.5:8000, logging every request
//!
//! PostgreSQL 15: a throwaway cluster (tests/support/pg.rs), reached by both appliances over
//! its Unix socket directory (the edge namespace shares the file system).
//! ```
//!
//! One test, in phases on the same rig (bounded, about half a minute): A serves on SQLite first
//! and is migrated (`store migrate`), B joins with A's `keys.secret` (`init --store-url`); then
//! alternating clients, a revoke on A seen as 401 on B (measured), PostgreSQL SIGKILLed under
//! load on both and restarted (no failed request; the ledger equals the model's count), and
//! `kill -9` of A under load on B (B unaffected).

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::chain::{chat_body, MODEL, NAME};
use crate::harness::curl;
use crate::harness::lab::{Appliance, Lab, EDGE_PUBLIC, LAN_NET, MODEL_ADDR, MODEL_PORT};
use crate::harness::model::ModelLog;
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{bin, run_ok, Proc};

#[path = "../support/pg.rs"]
mod pg;

const DB: &str = "modelgate";
/// Completion tokens each request asks for (the fake model serves exactly this many).
const MAX_TOKENS: u32 = 5;

/// One appliance of the pair: its files, its daemon and how clients reach it.
struct Node {
    label: &'static str,
    app: Appliance,
    /// `https://gw.test:PORT/v1/chat/completions`.
    url: String,
    mg: Option<Proc>,
}

impl Node {
    /// `init` in `lab.dir/NAME`: its own WireGuard port, tunnel network, HTTPS and metrics
    /// ports and control socket; `store` adds `--store-url URL --store-password-file FILE`
    /// (the caller copies the first appliance's `keys.secret` into `NAME/state` first).
    fn init(lab: &Lab, label: &'static str, n: u16, store: Option<(&str, &PathBuf)>) -> Node {
        let dir = lab.dir.path().join(format!("mg-{label}"));
        fs::create_dir_all(dir.join("state")).unwrap();
        let cfg = dir.join("modelgate.toml");
        let endpoint = format!("{EDGE_PUBLIC}:{}", 51820 + n);
        let https_port = if n == 0 { 443 } else { 8443 };
        let listen = format!("{EDGE_PUBLIC}:{https_port}");
        let tunnel = format!("10.{}.0.1/24", 99 - n);
        let metrics = format!("127.0.0.1:{}", 9464 + n);
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("--config").arg(&cfg).args([
            "init",
            "--public-endpoint",
            &endpoint,
            "--wg-listen",
            &endpoint,
            "--tunnel-address",
            &tunnel,
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--self-signed",
            NAME,
        ]);
        cmd.arg("--state-dir").arg(dir.join("state"));
        cmd.arg("--control-socket").arg(dir.join("control.sock"));
        if let Some((url, pw)) = store {
            cmd.args(["--store-url", url])
                .arg("--store-password-file")
                .arg(pw);
        }
        run_ok(&mut cmd);
        let app = Appliance {
            bin: bin(),
            cfg,
            state: dir.join("state"),
            listen,
            corp_conf: String::new(),
        };
        Node {
            label,
            app,
            url: format!("https://{NAME}:{https_port}/v1/chat/completions"),
            mg: None,
        }
    }

    /// The corp router's file for its interface `ifname`, as `peer add` prints it; and the
    /// fake model behind it as upstream `vllm`.
    fn add_corp_peer(&mut self, ifname: &str) -> String {
        let conf = self.app.cli(&[
            "peer",
            "add",
            "corp",
            "--allowed-ips",
            LAN_NET,
            "--interface",
            ifname,
        ]);
        assert!(
            conf.contains("[Interface]") && conf.contains(&format!("/etc/wireguard/{ifname}.conf")),
            "`peer add --interface {ifname}` printed no file for that interface:\n{conf}"
        );
        self.app.corp_conf = conf.clone();
        let model_url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
        self.app
            .cli(&["upstream", "add", "vllm", "--url", &model_url]);
        conf
    }

    /// `modelgate run` in the edge, logging to `modelgate-LABEL.log`; returns once its HTTPS
    /// port accepts from the client namespace (bounded: 15 s).
    fn start(&mut self, lab: &Lab) {
        let cfg = self.app.cfg.to_str().unwrap().to_string();
        let b = bin();
        let mut p = lab.spawn(
            &format!("modelgate-{}", self.label),
            Some(&lab.edge),
            &[b.to_str().unwrap(), "--config", &cfg, "run"],
            &[("RUST_LOG", "modelgate=debug,info")],
        );
        for _ in 0..15 {
            assert!(
                p.is_running(),
                "{}: modelgate run exited:\n{}",
                self.label,
                p.log()
            );
            if lab
                .helper(&lab.client, &["wait-accept", &self.app.listen, "1000"])
                .first()
                .starts_with("ok")
            {
                self.mg = Some(p);
                return;
            }
        }
        panic!(
            "{}: {} did not accept within 15 s",
            self.label, self.app.listen
        );
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.mg.take() {
            p.stop();
        }
    }

    fn cert(&self) -> PathBuf {
        self.app.state.join("self-signed.crt")
    }

    fn post(&self, lab: &Lab, key: &str) -> curl::Response {
        curl::post(
            lab,
            &self.cert(),
            key,
            &self.url,
            &chat_body(MODEL, MAX_TOKENS),
        )
    }

    /// One chat that must be answered 200 with the model's MAX_TOKENS.
    fn chat_ok(&self, lab: &Lab, key: &str, what: &str) {
        let r = self.post(lab, key);
        assert_eq!(r.status, 200, "{what} via {}: {}", self.label, r.body);
        assert_eq!(
            r.json()["usage"]["completion_tokens"],
            MAX_TOKENS,
            "{what} via {}: {}",
            self.label,
            r.body
        );
    }

    /// `key create NAME --json` → the secret.
    fn key(&self, name: &str) -> String {
        let v: Value =
            serde_json::from_str(&self.app.cli(&["key", "create", name, "--json"])).unwrap();
        v["secret"].as_str().unwrap().to_string()
    }

    /// `key show NAME --json`'s `usage_total`.
    fn usage(&self, name: &str) -> Value {
        let v: Value =
            serde_json::from_str(&self.app.cli(&["key", "show", name, "--json"])).unwrap();
        v["usage_total"].clone()
    }

    /// Waits (bounded: 20 s) until `vllm` is reachable with its models.
    fn wait_upstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.app.status();
            let ok = s["upstreams"].as_array().is_some_and(|us| {
                us.iter().any(|u| {
                    u["name"] == "vllm"
                        && u["reachable"] == true
                        && u["models"].as_array().is_some_and(|m| !m.is_empty())
                })
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: upstream never reachable with models: {s}",
                self.label
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `status --json`'s `store` object.
    fn store_status(&self) -> Value {
        self.app.status()["store"].clone()
    }
}

/// Fields drop in order: daemons and peers first, PostgreSQL, then the lab.
struct Rig {
    a: Node,
    b: Node,
    _wg: Vec<Proc>,
    _model: Proc,
    model_log: ModelLog,
    pg: pg::Pg,
    lab: Lab,
}

/// `(requests, prompt + completion tokens)` the fake model served in its POST records `from..`
/// (its own count: prompt = max(1, body bytes / 4), completion = MAX_TOKENS).
fn model_count(log: &ModelLog, from: usize) -> (u64, u64) {
    let posts = log.posts();
    let served = &posts[from..];
    let tokens = served
        .iter()
        .map(|p| (p["body_bytes"].as_u64().unwrap() / 4).max(1) + u64::from(MAX_TOKENS))
        .sum();
    (served.len() as u64, tokens)
}

fn keys_settle() {
    // Key changes reach every appliance within 1 s by contract; 1.5 s here.
    thread::sleep(Duration::from_millis(1500));
}

#[test]
fn two_appliances_one_store_one_corp_router() {
    let test = "ha::two_appliances_one_store_one_corp_router";
    if check(test, Needs::LAB).is_none() {
        return;
    }
    // As root (`check` passed) a missing PostgreSQL is a broken machine: fail with the fix.
    if let Some(why) = pg::missing() {
        panic!("{test}: {why}");
    }
    let lab = Lab::up();
    lab.add_host(&lab.client, EDGE_PUBLIC, NAME);
    let log_path = lab.dir.path().join("fake-vllm.jsonl");
    let model = lab.start_fake_vllm(&log_path, &["--models", MODEL, "--token-delay-ms", "0"]);
    let model_log = ModelLog(log_path);
    let pg = pg::Pg::start();
    pg.createdb(DB);
    // The Unix socket directory, percent-encoded as the URL's host (tokio-postgres: a host
    // starting with '/' is a socket directory).
    let sock = pg.sock().to_str().unwrap().replace('/', "%2F");
    let url = format!(
        "postgres://{}@{sock}:{}/{DB}?sslmode=disable",
        pg::USER,
        pg.port
    );
    let pw = pg.password_file(lab.dir.path());

    // A on SQLite first, with the corp router's first interface.
    let mut a = Node::init(&lab, "a", 0, None);
    let mut b_secret_dir = lab.dir.path().join("mg-b").join("state");
    let wg_a = lab.wg_corp.clone();
    let wg_b = format!("mg{}d", lab.tag);
    let conf_a = a.add_corp_peer(&wg_a);
    a.start(&lab);
    let mut wg = vec![lab.start_wg_with(&lab.corp, &wg_a, &conf_a, true)];
    assert!(
        lab.wait_handshake(&lab.corp, &wg_a, 0, Duration::from_secs(10)),
        "corp {wg_a} did not complete a handshake with A within 10 s"
    );
    a.wait_upstream();
    let early = a.key("early");
    keys_settle();
    let before = model_log.posts().len();
    for i in 0..6 {
        a.chat_ok(&lab, &early, &format!("SQLite request {i}"));
    }
    let sqlite_model = model_count(&model_log, before);
    a.stop(); // SIGTERM: the ledger is flushed.
    let sqlite_usage = a.usage("early");
    assert_eq!(
        (
            sqlite_usage["requests"].as_u64().unwrap(),
            sqlite_usage["tokens"].as_u64().unwrap()
        ),
        sqlite_model,
        "the SQLite ledger before the migration: {sqlite_usage}"
    );

    // store migrate → [store] in A's config; B joins with A's keys.secret.
    let report = a.app.cli(&[
        "store",
        "migrate",
        "--to",
        &url,
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    eprintln!("store migrate: {}", report.trim());
    let migrated = a.usage("early");
    assert_eq!(
        migrated, sqlite_usage,
        "usage totals after `store migrate` differ from the SQLite store's"
    );
    fs::create_dir_all(&b_secret_dir).unwrap();
    b_secret_dir.push("keys.secret");
    fs::copy(a.app.state.join("keys.secret"), &b_secret_dir).unwrap();
    let mut b = Node::init(&lab, "b", 1, Some((&url, &pw)));
    let conf_b = b.add_corp_peer(&wg_b);
    a.start(&lab);
    b.start(&lab);
    wg.push(lab.start_wg_with(&lab.corp, &wg_b, &conf_b, true));
    assert!(
        lab.wait_handshake(&lab.corp, &wg_b, 0, Duration::from_secs(10)),
        "corp {wg_b} did not complete a handshake with B within 10 s"
    );
    a.wait_upstream();
    b.wait_upstream();
    let mut rig = Rig {
        a,
        b,
        _wg: wg,
        _model: model,
        model_log,
        pg,
        lab,
    };
    let (a, b, lab) = (&rig.a, &rig.b, &rig.lab);
    assert_eq!(a.store_status()["degraded"], false, "{}", a.store_status());
    assert_eq!(b.store_status()["degraded"], false, "{}", b.store_status());

    // The migrated key works on both, and its totals are the SQLite store's plus these two.
    let before = rig.model_log.posts().len();
    a.chat_ok(lab, &early, "migrated key");
    b.chat_ok(lab, &early, "migrated key");
    let (n, t) = model_count(&rig.model_log, before);
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = (sqlite_model.0 + n, sqlite_model.1 + t);
    loop {
        let u = b.usage("early");
        let got = (
            u["requests"].as_u64().unwrap(),
            u["tokens"].as_u64().unwrap(),
        );
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migrated key's totals {got:?}, want {want:?} (SQLite {sqlite_model:?} + {n} requests)"
        );
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "store migrate: key `early` {} requests / {} tokens on SQLite = on PostgreSQL; works on A and B",
        sqlite_model.0, sqlite_model.1
    );

    // Clients alternating between A and B.
    let alt = a.key("alt");
    keys_settle();
    for i in 0..20 {
        let node = if i % 2 == 0 { a } else { b };
        node.chat_ok(lab, &alt, &format!("alternating request {i}"));
    }

    // Revoke on A (CLI against A's config) → 401 on B.
    let victim = b.key("victim");
    keys_settle();
    b.chat_ok(lab, &victim, "before the revoke");
    a.app.cli(&["key", "revoke", "victim", "--yes"]);
    let revoked = Instant::now();
    let mut polls = 0;
    let took = loop {
        polls += 1;
        let r = b.post(lab, &victim);
        if r.status == 401 {
            break revoked.elapsed();
        }
        assert_eq!(r.status, 200, "before the revoke took effect: {}", r.body);
        assert!(
            revoked.elapsed() < Duration::from_secs(3),
            "B still answers 200 for a key revoked on A 3 s ago"
        );
    };
    eprintln!("revoke on A -> 401 on B after {took:?} ({polls} requests to B)");
    assert!(
        took < Duration::from_secs(1),
        "revoke reached B after {took:?}"
    );

    // PostgreSQL SIGKILLed mid-load (two clients, one per appliance, 30 requests each),
    // restarted after 40: no request fails, and the ledger then equals the model's count.
    let load = a.key("load");
    keys_settle();
    let before = rig.model_log.posts().len();
    let done = AtomicUsize::new(0);
    let mut degraded_seen = (false, false);
    thread::scope(|s| {
        for node in [a, b] {
            let (done, load) = (&done, &load);
            s.spawn(move || {
                for i in 0..30 {
                    node.chat_ok(lab, load, &format!("load request {i}"));
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let wait_done = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while done.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "load stalled before {n} requests"
                );
                thread::sleep(Duration::from_millis(10));
            }
        };
        wait_done(20);
        let at_kill = done.load(Ordering::SeqCst);
        rig.pg.kill();
        let killed = done.load(Ordering::SeqCst);
        assert!(
            killed + 10 <= 60,
            "the load ended before PostgreSQL was down"
        );
        // At least 10 requests answered with PostgreSQL down.
        wait_done(killed + 10);
        // Both have noticed (their ledger flushes fail and spool) before it comes back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(degraded_seen.0 && degraded_seen.1) && Instant::now() < deadline {
            degraded_seen.0 |= a.store_status()["degraded"] == true;
            degraded_seen.1 |= b.store_status()["degraded"] == true;
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "PostgreSQL SIGKILLed after {at_kill} requests (down after {killed}), restarted \
             after {}; degraded seen on A {}, B {}",
            done.load(Ordering::SeqCst),
            degraded_seen.0,
            degraded_seen.1
        );
        rig.pg.launch();
    });
    assert!(
        degraded_seen.0 && degraded_seen.1,
        "status did not report the store degraded while PostgreSQL was down: A {}, B {}",
        a.store_status(),
        b.store_status()
    );
    let model_load = model_count(&rig.model_log, before);
    assert_eq!(
        model_load.0, 60,
        "the model did not see all 60 load requests"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in [a, b] {
        loop {
            let st = node.store_status();
            if st["degraded"] == false && st["spooled_rows"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still degraded 20 s after PostgreSQL came back: {st}",
                node.label
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
    // The ledger writer flushes every 250 ms: poll (bounded: 5 s) until it matches, printing
    // how long after the spool was empty.
    let synced = Instant::now();
    let (u, ledger) = loop {
        let u = a.usage("load");
        let ledger = (
            u["requests"].as_u64().unwrap(),
            u["tokens"].as_u64().unwrap(),
        );
        if ledger == model_load || synced.elapsed() > Duration::from_secs(5) {
            break (u, ledger);
        }
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "ledger polled for {:?} after both spools were empty",
        synced.elapsed()
    );
    eprintln!(
        "after the PostgreSQL kill: ledger {ledger:?}, model {model_load:?} (requests, tokens)"
    );
    assert_eq!(
        ledger, model_load,
        "the ledger differs from the model's count: {u}"
    );

    // kill -9 A while B serves: B unaffected.
    let after = b.key("after");
    keys_settle();
    let done = AtomicUsize::new(0);
    thread::scope(|s| {
        let (done, after) = (&done, &after);
        s.spawn(move || {
            for i in 0..20 {
                b.chat_ok(lab, after, &format!("B request {i} around A's kill -9"));
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::SeqCst) < 5 {
            assert!(Instant::now() < deadline, "B's load stalled");
            thread::sleep(Duration::from_millis(10));
        }
        rig.a.mg.as_mut().expect("A runs").kill9();
    });
    let gone = lab.helper(&lab.client, &["tcp-connect", &rig.a.app.listen, "1000"]);
    assert!(
        !gone.first().starts_with("connect ok"),
        "A still accepts after kill -9: {}",
        gone.first()
    );
    eprintln!("kill -9 A after 5 of B's 20 requests: all 20 answered 200 by B");
}
