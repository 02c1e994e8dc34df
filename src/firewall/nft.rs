//! Applying and removing the table: the [`Nft`] trait and the real `nft` binary behind it.
//!
//! The JSON batch is built with the `nftables` crate's schema types ([`super::render`]) and fed
//! to `nft -j -f -`, one kernel transaction per call. The process is run here rather than with
//! `nftables::helper::apply_ruleset_raw`, which lets nft's stderr through to the terminal: this
//! module needs it to tell "not root" from "nft rejected the batch". Listing uses the crate's
//! `helper::get_current_ruleset_with_args`. Never builds a batch itself: [`apply`] and
//! [`remove`] send only what [`super::render`] made for table `inet modelgate`.

use nftables::helper::{get_current_ruleset_with_args, NftablesError};
use nftables::schema::{NfListObject, NfObject, Nftables};
use nftables::types::NfFamily;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::render::{apply_batch, remove_batch};
use super::{Ruleset, TABLE_NAME};

/// What `modelgate firewall` needs from nftables.
pub trait Nft {
    /// Runs `batch` as one nft transaction.
    fn run_batch(&self, batch: &Nftables) -> Result<(), NftError>;
    /// Whether table `inet modelgate` exists.
    fn table_exists(&self) -> Result<bool, NftError>;
}

/// Why nft could not do it, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftError {
    /// No `nft` binary.
    NotInstalled { looked_in: String },
    /// Not root / no CAP_NET_ADMIN.
    NotPermitted { detail: String },
    /// nft ran and failed.
    Failed { action: String, detail: String },
}

impl fmt::Display for NftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NftError::NotInstalled { looked_in } => write!(
                f,
                "nft (nftables) not found (looked in {looked_in}); fix: apt-get install nftables, \
                 or set MODELGATE_NFT=/path/to/nft"
            ),
            NftError::NotPermitted { detail } => write!(
                f,
                "changing the firewall needs root (CAP_NET_ADMIN): {detail}; fix: run it with \
                 sudo, or start modelgate-firewall.service (`modelgate firewall print` needs \
                 no privileges)"
            ),
            NftError::Failed { action, detail } => write!(f, "nft failed while {action}: {detail}"),
        }
    }
}

impl std::error::Error for NftError {}

/// Result of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The table existed before and was replaced (false: created).
    pub replaced: bool,
    /// Rules in the chain now.
    pub rules: usize,
}

/// Result of [`remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    Removed,
    /// There was no table `inet modelgate`: nothing was done.
    Absent,
}

/// Loads `ruleset` as table `inet modelgate`, replacing any previous version in the same
/// transaction.
pub fn apply(nft: &dyn Nft, ruleset: &Ruleset) -> Result<ApplyReport, NftError> {
    let existed = nft.table_exists()?;
    nft.run_batch(&apply_batch(ruleset))?;
    Ok(ApplyReport {
        replaced: existed,
        rules: ruleset.rules.len(),
    })
}

/// Deletes table `inet modelgate` when it exists; nothing else.
pub fn remove(nft: &dyn Nft) -> Result<RemoveOutcome, NftError> {
    if !nft.table_exists()? {
        return Ok(RemoveOutcome::Absent);
    }
    nft.run_batch(&remove_batch())?;
    Ok(RemoveOutcome::Removed)
}

/// The `nft` command line tool.
#[derive(Debug, Clone)]
pub struct NftCommand {
    pub program: PathBuf,
}

/// Environment variable naming the nft binary (tests, unusual installs).
pub const NFT_ENV: &str = "MODELGATE_NFT";

impl NftCommand {
    /// Finds `nft`: `$MODELGATE_NFT`, else `$PATH`, else `/usr/sbin` and `/sbin` (a non-root
    /// Debian `PATH` has neither).
    pub fn locate() -> Result<NftCommand, NftError> {
        if let Some(p) = std::env::var_os(NFT_ENV) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(NftCommand { program: p })
            } else {
                Err(NftError::NotInstalled {
                    looked_in: format!("{NFT_ENV}={}", p.display()),
                })
            };
        }
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
        for d in &dirs {
            let p = d.join("nft");
            if p.is_file() {
                return Ok(NftCommand { program: p });
            }
        }
        Err(NftError::NotInstalled {
            looked_in: "$PATH, /usr/sbin, /sbin".into(),
        })
    }

    fn check_privilege() -> Result<(), NftError> {
        match has_cap_net_admin(Path::new("/proc/self/status")) {
            Some(false) => Err(NftError::NotPermitted {
                detail: "this process lacks CAP_NET_ADMIN".into(),
            }),
            // Unknown (no /proc): let nft decide.
            _ => Ok(()),
        }
    }
}

/// Classifies nft's stderr: EPERM means missing privileges.
fn classify(action: &str, stderr: &str) -> NftError {
    let detail = stderr
        .trim()
        .lines()
        .take(6)
        .collect::<Vec<_>>()
        .join(" | ");
    if stderr.contains("Operation not permitted") {
        NftError::NotPermitted { detail }
    } else {
        NftError::Failed {
            action: action.to_string(),
            detail,
        }
    }
}

impl Nft for NftCommand {
    fn run_batch(&self, batch: &Nftables) -> Result<(), NftError> {
        Self::check_privilege()?;
        let payload = serde_json::to_string(batch).expect("nftables schema types serialise");
        let mut child = Command::new(&self.program)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(&self.program, &e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(payload.as_bytes())
                .map_err(|e| NftError::Failed {
                    action: "sending the batch".into(),
                    detail: e.to_string(),
                })?;
        }
        let out = child.wait_with_output().map_err(|e| NftError::Failed {
            action: "running nft".into(),
            detail: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(classify(
                "loading table inet modelgate",
                &String::from_utf8_lossy(&out.stderr),
            ))
        }
    }

    fn table_exists(&self) -> Result<bool, NftError> {
        Self::check_privilege()?;
        let listed = get_current_ruleset_with_args(Some(&self.program), ["list", "tables"])
            .map_err(|e| match e {
                NftablesError::NftExecution { inner, .. } => spawn_error(&self.program, &inner),
                NftablesError::NftFailed { stderr, .. } => classify("listing tables", &stderr),
                other => NftError::Failed {
                    action: "listing tables".into(),
                    detail: other.to_string(),
                },
            })?;
        Ok(listed.objects.iter().any(|o| {
            matches!(o, NfObject::ListObject(NfListObject::Table(t))
                if t.family == NfFamily::INet && t.name == TABLE_NAME)
        }))
    }
}

fn spawn_error(program: &Path, e: &std::io::Error) -> NftError {
    if e.kind() == std::io::ErrorKind::NotFound {
        NftError::NotInstalled {
            looked_in: program.display().to_string(),
        }
    } else {
        NftError::Failed {
            action: format!("starting {}", program.display()),
            detail: e.to_string(),
        }
    }
}

/// Whether the `CapEff` line of a `/proc/PID/status` file has CAP_NET_ADMIN (bit 12); `None`
/// when the file or line is unreadable.
pub fn has_cap_net_admin(status: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(status).ok()?;
    cap_net_admin_in(&text)
}

/// [`has_cap_net_admin`] on the text of a status file.
pub fn cap_net_admin_in(status_text: &str) -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    let line = status_text.lines().find(|l| l.starts_with("CapEff:"))?;
    let hex = line.split_whitespace().nth(1)?;
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}
