//! `modelgate run`: wires the tunnel, the netstack and (later) the gateway together and keeps
//! them running until SIGTERM/SIGINT. (Being built; the signature below is the contract main uses.)

use std::net::SocketAddr;
use std::str::FromStr;

use crate::config::Config;

/// Options of `modelgate run` that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--forward LISTEN=TARGET`: debug TCP forwards from a local port through the tunnel.
    pub forwards: Vec<Forward>,
}

/// One `--forward 127.0.0.1:8080=10.20.0.5:8000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (l, t) = s.split_once('=').ok_or_else(|| {
            format!("--forward {s:?}: expected LISTEN=TARGET, e.g. 127.0.0.1:8080=10.20.0.5:8000")
        })?;
        let listen = l
            .parse()
            .map_err(|_| format!("--forward {s:?}: {l:?} is not an IP:PORT to listen on"))?;
        let target = t
            .parse()
            .map_err(|_| format!("--forward {s:?}: {t:?} is not an IP:PORT inside the tunnel"))?;
        Ok(Forward { listen, target })
    }
}

/// Runs the daemon in the current tokio runtime until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let _ = (config, opts);
    anyhow::bail!("modelgate run is not built yet")
}
