//! The Python interpreter with the `openai` SDK that the client-side tests drive: env
//! `MODELGATE_PYTHON`, default `.venv/bin/python` at the repository root (which
//! `scripts/test.sh` creates with `pip install openai`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `rel` inside the repository.
pub fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The interpreter, if it can `import openai`.
pub fn sdk_python() -> Option<PathBuf> {
    let py = std::env::var_os("MODELGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_path(".venv/bin/python"));
    Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(py)
}

/// [`sdk_python`], or `None` after printing why `test` is skipped.
pub fn sdk_python_or_skip(test: &str) -> Option<PathBuf> {
    let py = sdk_python();
    if py.is_none() {
        eprintln!(
            "SKIPPED {test}: no Python with the openai SDK (set MODELGATE_PYTHON, or run \
             scripts/test.sh, which creates .venv with `pip install openai`)"
        );
    }
    py
}
