//! Unit tests of the WireGuard core: handshakes and endpoint learning, roaming, the inner-source
//! check, garbage input, peer-set changes and longest-prefix routing.

use super::*;

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(payload);
    p
}

struct Pair {
    a: WgCore,
    b: WgCore,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

/// Two cores that know each other: a routes 10.0.0.2/32, b routes 10.0.0.1/32 and only b
/// has a's endpoint (like a corp peer that dials the appliance).
fn pair() -> Pair {
    pair_with(PrivateKey::generate(), PrivateKey::generate())
}

/// [`pair`] with the keys given (a test that "restarts" a builds it again from its key).
fn pair_with(ka: PrivateKey, kb: PrivateKey) -> Pair {
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let b_addr: SocketAddr = "198.51.100.2:40000".parse().unwrap();
    let a = WgCore::new(
        &ka,
        vec![PeerSpec {
            name: "b".into(),
            public_key: kb.public_key(),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            keepalive: None,
            endpoint: None,
        }],
    );
    let b = WgCore::new(
        &kb,
        vec![PeerSpec {
            name: "a".into(),
            public_key: ka.public_key(),
            allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
            keepalive: None,
            endpoint: Some(a_addr),
        }],
    );
    Pair {
        a,
        b,
        a_addr,
        b_addr,
    }
}

#[derive(Default)]
struct Collected {
    udp: Vec<(SocketAddr, Vec<u8>)>,
    ip: Vec<Vec<u8>>,
}

fn collect(c: &mut Collected) -> impl FnMut(Output<'_>) + '_ {
    move |o| match o {
        Output::Udp { to, data, .. } => c.udp.push((to, data.to_vec())),
        Output::Ip(p) => c.ip.push(p.to_vec()),
    }
}

/// Delivers datagrams back and forth until both sides are quiet (bounded).
fn shuttle(p: &mut Pair, mut from_b: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut ip_at_a = Vec::new();
    let mut ip_at_b = Vec::new();
    for _ in 0..10 {
        let mut at_a = Collected::default();
        for d in from_b.drain(..) {
            p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut at_a));
        }
        ip_at_a.extend(at_a.ip);
        let mut at_b = Collected::default();
        for (to, d) in at_a.udp {
            assert_eq!(to, p.b_addr, "a must answer the address b dialled from");
            p.b.handle_datagram(p.a_addr, None, &d, &mut collect(&mut at_b));
        }
        ip_at_b.extend(at_b.ip);
        from_b = at_b.udp.into_iter().map(|(_, d)| d).collect();
        if from_b.is_empty() {
            break;
        }
    }
    (ip_at_a, ip_at_b)
}

#[test]
fn handshake_learns_endpoint_and_carries_packets_both_ways() {
    let mut p = pair();
    assert_eq!(
        p.a.check_route("10.0.0.2".parse().unwrap()),
        Err(RouteError::NoEndpoint)
    );
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"hello");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    assert_eq!(
        c.udp.len(),
        1,
        "first packet triggers a handshake initiation"
    );
    let (ip_at_a, _) = shuttle(&mut p, c.udp.into_iter().map(|(_, d)| d).collect());
    assert_eq!(
        ip_at_a,
        vec![pkt.clone()],
        "queued packet delivered after handshake"
    );
    assert_eq!(p.a.check_route("10.0.0.2".parse().unwrap()), Ok(()));
    assert_eq!(p.a.stats()[0].endpoint, Some(p.b_addr));

    // a answers through the learned endpoint.
    let reply = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"world");
    let mut c = Collected::default();
    p.a.send_ip(&reply, &mut collect(&mut c)).unwrap();
    assert_eq!(c.udp.len(), 1);
    assert_eq!(c.udp[0].0, p.b_addr);
    let mut at_b = Collected::default();
    p.b.handle_datagram(p.a_addr, None, &c.udp[0].1, &mut collect(&mut at_b));
    assert_eq!(at_b.ip, vec![reply]);
}

#[test]
fn roaming_updates_endpoint() {
    let mut p = pair();
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"x");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    shuttle(&mut p, c.udp.into_iter().map(|(_, d)| d).collect());
    // Same session, new NAT mapping.
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    let moved: SocketAddr = "198.51.100.2:40001".parse().unwrap();
    let mut at_a = Collected::default();
    p.a.handle_datagram(moved, None, &c.udp[0].1, &mut collect(&mut at_a));
    assert_eq!(at_a.ip.len(), 1);
    assert_eq!(p.a.stats()[0].endpoint, Some(moved));
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped() {
    let mut p = pair();
    let good = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"x");
    let mut c = Collected::default();
    p.b.send_ip(&good, &mut collect(&mut c)).unwrap();
    shuttle(&mut p, c.udp.into_iter().map(|(_, d)| d).collect());
    // b spoofs a source it does not own (b's own routing only checks the destination).
    let spoofed = ipv4_packet([10, 9, 9, 9], [10, 0, 0, 1], b"spoof");
    let mut c = Collected::default();
    p.b.send_ip(&spoofed, &mut collect(&mut c)).unwrap();
    let mut at_a = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &c.udp[0].1, &mut collect(&mut at_a));
    assert!(at_a.ip.is_empty());
    assert_eq!(p.a.drops().bad_source, 1);
}

#[test]
fn garbage_and_unknown_keys_are_ignored() {
    let mut p = pair();
    let mut c = Collected::default();
    for len in [0usize, 1, 3, 4, 31, 32, 64, 92, 148, 200, 1500] {
        for first in [0u8, 1, 2, 3, 4, 0xff] {
            let mut d = vec![0xAAu8; len];
            if !d.is_empty() {
                d[0] = first;
            }
            p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut c));
        }
    }
    // Data packet with a receiver index that looks like ours but garbage ciphertext.
    let mut forged = vec![0u8; 64];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&(p.a.peer_index(0) << 8).to_le_bytes());
    p.a.handle_datagram(p.b_addr, None, &forged, &mut collect(&mut c));
    // A real handshake from a key a does not know.
    let stranger_key = PrivateKey::generate();
    let mut stranger = WgCore::new(
        &stranger_key,
        vec![PeerSpec {
            name: "a".into(),
            public_key: p.a.public_key(),
            allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
            keepalive: None,
            endpoint: Some(p.a_addr),
        }],
    );
    let mut s = Collected::default();
    stranger
        .send_ip(
            &ipv4_packet([10, 0, 0, 3], [10, 0, 0, 1], b"?"),
            &mut collect(&mut s),
        )
        .unwrap();
    for (_, d) in &s.udp {
        p.a.handle_datagram(p.b_addr, None, d, &mut collect(&mut c));
    }
    assert!(c.udp.is_empty() && c.ip.is_empty(), "nothing answered");
    assert_eq!(p.a.drops().unknown_peer, 1);
    assert!(p.a.drops().invalid >= 60);
    assert_eq!(
        p.a.stats()[0].endpoint,
        None,
        "endpoint not learned from junk"
    );
}

/// A reload that adds a peer and rewrites another's allowed IPs keeps the established
/// session of the peer whose key stayed: its next packet decrypts with no handshake, its
/// counters go on, and the new peer (with an endpoint) is handshaken at once.
#[test]
fn set_peers_keeps_sessions_of_unchanged_keys() {
    let mut p = pair();
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"before");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    let (ip_at_a, _) = shuttle(&mut p, c.udp.into_iter().map(|(_, d)| d).collect());
    assert_eq!(ip_at_a.len(), 1);
    let before = p.a.stats()[0].clone();
    assert!(before.last_handshake.is_some() && before.rx_bytes > 0);

    let b_spec = PeerSpec {
        name: "b-renamed".into(),
        public_key: p.a.peers[0].spec.public_key,
        allowed_ips: vec![
            "10.0.0.2/32".parse().unwrap(),
            "10.5.0.0/16".parse().unwrap(),
        ],
        keepalive: None,
        endpoint: None,
    };
    let c_spec = PeerSpec {
        name: "c".into(),
        public_key: PrivateKey::generate().public_key(),
        allowed_ips: vec!["10.0.0.3/32".parse().unwrap()],
        keepalive: None,
        endpoint: Some("203.0.113.7:51820".parse().unwrap()),
    };
    let mut out = Collected::default();
    let changes = p.a.set_peers(vec![c_spec, b_spec], &mut collect(&mut out));
    assert_eq!(changes.added, vec!["c".to_string()]);
    assert_eq!(changes.updated, vec!["b-renamed".to_string()]);
    assert!(changes.removed.is_empty() && changes.restarted.is_empty());
    assert_eq!(
        out.udp.len(),
        1,
        "the new peer with an endpoint is handshaken"
    );
    assert_eq!(out.udp[0].0, "203.0.113.7:51820".parse().unwrap());

    // b's session survives: its next packet is delivered without any handshake message.
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"after");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    assert_eq!(c.udp.len(), 1);
    let mut at_a = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &c.udp[0].1, &mut collect(&mut at_a));
    assert_eq!(at_a.ip, vec![pkt]);
    assert!(at_a.udp.is_empty(), "no handshake was needed");
    let after =
        p.a.stats()
            .into_iter()
            .find(|s| s.name == "b-renamed")
            .unwrap();
    assert!(after.rx_bytes > before.rx_bytes, "counters carried over");
    assert_eq!(after.endpoint, Some(p.b_addr), "learned endpoint kept");
    assert_eq!(
        p.a.route("10.5.1.1".parse().unwrap())
            .map(|i| p.a.peers[i].spec.name.as_str()),
        Some("b-renamed")
    );
    assert_eq!(
        p.a.route("10.0.0.3".parse().unwrap())
            .map(|i| p.a.peers[i].spec.name.as_str()),
        Some("c")
    );

    // A new keepalive restarts that peer's session; removing a peer drops its packets.
    let mut b_ka =
        p.a.peers
            .iter()
            .find(|x| x.spec.name == "b-renamed")
            .unwrap()
            .spec
            .clone();
    b_ka.keepalive = Some(25);
    let changes =
        p.a.set_peers(vec![b_ka], &mut collect(&mut Collected::default()));
    assert_eq!(changes.restarted, vec!["b-renamed".to_string()]);
    assert_eq!(changes.removed, vec!["c".to_string()]);
    let changes =
        p.a.set_peers(Vec::new(), &mut collect(&mut Collected::default()));
    assert_eq!(changes.removed, vec!["b-renamed".to_string()]);
    let invalid = p.a.drops().invalid;
    let mut c = Collected::default();
    p.b.send_ip(
        &ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"x"),
        &mut collect(&mut c),
    )
    .unwrap();
    let mut at_a = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &c.udp[0].1, &mut collect(&mut at_a));
    assert!(at_a.ip.is_empty());
    assert_eq!(p.a.drops().invalid, invalid + 1);
    assert_eq!(p.a.route("10.0.0.2".parse().unwrap()), None);
}

#[test]
fn longest_prefix_wins() {
    let k = PrivateKey::generate();
    let spec = |name: &str, nets: &[&str]| PeerSpec {
        name: name.into(),
        public_key: PrivateKey::generate().public_key(),
        allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        keepalive: None,
        endpoint: Some("192.0.2.9:1".parse().unwrap()),
    };
    let core = WgCore::new(
        &k,
        vec![
            spec("wide", &["10.0.0.0/8"]),
            spec("narrow", &["10.20.0.0/24"]),
        ],
    );
    assert_eq!(core.route("10.20.0.5".parse().unwrap()), Some(1));
    assert_eq!(core.route("10.21.0.5".parse().unwrap()), Some(0));
    assert_eq!(core.route("192.168.0.1".parse().unwrap()), None);
}

mod restart;
