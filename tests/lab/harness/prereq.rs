//! Whether a lab test can run here: the one place that decides between running, skipping and
//! failing, by the rule of every test binary (`tests/support/skip.rs`): a missing prerequisite
//! (root, a tool, the openai SDK, a file) fails the test under the test command (root, or CI
//! set) and is a visible skip elsewhere (listed by scripts/test.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "../../support/skip.rs"]
mod skip;
pub use skip::is_root;

/// What the topology of `scripts/lab.sh` and its clients need.
const LAB_TOOLS: &[&str] = &[
    "ip",
    "nft",
    "wg",
    "wg-quick",
    "wireguard-go",
    "python3",
    "curl",
];

/// What a lab test needs besides root.
pub struct Needs {
    tools: &'static [&'static str],
    extra_tools: &'static [&'static str],
    sdk: bool,
    file: Option<&'static str>,
}

impl Needs {
    /// The namespace lab: `scripts/lab.sh`, wireguard-go and the Python servers.
    pub const LAB: Needs = Needs {
        tools: LAB_TOOLS,
        extra_tools: &[],
        sdk: false,
        file: None,
    };

    /// Only `tools` (a topology of the test's own, not the lab).
    pub const fn tools(tools: &'static [&'static str]) -> Needs {
        Needs {
            tools,
            extra_tools: &[],
            sdk: false,
            file: None,
        }
    }

    /// Also `tools`.
    pub const fn and_tools(self, extra_tools: &'static [&'static str]) -> Needs {
        Needs {
            extra_tools,
            ..self
        }
    }

    /// Also a Python with the `openai` SDK ([`Ready::python`]).
    pub const fn and_sdk(self) -> Needs {
        Needs { sdk: true, ..self }
    }

    /// Also the file `path` (a missing prerequisite when absent).
    pub const fn and_file(self, path: &'static str) -> Needs {
        Needs {
            file: Some(path),
            ..self
        }
    }
}

/// What [`check`] found for a test that runs.
pub struct Ready {
    python: Option<PathBuf>,
}

impl Ready {
    /// The interpreter with the openai SDK (the test asked for it with [`Needs::and_sdk`]).
    pub fn python(&self) -> PathBuf {
        self.python
            .clone()
            .expect("the test did not declare Needs::and_sdk")
    }
}

/// Decides whether `test` runs: `None` (recorded) when it is skipped; panics when a
/// prerequisite is missing under the test command (root or CI), and as root when a tool is.
pub fn check(test: &str, needs: Needs) -> Option<Ready> {
    if !is_root() {
        return skip(
            test,
            "the namespace lab needs root (ip netns, TUN, nftables); run `sudo -E cargo test \
             --test lab` or run it in CI, which is root",
        );
    }
    for tool in needs.tools.iter().chain(needs.extra_tools) {
        assert!(
            have(tool),
            "{test}: `{tool}` is not installed; apt-get install wireguard-go wireguard-tools \
             nftables iproute2 python3 curl pebble openssl (scripts/test.sh does)"
        );
    }
    if let Some(file) = needs.file {
        if !Path::new(file).exists() {
            return skip(test, &format!("{file} missing"));
        }
    }
    let python = if needs.sdk {
        match sdk_python() {
            Some(py) => Some(py),
            None => {
                return skip(
                    test,
                    "no Python with the openai SDK (set MODELGATE_PYTHON, or run \
                     scripts/test.sh, which creates .venv with `pip install openai`)",
                )
            }
        }
    } else {
        None
    };
    Some(Ready { python })
}

/// A missing prerequisite: fails under the test command, a recorded skip elsewhere.
fn skip(test: &str, why: &str) -> Option<Ready> {
    skip::missing(test, why);
    None
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The interpreter, if it can `import openai`: env `MODELGATE_PYTHON`, default
/// `.venv/bin/python` at the repository root (which `scripts/test.sh` creates).
fn sdk_python() -> Option<PathBuf> {
    let py = std::env::var_os("MODELGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::proc::manifest_path(".venv/bin/python"));
    Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(py)
}
