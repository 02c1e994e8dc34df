//! The appliance obtains and renews its certificate over ACME TLS-ALPN-01 on its one
//! HTTPS port, against pebble (Debian's ACME test CA) in the lab:
//!
//! ```text
//! [client] 192.0.2.10  pebble :14000 (ACME API) :15000 (management: /roots/0)
//!                      pebble-challtestsrv :8053 (DNS: every name → 192.0.2.1)
//!                      openai SDK / http.client trusting ONLY pebble's root → https://gw.test
//!     │
//! [edge]   192.0.2.1   modelgate run, [tls] mode = "acme", domain gw.test, :443 only
//!     │                (/etc/hosts: pebble.test → 192.0.2.10)
//! [corp] ── [model]    wireguard-go ── tests/python/fake_vllm.py
//! ```
//!
//! pebble issues 45-second certificates here (`certificateValidityPeriod`), so the product's own
//! renewal rule (renew once a third of the lifetime is left) fires 30 s after issuance: the test
//! needs no knob that production lacks. `PEBBLE_AUTHZREUSE=0` makes the renewal validate over
//! TLS-ALPN-01 again; pebble's default 5 % `badNonce` rejections stay on.
//!
//! Needs root, `pebble` and `pebble-challtestsrv` (scripts/test.sh installs them) and, for the
//! issuance test, a Python with the `openai` package (`MODELGATE_PYTHON`, default
//! `.venv/bin/python`); `harness::prereq` decides.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::lab::{Appliance, Lab, EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{run_ok, Proc};
use crate::harness::sdk::Sdk;

const CLIENT_ADDR: &str = "192.0.2.10";
const GATEWAY_LISTEN: &str = "192.0.2.1:443";
const DOMAIN: &str = "gw.test";
const MODEL: &str = "acme-coder";
/// Lifetime of pebble's certificates in this test: renewal is due 30 s after issuance.
const CERT_VALIDITY_S: u64 = 45;
/// pebble, its DNS and openssl (the client that checks what :443 serves), in the lab.
const NEEDS: Needs = Needs::LAB.and_tools(&["pebble", "pebble-challtestsrv", "openssl"]);

/// A CA for pebble's own API and a leaf for `pebble.test` it signed, written to `dir`
/// (Debian's pebble ships no certificate for its API). Returns the CA file.
fn pebble_api_pki(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "pebble API test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["pebble.test".to_string(), CLIENT_ADDR.into()]).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("pebble-api-ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-api.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-api.key"), leaf_key.serialize_pem()).unwrap();
    dir.join("pebble-api-ca.pem")
}

/// pebble + its DNS in the client namespace. Fields drop in order (processes by PID).
struct Pebble {
    _pebble: Proc,
    _dns: Proc,
    /// pebble's issuing root (fetched from the management port; new at every start).
    root: PathBuf,
    /// The root of pebble's API certificate, for `--acme-ca-root`.
    api_ca: PathBuf,
}

impl Pebble {
    fn start(lab: &Lab) -> Pebble {
        let dir = lab.dir.path();
        let api_ca = pebble_api_pki(dir);
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("{CLIENT_ADDR}:14000"),
            "managementListenAddress": format!("{CLIENT_ADDR}:15000"),
            "certificate": dir.join("pebble-api.pem"),
            "privateKey": dir.join("pebble-api.key"),
            // The ports pebble validates on: TLS-ALPN-01 goes to 443, the appliance's port.
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": CERT_VALIDITY_S,
        }});
        let config_file = dir.join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let dns = lab.spawn(
            "challtestsrv",
            Some(&lab.client),
            &[
                "pebble-challtestsrv",
                "-defaultIPv4",
                EDGE_PUBLIC,
                "-defaultIPv6",
                "",
                "-dns01",
                "127.0.0.1:8053",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                "127.0.0.1:8055",
            ],
            &[],
        );
        let pebble = lab.spawn(
            "pebble",
            Some(&lab.client),
            &[
                "pebble",
                "-config",
                config_file.to_str().unwrap(),
                "-dnsserver",
                "127.0.0.1:8053",
            ],
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_AUTHZREUSE", "0")],
        );
        // Wait (bounded) for the management port to hand out the issuing root.
        let root = dir.join("pebble-root.pem");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = lab.exec(
                &lab.client,
                &[
                    "curl",
                    "-sf",
                    "--max-time",
                    "2",
                    "--cacert",
                    api_ca.to_str().unwrap(),
                    &format!("https://{CLIENT_ADDR}:15000/roots/0"),
                ],
            );
            if out.status.success() && out.stdout.starts_with(b"-----BEGIN CERTIFICATE") {
                std::fs::write(&root, &out.stdout).unwrap();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pebble did not serve /roots/0 within 15 s:\n{}",
                pebble.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
        Pebble {
            _pebble: pebble,
            _dns: dns,
            root,
            api_ca,
        }
    }
}

/// What a client that trusts only `root` sees at gw.test:443: (SHA-256 fingerprint, serial),
/// or None when verification fails (the placeholder, or nothing listening).
fn served_cert(lab: &Lab, root: &Path) -> Option<(String, String)> {
    let script = format!(
        "openssl s_client -connect {GATEWAY_LISTEN} -servername {DOMAIN} -verify_hostname {DOMAIN} \
         -CAfile {} -verify_return_error </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256 -serial",
        root.display()
    );
    let out = lab.exec(&lab.client, &["timeout", "5", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.split_once('=').filter(|(n, _)| n.contains(k)))
            .map(|(_, v)| v.trim().to_string())
    };
    let fp = field("Fingerprint")?.replace(':', "").to_ascii_lowercase();
    Some((fp, field("serial")?))
}

/// The `took_ms` of every "ACME certificate installed" line of the daemon's log.
fn issuance_times_ms(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("ACME certificate installed"))
        .filter_map(|l| {
            let at = l.find("took_ms=")? + "took_ms=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The appliance gets a certificate from pebble over TLS-ALPN-01 on :443 alone; a client that
/// trusts only pebble's root streams a chat through it (openai SDK); the certificate is
/// renewed on schedule and swapped while a long SSE stream opened before the swap (on the old
/// certificate) runs on to `data: [DONE]`; new connections get the new certificate; the
/// account, key and certificate are stored with mode 0600, and a restart serves the stored
/// certificate at once with the stored account.
#[test]
fn acme_tls_alpn_issuance_and_renewal_on_the_https_port() {
    let test = "acme::acme_tls_alpn_issuance_and_renewal_on_the_https_port";
    let Some(ready) = check(test, NEEDS.and_sdk()) else {
        return;
    };
    let t_test = Instant::now();
    let lab = Lab::up();
    lab.add_host(&lab.client, EDGE_PUBLIC, DOMAIN);
    lab.add_host(&lab.edge, CLIENT_ADDR, "pebble.test");
    let pebble = Pebble::start(&lab);
    let sdk = Sdk {
        py: ready.python(),
        ns: lab.client.clone(),
        cert: pebble.root.clone(),
    };
    let model_log = lab.dir.path().join("fake-vllm.jsonl");
    let _model = lab.start_fake_vllm(&model_log, &["--models", MODEL, "--token-delay-ms", "20"]);

    let app = Appliance::init_tls(
        &lab,
        GATEWAY_LISTEN,
        &[
            "--acme-domain",
            DOMAIN,
            "--acme-email",
            "ops@example.com",
            "--acme-directory",
            "https://pebble.test:14000/dir",
            "--acme-ca-root",
            pebble.api_ca.to_str().unwrap(),
        ],
    );
    let url = format!("http://{MODEL_ADDR}:{MODEL_PORT}");
    app.cli(&["upstream", "add", "vllm", "--url", &url]);
    let t_run = Instant::now();
    let mut mg = app.run_gateway(&lab);
    let _corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &app.corp_conf, true);

    // 1. Issuance: a client trusting only pebble's root accepts what :443 serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (first_fp, first_serial) = loop {
        if let Some(c) = served_cert(&lab, &pebble.root) {
            break c;
        }
        assert!(mg.is_running(), "modelgate exited:\n{}", mg.log());
        assert!(
            Instant::now() < deadline,
            "no pebble-issued certificate on {GATEWAY_LISTEN} within 60 s:\n{}",
            mg.log()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let issued_after = t_run.elapsed();
    let t_issued = Instant::now();
    let took = issuance_times_ms(&mg.log());
    eprintln!(
        "first certificate (serial {first_serial}) trusted {:.2} s after `modelgate run`; ACME issuance took {took:?} ms",
        issued_after.as_secs_f64()
    );
    assert!(
        mg.log()
            .contains("ACME tls-alpn-01 validation handshake served"),
        "the validation did not reach the HTTPS port"
    );

    // 2. A streamed chat through the ACME certificate (openai SDK, only pebble's root).
    lab.assert_corp_handshake();
    let out: Value = serde_json::from_str(&app.cli(&["key", "create", "dev", "--json"])).unwrap();
    let key = out["secret"].as_str().unwrap().to_string();
    let base = format!("https://{DOMAIN}/v1");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = sdk.run(&key, &base, &["models"]);
        if m["models"].as_array().is_some_and(|m| !m.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "models never discovered: {m}");
        thread::sleep(Duration::from_millis(300));
    }
    let chat = sdk.run(
        &key,
        &base,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "4"],
    );
    assert_eq!(chat["content"], "tok0 tok1 tok2 tok3 ", "{chat}");
    assert_eq!(chat["finish_reason"], "stop", "{chat}");

    // 3. Renewal. pebble's 45 s certificate is due 30 s after issuance: open a 20 s stream
    //    ~8 s before that, on the old certificate.
    let renew_at = t_issued + Duration::from_secs(CERT_VALIDITY_S * 2 / 3);
    if let Some(wait) = renew_at
        .checked_duration_since(Instant::now())
        .and_then(|d| d.checked_sub(Duration::from_secs(8)))
    {
        thread::sleep(wait);
    }
    assert_eq!(
        served_cert(&lab, &pebble.root).map(|c| c.1),
        Some(first_serial.clone()),
        "renewed before the long stream was opened (setup too slow?)"
    );
    let body = lab.dir.path().join("long-stream.json");
    std::fs::write(
        &body,
        serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long story."}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 20,
            "fake_token_delay_ms": 1000,
        })
        .to_string(),
    )
    .unwrap();
    let stream_started = Instant::now();
    let mut stream = sdk.spawn(
        &lab,
        "long-stream",
        &key,
        &format!("https://{DOMAIN}"),
        &[
            "--timeout",
            "60",
            "raw-post",
            "--path",
            "/v1/chat/completions",
            "--body-file",
            body.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let (second_fp, second_serial) = loop {
        match served_cert(&lab, &pebble.root) {
            Some(c) if c.1 != first_serial => break c,
            _ => {}
        }
        assert!(mg.is_running(), "modelgate exited:\n{}", mg.log());
        assert!(
            Instant::now() < deadline,
            "the certificate was not renewed within 40 s:\n{}",
            mg.log()
        );
        thread::sleep(Duration::from_millis(250));
    };
    let swapped_after_issue = t_issued.elapsed();
    let swap_into_stream = stream_started.elapsed();
    assert!(
        stream.is_running(),
        "the long stream ended before the swap; cannot show it survives one"
    );
    stream.wait_exit(Duration::from_secs(60));
    let r = stream.last_json();
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        r["done"], true,
        "the stream did not reach data: [DONE]: {r}"
    );
    assert_eq!(r["usage"], true, "{r}");
    // role + 20 content + finish + usage + [DONE]
    assert_eq!(r["events"], 24, "{r}");
    assert_eq!(
        r["peer_cert_sha256"], first_fp,
        "the long stream was not on the old certificate"
    );
    assert_ne!(first_fp, second_fp);
    let took = issuance_times_ms(&mg.log());
    assert!(took.len() >= 2, "{took:?}");
    eprintln!(
        "renewed certificate (serial {second_serial}) served {:.2} s after the first issuance, \
         {:.2} s into the open stream; issuance times {took:?} ms; the stream ran on to [DONE] \
         ({} events)",
        swapped_after_issue.as_secs_f64(),
        swap_into_stream.as_secs_f64(),
        r["events"]
    );

    // 4. New connections get the new certificate and work.
    let chat = sdk.run(
        &key,
        &base,
        &["chat", "--model", MODEL, "--stream", "--max-tokens", "2"],
    );
    assert_eq!(chat["content"], "tok0 tok1 ", "{chat}");

    // 5. The ACME state on disk: 0600 files in STATE_DIR/acme.
    for f in ["account.json", "key.pem", "cert.pem"] {
        let p = app.state.join("acme").join(f);
        let mode = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", p.display());
    }
    let stored = std::fs::read_to_string(app.state.join("acme/cert.pem")).unwrap();
    assert!(
        stored.matches("BEGIN CERTIFICATE").count() >= 2,
        "chain without intermediate"
    );
    assert!(
        !mg.log().contains("BEGIN PRIVATE KEY"),
        "key material in the log"
    );
    assert!(mg.log().contains("ACME account created"));

    // 6. A restart serves the stored certificate at once (no placeholder) and reuses the
    //    stored account.
    mg.stop();
    let mut mg = app.run_gateway(&lab);
    let served = served_cert(&lab, &pebble.root).map(|c| c.0);
    let stored_fp = {
        let out = run_ok(
            Command::new("openssl")
                .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
                .arg(app.state.join("acme/cert.pem")),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_once('=')
            .map(|(_, v)| v.trim().replace(':', "").to_ascii_lowercase())
            .unwrap()
    };
    assert_eq!(
        served,
        Some(stored_fp),
        "after a restart the stored certificate was not served at once"
    );
    assert!(
        !mg.log().contains("ACME account created"),
        "the stored account was not reused:\n{}",
        mg.log()
    );
    mg.stop();
    eprintln!("{test}: {:.1} s", t_test.elapsed().as_secs_f64());
}

/// The name resolves (pebble's DNS) to an address where nothing answers on 443: the validation
/// fails, the daemon logs why (the CA's own problem detail), keeps serving its placeholder and
/// schedules a retry with backoff instead of hammering the CA.
#[test]
fn acme_validation_failure_is_reported_and_retried() {
    if check(
        "acme::acme_validation_failure_is_reported_and_retried",
        NEEDS,
    )
    .is_none()
    {
        return;
    }
    let lab = Lab::up();
    lab.add_host(&lab.edge, CLIENT_ADDR, "pebble.test");
    let pebble = Pebble::start(&lab);
    // wrong.test → the client namespace's own address, where no one listens on 443.
    let out = lab.exec(
        &lab.client,
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            "-d",
            &format!(r#"{{"host":"wrong.test","addresses":["{CLIENT_ADDR}"]}}"#),
            "http://127.0.0.1:8055/add-a",
        ],
    );
    assert!(out.status.success(), "challtestsrv add-a failed: {out:?}");
    let app = Appliance::init_tls(
        &lab,
        GATEWAY_LISTEN,
        &[
            "--acme-domain",
            "wrong.test",
            "--acme-directory",
            "https://pebble.test:14000/dir",
            "--acme-ca-root",
            pebble.api_ca.to_str().unwrap(),
        ],
    );
    let mut mg = app.run_gateway(&lab);
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = mg.log();
        if let Some(l) = log.lines().find(|l| l.contains("ACME issuance failed")) {
            break l.to_string();
        }
        assert!(mg.is_running(), "modelgate exited:\n{log}");
        assert!(
            Instant::now() < deadline,
            "no failure logged within 30 s:\n{log}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{line}");
    // pebble's own problem document, naming the challenge and the address it could not reach.
    assert!(
        line.contains("urn:ietf:params:acme:error:"),
        "no CA detail: {line}"
    );
    assert!(
        line.contains("tls-alpn-01") && line.contains(CLIENT_ADDR),
        "{line}"
    );
    assert!(line.contains("failures=1"), "{line}");
    assert!(
        line.contains("retry_in_s=9") || line.contains("retry_in_s=10"),
        "{line}"
    );
    // Still serving (the placeholder), not crashed, and nothing stored.
    assert!(mg.is_running());
    assert!(!app.state.join("acme/cert.pem").exists());
    mg.stop();
}
