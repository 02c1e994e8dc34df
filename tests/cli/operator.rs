//! What an operator is told around a running daemon: config edits point at `modelgate reload`
//! (which applies them without cutting streams), never at a restart; the control verbs on a
//! config that is not TOML exit 64 with the parse error instead of guessing the default socket
//! and reporting "no daemon".

use std::fs;

use crate::env::{code, stderr, stdout, Env};

#[test]
fn peer_and_upstream_edits_say_reload_not_restart() {
    let env = Env::initialised("gw.example.com:51820");
    let mut said = Vec::new();
    for args in [
        &["peer", "add", "corp", "--allowed-ips", "10.20.0.0/24"][..],
        &["upstream", "add", "vllm", "--url", "http://10.20.0.5:8000"],
        &["upstream", "remove", "vllm", "--yes"],
        &["peer", "remove", "corp", "--yes"],
    ] {
        let out = env.mg(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            text.contains("`modelgate reload`"),
            "{args:?} does not point at reload: {text}"
        );
        assert!(
            !text.to_lowercase().contains("restart"),
            "{args:?} still mentions a restart: {text}"
        );
        said.push(text);
    }
    assert_eq!(said.len(), 4);
}

#[test]
fn control_verbs_on_a_config_that_is_not_toml_exit_64_with_the_parse_error() {
    let env = Env::initialised("gw.example.com:51820");
    fs::write(env.config(), "[server\ncontrol_socket = \"/run/x.sock\"\n").unwrap();
    for verb in ["reload", "status"] {
        let err = env.fails(&[verb], 64, &["not valid TOML", "--socket"]);
        assert!(
            !err.contains("no daemon") && !err.contains("/run/modelgate/control.sock"),
            "{verb} fell back to the default socket: {err}"
        );
    }
    // doctor reports it as its hop 1 (config), also 64.
    let out = env.mg(&["doctor", "--json"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["first_failing_hop"], "config", "{v}");
    // With --socket the verbs go where they are told (nothing listens there: exit 1).
    let sock = env.dir.path().join("none.sock");
    env.fails(
        &["reload", "--socket", sock.to_str().unwrap()],
        1,
        &["none.sock"],
    );
}
