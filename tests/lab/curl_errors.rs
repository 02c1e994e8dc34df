//! Early errors as the curl network engineers use sees them (Debian 12's curl 7.88): a 401, a
//! 413 and a 431 answered before the request body was read arrive intact, 40 times in a row,
//! over HTTP/2 and HTTP/1.1. Before the gateway drained the rest of the body, curl 7.88 printed
//! `(92) Stream error in the HTTP/2 framing layer` for most HTTP/2 tries (the stream ended with
//! RST_STREAM(NO_ERROR) while curl was still reading the answer).

use crate::harness::chain::{Chain, Spec, MODEL, NAME};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::text;

const TRIES: usize = 40;

/// `curl` from the client namespace `TRIES` times with `args`; each try's `%{http_code}` or
/// its error line.
fn curl_tries(c: &Chain, proto: &str, args: &[String]) -> Vec<String> {
    let cert = c.cert();
    let url = format!("https://{NAME}/v1/chat/completions");
    let mut cmd: Vec<String> = vec![
        "curl".into(),
        "-sS".into(),
        proto.into(),
        "--max-time".into(),
        "20".into(),
        "--cacert".into(),
        cert.to_str().unwrap().into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
    ];
    cmd.extend(args.iter().cloned());
    cmd.push(url);
    let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
    (0..TRIES)
        .map(|_| {
            let out = c.lab.exec(&c.lab.client, &argv);
            let code = text(&out.stdout).trim().to_string();
            if out.status.success() {
                code
            } else {
                format!("{code} {}", text(&out.stderr).trim())
            }
        })
        .collect()
}

#[test]
fn early_errors_reach_curl_7_88_intact() {
    let test = "curl_errors::early_errors_reach_curl_7_88_intact";
    if check(test, Needs::LAB).is_none() {
        return;
    }
    let c = Chain::up(Spec {
        token_delay_ms: Some("0"),
        extra_config: "[gateway]\nmax_header_bytes = 16384\nmax_body_bytes = 65536",
        ..Spec::default()
    });
    c.wait_upstream("vllm", true);
    let key = c.key("dev", &[]);
    c.keys_settle();
    let version = text(&c.lab.exec(&c.lab.client, &["curl", "--version"]).stdout);
    eprintln!("{}", version.lines().next().unwrap_or(""));

    let dir = c.lab.dir.path();
    let file = |name: &str, body: String| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        format!("@{}", p.display())
    };
    let chat = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "hello ".repeat(150)
    );
    let small = file("small.json", chat);
    let large = file(
        "large.json",
        format!(r#"{{"model":"{MODEL}","x":"{}"}}"#, "y".repeat(100_000)),
    );
    let good = file(
        "good.auth",
        format!("Authorization: Bearer {}\n", key.secret),
    );
    let wrong = file(
        "wrong.auth",
        "Authorization: Bearer mg_wrong_key_for_the_test\n".into(),
    );
    let filler = "f".repeat(10_000);
    let json = "content-type: application/json".to_string();
    let cases: Vec<(&str, u16, Vec<String>)> = vec![
        (
            "401, body not read",
            401,
            vec![
                "-H".into(),
                wrong,
                "-H".into(),
                json.clone(),
                "--data-binary".into(),
                small.clone(),
            ],
        ),
        (
            "413, body over max_body_bytes",
            413,
            vec![
                "-H".into(),
                good.clone(),
                "-H".into(),
                json.clone(),
                "--data-binary".into(),
                large,
            ],
        ),
        (
            "431, head over max_header_bytes",
            431,
            vec![
                "-H".into(),
                good,
                "-H".into(),
                format!("x-a: {filler}"),
                "-H".into(),
                format!("x-b: {filler}"),
                "-H".into(),
                json,
                "--data-binary".into(),
                small,
            ],
        ),
    ];
    let posts_before = c.model_log.posts().len();
    let mut failures = Vec::new();
    for (name, status, args) in &cases {
        for proto in ["--http2", "--http1.1"] {
            let seen = curl_tries(&c, proto, args);
            let good = seen.iter().filter(|s| **s == status.to_string()).count();
            eprintln!("{name} {proto}: {good}/{TRIES} answered {status}");
            if good != TRIES {
                let other: Vec<&String> =
                    seen.iter().filter(|s| **s != status.to_string()).collect();
                failures.push(format!(
                    "{name} {proto}: {good}/{TRIES}, others: {:?}",
                    &other[..other.len().min(3)]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        c.model_log.posts().len(),
        posts_before,
        "a refused request reached the model"
    );
}
