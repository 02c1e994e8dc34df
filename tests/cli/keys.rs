//! `modelgate key …` on temporary directories: the binary writes the store,
//! the library's `KeyRing::load` authenticates what it printed, and a watching daemon-side
//! `Keys` sees CLI changes within a second. Also exit codes, error lines and file modes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use modelgate::keys::{AuthError, KeyRing, KeyStore, Keys};
use serde_json::Value;

use crate::env::{code, mode, stderr, stdout, Env};

/// A directory with `modelgate init` done.
fn initialised() -> Env {
    Env::initialised("127.0.0.1:51820")
}

fn secs(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

#[test]
fn create_list_show_authenticate_revoke() {
    let env = initialised();
    let out = env.mg(&[
        "key",
        "create",
        "alice",
        "--models",
        "llama-3*,qwen2",
        "--rpm",
        "60",
        "--tpm",
        "100000",
        "--max-concurrent",
        "4",
        "--budget",
        "2000000/day",
        "--expires",
        "30d",
        "--allow-cidr",
        "203.0.113.0/24",
        "--allow-cidr",
        "2001:db8::/32",
        "--endpoints",
        "chat_completions,models",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Human output: the secret alone on stdout, the warning on stderr.
    let secret = stdout(&out);
    let lines: Vec<&str> = secret.lines().collect();
    assert_eq!(lines.len(), 1, "{secret}");
    let secret = lines[0].to_string();
    assert!(secret.starts_with("mg_") && secret.len() == 65, "{secret}");
    assert!(stderr(&out).contains("only once"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&secret));

    let list = env.json(&["key", "list", "--json"]);
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    let k = &arr[0];
    assert_eq!(k["name"], "alice");
    assert_eq!(k["status"], "active");
    let id = k["id"].as_str().unwrap().to_string();
    assert_eq!(&secret[3..15], id);
    assert!(k.get("secret").is_none());
    let p = &k["policy"];
    assert_eq!(p["models"], serde_json::json!(["llama-3*", "qwen2"]));
    assert_eq!(
        p["endpoints"],
        serde_json::json!(["chat_completions", "models"])
    );
    assert_eq!(
        p["allow_cidrs"],
        serde_json::json!(["203.0.113.0/24", "2001:db8::/32"])
    );
    assert_eq!(p["rpm"], 60);
    assert_eq!(p["tpm"], 100000);
    assert_eq!(p["max_concurrent"], 4);
    assert_eq!(
        p["budget"],
        serde_json::json!({"tokens": 2000000, "period": "day"})
    );
    let expires = secs(&k["expires_at"]);
    let in_30d = SystemTime::now() + Duration::from_secs(30 * 86_400);
    assert!(expires <= in_30d && expires > in_30d - Duration::from_secs(120));

    let table = env.ok(&["key", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("alice") && table.contains(&id) && table.contains("active"));
    assert!(table.contains("llama-3*,qwen2"));

    let show = env.json(&["key", "show", "alice", "--json"]);
    assert_eq!(show, *k);
    let by_id = env.json(&["key", "show", &id, "--json"]);
    assert_eq!(by_id, *k);
    let human = env.ok(&["key", "show", "alice"]);
    assert!(
        human.contains("2000000/day") && human.contains(&id),
        "{human}"
    );
    assert!(!human.contains(&secret));

    // The printed secret authenticates through the store-backed ring.
    let now = SystemTime::now();
    let principal = env.ring().authenticate(&secret, now).unwrap();
    assert_eq!(principal.id, id);
    assert_eq!(principal.name, "alice");
    assert_eq!(principal.policy.rpm, Some(60));
    assert_eq!(
        principal.policy.expires_at,
        Some(expires_within_ms(&env, &id))
    );

    // Revoke without --yes and without a terminal: usage error, nothing changes.
    env.fails(&["key", "revoke", "alice"], 2, &["--yes"]);
    assert!(env.ring().authenticate(&secret, now).is_ok());

    let out = env.ok(&["key", "revoke", "alice", "--yes"]);
    assert!(out.contains("revoked") && out.contains(&id));
    assert_eq!(
        env.ring().authenticate(&secret, now),
        Err(AuthError::Revoked)
    );
    assert_eq!(
        env.json(&["key", "show", "alice", "--json"])["status"],
        "revoked"
    );
    // Revoking again is a runtime error; the name is free again.
    env.fails(&["key", "revoke", "alice", "--yes"], 1, &["revoked"]);
    env.ok(&["key", "create", "alice"]);
    assert_eq!(
        env.json(&["key", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// The exact stored expiry (the JSON shows whole seconds; the store keeps milliseconds).
fn expires_within_ms(env: &Env, id: &str) -> SystemTime {
    KeyStore::open(&env.state())
        .unwrap()
        .get(id)
        .unwrap()
        .expires_at
        .unwrap()
}

#[test]
fn create_json_shape() {
    let env = initialised();
    let v = env.json(&["key", "create", "bot", "--json", "--models", "m"]);
    for field in ["id", "name", "secret", "created_at", "expires_at", "policy"] {
        assert!(v.get(field).is_some(), "{field} missing: {v}");
    }
    assert_eq!(v["name"], "bot");
    assert_eq!(v["expires_at"], Value::Null);
    assert_eq!(v["policy"]["models"], serde_json::json!(["m"]));
    let secret = v["secret"].as_str().unwrap();
    assert!(env.ring().authenticate(secret, SystemTime::now()).is_ok());
}

#[test]
fn rotate_with_and_without_grace() {
    let env = initialised();
    let old = env.json(&["key", "create", "ci", "--json"]);
    let old = old["secret"].as_str().unwrap().to_string();

    let rotated = env.json(&["key", "rotate", "ci", "--grace", "10m", "--json"]);
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(&new[..15], &old[..15], "same id");
    let until = KeyStore::open(&env.state())
        .unwrap()
        .get("ci")
        .unwrap()
        .previous_valid_until
        .unwrap();
    assert_eq!(secs(&rotated["previous_valid_until"]), truncate_s(until));
    let ring = env.ring();
    let now = SystemTime::now();
    assert!(ring.authenticate(&old, now).is_ok());
    assert!(ring.authenticate(&new, now).is_ok());
    assert!(ring
        .authenticate(&old, until - Duration::from_millis(1))
        .is_ok());
    assert_eq!(ring.authenticate(&old, until), Err(AuthError::Unknown));
    assert!(ring.authenticate(&new, until).is_ok());

    // Default grace is 0: the previous secret stops at once. Human output: secret alone.
    let out = env.mg(&["key", "rotate", "ci"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let newest = stdout(&out).trim().to_string();
    assert!(stderr(&out).contains("no longer works"), "{}", stderr(&out));
    let ring = env.ring();
    assert_eq!(ring.authenticate(&new, now), Err(AuthError::Unknown));
    assert_eq!(ring.authenticate(&old, now), Err(AuthError::Unknown));
    assert!(ring.authenticate(&newest, now).is_ok());

    env.fails(&["key", "rotate", "nope"], 1, &[]);
    env.fails(&["key", "rotate", "ci", "--grace", "soon"], 2, &["--grace"]);
}

fn truncate_s(t: SystemTime) -> SystemTime {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs())
}

#[test]
fn expiry() {
    let env = initialised();
    let v = env.json(&["key", "create", "temp", "--expires", "1h", "--json"]);
    let secret = v["secret"].as_str().unwrap();
    let ring = env.ring();
    let now = SystemTime::now();
    assert!(ring.authenticate(secret, now).is_ok());
    assert_eq!(
        ring.authenticate(secret, now + Duration::from_secs(3601)),
        Err(AuthError::Expired)
    );

    // An RFC 3339 instant, and the status a list shows once it has passed.
    let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(2));
    let v = env.json(&[
        "key",
        "create",
        "brief",
        "--expires",
        &soon.to_string(),
        "--json",
    ]);
    let secret = v["secret"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let brief = env.json(&["key", "show", "brief", "--json"]);
    assert_eq!(brief["status"], "expired");
    assert_eq!(
        env.ring().authenticate(&secret, SystemTime::now()),
        Err(AuthError::Expired)
    );
    // Rotating an expired key would hand out a useless secret.
    env.fails(&["key", "rotate", "brief"], 1, &["expired"]);
}

#[test]
fn file_modes() {
    let env = initialised();
    env.ok(&["key", "create", "a"]);
    assert_eq!(mode(&env.state().join("keys.db")), 0o600);
    assert_eq!(mode(&env.state().join("keys.secret")), 0o600);
    assert_eq!(fs::read(env.state().join("keys.secret")).unwrap().len(), 32);
    for extra in ["keys.db-wal", "keys.db-shm"] {
        let p = env.state().join(extra);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{extra}");
        }
    }
    // A readable secret file is refused with the file name and the fix.
    let secret_file = env.state().join("keys.secret");
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o644)).unwrap();
    let err = env.fails(
        &["key", "list"],
        1,
        &[&secret_file.display().to_string(), "chmod 600"],
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn wrong_checksum_is_malformed() {
    let env = initialised();
    let v = env.json(&["key", "create", "a", "--json"]);
    let secret = v["secret"].as_str().unwrap();
    let ring = env.ring();
    let now = SystemTime::now();
    let mut bad = secret.to_string();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(ring.authenticate(&bad, now), Err(AuthError::Malformed));
    // A typo inside the secret is caught by the checksum too, before any lookup.
    let mut typo = secret.as_bytes().to_vec();
    typo[30] = if typo[30] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    assert_eq!(ring.authenticate(&typo, now), Err(AuthError::Malformed));
    assert!(ring.authenticate(secret, now).is_ok());
}

#[test]
fn errors_and_exit_codes() {
    let env = initialised();
    env.ok(&["key", "create", "dup"]);
    env.fails(&["key", "create", "dup"], 1, &["already exists"]);

    for (args, flag) in [
        (vec!["--budget", "5/week"], "--budget"),
        (vec!["--budget", "0/day"], "--budget"),
        (vec!["--expires", "2001-01-01"], "--expires"),
        (vec!["--expires", "whenever"], "--expires"),
        (vec!["--rpm", "0"], "--rpm"),
        (vec!["--tpm=-3"], "--tpm"),
        (vec!["--max-concurrent", "x"], "--max-concurrent"),
        (vec!["--allow-cidr", "10.0.0.0/33"], "--allow-cidr"),
        (vec!["--endpoints", "chat"], "--endpoints"),
        (vec!["--models", "a,,b"], "--models"),
    ] {
        let mut full = vec!["key", "create", "x"];
        full.extend(&args);
        env.fails(&full, 2, &[flag, "fix:"]);
    }
    env.fails(&["key", "create", "bad name"], 2, &["fix:"]);
    env.fails(&["key", "show", "nobody"], 1, &["key list"]);

    // No config file: runtime error; invalid config: 64.
    let missing = env.dir.path().join("missing.toml");
    env.fails(
        &["--config", missing.to_str().unwrap(), "key", "list"],
        1,
        &[],
    );
    let broken = env.dir.path().join("broken.toml");
    fs::write(&broken, "[server]\nlisten = 5\n").unwrap();
    env.fails(
        &["--config", broken.to_str().unwrap(), "key", "list"],
        64,
        &[],
    );
}

#[test]
fn secret_never_logged() {
    let env = initialised();
    let out = env.mg_env(
        &["key", "create", "a", "--json"],
        &[("MODELGATE_LOG", "trace")],
    );
    assert_eq!(code(&out), 0);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let secret = v["secret"].as_str().unwrap();
    let secret_part = &secret[16..59];
    assert!(!stderr(&out).contains(secret_part));
    for f in ["keys.db", "keys.db-wal"] {
        let p = env.state().join(f);
        if p.exists() {
            let bytes = fs::read(&p).unwrap();
            assert!(!bytes
                .windows(secret_part.len())
                .any(|w| w == secret_part.as_bytes()));
        }
    }
}

/// A change made by the CLI (another process) reaches a watching `Keys` within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_cli_changes_within_a_second() {
    let env = initialised();
    let keys = Keys::new(KeyRing::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(keys.clone().watch(env.state(), Default::default(), stop_rx));

    let wait_for = |keys: Arc<Keys>, secret: String, want: Result<(), AuthError>| async move {
        let start = Instant::now();
        loop {
            let got = keys
                .current()
                .authenticate(&secret, SystemTime::now())
                .map(|_| ());
            if got == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "still {got:?} after 1 s, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    let config = env.config();
    let run = move |args: Vec<String>| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_modelgate"))
                    .args(&args)
                    .env("MODELGATE_CONFIG", config)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(vec![
        "key".into(),
        "create".into(),
        "live".into(),
        "--json".into(),
    ])
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let secret = v["secret"].as_str().unwrap().to_string();
    let took = wait_for(keys.clone(), secret.clone(), Ok(())).await;
    eprintln!("create seen after {took:?}");

    let out = run(vec![
        "key".into(),
        "revoke".into(),
        "live".into(),
        "--yes".into(),
    ])
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let took = wait_for(keys.clone(), secret, Err(AuthError::Revoked)).await;
    eprintln!("revoke seen after {took:?}");

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("watch stops when told")
        .unwrap();
}

#[test]
fn list_and_show_report_ledger_usage() {
    use modelgate::keys::ledger::{Ledger, UsageEvent};
    let env = initialised();
    env.ok(&["key", "create", "alice"]);
    env.ok(&["key", "create", "bob"]);
    let id = env.json(&["key", "show", "alice", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Fresh keys show zero usage.
    let bob = env.json(&["key", "show", "bob", "--json"]);
    assert_eq!(bob["usage_total"]["tokens"], 0);
    assert_eq!(bob["usage_total"]["requests"], 0);

    let now = SystemTime::now();
    let mut ledger = Ledger::open(&env.state()).unwrap();
    let ev = |at, prompt, completion, estimated| UsageEvent {
        key_id: Arc::from(id.as_str()),
        at,
        prompt_tokens: prompt,
        completion_tokens: completion,
        estimated,
    };
    // 40 days back is always in an earlier UTC month (months have at most 31 days).
    ledger
        .write(&[
            ev(now, 100, 20, false),
            ev(now, 10, 0, true),
            ev(now - Duration::from_secs(40 * 86_400), 1000, 500, false),
        ])
        .unwrap();
    drop(ledger);

    let show = env.json(&["key", "show", "alice", "--json"]);
    assert_eq!(show["usage_today"]["tokens"], 130);
    assert_eq!(show["usage_today"]["prompt_tokens"], 110);
    assert_eq!(show["usage_today"]["completion_tokens"], 20);
    assert_eq!(show["usage_today"]["requests"], 2);
    assert_eq!(show["usage_today"]["estimated_requests"], 1);
    assert_eq!(show["usage_month"]["tokens"], 130);
    assert_eq!(show["usage_total"]["tokens"], 1630);
    assert_eq!(show["usage_total"]["requests"], 3);

    let list = env.json(&["key", "list", "--json"]);
    let alice = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap();
    assert_eq!(alice["usage_total"]["tokens"], 1630);

    let table = env.ok(&["key", "list"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("TODAY") && header.contains("MONTH") && header.contains("TOTAL"),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with("alice")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[cols.len() - 3..], ["130", "130", "1630"], "{table}");
    let human = env.ok(&["key", "show", "alice"]);
    assert!(human.contains("usage today:     130 tokens"), "{human}");
    assert!(human.contains("usage total:     1630 tokens"), "{human}");
}

#[test]
fn named_policies_are_shared_and_overridden_per_key() {
    let env = initialised();
    let cfg = env.config();
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(
        "\n[[policy]]\nname = \"developers\"\nmodels = [\"coder*\"]\nrpm = 60\ntpm = 100000\nbudget = \"2000000/month\"\n",
    );
    fs::write(&cfg, text).unwrap();

    // An unknown policy name is a usage error naming the defined ones.
    env.fails(
        &["key", "create", "x", "--policy", "nope"],
        2,
        &["--policy nope", "developers"],
    );

    let out = env.mg(&[
        "key",
        "create",
        "bob",
        "--policy",
        "developers",
        "--rpm",
        "120",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let secret = stdout(&out).trim().to_string();
    let show = env.json(&["key", "show", "bob", "--json"]);
    let p = &show["policy"];
    assert_eq!(p["name"], "developers");
    // The key's own --rpm wins; everything else comes from the policy.
    assert_eq!(p["rpm"], 120);
    assert_eq!(p["tpm"], 100000);
    assert_eq!(p["models"], serde_json::json!(["coder*"]));
    assert_eq!(p["budget"]["tokens"], 2000000);
    assert_eq!(show["policy_defined"], true);
    let human = stdout(&env.mg(&["key", "show", "bob"]));
    assert!(human.contains("policy:          developers"), "{human}");
    let list = stdout(&env.mg(&["key", "list"]));
    assert!(
        list.contains("developers") && list.contains("coder*"),
        "{list}"
    );

    // The gateway's ring resolves the same way.
    let principal = env.ring().authenticate(&secret, SystemTime::now()).unwrap();
    assert_eq!(principal.policy.rpm, Some(120));
    assert_eq!(principal.policy.tpm, Some(100000));
    assert!(!principal.policy.missing_policy);

    // A policy removed from the config fails closed: the key authenticates but is refused.
    let text = fs::read_to_string(&cfg).unwrap();
    let cut = text.find("\n[[policy]]").unwrap();
    fs::write(&cfg, &text[..cut]).unwrap();
    let principal = env.ring().authenticate(&secret, SystemTime::now()).unwrap();
    assert!(principal.policy.missing_policy);
    let denied = modelgate::policy::check_access(
        &principal,
        modelgate::policy::Endpoint::ChatCompletions,
        Some("coder"),
        "127.0.0.1".parse().unwrap(),
        SystemTime::now(),
    );
    assert!(
        matches!(denied, Err(modelgate::policy::Deny::UnknownPolicy(ref n)) if n == "developers"),
        "{denied:?}"
    );
    let show = env.json(&["key", "show", "bob", "--json"]);
    assert_eq!(show["policy_defined"], false);
    let human = stdout(&env.mg(&["key", "show", "bob"]));
    assert!(human.contains("NOT DEFINED"), "{human}");
}
