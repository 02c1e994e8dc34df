//! Packaging: `scripts/install.sh` into a staging tree (any user), and the `.deb` built by
//! `scripts/build-deb.sh` (cargo-deb) installed with `dpkg -i` on this machine and removed with
//! `dpkg -r` / `dpkg -P` (root).
//!
//! Both package the debug binary cargo built for the tests (stripped of debug info by
//! install.sh), so the suite needs no second, release build; the release path differs only in
//! which binary is copied. The .deb test changes the machine it runs on (that is its point): it
//! refuses to touch a `modelgate` package it did not install itself (version suffix `~test`),
//! and purges its own package even when it fails.
//!
//! Decisions the tests pin down: `dpkg -r` removes the binary, units, man pages and
//! completions; `dpkg -P` also the `/etc/modelgate/firewall.env` skeleton and empty
//! directories; neither removes the `modelgate` user/group (files may still belong to it, and a
//! reused UID would inherit them) nor the operator's config and state.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::harness::{bin, build_deb, deb_test_runs, have, is_root, repo, run, run_ok, skip};

fn install_sh(args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo("scripts/install.sh"))
        .args(args)
        .env_remove("DESTDIR");
    c
}

#[test]
fn install_sh_into_a_staging_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let d = dest.to_str().unwrap();
    let out = run_ok(&mut install_sh(&["--binary", bin(), "--destdir", d]));
    assert!(out.contains("Nothing is enabled or started"), "{out}");
    assert!(
        out.contains("systemctl enable --now"),
        "prints the next commands:\n{out}"
    );

    let installed = dest.join("usr/bin/modelgate");
    let version = run_ok(Command::new(&installed).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("modelgate {}", env!("CARGO_PKG_VERSION"))
    );
    for f in [
        "usr/lib/systemd/system/modelgate.service",
        "usr/lib/systemd/system/modelgate.socket",
        "usr/lib/systemd/system/modelgate-firewall.service",
        "usr/share/man/man1/modelgate.1.gz",
        "usr/share/man/man1/modelgate-firewall.1.gz",
        "usr/share/man/man1/modelgate-run.1.gz",
        "usr/share/bash-completion/completions/modelgate",
        "usr/share/zsh/vendor-completions/_modelgate",
        "usr/share/fish/vendor_completions.d/modelgate.fish",
        "usr/share/modelgate/firewall.env",
        "usr/share/doc/modelgate/examples/modelgate.toml",
        "etc/modelgate/firewall.env",
    ] {
        assert!(dest.join(f).is_file(), "{f} missing");
    }
    assert!(
        !dest.join("etc/modelgate/modelgate.toml").exists(),
        "init writes the config"
    );
    assert!(
        !dest.join("var/lib/modelgate").exists(),
        "init + StateDirectory= own the state"
    );
    let bash =
        fs::read_to_string(dest.join("usr/share/bash-completion/completions/modelgate")).unwrap();
    assert!(
        bash.contains("firewall") && bash.contains("--ssh-from"),
        "completions are from clap"
    );
    if have("man") {
        let page = run_ok(
            Command::new("man")
                .args(["-w", "modelgate"])
                .env("MANPATH", dest.join("usr/share/man")),
        );
        assert_eq!(
            page.trim(),
            dest.join("usr/share/man/man1/modelgate.1.gz")
                .to_str()
                .unwrap()
        );
    }

    // Reinstalling never overwrites the operator's files.
    let env_file = dest.join("etc/modelgate/firewall.env");
    fs::write(&env_file, "MODELGATE_SSH_FROM=192.0.2.0/24\n").unwrap();
    fs::write(dest.join("etc/modelgate/modelgate.toml"), "# mine\n").unwrap();
    run_ok(&mut install_sh(&["--binary", bin(), "--destdir", d]));
    assert_eq!(
        fs::read_to_string(&env_file).unwrap(),
        "MODELGATE_SSH_FROM=192.0.2.0/24\n"
    );
    assert_eq!(
        fs::read_to_string(dest.join("etc/modelgate/modelgate.toml")).unwrap(),
        "# mine\n"
    );

    // --uninstall removes what install put there, keeps /etc/modelgate.
    let out = run_ok(&mut install_sh(&["--uninstall", "--destdir", d]));
    assert!(out.contains("Kept (operator data)"), "{out}");
    assert!(!installed.exists());
    assert!(!dest
        .join("usr/lib/systemd/system/modelgate.service")
        .exists());
    assert!(!dest
        .join("usr/lib/systemd/system/modelgate.socket")
        .exists());
    assert!(!dest.join("usr/share/man/man1/modelgate.1.gz").exists());
    assert!(!dest
        .join("usr/share/bash-completion/completions/modelgate")
        .exists());
    assert!(env_file.is_file());

    // Another prefix: the units point at the binary where it is.
    let dest2 = tmp.path().join("root2");
    run_ok(&mut install_sh(&[
        "--binary",
        bin(),
        "--destdir",
        dest2.to_str().unwrap(),
        "--prefix",
        "/opt/modelgate",
    ]));
    let unit = fs::read_to_string(dest2.join("opt/modelgate/lib/systemd/system/modelgate.service"))
        .unwrap();
    assert!(
        unit.contains(
            "ExecStart=/opt/modelgate/bin/modelgate --config /etc/modelgate/modelgate.toml run"
        ),
        "{unit}"
    );
}

#[test]
fn install_sh_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let out = run(&mut install_sh(&[
        "--binary",
        "/nonexistent",
        "--destdir",
        d,
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an executable"));
    let out = run(&mut install_sh(&["--frobnicate"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(&mut install_sh(&["--prefix", "usr", "--destdir", d]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absolute"));
    if !is_root() {
        let out = run(&mut install_sh(&["--binary", bin()]));
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
    }
}

/// Purges the test's package when the test ends, passing or failing.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed_version().is_some_and(|v| v.ends_with(TEST_SUFFIX)) {
            let _ = Command::new("dpkg").args(["-P", "modelgate"]).output();
        }
    }
}

const TEST_SUFFIX: &str = "~test";

/// Version of the installed (or half-installed) `modelgate` package.
fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}|${Version}", "modelgate"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once('|')?;
    (out.status.success() && !status.contains("not-installed")).then(|| version.to_string())
}

#[test]
fn deb_installs_a_working_modelgate_and_removes_cleanly() {
    let name = "packaging::deb_installs_a_working_modelgate_and_removes_cleanly";
    if !deb_test_runs(name, None) {
        return;
    }
    match installed_version() {
        Some(v) if v.ends_with(TEST_SUFFIX) => {
            run_ok(Command::new("dpkg").args(["-P", "modelgate"]));
        }
        Some(v) => {
            return skip(
                name,
                &format!("a real modelgate package ({v}) is installed; not touching it"),
            )
        }
        None => {}
    }

    let tmp = tempfile::tempdir().unwrap();
    let version = format!("{}-0{TEST_SUFFIX}", env!("CARGO_PKG_VERSION"));
    let started = std::time::Instant::now();
    let deb = build_deb(tmp.path(), Some(&version));
    let build_ms = started.elapsed().as_millis();
    let fields = run_ok(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .args(["Package", "Version", "Depends"]),
    );
    assert!(fields.contains(&format!("Version: {version}")), "{fields}");

    let _purge = Purge;
    let out = run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    eprintln!("dpkg -i: {}", out.trim());
    assert_eq!(installed_version().as_deref(), Some(version.as_str()));

    let v = run_ok(Command::new("/usr/bin/modelgate").arg("--version"));
    assert_eq!(v.trim(), format!("modelgate {}", env!("CARGO_PKG_VERSION")));
    let page = run_ok(
        Command::new("man")
            .args(["-w", "modelgate"])
            .env_remove("MANPATH"),
    );
    assert_eq!(page.trim(), "/usr/share/man/man1/modelgate.1.gz");
    run_ok(
        Command::new("man")
            .args(["-w", "modelgate-firewall"])
            .env_remove("MANPATH"),
    );
    let listed = run_ok(Command::new("dpkg").args(["-L", "modelgate"]));
    for f in [
        "/usr/bin/modelgate",
        "/lib/systemd/system/modelgate.service",
        "/lib/systemd/system/modelgate.socket",
        "/lib/systemd/system/modelgate-firewall.service",
        "/usr/share/bash-completion/completions/modelgate",
    ] {
        assert!(
            listed.lines().any(|l| l == f),
            "{f} not in the package:\n{listed}"
        );
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    assert!(
        run_ok(Command::new("getent").args(["passwd", "modelgate"])).contains("/usr/sbin/nologin")
    );
    assert!(Path::new("/etc/modelgate/firewall.env").is_file());
    // Installed for real, the units verify without the temp-copy tricks of systemd.rs.
    if have("systemd-analyze") {
        run_ok(Command::new("systemd-analyze").args([
            "verify",
            "/lib/systemd/system/modelgate.service",
            "/lib/systemd/system/modelgate.socket",
            "/lib/systemd/system/modelgate-firewall.service",
        ]));
    }
    // The installed binary works end to end for an offline verb.
    let cfg = tmp.path().join("mg.toml");
    run_ok(
        Command::new("/usr/bin/modelgate")
            .arg("--config")
            .arg(&cfg)
            .args([
                "init",
                "--public-endpoint",
                "gw.example.com:51820",
                "--self-signed",
                "gw.test",
            ])
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .arg("--control-socket")
            .arg(tmp.path().join("c.sock")),
    );
    let rules = run_ok(
        Command::new("/usr/bin/modelgate")
            .arg("--config")
            .arg(&cfg)
            .args(["firewall", "print"]),
    );
    assert!(rules.contains("udp dport 51820 accept"), "{rules}");

    // Reinstalling the same package (an upgrade in dpkg's eyes) keeps working.
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));

    let out = run_ok(Command::new("dpkg").args(["-r", "modelgate"]));
    eprintln!("dpkg -r: {}", out.trim());
    for f in [
        "/usr/bin/modelgate",
        "/lib/systemd/system/modelgate.service",
        "/lib/systemd/system/modelgate.socket",
        "/lib/systemd/system/modelgate-firewall.service",
        "/usr/share/man/man1/modelgate.1.gz",
        "/usr/share/bash-completion/completions/modelgate",
    ] {
        assert!(!Path::new(f).exists(), "{f} left behind by dpkg -r");
    }
    let man = run(Command::new("man")
        .args(["-w", "modelgate"])
        .env_remove("MANPATH"));
    assert!(!man.status.success(), "man page still found after dpkg -r");
    run_ok(Command::new("dpkg").args(["-P", "modelgate"]));
    assert_eq!(installed_version(), None);
    assert!(
        !Path::new("/etc/modelgate/firewall.env").exists(),
        "purge removes the skeleton"
    );
    // Documented: the system user stays.
    assert!(run(Command::new("getent").args(["passwd", "modelgate"]))
        .status
        .success());
    eprintln!("packaging: build-deb.sh (debug binary, --fast) took {build_ms} ms");
}
