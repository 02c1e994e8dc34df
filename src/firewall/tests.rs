use super::render::{apply_batch, remove_batch, rule_text, to_json, to_nft_text};
use super::*;
use nftables::schema::{NfCmd, NfListObject, NfObject, Nftables};
use std::cell::RefCell;

fn spec(ssh: &[&str]) -> FirewallSpec {
    FirewallSpec {
        https: "0.0.0.0:443".parse().unwrap(),
        wireguard: "0.0.0.0:51820".parse().unwrap(),
        ssh_from: ssh.iter().map(|s| parse_ssh_from(s).unwrap()).collect(),
        ssh_port: DEFAULT_SSH_PORT,
    }
}

fn texts(r: &Ruleset) -> Vec<String> {
    r.rules.iter().map(rule_text).collect()
}

#[test]
fn opens_exactly_the_listeners_and_ssh_networks() {
    let r = desired(&spec(&["203.0.113.0/24", "2001:db8::/48"]));
    let t = texts(&r);
    let ports: Vec<&String> = t.iter().filter(|l| l.contains(" dport ")).collect();
    assert_eq!(
        ports,
        [
            "ip6 saddr fe80::/10 udp dport 546 accept comment \"DHCPv6 client\"",
            "tcp dport 443 accept comment \"modelgate HTTPS (server.listen)\"",
            "udp dport 51820 accept comment \"modelgate WireGuard (wireguard.listen)\"",
            "ip saddr 203.0.113.0/24 tcp dport 22 accept comment \"SSH from 203.0.113.0/24 (--ssh-from)\"",
            "ip6 saddr 2001:db8::/48 tcp dport 22 accept comment \"SSH from 2001:db8::/48 (--ssh-from)\"",
        ]
    );
    assert_eq!(
        t[0],
        "ct state invalid counter drop comment \"invalid conntrack state\""
    );
    assert!(t[1].starts_with("ct state established,related accept"));
    assert_eq!(t[2], "iif \"lo\" accept comment \"loopback\"");
    assert_eq!(
        t.last().unwrap(),
        "counter comment \"dropped by policy\"",
        "the last rule only counts; the policy drops"
    );
    assert!(t.iter().any(|l| l
        == "icmp type echo-request limit rate 10/second burst 20 packets accept comment \"ping\""));
    assert!(t
        .iter()
        .any(|l| l.starts_with("icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept")));
}

#[test]
fn no_ssh_without_ssh_from_and_custom_ssh_port() {
    let t = texts(&desired(&spec(&[])));
    assert!(!t.iter().any(|l| l.contains("dport 22 ")), "{t:?}");
    let mut s = spec(&["198.51.100.7"]);
    s.ssh_port = 2222;
    let t = texts(&desired(&s));
    assert!(
        t.iter()
            .any(|l| l.starts_with("ip saddr 198.51.100.7 tcp dport 2222 accept")),
        "{t:?}"
    );
}

#[test]
fn specific_listen_addresses_restrict_the_destination() {
    let s = FirewallSpec {
        https: "192.0.2.1:8443".parse().unwrap(),
        wireguard: "[2001:db8::1]:51000".parse().unwrap(),
        ssh_from: vec![],
        ssh_port: 22,
    };
    let t = texts(&desired(&s));
    assert!(
        t.iter()
            .any(|l| l.starts_with("ip daddr 192.0.2.1 tcp dport 8443 accept")),
        "{t:?}"
    );
    assert!(
        t.iter()
            .any(|l| l.starts_with("ip6 daddr 2001:db8::1 udp dport 51000 accept")),
        "{t:?}"
    );
}

#[test]
fn ssh_from_parsing() {
    for (given, net) in [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        (" 2001:db8::5 ", "2001:db8::5/128"),
    ] {
        assert_eq!(parse_ssh_from(given).unwrap().to_string(), net, "{given:?}");
    }
    let e = parse_ssh_from("office").unwrap_err();
    assert!(e.contains("\"office\"") && e.contains("fix:"), "{e}");
    assert!(parse_ssh_from("10.0.0.0/33").is_err());
}

#[test]
fn text_is_one_replacing_transaction() {
    let text = to_nft_text(&desired(&spec(&["203.0.113.0/24"])));
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        &lines[..5],
        [
            "table inet modelgate",
            "delete table inet modelgate",
            "table inet modelgate {",
            "\tchain input {",
            "\t\ttype filter hook input priority filter + 10; policy drop;",
        ]
    );
    assert_eq!(&lines[lines.len() - 2..], ["\t}", "}"]);
    assert!(!text.contains("flush ruleset"));
}

fn cmd_kinds(batch: &Nftables) -> Vec<String> {
    batch
        .objects
        .iter()
        .map(|o| match o {
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(t))) => {
                format!("add table {}", t.name)
            }
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(t))) => {
                format!("delete table {}", t.name)
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(c))) => {
                format!("add chain {} {} prio {:?}", c.table, c.name, c.prio)
            }
            NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(r))) => {
                format!("add rule {} {}", r.table, r.chain)
            }
            other => format!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn json_batch_touches_only_our_table() {
    let r = desired(&spec(&["203.0.113.0/24"]));
    let kinds = cmd_kinds(&apply_batch(&r));
    assert_eq!(
        &kinds[..4],
        [
            "add table modelgate",
            "delete table modelgate",
            "add table modelgate",
            "add chain modelgate input prio Some(10)",
        ]
    );
    assert_eq!(kinds.len(), 4 + r.rules.len());
    assert!(kinds[4..].iter().all(|k| k == "add rule modelgate input"));
    assert_eq!(
        cmd_kinds(&remove_batch()),
        ["add table modelgate", "delete table modelgate"]
    );
    let json = to_json(&apply_batch(&r));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["nftables"].is_array());
    assert!(json.contains("\"policy\": \"drop\""), "{json}");
    assert!(json.contains("\"family\": \"inet\""));
    assert!(!json.contains("\"family\": \"ip\""), "only the inet table");
}

#[test]
fn ssh_lockout_warning_only_when_the_session_is_not_covered() {
    let s = spec(&["203.0.113.0/24"]);
    assert_eq!(ssh_lockout_warning(&s, None), None);
    assert_eq!(
        ssh_lockout_warning(&s, Some("203.0.113.9 50000 192.0.2.1 22")),
        None
    );
    let w = ssh_lockout_warning(&s, Some("198.51.100.4 50000 192.0.2.1 22")).unwrap();
    assert!(w.contains("--ssh-from 198.51.100.4/32"), "{w}");
    let w = ssh_lockout_warning(&s, Some("203.0.113.9 50000 192.0.2.1 2222")).unwrap();
    assert!(w.contains("--ssh-port 2222"), "{w}");
    // An IPv4 client seen through a dual-stack socket.
    assert_eq!(
        ssh_lockout_warning(&s, Some("::ffff:203.0.113.9 50000 ::ffff:192.0.2.1 22")),
        None
    );
    assert_eq!(ssh_lockout_warning(&s, Some("garbage")), None);
}

/// Records what would be sent to nft.
struct FakeNft {
    exists: RefCell<bool>,
    sent: RefCell<Vec<Vec<String>>>,
    fail: Option<NftError>,
}

impl FakeNft {
    fn new(exists: bool) -> Self {
        FakeNft {
            exists: RefCell::new(exists),
            sent: RefCell::new(vec![]),
            fail: None,
        }
    }
}

impl Nft for FakeNft {
    fn run_batch(&self, batch: &Nftables) -> Result<(), NftError> {
        if let Some(e) = &self.fail {
            return Err(e.clone());
        }
        let kinds = cmd_kinds(batch);
        *self.exists.borrow_mut() = kinds.last().is_some_and(|k| !k.starts_with("delete"));
        self.sent.borrow_mut().push(kinds);
        Ok(())
    }
    fn table_exists(&self) -> Result<bool, NftError> {
        Ok(*self.exists.borrow())
    }
}

#[test]
fn apply_and_remove_are_idempotent() {
    let r = desired(&spec(&[]));
    let nft = FakeNft::new(false);
    let first = apply(&nft, &r).unwrap();
    assert!(!first.replaced);
    let second = apply(&nft, &r).unwrap();
    assert!(second.replaced);
    let sent = nft.sent.borrow().clone();
    assert_eq!(sent[0], sent[1], "the same transaction both times");
    assert_eq!(remove(&nft).unwrap(), RemoveOutcome::Removed);
    assert_eq!(remove(&nft).unwrap(), RemoveOutcome::Absent);
    assert_eq!(
        nft.sent.borrow().len(),
        3,
        "removing an absent table sends nothing"
    );
}

#[test]
fn errors_say_what_to_do() {
    let mut nft = FakeNft::new(false);
    nft.fail = Some(NftError::NotPermitted {
        detail: "Operation not permitted".into(),
    });
    let e = apply(&nft, &desired(&spec(&[]))).unwrap_err().to_string();
    assert!(e.contains("needs root") && e.contains("sudo"), "{e}");
    let e = NftError::NotInstalled {
        looked_in: "$PATH".into(),
    }
    .to_string();
    assert!(e.contains("apt-get install nftables"), "{e}");
}

#[test]
fn cap_net_admin_is_read_from_capeff() {
    for (status, want) in [
        ("Name:\tx\nCapEff:\t000001ffffffffff\n", Some(true)),
        ("CapEff:\t0000000000000000\n", Some(false)),
        ("CapEff:\t0000000000001000\n", Some(true)),
        ("nothing", None),
    ] {
        assert_eq!(nft::cap_net_admin_in(status), want, "{status:?}");
    }
}
