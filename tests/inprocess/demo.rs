//! `modelgate demo --check`: the README's first command, run for real through the binary.

use std::process::Command;

#[test]
fn demo_check_streams_through_the_whole_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["demo", "--listen", "127.0.0.1:0", "--check"])
        .output()
        .expect("run modelgate demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"hello from the corp network\""),
        "unexpected output: {stdout}"
    );
    // The audit line was written, with usage and without the prompt.
    assert!(
        stdout.contains("audit")
            && stdout.contains("prompt_tokens=")
            && stdout.contains("key=demo"),
        "no audit line: {stdout}"
    );
    assert!(
        !stdout.contains("\"content\""),
        "prompt or completion leaked into logs: {stdout}"
    );
}
