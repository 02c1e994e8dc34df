//! modelgate: a userspace-WireGuard HTTPS gateway to an on-prem OpenAI-compatible model.
//!
//! Module map (the README's "Code map" walks one request through these files):
//! - [`config`]: TOML config, raw serde structs validated into [`config::Config`]; CLI edits keep comments.
//! - [`civil`]: calendar arithmetic on UTC day numbers (budgets, certificates) and the one RFC 3339 formatter.
//! - [`cli`]: the `modelgate` verbs (clap), human tables and `--json`.
//! - [`wgkey`]: WireGuard key parsing/formatting with masked private keys.
//! - [`tunnel`]: WireGuard peers over one UDP socket (boringtun `Tunn`), AllowedIPs routing.
//! - [`netstack`]: userspace TCP/IP (smoltcp) over the tunnel: the driver task, its connection table and per-connection service; `dial` and `listen`.
//! - [`keys`]: API keys (format, keyed hash, store behind a backend trait (SQLite), usage ledger, in-memory ring, watcher).
//! - [`policy`]: pure per-key access decisions and limits (RPM, TPM, concurrency, budgets) with injected clocks.
//! - [`tls`]: certificates for the public listener (files, self-signed, ACME TLS-ALPN-01).
//! - [`gateway`]: the HTTPS front, one named step per file: auth, request, admission, forward, body (response + settlement), audit; compat, meter, fair queue, upstreams.
//! - [`accept`]: the bounded accept loop of every listener (HTTPS, metrics, control, `--forward`).
//! - [`daemon`]: `modelgate run`: wires the planes together until shutdown; reloads, drains, sd_notify.
//! - [`control`]: the local control API (unix socket) behind `modelgate status` and `reload`.
//! - [`doctor`]: `modelgate doctor`: one file per hop (config … streamed completion); names the first failing one.
//! - [`telemetry`]: request metrics and the Prometheus listener.
//! - [`firewall`]: the host's nftables table `inet modelgate` (desired state, apply/remove).
//! - [`demo`]: `modelgate demo`: the whole product on loopback (corp peer + echo model in-process).
//! - [`fsutil`]: atomic writes, 0600 files, handing created state files to the state directory's owner.
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
