//! The in-process tests, one binary, no root: everything runs in this process (or in a child
//! it starts and reaps) and talks over loopback only.
//!
//! - [`tunnel`]: two modelgate netstacks joined by WireGuard over loopback UDP.
//! - [`gateway`]: the HTTPS gateway end to end (keys, policy, limits, routing, streaming,
//!   ledger, fair share) through that tunnel to the echo model.
//! - [`cursor_compat`]: Cursor's request bodies through the gateway to `fake_vllm.py`.
//! - [`tls`]: the public listener's certificates over real sockets (files, self-signed, ACME
//!   placeholder, reloads).
//! - [`demo`]: `modelgate demo --check`, the README's first command, through the binary.
//! - [`restart`]: the appliance's netstack restarted with the corp side untouched (endpoint
//!   store), and answers cut short (dead model connection, end of the drain period).
//!
//! [`harness`] builds the gateway stack (the way the daemon builds it) and its client.

mod cursor_compat;
mod demo;
mod gateway;
mod harness;
mod restart;
mod tls;
mod tunnel;
