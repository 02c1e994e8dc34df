//! Configuration: the validated model the daemon runs on.
//!
//! Owns reading `/etc/modelgate/modelgate.toml` into raw serde structs and validating them into
//! [`Config`], reporting every bad setting at once (exit 64). Never touches the network.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::wgkey::PublicKey;

/// The validated configuration. Every field has already been checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (relative paths inside were resolved against its folder).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub wireguard: WireguardConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTPS listener (`--listen`).
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct WireguardConfig {
    /// UDP address the WireGuard socket binds (`--wg-listen`).
    pub listen: SocketAddr,
    /// `HOST:PORT` that corp peers dial (`--public-endpoint`), as written.
    pub public_endpoint: String,
    /// The appliance's address inside the tunnel, with the tunnel network's prefix length.
    pub address: IpNet,
    /// 0600 file holding the appliance's private key in `wg genkey` form.
    pub private_key_file: PathBuf,
    /// Inner MTU of the tunnel (1420 like wg-quick).
    pub mtu: u16,
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    /// The peer's own tunnel address (allocated by `peer add`).
    pub tunnel_address: IpAddr,
    /// Everything routed to this peer: its tunnel address /32 (or /128) plus the networks behind it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive the appliance sends (normally none: the corp side keeps the NAT open).
    pub keepalive: Option<u16>,
    /// Optional fixed endpoint; normally learned from the peer's authenticated packets.
    pub endpoint: Option<SocketAddr>,
}
