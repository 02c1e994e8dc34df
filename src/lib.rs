//! modelgate: a userspace-WireGuard HTTPS gateway to an on-prem OpenAI-compatible model.
//!
//! Module map (see `DESIGN.md` in the shared folder and the README):
//! - [`config`]: TOML config, raw serde structs validated into [`config::Config`]; CLI edits keep comments.
//! - [`civil`]: calendar arithmetic on UTC day numbers (budgets, certificates, RFC 3339).
//! - [`cli`]: the `modelgate` verbs (clap), human tables and `--json`.
//! - [`wgkey`]: WireGuard key parsing/formatting with masked private keys.
//! - [`tunnel`]: WireGuard peers over one UDP socket (boringtun `Tunn`), AllowedIPs routing.
//! - [`netstack`]: userspace TCP/IP (smoltcp) over the tunnel; `dial` and `listen`.
//! - [`keys`]: API keys (format, keyed hash, SQLite store, usage ledger, in-memory ring).
//! - [`policy`]: pure per-key access decisions and limits (RPM, TPM, concurrency, budgets) with injected clocks.
//! - [`tls`]: certificates for the public listener (files, self-signed; ACME later).
//! - [`gateway`]: the HTTPS front: auth, policy, routing, streaming proxy.
//! - [`accept`]: the bounded accept loop of every listener (HTTPS, metrics, control, `--forward`).
//! - [`daemon`]: `modelgate run`: wires the planes together until shutdown; reloads, drains, sd_notify.
//! - [`control`]: the local control API (unix socket) behind `modelgate status` and `reload`.
//! - [`doctor`]: `modelgate doctor`: checks every hop (config … streamed completion) and names the first failing one.
//! - [`telemetry`]: request metrics and the Prometheus listener.
//! - [`firewall`]: the host's nftables table `inet modelgate` (desired state, apply/remove).
#![forbid(unsafe_code)]

pub mod accept;
pub mod civil;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod firewall;
pub mod fsutil;
pub mod gateway;
pub mod keys;
pub mod netstack;
pub mod policy;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod wgkey;
