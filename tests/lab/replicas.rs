//! One model on three real model servers (llama.cpp's `llama-server` with the tiny model of
//! `tests/fixtures/tiny_model.py`), two at the corp site and one behind a second corp
//! wireguard-go peer at a second site, through the real appliance:
//!
//! ```text
//! [client] replica_load.py, curl ─ HTTPS ─ [edge] modelgate ─┬─ WireGuard ─ [corp]  ─ [model]  r1 10.20.0.5:8000
//!                                                             │                               r2 10.20.0.5:8001
//!                                                             └─ WireGuard ─ [corp2] ─ [model2] r3 10.30.0.5:8000
//! ```
//!
//! r1 and r2 route the model statically, r3 discovers it (`GET /v1/models`). One test, in
//! phases on the same rig (bounded, about a minute): the load spread with `least_loaded`
//! (counted by each server's own log), r2 killed under load (no request fails before its
//! answer began: those are retried on r1/r3) and back (traffic within 5 s), then the prompt
//! cache (`usage.prompt_tokens_details.cached_tokens`, as llama-server reports it) of
//! Cursor-shaped multi-turn conversations with `least_loaded` against `affinity`.
//!
//! Each server has one slot (`-np 1`) and its host prompt cache off (`--cache-ram 0`), so its
//! prefix cache holds exactly the last prompt it served (as a busy GPU cache would hold only
//! recent conversations). The context (`-c 8192`, the model written with the same length) fits
//! the conversations: ~4k tokens of system prompt, tools and one tool step, plus short turns.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::curl;
use crate::harness::lab::{Appliance, Lab, EDGE_PUBLIC, MODEL_ADDR};
use crate::harness::llama::{self, LlamaServer, MODEL_ID};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{manifest_path, run_ok, text, Proc};
use crate::harness::site2::{Site2, MODEL2_ADDR};

const NAME: &str = "gw.test";
const LISTEN: &str = "192.0.2.1:443";
const CTX: u32 = 8192;

/// Fields drop in order: servers and peers first, the lab last.
struct Rig {
    /// r1, r2, r3 (r2 replaced when it is restarted).
    servers: Vec<LlamaServer>,
    _site2: Site2,
    _corp: Proc,
    _mg: Proc,
    key: String,
    bin: PathBuf,
    model: PathBuf,
    app: Appliance,
    lab: Lab,
}

impl Rig {
    fn up() -> Rig {
        let bin = llama::binary();
        let lab = Lab::up();
        lab.add_host(&lab.client, EDGE_PUBLIC, NAME);
        let model = llama::tiny_model(lab.dir.path(), CTX);
        let app = Appliance::init_tls(&lab, LISTEN, &["--self-signed", NAME]);
        let site2 = Site2::up(&lab, &app);
        let servers = vec![
            LlamaServer::start(&lab, "r1", &lab.model, &bin, &model, MODEL_ADDR, 8000, CTX),
            LlamaServer::start(&lab, "r2", &lab.model, &bin, &model, MODEL_ADDR, 8001, CTX),
            LlamaServer::start(
                &lab,
                "r3",
                &site2.model,
                &bin,
                &model,
                MODEL2_ADDR,
                8000,
                CTX,
            ),
        ];
        let route = format!("--model={MODEL_ID}");
        for (name, s) in [("r1", &servers[0]), ("r2", &servers[1])] {
            app.cli(&[
                "upstream",
                "add",
                name,
                "--url",
                &s.url(),
                &route,
                "--max-concurrent",
                "2",
            ]);
        }
        app.cli(&[
            "upstream",
            "add",
            "r3",
            "--url",
            &servers[2].url(),
            "--max-concurrent",
            "2",
        ]);
        let created: Value =
            serde_json::from_str(&app.cli(&["key", "create", "load", "--json"])).unwrap();
        let key = created["secret"].as_str().unwrap().to_string();
        let mg = app.run_gateway(&lab);
        let corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &app.corp_conf, true);
        lab.assert_corp_handshake();
        site2.assert_handshake(&lab);
        let rig = Rig {
            servers,
            _site2: site2,
            _corp: corp,
            _mg: mg,
            key,
            bin,
            model,
            app,
            lab,
        };
        rig.wait_replicas();
        rig
    }

    /// Waits (bounded: 30 s) until `status` shows the model with its three replicas healthy
    /// and every upstream reachable (r3 has discovered it through the second site).
    fn wait_replicas(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.app.status();
            let model = s["models"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["name"] == MODEL_ID))
                .cloned();
            let reachable = s["upstreams"]
                .as_array()
                .is_some_and(|u| u.len() == 3 && u.iter().all(|u| u["reachable"] == true));
            if reachable
                && model.as_ref().is_some_and(|m| {
                    m["replicas"] == serde_json::json!(["r1", "r2", "r3"])
                        && m["healthy_replicas"] == 3
                })
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the three replicas never showed up healthy: {s}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `status --json`'s entry of upstream `name`.
    fn upstream_status(&self, name: &str) -> Value {
        let st = self.app.status();
        st["upstreams"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no upstream {name} in {st}"))
    }

    fn cert(&self) -> PathBuf {
        self.app.state.join("self-signed.crt")
    }

    fn processed(&self) -> Vec<usize> {
        self.servers.iter().map(LlamaServer::processed).collect()
    }

    /// `replica_load.py` in the client namespace with `args`; in the background.
    fn load(&self, name: &str, args: &[&str]) -> (Proc, PathBuf) {
        let out = self.lab.dir.path().join(format!("{name}.jsonl"));
        let script = manifest_path("tests/python/replica_load.py");
        let cert = self.cert();
        let url = format!("https://{NAME}/v1/chat/completions");
        let mut argv = vec![
            "python3",
            script.to_str().unwrap(),
            "--url",
            &url,
            "--cert",
            cert.to_str().unwrap(),
            "--model",
            MODEL_ID,
            "--out",
            out.to_str().unwrap(),
        ];
        argv.extend_from_slice(args);
        let p = self.lab.spawn(
            name,
            Some(&self.lab.client),
            &argv,
            &[("MG_KEY", &self.key)],
        );
        (p, out)
    }

    /// One body through the gateway with curl; the server's `(prompt_tokens, cached_tokens)`.
    fn cached(&self, body: &Value) -> (u64, u64) {
        let r = curl::post(
            &self.lab,
            &self.cert(),
            &self.key,
            &format!("https://{NAME}/v1/chat/completions"),
            &body.to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let usage = r
            .body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|e| e.get("usage").filter(|u| u.is_object()).cloned())
            .unwrap_or_else(|| panic!("no usage in the stream: {}", r.body));
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens in {usage}"));
        (usage["prompt_tokens"].as_u64().unwrap(), cached)
    }

    /// The index of the one server that processed a request while `f` ran.
    fn served_by(&self, f: impl FnOnce()) -> usize {
        let before = self.processed();
        f();
        let after = self.processed();
        let got: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
        assert_eq!(got.len(), 1, "one request, servers {before:?} → {after:?}");
        got[0]
    }
}

/// `(requests, ok, failed_before_head, cut_after_head, other_status)` of a finished load.
fn summary(p: &mut Proc) -> Value {
    let status = p.wait_exit(Duration::from_secs(90));
    assert!(status.success(), "replica_load.py failed:\n{}", p.log());
    p.last_json()
}

/// The multi-turn Cursor-shaped conversation (`cursor_requests.py multiturn`), its first user
/// message marked with `label` so that conversations differ from their first question on.
fn conversation(turns: usize, label: &str) -> Vec<Value> {
    let out = run_ok(
        std::process::Command::new("python3").args([
            manifest_path("tests/fixtures/cursor_requests.py")
                .to_str()
                .unwrap(),
            "multiturn",
            "--turns",
            &turns.to_string(),
            "--history-kb",
            "2",
            "--model",
            MODEL_ID,
            "--max-tokens",
            "8",
        ]),
    );
    let mut bodies: Vec<Value> = serde_json::from_str(&text(&out.stdout)).unwrap();
    for b in &mut bodies {
        let first = b["messages"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|m| m["role"] == "user")
            .unwrap();
        let c = first["content"].as_str().unwrap().to_string();
        first["content"] = Value::String(format!("[{label}] {c}"));
    }
    bodies
}

/// Turns `1..` of `convs` (turn 0 already sent), each turn in a rotated order of the
/// conversations (users do not take turns in a fixed order); the mean cached and prompt
/// tokens per request.
fn later_turns(rig: &Rig, convs: &[Vec<Value>]) -> (f64, f64) {
    let (mut cached, mut prompt, mut n) = (0u64, 0u64, 0u64);
    for t in 1..convs[0].len() {
        for k in 0..convs.len() {
            let c = &convs[(t + k) % convs.len()];
            let (p, h) = rig.cached(&c[t]);
            prompt += p;
            cached += h;
            n += 1;
        }
    }
    (cached as f64 / n as f64, prompt as f64 / n as f64)
}

#[test]
fn replicas_balance_fail_over_come_back_and_keep_conversations_cached() {
    let Some(_) = check("replicas", Needs::LAB) else {
        return;
    };
    let started = Instant::now();
    let mut rig = Rig::up();
    // Keys reach the daemon within 1 s.
    thread::sleep(Duration::from_millis(1500));
    eprintln!("rig up in {:?}", started.elapsed());

    // 1. Spread: 90 streamed requests from 6 clients, least_loaded.
    let before = rig.processed();
    let (mut p, _) = rig.load(
        "spread",
        &[
            "--concurrency",
            "6",
            "--requests",
            "90",
            "--max-tokens",
            "24",
        ],
    );
    let s = summary(&mut p);
    assert_eq!(s["ok"], 90, "every request answered to [DONE]: {s}");
    let per: Vec<usize> = rig
        .processed()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    eprintln!("spread over r1, r2, r3 (their own logs): {per:?}");
    assert_eq!(
        per.iter().sum::<usize>(),
        90,
        "each request processed once: {per:?}"
    );
    for n in &per {
        assert!((27..=33).contains(n), "not within ±10% of 30 each: {per:?}");
    }

    // 2. r2 killed under load, then back.
    let stop = rig.lab.dir.path().join("stop-load");
    let (mut p, out) = rig.load(
        "failover",
        &[
            "--concurrency",
            "6",
            "--seconds",
            "60",
            "--max-tokens",
            "96",
            "--stop-file",
            stop.to_str().unwrap(),
        ],
    );
    thread::sleep(Duration::from_secs(2));
    assert!(rig.servers[1].processed() > 0);
    rig.servers[1].proc.kill9();
    let killed = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let r2 = rig.upstream_status("r2");
    assert!(r2["ejections_total"].as_u64().unwrap() >= 1, "{r2}");
    let back = LlamaServer::start(
        &rig.lab,
        "r2-back",
        &rig.lab.model,
        &rig.bin,
        &rig.model,
        MODEL_ADDR,
        8001,
        CTX,
    );
    let listening = Instant::now();
    rig.servers[1] = back;
    let deadline = listening + Duration::from_secs(5);
    while rig.servers[1].processed() == 0 {
        assert!(
            Instant::now() < deadline,
            "r2 back for 5 s without traffic: {}",
            rig.app.status()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let returned_after = listening.elapsed();
    thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").unwrap();
    let s = summary(&mut p);
    let records: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let not_started: Vec<&Value> = records
        .iter()
        .filter(|r| r["status"] != 200 || r["head"] != true)
        .collect();
    let r2 = rig.upstream_status("r2");
    eprintln!(
        "failover: {s}; r2 down {:?}, traffic again {returned_after:?} after it listened; r2 retries_total {} ejections_total {}",
        listening - killed,
        r2["retries_total"],
        r2["ejections_total"]
    );
    assert!(
        not_started.is_empty(),
        "{} request(s) failed before their answer began: {not_started:?}",
        not_started.len()
    );
    assert!(s["requests"].as_u64().unwrap() >= 30, "{s}");
    assert!(r2["retries_total"].as_u64().unwrap() >= 1, "{r2}");
    let metrics = text(
        &rig.lab
            .exec(
                &rig.lab.edge,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:9464/metrics",
                ],
            )
            .stdout,
    );
    for want in [
        "modelgate_upstream_healthy{upstream=\"r2\"} 1",
        "modelgate_upstream_ejections_total{upstream=\"r2\"}",
        "modelgate_upstream_retries_total{upstream=\"r2\"}",
        "modelgate_model_queued{model=\"tiny-llama\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }

    // 3. Prompt cache: three conversations, least_loaded (the default) …
    let turns = 4;
    let ll: Vec<Vec<Value>> = ["ll-a", "ll-b", "ll-c"]
        .iter()
        .map(|l| conversation(turns, l))
        .collect();
    for c in &ll {
        rig.cached(&c[0]);
    }
    let (ll_cached, ll_prompt) = later_turns(&rig, &ll);

    // … then affinity, applied by `model set` + `reload`.
    rig.app
        .cli(&["model", "set", MODEL_ID, "--balance", "affinity"]);
    let reloaded = rig.app.cli(&["reload"]);
    assert!(
        reloaded.contains("[[model]] balancing updated"),
        "{reloaded}"
    );
    let st = rig.app.status();
    assert_eq!(st["models"][0]["balance"], "affinity", "{st}");
    // One conversation per replica: each server's only slot then holds its own conversation
    // (with two on one replica they would evict each other there, which a real prefix cache
    // with room for more than one prompt would not). Their first turns show where they live.
    let mut af: Vec<Vec<Value>> = Vec::new();
    let mut homes = Vec::new();
    for i in 0..20 {
        let c = conversation(turns, &format!("af-{i}"));
        let home = rig.served_by(|| {
            rig.cached(&c[0]);
        });
        if !homes.contains(&home) {
            homes.push(home);
            af.push(c);
        }
        if homes.len() == 3 {
            break;
        }
    }
    assert!(
        af.len() >= 2,
        "20 conversations all on one replica: {homes:?}"
    );
    // Conversations not kept may have been served last at a home: the kept ones' first turns
    // again (to the same replica: affinity) put each home's slot back on its conversation.
    for (c, home) in af.iter().zip(&homes) {
        let again = rig.served_by(|| {
            rig.cached(&c[0]);
        });
        assert_eq!(again, *home, "a conversation moved between replicas");
    }
    let (af_cached, af_prompt) = later_turns(&rig, &af);
    eprintln!(
        "cached_tokens per later turn: least_loaded {ll_cached:.0} of {ll_prompt:.0} prompt tokens, affinity {af_cached:.0} of {af_prompt:.0} ({} conversations on {} replicas)",
        af.len(),
        homes.len()
    );
    assert!(
        af_cached > 1.5 * ll_cached,
        "affinity did not raise cached_tokens: {af_cached:.0} vs {ll_cached:.0}"
    );
    assert!(
        af_cached > 0.9 * af_prompt,
        "{af_cached:.0} of {af_prompt:.0}"
    );
    eprintln!("replicas lab test took {:?}", started.elapsed());
}
