//! Operating the daemon: `status [--json]`, `reload` (and SIGHUP), graceful stop, sd_notify
//! readiness and the Prometheus metrics, against the real binary.
//!
//! - `notify_status_reload_and_stop_on_loopback` needs no root: the daemon on loopback ports
//!   with `NOTIFY_SOCKET` pointing at a datagram socket the test reads.
//! - The others (root) use the whole chain of `harness::chain` (client → edge → corp
//!   wireguard-go → fake model). Clients are curl and `scripts/lib/sse_hold.py` (stdlib asyncio,
//!   N concurrent SSE streams counted to `[DONE]`), so no Python venv is needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::chain::{Chain, Key, Spec, GATEWAY_LISTEN, MODEL, NAME};
use crate::harness::lab::{EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{
    self, bin, manifest_path, modelgate, signal, status_json, text, wait_for, Proc,
};

fn peer<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no peer {name} in {status}"))
}

/// A plain HTTP GET of `path` on `addr` (std only); returns the whole answer.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The next sd_notify datagram (bounded wait).
fn next_notify(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify datagram within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The daemon on loopback (ports 0) under a fake systemd: `READY=1` once it serves, status and
/// metrics answer, SIGHUP and `reload` go through `RELOADING=1` → `READY=1`, a broken config is
/// refused with exit 64 and its reason while the daemon keeps serving, a second daemon on the
/// same socket is refused, and SIGTERM sends `STOPPING=1`, exits 0 and removes the socket.
#[test]
fn notify_status_reload_and_stop_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("modelgate.toml");
    let sock = d.join("run/control.sock");
    let init = modelgate(
        &cfg,
        &[
            "init",
            "--public-endpoint",
            "127.0.0.1:51820",
            "--wg-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--self-signed",
            "localhost",
            "--state-dir",
            d.join("state").to_str().unwrap(),
            "--control-socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(init.status.success(), "{}", text(&init.stderr));

    let notify_path = d.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let b = bin();
    let mut daemon = proc::spawn(
        d,
        "modelgate",
        None,
        &[
            b.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "run",
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let pid = u64::from(daemon.pid());

    let ready = next_notify(&notify);
    assert!(ready.starts_with("READY=1\nSTATUS=serving"), "{ready}");
    // Ready means ready: status answers at once.
    let s = status_json(&cfg);
    assert_eq!(s["pid"].as_u64(), Some(pid));
    assert_ne!(s["interface"]["listen_port"].as_u64(), Some(0));
    assert!(s["https"]["listen"].as_str().is_some(), "{s}");
    assert!(
        s["https"]["certificate_days_left"].as_i64().unwrap() > 300,
        "{s}"
    );
    let human = modelgate(&cfg, &["status"]);
    assert!(human.status.success());
    let human = text(&human.stdout);
    assert!(human.starts_with("interface: modelgate"), "{human}");
    assert!(human.contains("certificate expires:"), "{human}");
    let metrics_addr = s["metrics_listen"].as_str().unwrap().to_string();
    let scrape = http_get(&metrics_addr, "/metrics");
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("# TYPE modelgate_requests_total counter"));

    signal(pid, "HUP");
    assert!(next_notify(&notify).starts_with("RELOADING=1"));
    assert!(next_notify(&notify).starts_with("READY=1"));
    let r = modelgate(&cfg, &["reload"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(
        text(&r.stdout).starts_with("reloaded\n"),
        "{}",
        text(&r.stdout)
    );
    assert!(text(&r.stdout).contains("certificate reloaded"));
    assert!(next_notify(&notify).starts_with("RELOADING=1"));
    assert!(next_notify(&notify).starts_with("READY=1"));

    // A broken config is refused with its reason; the daemon keeps serving the old one.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}\n[bogus]\nx = 1\n")).unwrap();
    let r = modelgate(&cfg, &["reload"]);
    assert_eq!(r.status.code(), Some(64), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("unknown field `bogus`"),
        "{}",
        text(&r.stderr)
    );
    let r = modelgate(&cfg, &["reload", "--json"]);
    assert_eq!(r.status.code(), Some(64));
    let j: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(j["applied"], false);
    std::fs::write(&cfg, &good).unwrap();
    assert_eq!(status_json(&cfg)["pid"].as_u64(), Some(pid));
    let scrape = http_get(&metrics_addr, "/metrics");
    assert!(
        scrape.contains("modelgate_config_reloads_total{result=\"ok\"} 2\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("modelgate_config_reloads_total{result=\"refused\"} 2\n"),
        "{scrape}"
    );
    assert!(
        daemon.log().contains("configuration reload refused"),
        "{}",
        daemon.log()
    );

    // A second daemon on the same control socket is refused, and the first keeps it.
    let second = modelgate(&cfg, &["run"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        text(&second.stderr).contains("another modelgate daemon answers on it"),
        "{}",
        text(&second.stderr)
    );
    assert_eq!(status_json(&cfg)["pid"].as_u64(), Some(pid));

    signal(pid, "TERM");
    for _ in 0..4 {
        // RELOADING/READY of the refused reloads may still be queued before STOPPING.
        let m = next_notify(&notify);
        if m.starts_with("STOPPING=1") {
            break;
        }
        assert!(
            m.starts_with("RELOADING=1") || m.starts_with("READY=1"),
            "{m}"
        );
    }
    let exit = daemon.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "exit {exit}:\n{}", daemon.log());
    assert!(!sock.exists(), "control socket left behind");
    let gone = modelgate(&cfg, &["status"]);
    assert_eq!(gone.status.code(), Some(1));
    let err = text(&gone.stderr);
    assert!(
        err.contains(&sock.display().to_string()) && err.contains("fix:"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The namespace lab (root).

impl Chain {
    /// Starts `sse_hold.py` in the client namespace: `n` concurrent streaming chats of `tokens`
    /// tokens, each counted when it ends with `[DONE]`.
    fn hold_streams(&self, secret: &str, n: usize, tokens: usize, token_ms: u64) -> Proc {
        let body = format!(
            r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Write slowly."}}],"max_tokens":{tokens},"stream":true,"stream_options":{{"include_usage":true}},"fake_token_delay_ms":{token_ms}}}"#
        );
        let script = manifest_path("scripts/lib/sse_hold.py");
        let cert = self.cert();
        let streams = n.to_string();
        self.lab.spawn(
            "sse-hold",
            Some(&self.lab.client),
            &[
                "python3",
                script.to_str().unwrap(),
                NAME,
                "443",
                "--cafile",
                cert.to_str().unwrap(),
                "--sni",
                NAME,
                "--path",
                "/v1/chat/completions",
                "--body",
                &body,
                "--streams",
                &streams,
                "--ramp-per-s",
                "100",
                "--deadline-s",
                "120",
            ],
            &[("MG_KEY", secret)],
        )
    }

    /// Waits (bounded: 30 s) until `status` shows `n` active streams for `key_id`.
    fn wait_active_streams(&self, key_id: &str, n: u64) -> Value {
        let mut last = Value::Null;
        wait_for(
            &format!("{n} active streams for {key_id}"),
            Duration::from_secs(30),
            || {
                last = self.status();
                let active = last["streams"]
                    .as_array()
                    .and_then(|ks| ks.iter().find(|k| k["key_id"] == key_id))
                    .and_then(|k| k["active"].as_u64())
                    .unwrap_or(0);
                active == n
            },
        );
        last
    }
}

/// Waits (bounded) for sse_hold.py to exit and returns its result line.
fn hold_result(hold: &mut Proc, limit: Duration) -> Value {
    hold.wait_exit(limit);
    hold.last_json()
}

/// `test`'s chain (the fake model's tokens without delay, `extra_config` appended) with
/// upstream `vllm` discovered, and a key `key` the daemon has; `None` when the test is skipped.
fn chain(test: &str, extra_config: &'static str, key: &str) -> Option<(Chain, Key)> {
    check(test, Needs::LAB)?;
    let c = Chain::up(Spec {
        token_delay_ms: Some("0"),
        extra_config,
        ..Spec::default()
    });
    c.wait_upstream("vllm", true);
    let key = c.key(key, &[]);
    c.keys_settle();
    Some((c, key))
}

/// `status --json` shows the corp wireguard-go peer with its real public key, a recent
/// handshake and transfer counters that grow while requests flow; the upstream is reachable
/// with its models; the metrics scrape shows the request counter for the key, the peer's
/// handshake age and bytes, and the upstream's health.
#[test]
fn status_and_metrics_follow_the_corp_peer_and_requests() {
    let Some((c, Key { id: key_id, secret })) = chain(
        "control::status_and_metrics_follow_the_corp_peer_and_requests",
        "",
        "dev",
    ) else {
        return;
    };
    let corp_pub = c
        .lab
        .wg_show(&c.lab.corp, &c.lab.wg_corp, "public-key")
        .trim()
        .to_string();

    let s1 = c.status();
    let p1 = peer(&s1, "corp").clone();
    assert_eq!(p1["public_key"], corp_pub.as_str(), "{p1}");
    let age = p1["latest_handshake_seconds_ago"]
        .as_u64()
        .expect("handshake");
    assert!(age < 60, "{p1}");
    assert!(p1["endpoint"].as_str().is_some(), "{p1}");
    assert!(
        p1["allowed_ips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "10.20.0.0/24"),
        "{p1}"
    );
    let listen_port = c.lab.wg_show(&c.lab.corp, &c.lab.wg_corp, "endpoints");
    assert!(
        listen_port.contains(&format!("{EDGE_PUBLIC}:{}", s1["interface"]["listen_port"])),
        "the corp peer dials the port status reports: {listen_port} vs {s1}"
    );

    let mut last = (
        p1["rx_bytes"].as_u64().unwrap(),
        p1["tx_bytes"].as_u64().unwrap(),
    );
    for round in 0..3 {
        let r = c.curl_chat(&secret, MODEL, 3);
        assert_eq!(r.status, 200, "{}", r.body);
        let p = peer(&c.status(), "corp").clone();
        let now = (
            p["rx_bytes"].as_u64().unwrap(),
            p["tx_bytes"].as_u64().unwrap(),
        );
        eprintln!("round {round}: corp rx/tx {last:?} → {now:?}");
        assert!(
            now.0 > last.0 && now.1 > last.1,
            "transfer did not grow: {last:?} → {now:?}"
        );
        last = now;
    }
    let s = c.status();
    let up = &s["upstreams"][0];
    assert_eq!(up["name"], "vllm");
    assert_eq!(up["reachable"], true);
    assert_eq!(up["in_flight"], 0);
    assert!(
        up["models"].as_array().unwrap().iter().any(|m| m == MODEL),
        "{up}"
    );
    assert_eq!(s["https"]["listen"], GATEWAY_LISTEN);
    let human = text(&c.app.mg(&["status"]).stdout);
    eprintln!("{human}");
    assert!(
        human.contains(&format!("peer: {corp_pub} (corp)")),
        "{human}"
    );
    assert!(human.contains("seconds ago"), "{human}");

    // A refused request counts too (by key id "-": no valid key).
    let r = c.curl_chat("mg_this_is_not_a_key_0000000000000000", MODEL, 3);
    assert_eq!(r.status, 401, "{}", r.body);
    let scrape = c.lab.exec_ok(
        &c.lab.edge,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://127.0.0.1:9464/metrics",
        ],
    );
    for want in [
        format!(
            "modelgate_requests_total{{key_id=\"{key_id}\",model=\"{MODEL}\",status=\"200\"}} 3\n"
        ),
        "modelgate_requests_total{key_id=\"-\",model=\"-\",status=\"401\"} 1\n".to_string(),
        format!("modelgate_tokens_total{{key_id=\"{key_id}\",kind=\"completion\"}} 9\n"),
        "modelgate_peer_last_handshake_age_seconds{peer=\"corp\"} ".to_string(),
        "modelgate_peer_receive_bytes_total{peer=\"corp\"} ".to_string(),
        "modelgate_upstream_up{upstream=\"vllm\"} 1\n".to_string(),
        "modelgate_request_ttfb_seconds_count 3\n".to_string(),
    ] {
        assert!(scrape.contains(&want), "metrics lack {want:?}:\n{scrape}");
    }
    let line = scrape
        .lines()
        .find(|l| l.starts_with("modelgate_peer_last_handshake_age_seconds{peer=\"corp\"}"))
        .unwrap();
    let age: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((0.0..130.0).contains(&age), "{line}");
}

/// 100 streams are in flight through upstream `vllm` while the config gains an upstream `vllm2`
/// (with a new model name) and a peer and loses `vllm` itself, and `modelgate reload` applies
/// it: all 100 streams complete with `[DONE]` (they keep the upstream they started on), the new
/// model answers, the removed upstream's model is gone, the new peer is listed, and the corp
/// peer's WireGuard session is the same (its handshake time did not move, on both sides). Then
/// a broken config is refused (exit 64 with the reason) and requests keep working on the
/// previous config.
#[test]
fn reload_under_100_streams_drops_none_and_applies_changes() {
    let Some((c, Key { id: key_id, secret })) = chain(
        "control::reload_under_100_streams_drops_none_and_applies_changes",
        "",
        "load",
    ) else {
        return;
    };
    let before = c.status();
    let corp_hs = peer(&before, "corp")["latest_handshake_unix"]
        .as_u64()
        .unwrap();
    let wg_hs = c.lab.latest_handshake(&c.lab.corp, &c.lab.wg_corp);

    // 40 tokens 200 ms apart: each stream lasts ≈ 8 s.
    let mut hold = c.hold_streams(&secret, 100, 40, 200);
    let during = c.wait_active_streams(&key_id, 100);
    assert_eq!(during["upstreams"][0]["in_flight"], 100, "{during}");

    let url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
    c.app.cli(&[
        "upstream",
        "add",
        "vllm2",
        "--url",
        &url,
        "--model",
        "newmodel=acme-small",
    ]);
    c.app
        .cli(&["peer", "add", "lab2", "--allowed-ips", "10.30.0.0/24"]);
    c.app.cli(&["upstream", "remove", "vllm", "--yes"]);
    let r = c.curl_chat(&secret, "newmodel", 3);
    assert_eq!(
        r.status, 404,
        "the new model must not exist before the reload: {}",
        r.body
    );
    let t = Instant::now();
    let r = c.app.mg(&["reload"]);
    let out = text(&r.stdout);
    eprintln!("reload took {:?}:\n{out}", t.elapsed());
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(out.contains("upstream added: vllm2"), "{out}");
    assert!(out.contains("peer added: lab2"), "{out}");
    assert!(out.contains("upstream removed: vllm\n"), "{out}");
    assert!(
        !out.contains("corp"),
        "the corp peer must be untouched: {out}"
    );

    let r = c.curl_chat(&secret, "newmodel", 3);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c.curl_chat(&secret, MODEL, 3);
    assert_eq!(
        r.status, 404,
        "the removed upstream's model still answers: {}",
        r.body
    );
    let s = c.status();
    assert!(
        hold.is_running(),
        "the streams ended before the reload was checked"
    );
    let active = s["streams"][0]["active"].as_u64().unwrap_or(0);
    assert!(active > 0, "streams still in flight after the reload: {s}");
    assert!(
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "lab2"),
        "{s}"
    );
    let names: Vec<&str> = s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, ["vllm2"], "{s}");
    assert_eq!(
        peer(&s, "corp")["latest_handshake_unix"].as_u64().unwrap(),
        corp_hs,
        "the corp peer's session was reset by the reload"
    );

    // A broken config is refused with the reason; the running config stays.
    let good = std::fs::read_to_string(&c.app.cfg).unwrap();
    std::fs::write(&c.app.cfg, good.replace("mtu = 1420", "mtu = 100")).unwrap();
    let r = c.app.mg(&["reload"]);
    assert_eq!(r.status.code(), Some(64), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("wireguard.mtu"),
        "{}",
        text(&r.stderr)
    );
    let r = c.curl_chat(&secret, "newmodel", 3);
    assert_eq!(r.status, 200, "service after a refused reload: {}", r.body);
    std::fs::write(&c.app.cfg, good).unwrap();

    let res = hold_result(&mut hold, Duration::from_secs(90));
    eprintln!("100 streams across the reload: {res}");
    assert_eq!(res["ok"], 100, "{res}");
    assert_eq!(res["broken"], 0, "{res}");
    assert_eq!(res["non200"], 0, "{res}");
    assert_eq!(
        c.lab.latest_handshake(&c.lab.corp, &c.lab.wg_corp),
        wg_hs,
        "wireguard-go saw a new handshake: the session was reset"
    );
    assert!(c.mg.log().contains("configuration reload refused"));
}

/// SIGTERM with 20 streams in flight: new connections are refused at once, every stream
/// finishes with `[DONE]` inside the grace period (`drain_timeout = "20s"`), and the daemon
/// exits 0 well before the grace period ends.
#[test]
fn sigterm_drains_streams_and_refuses_new_connections() {
    let Some((mut c, Key { id: key_id, secret })) = chain(
        "control::sigterm_drains_streams_and_refuses_new_connections",
        "[gateway]\ndrain_timeout = \"20s\"",
        "drain",
    ) else {
        return;
    };
    // 20 tokens 250 ms apart: each stream lasts ≈ 5 s.
    let mut hold = c.hold_streams(&secret, 20, 20, 250);
    let s = c.wait_active_streams(&key_id, 20);
    let pid = s["pid"].as_u64().unwrap();
    let t = Instant::now();
    signal(pid, "TERM");

    // New connections are refused while the streams drain.
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let r = c
            .lab
            .helper(&c.lab.client, &["tcp-connect", GATEWAY_LISTEN, "500"]);
        let line = r.first().to_string();
        if line.starts_with("connect err ConnectionRefused") {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "new connections still accepted 3 s after SIGTERM: {line}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{:?} after SIGTERM: {refused}", t.elapsed());
    assert!(
        c.mg.is_running(),
        "the daemon exited before its streams finished"
    );

    let res = hold_result(&mut hold, Duration::from_secs(30));
    eprintln!("20 streams across SIGTERM: {res}");
    assert_eq!(res["ok"], 20, "{res}");
    assert_eq!(res["broken"], 0, "{res}");
    let exit = c.mg.wait_exit(Duration::from_secs(20));
    let took = t.elapsed();
    eprintln!("modelgate exited ({exit}) {took:?} after SIGTERM");
    assert!(
        exit.success(),
        "modelgate did not exit 0 after draining: {exit}"
    );
    assert!(
        took < Duration::from_secs(20),
        "exit took {took:?}, past the grace period"
    );
    let mglog = c.mg.log();
    assert!(mglog.contains("all connections drained"), "{mglog}");
    assert!(mglog.contains("stopped"), "{mglog}");
    c.corp.stop();
}
