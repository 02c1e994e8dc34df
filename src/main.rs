//! `modelgate` binary: parse the command line, set up logging, run the verb, map the exit code.

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

use modelgate::cli::{execute, Cli};

/// The daemon's allocator (see Cargo.toml): RSS that follows the live heap over long uptimes.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's convention, matching our contract); --help/--version exit 0.
    let cli = Cli::parse();
    init_tracing(cli.command.is_daemon());
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelgate: error: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// Logs filtered by `MODELGATE_LOG`, else `RUST_LOG`, else `info`. The daemon logs to stdout
/// (journald); the other verbs log to stderr so their stdout (wg-quick files, JSON) stays clean.
fn init_tracing(daemon: bool) {
    let spec = std::env::var("MODELGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("modelgate: warning: MODELGATE_LOG/RUST_LOG {spec:?}: {e}; using \"info\"");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // Colour codes only for a terminal; journald and files get plain text.
    if daemon {
        let ansi = std::io::stdout().is_terminal();
        builder.with_ansi(ansi).with_writer(std::io::stdout).init();
    } else {
        let ansi = std::io::stderr().is_terminal();
        builder.with_ansi(ansi).with_writer(std::io::stderr).init();
    }
}
