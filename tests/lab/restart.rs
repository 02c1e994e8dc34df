//! Restarts, crashes and dead peers with the corp side left alone, on the whole chain of
//! `harness::chain` (the corp wireguard-go configured from `peer add`, behind the lab's
//! stateful NAT, and never touched after it came up):
//!
//! - `modelgate run` stopped with SIGTERM and started again, and killed with `kill -9` and
//!   started again, several times each: the first chat answered 200 through the tunnel comes
//!   within 3 s of the new process's first `/healthz` (measured by
//!   `tests/python/restart_probe.py`, started before the new process; printed);
//! - a stream open when the corp peer dies ends with an `upstream_disconnected` error event,
//!   which the openai SDK raises as a typed `APIError`; the silent peer is then refused with
//!   503 at once, shown as silent in `status`, and named by `doctor` at hop 5;
//! - a stream still open at the end of the drain period ends with `server_shutting_down`
//!   (`APIError` in the SDK), and a request still waiting for the model gets 503.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::chain::{chat_body, Chain, Spec, GATEWAY_LISTEN, MODEL, NAME};
use crate::harness::lab::{Appliance, Lab, EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT};
use crate::harness::model::ModelLog;
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{manifest_path, text, wait_for, Proc};

const BASE_V1: &str = "https://gw.test/v1";

/// The probe of `restart_probe.py` in the client namespace, started and running (it printed
/// its first line) before the caller starts the new daemon.
fn start_probe(c: &Chain, key: &str, name: &str) -> Proc {
    let script = manifest_path("tests/python/restart_probe.py");
    let cert = c.cert();
    let base = format!("https://{NAME}");
    let p = c.lab.spawn(
        name,
        Some(&c.lab.client),
        &[
            "python3",
            "-u",
            script.to_str().unwrap(),
            "--base",
            &base,
            "--cert",
            cert.to_str().unwrap(),
            "--model",
            MODEL,
        ],
        &[("MG_KEY", key)],
    );
    wait_for("the restart probe starts", Duration::from_secs(10), || {
        p.log().contains("\"probe\": \"started\"")
    });
    p
}

/// `doctor --json --name gw.test ARGS…` in the edge: its report.
fn doctor(c: &Chain, args: &[&str]) -> Value {
    let mut cmd = vec![
        c.app.bin.to_str().unwrap(),
        "--config",
        c.app.cfg.to_str().unwrap(),
        "doctor",
        "--json",
        "--name",
        NAME,
    ];
    cmd.extend_from_slice(args);
    let out = c.lab.exec(&c.lab.edge, &cmd);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", text(&out.stderr)))
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Term,
    Kill9,
}

/// Stops the daemon (`how`), starts it again and returns what the probe measured.
fn restart(c: &mut Chain, key: &str, how: Stop, round: usize) -> Value {
    match how {
        Stop::Term => {
            c.mg.stop();
        }
        Stop::Kill9 => c.mg.kill9(),
    }
    let mut probe = start_probe(c, key, &format!("probe-{round}"));
    c.mg = c.app.run_gateway(&c.lab);
    probe.wait_exit(Duration::from_secs(100));
    let v = probe.last_json();
    eprintln!("restart {round} after {how:?}: {v}");
    v
}

/// SIGTERM + start and kill -9 + start, three times each, the corp wireguard-go untouched: the
/// first 200 through the tunnel within 3 s of `/healthz` every time (the figures are printed).
/// The restarted daemon reports the peer up, says it handshook the stored endpoint, and
/// `doctor` passes hops 5 and 6 right away (no stale probe from before the handshake).
#[test]
fn sigterm_and_kill9_restarts_serve_within_3s_of_healthz() {
    if check(
        "restart::sigterm_and_kill9_restarts_serve_within_3s_of_healthz",
        Needs::LAB,
    )
    .is_none()
    {
        return;
    }
    let mut c = Chain::up(Spec::default());
    let key = c.key("restart", &[]);
    c.keys_settle();
    c.wait_upstream("vllm", true);
    assert_eq!(c.curl_chat(&key.secret, MODEL, 1).status, 200);
    let corp_pid = c.corp.pid();
    // The learned endpoint reaches the store within a second.
    wait_for(
        "the endpoint store is written",
        Duration::from_secs(5),
        || c.app.state.join("endpoints.json").exists(),
    );

    let mut figures = Vec::new();
    for (round, how) in [
        Stop::Term,
        Stop::Kill9,
        Stop::Term,
        Stop::Kill9,
        Stop::Term,
        Stop::Kill9,
    ]
    .into_iter()
    .enumerate()
    {
        let v = restart(&mut c, &key.secret, how, round);
        assert_eq!(
            v["timeout"], false,
            "round {round} ({how:?}): no 200 within 90 s: {v}"
        );
        let ms = v["recovery_ms"].as_f64().expect("recovery_ms");
        figures.push((how, ms));
        assert!(
            ms <= 3000.0,
            "round {round} ({how:?}): first 200 {ms} ms after /healthz (3 s at most): {v}\n{}",
            c.mg.log()
        );
        assert!(
            c.corp.is_running() && c.corp.pid() == corp_pid,
            "the corp side was not touched"
        );
    }
    eprintln!("recovery after restart (first 200 after /healthz, ms): {figures:?}");

    let log = c.mg.log();
    assert!(
        log.contains("handshaking the peers at their stored endpoints"),
        "{log}"
    );
    let s = c.status();
    assert_eq!(s["peers"][0]["state"], "up", "{s}");
    let d = doctor(&c, &[]);
    for id in ["peers", "upstreams", "models", "completion"] {
        let hop = d["hops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hop"] == id)
            .unwrap();
        assert_eq!(
            hop["status"], "pass",
            "right after a restart, hop {id}: {hop}"
        );
    }
}

/// The chain with the corp peer's keepalive at 5 s (`keepalive = 5` in its `[[peer]]`, so the
/// wg-quick file `peer config` prints says `PersistentKeepalive = 5`): a silent peer is down
/// after 15 s instead of 55 s. The fake model's tokens come `token_delay_ms` apart.
fn chain_with_keepalive_5(token_delay_ms: &str) -> Chain {
    let lab = Lab::up();
    lab.add_host(&lab.client, EDGE_PUBLIC, NAME);
    lab.add_host(&lab.edge, EDGE_PUBLIC, NAME);
    let model_log = lab.dir.path().join("fake-vllm.jsonl");
    let model = lab.start_fake_vllm(
        &model_log,
        &["--models", MODEL, "--token-delay-ms", token_delay_ms],
    );
    let app = Appliance::init_tls(&lab, GATEWAY_LISTEN, &["--self-signed", NAME]);
    let url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
    app.cli(&["upstream", "add", "vllm", "--url", &url]);
    let cfg = std::fs::read_to_string(&app.cfg).unwrap();
    let edited = cfg.replacen("name = \"corp\"\n", "name = \"corp\"\nkeepalive = 5\n", 1);
    assert_ne!(cfg, edited, "the [[peer]] of corp was not found in:\n{cfg}");
    std::fs::write(&app.cfg, edited).unwrap();
    let conf = app.cli(&["peer", "config", "corp"]);
    assert!(conf.contains("PersistentKeepalive = 5"), "{conf}");
    let mg = app.run_gateway(&lab);
    let corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &conf, true);
    lab.assert_corp_handshake();
    Chain {
        mg,
        corp,
        model,
        app,
        model_log: ModelLog(model_log),
        lab,
    }
}

/// A chat from the client namespace with curl, bounded by `max_s`: `(status, body, took)`,
/// status 0 when curl got no answer in time.
fn curl_chat(c: &Chain, secret: &str, max_tokens: u32, max_s: &str) -> (u16, String, Duration) {
    let dir = c.lab.dir.path();
    let auth = dir.join("restart-curl.auth");
    std::fs::write(&auth, format!("Authorization: Bearer {secret}\n")).unwrap();
    let body = dir.join("restart-curl.json");
    std::fs::write(&body, chat_body(MODEL, max_tokens)).unwrap();
    let out_body = dir.join(format!("restart-curl-{}.out", std::process::id()));
    let _ = std::fs::remove_file(&out_body);
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let t = Instant::now();
    let out = c.lab.exec(
        &c.lab.client,
        &[
            "curl",
            "-sS",
            "--max-time",
            max_s,
            "--cacert",
            &p(&c.cert()),
            "-H",
            &format!("@{}", p(&auth)),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", p(&body)),
            "-o",
            &p(&out_body),
            "-w",
            "%{http_code}",
            &format!("https://{NAME}/v1/chat/completions"),
        ],
    );
    let took = t.elapsed();
    let status = text(&out.stdout).trim().parse().unwrap_or(0);
    (
        status,
        std::fs::read_to_string(&out_body).unwrap_or_default(),
        took,
    )
}

/// The SDK's `cut` command in the background: a long stream the test then cuts.
fn spawn_cut_stream(c: &Chain, py: &Path, key: &str, max_tokens: &str) -> Proc {
    let sdk = c.sdk(py.to_path_buf());
    let p = sdk.spawn(
        &c.lab,
        "sdk-cut",
        key,
        BASE_V1,
        &[
            "--timeout",
            "90",
            "cut",
            "--model",
            MODEL,
            "--max-tokens",
            max_tokens,
        ],
    );
    wait_for("the stream's first chunk", Duration::from_secs(20), || {
        p.log().contains("first_chunk_at")
    });
    p
}

/// The corp peer dies (its wireguard-go killed) under an open stream: the stream ends with an
/// `upstream_disconnected` error event (the SDK raises `APIError` with that code, not a parse
/// or connection error); once the peer has been silent for 2 keepalives + 5 s requests get 503
/// `tunnel_unavailable` with `Retry-After` at once, `status` shows it silent since the last
/// packet, and `doctor` fails hop 5 naming it with the corp-side fix. Its wireguard-go started
/// again, requests work again.
#[test]
fn a_dead_peer_cuts_streams_with_an_error_event_and_is_refused_at_once() {
    let Some(ready) = check(
        "restart::a_dead_peer_cuts_streams_with_an_error_event_and_is_refused_at_once",
        Needs::LAB.and_sdk(),
    ) else {
        return;
    };
    let mut c = chain_with_keepalive_5("100");
    let key = c.key("dead-peer", &[]);
    c.keys_settle();
    c.wait_upstream("vllm", true);
    let mut stream = spawn_cut_stream(&c, &ready.python(), &key.secret, "1000");

    let killed = Instant::now();
    let killed_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    c.corp.kill9();
    // Until the silence counts, requests may wait (a pooled connection, a dial timeout);
    // then 503 at once.
    let (refused_after, refusal) = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(40),
            "never refused at once"
        );
        let (status, body, took) = curl_chat(&c, &key.secret, 1, "3");
        if status == 503 && body.contains("tunnel_unavailable") {
            break (killed.elapsed(), took);
        }
        thread::sleep(Duration::from_millis(250));
    };
    eprintln!("dead peer: 503 from {refused_after:?} after the kill, answered in {refusal:?}");
    assert!(
        refusal < Duration::from_secs(1),
        "503 at once, took {refusal:?}"
    );
    assert!(
        refused_after >= Duration::from_secs(9) && refused_after < Duration::from_secs(25),
        "silence limit 2 × 5 s + 5 s after the last packet: {refused_after:?}"
    );
    let (status, _, took) = curl_chat(&c, &key.secret, 1, "3");
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(1), "{took:?}");

    let s = c.status();
    let peer = &s["peers"][0];
    assert_eq!(peer["state"], "silent", "{s}");
    assert_eq!(peer["silent_after_seconds"], 15, "{s}");
    let since = peer["silent_since_unix"]
        .as_u64()
        .expect("silent_since_unix");
    assert!(
        since + 7 >= killed_unix && since <= killed_unix + 1,
        "silent since {since}, killed at {killed_unix}: {s}"
    );
    let human = text(&c.app.mg(&["status"]).stdout);
    assert!(human.contains("state: SILENT since"), "{human}");

    let d = doctor(&c, &["--timeout", "5s"]);
    let hop5 = &d["hops"][4];
    assert_eq!(hop5["hop"], "peers");
    assert_eq!(hop5["status"], "fail", "{d}");
    assert!(
        hop5["detail"]
            .as_str()
            .unwrap()
            .contains("corp: silent since"),
        "{hop5}"
    );
    let fix = hop5["fix"].as_str().unwrap();
    assert!(
        fix.contains("WireGuard is down") && fix.contains("NAT/firewall"),
        "{fix}"
    );
    // Only the self-signed certificate (hop 3) fails before it.
    let first = d["first_failure"]["number"].as_u64().unwrap();
    assert!(first == 3 || first == 5, "{d}");

    stream.wait_exit(Duration::from_secs(60));
    let r = stream.last_json();
    eprintln!(
        "stream cut by the dead peer: {r}, ended {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        r["class"], "APIError",
        "a typed APIError from the error event: {r}"
    );
    assert_eq!(r["code"], "upstream_disconnected", "{r}");
    assert!(r["chunks"].as_u64().unwrap() > 0, "{r}");

    // The corp side comes back (a new wireguard-go): served again.
    let conf = c.app.cli(&["peer", "config", "corp"]);
    c.corp = c
        .lab
        .start_wg_with(&c.lab.corp, &c.lab.wg_corp, &conf, true);
    let back = Instant::now();
    loop {
        let (status, _, _) = curl_chat(&c, &key.secret, 1, "3");
        if status == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "not served again: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("corp peer back: served again after {:?}", back.elapsed());
    assert_eq!(c.status()["peers"][0]["state"], "up");
}

/// SIGTERM with `drain_timeout = "2s"`, a stream open and a non-streaming request still
/// waiting for the model: at the end of the drain period the stream ends with a
/// `server_shutting_down` error event (the SDK raises `APIError` with that code), the waiting
/// request gets 503 `server_shutting_down` with `Retry-After: 1`, and the daemon exits 0.
#[test]
fn the_end_of_the_drain_ends_streams_with_an_error_event() {
    let Some(ready) = check(
        "restart::the_end_of_the_drain_ends_streams_with_an_error_event",
        Needs::LAB.and_sdk(),
    ) else {
        return;
    };
    let mut c = Chain::up(Spec {
        token_delay_ms: Some("200"),
        extra_config: "[gateway]\ndrain_timeout = \"2s\"",
        ..Spec::default()
    });
    let key = c.key("drain-cut", &[]);
    c.keys_settle();
    c.wait_upstream("vllm", true);
    let mut stream = spawn_cut_stream(&c, &ready.python(), &key.secret, "200");
    // 100 tokens 200 ms apart: the fake model answers this one after 20 s.
    let dir = c.lab.dir.path();
    std::fs::write(
        dir.join("wait.auth"),
        format!("Authorization: Bearer {}\n", key.secret),
    )
    .unwrap();
    std::fs::write(dir.join("wait.json"), chat_body(MODEL, 100)).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let cert = c.cert();
    let mut waiting = c.lab.spawn(
        "curl-waiting",
        Some(&c.lab.client),
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            cert.to_str().unwrap(),
            "-H",
            &format!("@{}", p("wait.auth")),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", p("wait.json")),
            "-D",
            &p("wait.headers"),
            "-o",
            &p("wait.body"),
            "-w",
            "status=%{http_code}\n",
            &format!("https://{NAME}/v1/chat/completions"),
        ],
        &[],
    );
    wait_for(
        "the waiting request reaches the model",
        Duration::from_secs(10),
        || c.model_log.posts().len() >= 2,
    );
    let pid = c.status()["pid"].as_u64().unwrap();
    let t = Instant::now();
    crate::harness::proc::signal(pid, "TERM");

    stream.wait_exit(Duration::from_secs(20));
    let r = stream.last_json();
    let stream_ended = t.elapsed();
    eprintln!("stream at the end of the drain: {r}, {stream_ended:?} after SIGTERM");
    assert_eq!(r["class"], "APIError", "{r}");
    assert_eq!(r["code"], "server_shutting_down", "{r}");
    assert!(
        stream_ended >= Duration::from_millis(1900) && stream_ended < Duration::from_secs(6),
        "{stream_ended:?}"
    );
    waiting.wait_exit(Duration::from_secs(20));
    assert!(waiting.log().contains("status=503"), "{}", waiting.log());
    let body = std::fs::read_to_string(dir.join("wait.body")).unwrap();
    assert!(body.contains("server_shutting_down"), "{body}");
    let headers = std::fs::read_to_string(dir.join("wait.headers")).unwrap();
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{headers}"
    );
    let exit = c.mg.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "{exit}");
    let log = c.mg.log();
    assert!(log.contains("cutting them"), "{log}");
}
