//! Namespaces a test creates outside `scripts/lab.sh`: a unique tag per test (this process's
//! PID and a counter), a [`Netns`] deleted by its own name on drop, and the two-namespace
//! [`Pair`] the firewall tests probe across. Only namespaces carrying this process's tag are
//! ever deleted.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::proc::{exec_ok, run_ok};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// 8 characters `[0-9]`: this process's PID (6 digits, zero-padded) and a per-process counter
/// (2 digits), so tags of parallel tests and of parallel test processes never collide.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{:06}{:02}", std::process::id() % 1_000_000, n % 100)
}

/// One network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` with `lo` up (a leftover of the same name from a killed run goes first:
    /// the name carries the PID, so it is this process's own).
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// `nft -s list ruleset` inside (stateless: no counter values).
    pub fn ruleset(&self) -> String {
        exec_ok(&self.name, &["nft", "-s", "list", "ruleset"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub const APPL_V4: &str = "192.0.2.1";
pub const PROBE_V4: &str = "192.0.2.2";
pub const APPL_V6: &str = "2001:db8:f::1";
pub const PROBE_V6: &str = "2001:db8:f::2";

/// Two namespaces joined by a veth pair, IPv4 and IPv6:
///
/// ```text
/// [probe] 192.0.2.2, 2001:db8:f::2 ── 192.0.2.1, 2001:db8:f::1 [appl]
/// ```
///
/// Fields drop in order: the namespaces (and the veth with them), then the temp dir.
pub struct Pair {
    pub appl: Netns,
    pub probe: Netns,
    pub dir: tempfile::TempDir,
}

impl Pair {
    pub fn up() -> Pair {
        let tag = unique_tag();
        let pair = Pair {
            appl: Netns::new(format!("mgfw-{tag}-a")),
            probe: Netns::new(format!("mgfw-{tag}-p")),
            dir: tempfile::Builder::new().prefix("mg-fw-").tempdir().unwrap(),
        };
        let (va, vp) = (format!("mgfw{tag}a"), format!("mgfw{tag}p"));
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &va,
            "netns",
            &pair.appl.name,
            "type",
            "veth",
            "peer",
            "name",
            &vp,
            "netns",
            &pair.probe.name,
        ]));
        for (ns, dev, v4, v6) in [
            (&pair.appl, &va, APPL_V4, APPL_V6),
            (&pair.probe, &vp, PROBE_V4, PROBE_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        pair
    }
}
