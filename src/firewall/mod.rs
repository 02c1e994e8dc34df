//! Host firewall: modelgate's own nftables table `inet modelgate` as idempotent desired state.
//!
//! Owns three things, kept apart so the policy is testable without root:
//! - [`desired`]: a pure function from the config's listeners and the operator's `--ssh-from`
//!   networks to a [`Ruleset`] (no I/O);
//! - [`render`]: that ruleset as `nft -f` text (`modelgate firewall print`) and as the
//!   libnftables JSON batch built with the `nftables` crate's schema types (what `apply` sends);
//! - [`nft`]: the [`nft::Nft`] trait (run a JSON batch, list tables) with the real `nft`
//!   subprocess behind it, and [`apply`]/[`remove`] on top of it.
//!
//! Never touches another table: `apply` is one nft transaction `add table; delete table; add
//! table …` on `inet modelgate` only (atomic: no instant without the table, no half-loaded
//! rules), and `remove` deletes only that table. Never opens the metrics listener, nor anything
//! else that is not listed below.
//!
//! # What the table lets in
//! A base chain `input` (hook input, policy **drop**) accepts, in this order:
//! 1. conntrack `established,related` (replies to the host's own connections, and the ICMP errors
//!    that belong to a known flow, which covers Path MTU discovery); `invalid` is dropped first;
//! 2. loopback (`iif "lo"`);
//! 3. ICMP essentials. IPv4: `destination-unreachable`, `time-exceeded`, `parameter-problem`, and
//!    `echo-request` rate-limited to 10/s (burst 20) so monitoring can ping the box. IPv6 (RFC
//!    4890's must-not-drop list): `destination-unreachable`, `packet-too-big`, `time-exceeded`,
//!    `parameter-problem`; neighbour discovery (`nd-router-advert`, `nd-neighbor-solicit`,
//!    `nd-neighbor-advert`) only with hop limit 255, i.e. from the link itself; MLD queries from
//!    link-local addresses (switches with MLD snooping stop forwarding the host's
//!    solicited-node multicast otherwise); `echo-request` rate-limited like IPv4. Plus the DHCPv6
//!    client port (UDP 546) from link-local servers, without which a cloud VM can lose its IPv6
//!    address at lease renewal;
//! 4. the HTTPS port of `server.listen` (TCP) and the WireGuard port of `wireguard.listen` (UDP),
//!    restricted to the listener's address when it is not the wildcard;
//! 5. SSH (TCP 22, or `--ssh-port`) from each `--ssh-from` network, IPv4 or IPv6.
//!
//! A last `counter` rule counts what the policy then drops (`nft list table inet modelgate`).
//!
//! # Priority: `filter + 10`
//! Every base chain on the input hook sees every packet, in priority order. `drop` is final
//! anywhere, `accept` only ends the chain that says it, so the host's effective policy is the
//! intersection of all tables whatever their order: this table can only take away, never open
//! what another table (Docker's, the distribution's `inet filter`, fail2ban's) closes, and they
//! cannot open what this one drops. The order only decides who sees a packet first: `+ 10` runs
//! after the conventional `filter` (0) chains and fail2ban/sshguard (≤ 0), so their counters, logs
//! and `reject`s still see all traffic and modelgate's policy drop is the last word. Conntrack
//! (priority -200) has already run, so `ct state` is available.

pub mod nft;
pub mod render;

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

pub use nft::{apply, remove, ApplyReport, Nft, NftCommand, NftError, RemoveOutcome};

/// nftables family of the table.
pub const TABLE_FAMILY: &str = "inet";
/// Name of the only table modelgate manages.
pub const TABLE_NAME: &str = "modelgate";
/// Name of the base chain.
pub const CHAIN_NAME: &str = "input";
/// Priority of the base chain on the input hook: `filter + 10` (see the module docs).
pub const CHAIN_PRIORITY: i32 = 10;
/// Default SSH port for `--ssh-from`.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// Everything the desired ruleset depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    /// `server.listen`: the public HTTPS listener (TCP).
    pub https: SocketAddr,
    /// `wireguard.listen`: the WireGuard socket (UDP).
    pub wireguard: SocketAddr,
    /// Networks allowed to reach SSH (`--ssh-from`); empty means SSH is not opened.
    pub ssh_from: Vec<IpNet>,
    /// TCP port of SSH (`--ssh-port`, default 22).
    pub ssh_port: u16,
}

impl FirewallSpec {
    /// The spec for a validated config and the operator's SSH networks.
    pub fn from_config(
        config: &crate::config::Config,
        ssh_from: Vec<IpNet>,
        ssh_port: u16,
    ) -> Self {
        FirewallSpec {
            https: config.server.listen,
            wireguard: config.wireguard.listen,
            ssh_from,
            ssh_port,
        }
    }
}

/// Layer-4 protocol of a port match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// One condition of a rule. A rule matches when all of its conditions do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ct state A,B`.
    CtState(Vec<&'static str>),
    /// `iif "NAME"`.
    Iif(&'static str),
    /// `icmp type { … }` (IPv4).
    IcmpType(Vec<&'static str>),
    /// `icmpv6 type { … }`.
    Icmpv6Type(Vec<&'static str>),
    /// `ip6 hoplimit N`.
    Ip6HopLimit(u8),
    /// `ip saddr NET` / `ip6 saddr NET` (the family follows the network).
    Saddr(IpNet),
    /// `ip daddr A` / `ip6 daddr A`.
    Daddr(IpAddr),
    /// `tcp dport N` / `udp dport N`.
    Dport(L4, u16),
}

/// `limit rate N/second burst B packets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// What a rule does once matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// No verdict: the packet goes on to the next rule (and finally the chain policy).
    Continue,
}

/// One rule of the `input` chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub limit: Option<RateLimit>,
    pub counter: bool,
    pub verdict: Verdict,
    /// Kept in the kernel with the rule (`nft list` shows it): says why the rule exists.
    pub comment: String,
}

impl Rule {
    fn accept(matches: Vec<Match>, comment: impl Into<String>) -> Rule {
        Rule {
            matches,
            limit: None,
            counter: false,
            verdict: Verdict::Accept,
            comment: comment.into(),
        }
    }
}

/// The whole desired state of table `inet modelgate`: one input chain with policy drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
}

const PING_LIMIT: RateLimit = RateLimit {
    per_second: 10,
    burst: 20,
};

/// The desired ruleset for `spec` (pure; the module docs explain each rule), group by group in
/// the documented order.
pub fn desired(spec: &FirewallSpec) -> Ruleset {
    let mut rules = conntrack();
    rules.push(Rule::accept(vec![Match::Iif("lo")], "loopback")); // group 2
    rules.extend(icmp_essentials());
    rules.extend(icmpv6_essentials());
    rules.extend(listeners(spec));
    rules.extend(ssh(spec));
    rules.push(Rule {
        matches: vec![],
        limit: None,
        counter: true,
        verdict: Verdict::Continue,
        comment: "dropped by policy".into(),
    });
    Ruleset { rules }
}

/// Group 1: invalid conntrack state dropped (and counted), then replies and their ICMP errors.
fn conntrack() -> Vec<Rule> {
    vec![
        Rule {
            matches: vec![Match::CtState(vec!["invalid"])],
            limit: None,
            counter: true,
            verdict: Verdict::Drop,
            comment: "invalid conntrack state".into(),
        },
        Rule::accept(
            vec![Match::CtState(vec!["established", "related"])],
            "replies and their ICMP errors (PMTUD)",
        ),
    ]
}

/// Group 3, IPv4: ICMP errors and rate-limited ping.
fn icmp_essentials() -> [Rule; 2] {
    [
        Rule::accept(
            vec![Match::IcmpType(vec![
                "destination-unreachable",
                "time-exceeded",
                "parameter-problem",
            ])],
            "ICMP errors",
        ),
        Rule {
            limit: Some(PING_LIMIT),
            ..Rule::accept(vec![Match::IcmpType(vec!["echo-request"])], "ping")
        },
    ]
}

/// Group 3, IPv6: RFC 4890's must-not-drop ICMPv6, neighbour discovery from the link only, MLD
/// queries, rate-limited ping and the DHCPv6 client port.
fn icmpv6_essentials() -> [Rule; 5] {
    [
        Rule::accept(
            vec![Match::Icmpv6Type(vec![
                "destination-unreachable",
                "packet-too-big",
                "time-exceeded",
                "parameter-problem",
            ])],
            "ICMPv6 errors (RFC 4890)",
        ),
        Rule::accept(
            vec![
                Match::Icmpv6Type(vec![
                    "nd-router-advert",
                    "nd-neighbor-solicit",
                    "nd-neighbor-advert",
                ]),
                Match::Ip6HopLimit(255),
            ],
            "IPv6 neighbour discovery",
        ),
        Rule::accept(
            vec![
                Match::Icmpv6Type(vec!["mld-listener-query"]),
                Match::Saddr(link_local()),
            ],
            "MLD queries",
        ),
        Rule {
            limit: Some(PING_LIMIT),
            ..Rule::accept(vec![Match::Icmpv6Type(vec!["echo-request"])], "ping6")
        },
        Rule::accept(
            vec![Match::Saddr(link_local()), Match::Dport(L4::Udp, 546)],
            "DHCPv6 client",
        ),
    ]
}

/// Group 4: modelgate's own listeners.
fn listeners(spec: &FirewallSpec) -> [Rule; 2] {
    [
        listener_rule(L4::Tcp, spec.https, "modelgate HTTPS (server.listen)"),
        listener_rule(
            L4::Udp,
            spec.wireguard,
            "modelgate WireGuard (wireguard.listen)",
        ),
    ]
}

/// Group 5: SSH from each `--ssh-from` network.
fn ssh(spec: &FirewallSpec) -> impl Iterator<Item = Rule> + '_ {
    spec.ssh_from.iter().map(|net| {
        let net = net.trunc();
        Rule::accept(
            vec![Match::Saddr(net), Match::Dport(L4::Tcp, spec.ssh_port)],
            format!("SSH from {net} (--ssh-from)"),
        )
    })
}

fn link_local() -> IpNet {
    "fe80::/10".parse().expect("constant network")
}

/// Accepts `l4` traffic to the listener's port, and only to its address unless it is the
/// wildcard (`0.0.0.0` / `::`).
fn listener_rule(l4: L4, addr: SocketAddr, comment: &str) -> Rule {
    let mut matches = Vec::new();
    if !addr.ip().is_unspecified() {
        matches.push(Match::Daddr(addr.ip()));
    }
    matches.push(Match::Dport(l4, addr.port()));
    Rule::accept(matches, comment)
}

/// Parses an `--ssh-from` value: `CIDR` (host bits are cleared) or a bare address (one host).
pub fn parse_ssh_from(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "{s:?} is not an IPv4/IPv6 network; fix: write e.g. 203.0.113.0/24, 198.51.100.7 or 2001:db8::/48"
    ))
}

/// When this process runs inside an SSH session (`SSH_CONNECTION`) whose client the spec would
/// not let reach SSH again, a warning for the operator: the session itself survives (conntrack
/// `established`), the next login from there does not.
pub fn ssh_lockout_warning(spec: &FirewallSpec, ssh_connection: Option<&str>) -> Option<String> {
    let mut parts = ssh_connection?.split_whitespace();
    let client: IpAddr = parts.next()?.parse().ok()?;
    let _client_port = parts.next()?;
    let _server = parts.next()?;
    let server_port: u16 = parts.next()?.parse().ok()?;
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    let covered = server_port == spec.ssh_port && spec.ssh_from.iter().any(|n| n.contains(&client));
    if covered {
        return None;
    }
    Some(format!(
        "warning: this SSH session comes from {client} to port {server_port}, which the firewall \
         will not let in: the open session keeps working, new logins from there will be dropped; \
         fix: add --ssh-from {client}/{} (and --ssh-port {server_port} if that is your SSH port)",
        if client.is_ipv4() { 32 } else { 128 }
    ))
}

#[cfg(test)]
mod tests;
