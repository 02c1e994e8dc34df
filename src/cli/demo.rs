//! `modelgate demo`: the whole product on loopback, no root and no config (see [`crate::demo`]).

use clap::Args;
use std::net::SocketAddr;

use super::CliError;
use crate::demo::{self, DemoOptions};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// HTTPS address of the demo gateway (port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Send one streamed chat through the full path, print it and exit (0 when it worked).
    #[arg(long)]
    pub check: bool,
}

pub fn execute(a: DemoArgs) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    runtime
        .block_on(demo::run(DemoOptions {
            listen: a.listen,
            check: a.check,
        }))
        .map_err(|e| CliError::runtime(format!("demo: {e:#}")))
}
