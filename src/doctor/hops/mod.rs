//! The verdict of each hop, one file per hop in path order: what [`super::cert`],
//! [`super::net`], [`super::probe`] and the daemon's status found, turned into a pass, a failure
//! with its fix, or a skip with the missing prerequisite.
//!
//! Verdicts only read: the one write of a doctor run is the throwaway key of hops 7–8.

mod certificate;
mod config;
mod dns;
mod listener;
mod peers;
mod probes;
mod store;
mod upstreams;

pub(super) use certificate::certificate_hop;
pub(super) use config::config_hop;
pub(super) use dns::dns_hop;
pub(super) use listener::listener_hop;
pub(super) use peers::peers_hop;
pub(super) use probes::probe_hops;
pub(super) use store::store_hop;
pub(super) use upstreams::upstreams_hop;
