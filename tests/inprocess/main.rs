//! The in-process tests, one binary, no root: everything runs in this process (or in a child
//! it starts and reaps) and talks over loopback only.
//!
//! - [`tunnel`]: two modelgate netstacks joined by WireGuard over loopback UDP.
//! - [`gateway`]: the HTTPS gateway end to end (keys, policy, limits, routing, streaming,
//!   ledger, fair share) through that tunnel to the echo model.
//! - [`cursor_compat`]: Cursor's request bodies through the gateway to `fake_vllm.py`.
//! - [`replicas`]: one model on several servers: balancing, ejection, failover before the
//!   first byte only, the model-wide queue, affinity.
//! - [`tls`]: the public listener's certificates over real sockets (files, self-signed, ACME
//!   placeholder, reloads).
//! - [`demo`]: `modelgate demo --check`, the README's first command, through the binary.
//! - [`restart`]: the appliance's netstack restarted with the corp side untouched (endpoint
//!   store), and answers cut short (dead model connection, end of the drain period).
//! - [`adversarial`]: tables of hostile requests (HTTP/1.1 bytes, HTTP/2 frames), none reaching
//!   the model.
//! - [`hardening`]: one test per fix for hostile or broken clients (stalled bodies and floods
//!   of them, HTTP/2 without requests, ambiguous auth, deep JSON, unknown paths, early errors).
//!
//! - [`ha`]: two gateways on one shared PostgreSQL store (a throwaway cluster): a revoke on
//!   one is a 401 on the other within 1 s, PostgreSQL killed mid-load fails no request and the
//!   ledger equals the model's count afterwards, one gateway gone leaves the other serving.
//!
//! - [`upstream_pool`]: the upstream connection pool alone (reuse, drops, closes, expiry).
//!
//! [`harness`] builds the gateway stack (the way the daemon builds it) and its client; [`raw`]
//! writes requests as bytes and HTTP/2 frame by frame.

mod adversarial;
mod cursor_compat;
mod demo;
mod gateway;
mod ha;
mod hardening;
mod harness;
#[path = "../support/pg.rs"]
mod pg;
mod raw;
mod replicas;
mod restart;
#[path = "../support/skip.rs"]
mod skip;
mod tls;
mod tunnel;
mod upstream_pool;
