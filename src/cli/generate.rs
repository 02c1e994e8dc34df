//! `modelgate generate man DIR | completions SHELL` (hidden): documentation built from the clap
//! definitions, for packaging (`scripts/install.sh`, the .deb).
//!
//! Owns nothing but rendering: the man pages (`modelgate.1` and one page per subcommand, like
//! git's `git-commit.1`) with `clap_mangen`, and shell completion scripts with `clap_complete`.
//! Hidden from `--help` because operators never need it; the README's Operations section names it.

use clap::{CommandFactory, Subcommand};
use std::path::{Path, PathBuf};

use super::{Cli, CliError};

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write the man pages (modelgate.1 and modelgate-VERB.1 per subcommand) into DIR.
    Man {
        /// Output directory (created when missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

pub fn execute(cmd: GenerateCommand) -> Result<(), CliError> {
    match cmd {
        GenerateCommand::Man { dir } => {
            write_man_pages(&dir).map_err(|e| {
                CliError::runtime(format!("cannot write man pages to {}: {e}", dir.display()))
            })?;
            Ok(())
        }
        GenerateCommand::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "modelgate", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// Renders every man page into `dir`; returns the number of pages.
pub fn write_man_pages(dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let before = count_pages(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    Ok(count_pages(dir)? - before)
}

fn count_pages(dir: &Path) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_is_hidden_and_pages_cover_every_verb() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("firewall"), "{help}");
        assert!(!help.contains("generate"), "generate is hidden:\n{help}");
        let dir = tempfile::tempdir().unwrap();
        let n = write_man_pages(dir.path()).unwrap();
        let exists = |p: &str| dir.path().join(p).is_file();
        assert!(exists("modelgate.1") && exists("modelgate-firewall-apply.1"));
        assert!(!exists("modelgate-generate.1"));
        assert!(n >= 20, "{n} pages");
        let top = std::fs::read_to_string(dir.path().join("modelgate.1")).unwrap();
        assert!(
            top.contains("modelgate\\-firewall(1)"),
            "subcommands are cross-referenced"
        );
    }
}
