//! `modelgate upstream add|list|remove` and `modelgate model set|list|remove` on temporary
//! directories: the operator workflow, replicas of one model, the no-open-proxy refusal (exit
//! 2, nothing written, the fix named), flag errors, API key files, and that operator comments
//! survive every edit.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::{json, Value};

use crate::env::Env;

#[test]
fn operator_workflow_add_list_refuse_remove() {
    let env = Env::with_corp_peer();

    let out = env.ok(&[
        "upstream",
        "add",
        "vllm",
        "--url",
        "http://10.20.0.5:8000",
        "--model",
        "coder=Qwen/Qwen2.5-Coder",
    ]);
    assert!(
        out.contains("upstream \"vllm\" added: http://10.20.0.5:8000/v1"),
        "{out}"
    );
    let text = env.text();
    assert!(text.contains("# operator note: ticket OPS-42"), "{text}");
    assert!(
        text.contains("[[upstream]]\nname = \"vllm\"\nurl = \"http://10.20.0.5:8000\"\nmodels = [\"coder=Qwen/Qwen2.5-Coder\"]\n"),
        "{text}"
    );

    // Discovered models, a path and a concurrency limit.
    let added: Value = serde_json::from_str(&env.ok(&[
        "upstream",
        "add",
        "llama",
        "--url",
        "http://10.20.0.6:8080/openai/v1",
        "--max-concurrent",
        "4",
        "--json",
    ]))
    .unwrap();
    assert_eq!(added["discovered"], true);
    assert_eq!(added["base_path"], "/openai/v1");

    let list: Value = serde_json::from_str(&env.ok(&["upstream", "list", "--json"])).unwrap();
    assert_eq!(
        list,
        json!([
            {
                "name": "vllm",
                "url": "http://10.20.0.5:8000/v1",
                "addr": "10.20.0.5:8000",
                "base_path": "/v1",
                "models": [{"public": "coder", "upstream": "Qwen/Qwen2.5-Coder"}],
                "discovered": false,
                "api_key": false,
                "api_key_file": null,
                "max_concurrent": null,
            },
            {
                "name": "llama",
                "url": "http://10.20.0.6:8080/openai/v1",
                "addr": "10.20.0.6:8080",
                "base_path": "/openai/v1",
                "models": [],
                "discovered": true,
                "api_key": false,
                "api_key_file": null,
                "max_concurrent": 4,
            }
        ])
    );
    let table = env.ok(&["upstream", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME") && lines[0].ends_with("API KEY"));
    assert!(
        lines[1].contains("http://10.20.0.5:8000/v1")
            && lines[1].contains("coder=Qwen/Qwen2.5-Coder")
    );
    assert!(lines[2].contains("(discovered)") && lines[2].ends_with("no"));

    // An upstream outside every peer's networks: refused, nothing written, the fix named.
    let before = env.text();
    env.fails(
        &["upstream", "add", "cloud", "--url", "http://8.8.8.8:80"],
        2,
        &[
            "upstream \"cloud\" not added (nothing written)",
            "8.8.8.8 is not inside any peer's allowed networks",
            "fix: ",
            "--allowed-ips 8.8.8.8/32",
        ],
    );
    assert_eq!(env.text(), before);

    // A public model name routed by another server too: a replica of it, added.
    let out = env.ok(&[
        "upstream",
        "add",
        "other",
        "--url",
        "http://10.20.0.7:8000",
        "--model",
        "coder",
    ]);
    assert!(out.contains("upstream \"other\" added"), "{out}");
    // The same server (URL) for that model again is no replica: refused, nothing written.
    let before = env.text();
    env.fails(
        &[
            "upstream",
            "add",
            "same",
            "--url",
            "http://10.20.0.5:8000/v1",
            "--model",
            "coder",
        ],
        2,
        &[
            "already routed by upstream \"vllm\" at the same URL",
            "fix: a replica must be another model server",
        ],
    );
    assert_eq!(env.text(), before);
    env.ok(&["upstream", "remove", "other", "--yes"]);

    // The same name twice is a runtime failure like `peer add`.
    env.fails(
        &["upstream", "add", "vllm", "--url", "http://10.20.0.8:8000"],
        1,
        &["already exists"],
    );

    // The peer that carries an upstream cannot be removed from under it.
    env.fails(
        &["peer", "remove", "corp", "--yes"],
        1,
        &["upstream remove"],
    );
    assert!(env.text().contains("name = \"corp\""));

    // Removing needs --yes without a terminal.
    env.fails(&["upstream", "remove", "vllm"], 2, &["fix: pass --yes"]);
    env.ok(&["upstream", "remove", "vllm", "--yes"]);
    env.fails(
        &["upstream", "remove", "vllm", "--yes"],
        1,
        &["no such upstream"],
    );

    let text = env.text();
    assert!(!text.contains("name = \"vllm\""), "{text}");
    assert!(text.contains("name = \"llama\""));
    assert!(text.contains("# operator note: ticket OPS-42"));
    env.ok(&["upstream", "remove", "llama", "--yes"]);
    assert!(!env.text().contains("[[upstream]]"));
    assert!(env.text().contains("# operator note: ticket OPS-42"));
    assert!(env.ok(&["upstream", "list"]).starts_with("no upstreams"));
    assert_eq!(env.ok(&["upstream", "list", "--json"]).trim(), "[]");
}

#[test]
fn api_key_file_must_be_private_and_is_stored_absolute() {
    let env = Env::with_corp_peer();
    let key = env.dir.path().join("vllm.key");
    fs::write(&key, "sk-secret-value\n").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();

    // Relative to the working directory, like any command-line path.
    let err = env.fails(
        &[
            "upstream",
            "add",
            "vllm",
            "--url",
            "http://10.20.0.5:8000",
            "--api-key-file",
            "vllm.key",
        ],
        2,
        &["--api-key-file", &format!("chmod 600 {}", key.display())],
    );
    assert!(!err.contains("sk-secret"));

    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let v: Value = serde_json::from_str(&env.ok(&[
        "upstream",
        "add",
        "vllm",
        "--url",
        "http://10.20.0.5:8000",
        "--api-key-file",
        "vllm.key",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["api_key"], true);
    assert_eq!(v["api_key_file"], key.display().to_string());
    let text = env.text();
    assert!(
        text.contains(&format!("api_key_file = \"{}\"", key.display())),
        "{text}"
    );
    assert!(!text.contains("sk-secret"));
    assert!(env
        .ok(&["upstream", "list"])
        .lines()
        .nth(1)
        .unwrap()
        .ends_with("yes"));
}

#[test]
fn bad_flags_exit_2_naming_the_flag_and_fix() {
    let env = Env::with_corp_peer();
    let before = env.text();
    for (args, needle) in [
        (
            vec![
                "upstream",
                "add",
                "Bad_Name",
                "--url",
                "http://10.20.0.5:8000",
            ],
            "fix: use e.g. vllm",
        ),
        (
            vec!["upstream", "add", "x", "--url", "http://model.corp:8000"],
            "no DNS",
        ),
        (
            vec!["upstream", "add", "x", "--url", "https://10.20.0.5:8000"],
            "already encrypts",
        ),
        (
            vec!["upstream", "add", "x", "--url", "http://10.20.0.5"],
            "no port",
        ),
        (
            vec![
                "upstream",
                "add",
                "x",
                "--url",
                "http://10.20.0.5:8000",
                "--model",
                "a b",
            ],
            "PUBLIC=UPSTREAM_ID",
        ),
        (
            vec![
                "upstream",
                "add",
                "x",
                "--url",
                "http://10.20.0.5:8000",
                "--max-concurrent",
                "0",
            ],
            "--max-concurrent",
        ),
        (
            vec![
                "upstream",
                "add",
                "x",
                "--url",
                "http://10.20.0.5:8000",
                "--api-key-file",
                "missing.key",
            ],
            "--api-key-file",
        ),
        (
            vec!["upstream", "add", "x", "--url", "http://10.99.0.1:8000"],
            "appliance's own tunnel address",
        ),
        (vec!["upstream", "add", "x"], "--url"),
    ] {
        env.fails(&args, 2, &[needle]);
    }
    assert_eq!(env.text(), before, "nothing written");

    // An invalid config file is exit 64, as for every verb.
    fs::write(
        env.config(),
        format!("{before}\n[[upstream]]\nname = \"x\"\n"),
    )
    .unwrap();
    env.fails(
        &["upstream", "list"],
        64,
        &["upstream \"x\".url: (missing)"],
    );
}

/// `model set` writes a `[[model]]` table (and changes it in place the second time), `list`
/// shows every routed model with its balancing and static replicas, bad values exit 2 with the
/// fix, and `remove` returns the model to the default.
#[test]
fn model_balance_is_set_listed_and_removed() {
    let env = Env::with_corp_peer();
    for (name, url) in [
        ("a", "http://10.20.0.5:8000"),
        ("b", "http://10.20.0.6:8000"),
    ] {
        env.ok(&["upstream", "add", name, "--url", url, "--model", "coder"]);
    }
    let out = env.ok(&["model", "set", "coder", "--balance", "affinity"]);
    assert!(
        out.contains("model \"coder\": balance affinity, static replicas a, b."),
        "{out}"
    );
    assert!(env
        .text()
        .contains("[[model]]\nname = \"coder\"\nbalance = \"affinity\"\n"));
    assert!(env.text().contains("# operator note: ticket OPS-42"));
    let list: Value = serde_json::from_str(&env.ok(&["model", "list", "--json"])).unwrap();
    assert_eq!(
        list,
        json!([{"name": "coder", "balance": "affinity", "configured": true, "replicas": ["a", "b"]}])
    );
    // Set again: the same table changes, no second one.
    env.ok(&["model", "set", "coder", "--balance", "least_loaded"]);
    assert_eq!(env.text().matches("[[model]]").count(), 1);
    let table = env.ok(&["model", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("BALANCE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("coder")
            && lines[1].contains("least_loaded")
            && lines[1].ends_with("a, b"),
        "{table}"
    );
    // Bad values: exit 2, the fix named, nothing written.
    let before = env.text();
    env.fails(
        &["model", "set", "coder", "--balance", "random"],
        2,
        &["least_loaded or affinity"],
    );
    env.fails(
        &["model", "set", "a b", "--balance", "affinity"],
        2,
        &["fix: pass the name clients use"],
    );
    assert_eq!(env.text(), before);
    env.ok(&["model", "remove", "coder"]);
    assert!(!env.text().contains("[[model]]"));
    env.fails(&["model", "remove", "coder"], 1, &["no [[model]] table"]);
}
