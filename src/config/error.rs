//! Why a config cannot be used: unreadable, not TOML, or with bad settings (every one listed).
//!
//! Owns the error types and their one-line-per-setting display (`key: value: problem; fix:
//! how`). Never decides what is valid.

use std::fmt;
use std::path::PathBuf;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all (missing, permissions): a runtime failure (exit 1).
    #[error("cannot read config {}: {source}; fix: create it with `modelgate init --public-endpoint HOST:PORT` or pass --config PATH", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML, a value of the wrong type, or an unknown key (exit 64).
    #[error("invalid config {}: {message}; fix: correct that line (see config/modelgate.toml for every key)", path.display())]
    Parse { path: PathBuf, message: String },
    /// Well-formed TOML with bad settings; `errors` lists every one (exit 64).
    #[error("invalid config {}: {} error(s):\n{errors}", path.display(), errors.len())]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

impl ConfigError {
    /// True for an unreadable file (exit 1); false for an invalid one (exit 64).
    pub fn is_read_error(&self) -> bool {
        matches!(self, ConfigError::Read { .. })
    }
}

/// One bad setting: the key, the value as written, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub key: String,
    pub value: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}; fix: {}",
            self.key, self.value, self.problem, self.fix
        )
    }
}

/// Every bad setting of one config, in file order. Displays one error per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }
    pub(crate) fn push(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(FieldError {
            key: key.into(),
            value: value.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
