//! Restarts and silence: stored endpoints restored and handshaken, the unknown-session trigger
//! (only towards a known endpoint, rate-limited, never next to a live session), and a peer
//! told dead from its silence by the core's injected clock.

use super::*;

/// `b` sends `payload` to `a` on its current session: the datagram.
fn data_from_b(p: &mut Pair, payload: &[u8]) -> Vec<u8> {
    let mut c = Collected::default();
    p.b.send_ip(
        &ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], payload),
        &mut collect(&mut c),
    )
    .unwrap();
    assert_eq!(c.udp.len(), 1, "b has a session: one data datagram");
    c.udp.remove(0).1
}

/// A pair whose session is up (b dialled a, like a corp peer).
fn connected() -> Pair {
    let mut p = pair();
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"hello");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    let (ip_at_a, _) = shuttle(&mut p, c.udp.into_iter().map(|(_, d)| d).collect());
    assert_eq!(ip_at_a.len(), 1);
    p
}

/// `a` restarted: a fresh core with the same key and peers, knowing nothing of the session.
fn restarted_a(p: &Pair, key: &PrivateKey) -> WgCore {
    WgCore::new(key, vec![p.a.peers[0].spec.clone()])
}

fn pair_with_key() -> (Pair, PrivateKey) {
    let ka = PrivateKey::generate();
    (pair_with(ka.clone(), PrivateKey::generate()), ka)
}

fn handshake(p: &mut Pair) {
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"hello");
    let mut c = Collected::default();
    p.b.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    let (ip_at_a, _) = shuttle(p, c.udp.into_iter().map(|(_, d)| d).collect());
    assert_eq!(ip_at_a, vec![pkt], "handshake and first packet");
}

/// The learned endpoint is handed out once per change, with the local address it came to;
/// a restarted core given it back handshakes that endpoint at once, and the peer's answer
/// brings the tunnel up without the peer doing anything on its own.
#[test]
fn stored_endpoint_is_restored_and_handshaken_at_start() {
    let (mut p, ka) = pair_with_key();
    assert!(p.a.take_endpoint_changes().is_none(), "nothing learned yet");
    handshake(&mut p);
    let stored =
        p.a.take_endpoint_changes()
            .expect("the endpoint was learned");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].endpoint, p.b_addr);
    assert_eq!(stored[0].configured, None);
    assert!(
        p.a.take_endpoint_changes().is_none(),
        "no change, nothing to store"
    );
    // Another packet from the same place is no change either.
    let d = data_from_b(&mut p, b"again");
    p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut Collected::default()));
    assert!(p.a.take_endpoint_changes().is_none());

    let mut a2 = restarted_a(&p, &ka);
    assert_eq!(a2.restore_endpoints(&stored), vec!["b".to_string()]);
    assert_eq!(
        a2.check_route("10.0.0.2".parse().unwrap()),
        Err(RouteError::NoEndpoint),
        "a restored endpoint is not a session: still 503 until the handshake"
    );
    let mut out = Collected::default();
    a2.initiate_handshakes(&mut collect(&mut out));
    assert_eq!(out.udp.len(), 1, "one initiation, at once");
    assert_eq!(out.udp[0].0, p.b_addr, "to the stored endpoint");
    p.a = a2;
    let mut at_b = Collected::default();
    p.b.handle_datagram(p.a_addr, None, &out.udp[0].1, &mut collect(&mut at_b));
    assert_eq!(at_b.udp.len(), 1, "b answers the initiation");
    let mut at_a = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &at_b.udp[0].1, &mut collect(&mut at_a));
    assert!(
        p.a.take_recheck(),
        "a packet from a peer that was not up asks for a recheck"
    );
    assert!(p.a.refresh_health(), "the peer came up");
    assert_eq!(p.a.check_route("10.0.0.2".parse().unwrap()), Ok(()));
    // Data both ways on the new session.
    let pkt = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"back");
    let mut c = Collected::default();
    p.a.send_ip(&pkt, &mut collect(&mut c)).unwrap();
    let mut at_b = Collected::default();
    for (_, d) in &c.udp {
        p.b.handle_datagram(p.a_addr, None, d, &mut collect(&mut at_b));
    }
    assert_eq!(at_b.ip, vec![pkt]);
}

/// The most recently learned endpoint wins: a stored one replaces a configured endpoint only
/// while the configured one is the one it was learned under; unknown keys are ignored.
#[test]
fn restore_prefers_a_changed_configured_endpoint() {
    let k = PrivateKey::generate();
    let peer_key = PrivateKey::generate().public_key();
    let spec = |endpoint: &str| PeerSpec {
        name: "c".into(),
        public_key: peer_key,
        allowed_ips: vec!["10.0.0.3/32".parse().unwrap()],
        keepalive: None,
        endpoint: Some(endpoint.parse().unwrap()),
    };
    let rec = |configured: &str| LearnedEndpoint {
        public_key: peer_key,
        endpoint: "198.51.100.9:4000".parse().unwrap(),
        local: None,
        learned: SystemTime::now(),
        configured: Some(configured.parse().unwrap()),
    };
    let stranger = LearnedEndpoint {
        public_key: PrivateKey::generate().public_key(),
        ..rec("203.0.113.7:51820")
    };
    let mut same = WgCore::new(&k, vec![spec("203.0.113.7:51820")]);
    assert_eq!(
        same.restore_endpoints(&[stranger, rec("203.0.113.7:51820")]),
        vec!["c".to_string()]
    );
    assert_eq!(
        same.stats()[0].endpoint,
        Some("198.51.100.9:4000".parse().unwrap())
    );

    let mut moved = WgCore::new(&k, vec![spec("203.0.113.8:51820")]);
    assert!(moved
        .restore_endpoints(&[rec("203.0.113.7:51820")])
        .is_empty());
    assert_eq!(
        moved.stats()[0].endpoint,
        Some("203.0.113.8:51820".parse().unwrap()),
        "the operator's newer configured endpoint wins"
    );
}

/// The peer is still on the session of the previous run: its data, arriving from the stored
/// endpoint, starts a handshake there — once per 5 s at most — and that handshake brings the
/// tunnel back. The same packet from an address nobody authenticated starts nothing.
#[test]
fn data_on_an_unknown_session_from_the_stored_endpoint_handshakes_there() {
    let (mut p, ka) = pair_with_key();
    handshake(&mut p);
    let stored = p.a.take_endpoint_changes().unwrap();
    let old_session = data_from_b(&mut p, b"old session");

    // Without a stored endpoint, the packet's source address is never answered.
    let mut blind = restarted_a(&p, &ka);
    let mut out = Collected::default();
    blind.handle_datagram(p.b_addr, None, &old_session, &mut collect(&mut out));
    assert!(
        out.udp.is_empty(),
        "never towards an unauthenticated address"
    );

    let mut a2 = restarted_a(&p, &ka);
    a2.restore_endpoints(&stored);
    let t0 = Instant::now();
    a2.set_now(t0);
    // From somewhere else (a spoofed source): nothing.
    let elsewhere: SocketAddr = "203.0.113.66:1234".parse().unwrap();
    let mut out = Collected::default();
    a2.handle_datagram(elsewhere, None, &old_session, &mut collect(&mut out));
    assert!(
        out.udp.is_empty(),
        "an address that is not the peer's endpoint"
    );
    // From the stored endpoint: one initiation, to it (the first one at start was lost).
    a2.handle_datagram(p.b_addr, None, &old_session, &mut collect(&mut out));
    assert_eq!(out.udp.len(), 1, "{:?}", out.udp);
    assert_eq!(out.udp[0].0, p.b_addr);
    assert_eq!(a2.peers[0].last_rekick, Some(t0));
    // Rate limit: again 1 s later → not even tried; 6 s later → tried again.
    a2.set_now(t0 + Duration::from_secs(1));
    let mut again = Collected::default();
    a2.handle_datagram(p.b_addr, None, &old_session, &mut collect(&mut again));
    assert!(again.udp.is_empty());
    assert_eq!(a2.peers[0].last_rekick, Some(t0), "rate-limited");
    a2.set_now(t0 + Duration::from_secs(6));
    a2.handle_datagram(p.b_addr, None, &old_session, &mut collect(&mut again));
    assert_eq!(
        a2.peers[0].last_rekick,
        Some(t0 + Duration::from_secs(6)),
        "a new attempt after REKEY_TIMEOUT"
    );

    // The initiation reaches b, which answers: the tunnel is back with b untouched.
    p.a = a2;
    let mut at_b = Collected::default();
    p.b.handle_datagram(p.a_addr, None, &out.udp[0].1, &mut collect(&mut at_b));
    let mut at_a = Collected::default();
    for (_, d) in &at_b.udp {
        p.a.handle_datagram(p.b_addr, None, d, &mut collect(&mut at_a));
    }
    // a confirms the session with a keepalive (as every initiator does).
    assert_eq!(at_a.udp.len(), 1, "the initiator's confirming keepalive");
    p.b.handle_datagram(
        p.a_addr,
        None,
        &at_a.udp[0].1,
        &mut collect(&mut Collected::default()),
    );
    let d = data_from_b(&mut p, b"new session");
    let mut at_a = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut at_a));
    assert_eq!(at_a.ip.len(), 1, "b's next packet is on the new session");
    assert_eq!(p.a.check_route("10.0.0.2".parse().unwrap()), Ok(()));

    // With a live session, an unknown session from the same address starts nothing.
    p.a.set_now(Instant::now() + Duration::from_secs(60));
    let mut out = Collected::default();
    p.a.handle_datagram(p.b_addr, None, &old_session, &mut collect(&mut out));
    assert!(out.udp.is_empty(), "no handshake next to a live session");
}

/// A peer that dials us and sends nothing, not even a keepalive, for longer than two of its
/// keepalives plus 5 s is down (503 at once) while its handshake is still young; its next
/// packet brings it back up. A peer with a configured endpoint is never refused for silence.
#[test]
fn a_silent_peer_is_down_by_the_injected_clock() {
    let mut p = connected();
    let t0 = Instant::now();
    p.a.set_now(t0);
    let d = data_from_b(&mut p, b"keepalive-ish");
    p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut Collected::default()));
    assert!(p.a.refresh_health());
    let limit = silent_after(None);
    assert_eq!(limit, Duration::from_secs(55), "2 × 25 s + 5 s");
    p.a.set_now(t0 + limit);
    assert_eq!(
        p.a.check_route("10.0.0.2".parse().unwrap()),
        Ok(()),
        "at the limit: up"
    );
    p.a.set_now(t0 + limit + Duration::from_secs(1));
    assert_eq!(
        p.a.check_route("10.0.0.2".parse().unwrap()),
        Err(RouteError::Silent)
    );
    let s = &p.a.stats()[0];
    assert_eq!(s.health, PeerHealth::Silent);
    assert_eq!(s.last_received, Some(limit + Duration::from_secs(1)));
    assert!(
        s.last_handshake.is_some_and(|h| h < Duration::from_secs(5)),
        "a fresh handshake"
    );
    assert!(!p.a.refresh_health(), "going silent is not coming up");
    assert!(!p.a.peers[0].up);

    // Heard from again: up at once (the batch's recheck), by the same clock.
    let d = data_from_b(&mut p, b"back");
    p.a.handle_datagram(p.b_addr, None, &d, &mut collect(&mut Collected::default()));
    assert!(p.a.take_recheck());
    assert!(p.a.refresh_health(), "came up again");
    assert_eq!(p.a.check_route("10.0.0.2".parse().unwrap()), Ok(()));

    // b has a's endpoint configured: a silent a is still tried (only traffic makes b try).
    p.b.set_now(Instant::now() + Duration::from_secs(3600));
    assert_eq!(p.b.check_route("10.0.0.1".parse().unwrap()), Ok(()));
}

/// The peer's keepalive sets its silence limit; the states read in the order an operator
/// needs them.
#[test]
fn health_classification() {
    let s = |n| Some(Duration::from_secs(n));
    assert_eq!(silent_after(Some(5)), Duration::from_secs(15));
    assert_eq!(silent_after(Some(25)), silent_after(None));
    let limit = silent_after(None);
    for (hs, rx, want) in [
        (None, None, PeerHealth::NoHandshake),
        (None, s(1), PeerHealth::NoHandshake),
        (s(1), s(1), PeerHealth::Up),
        (s(1), None, PeerHealth::Up),
        (s(100), s(55), PeerHealth::Up),
        (s(100), s(56), PeerHealth::Silent),
        (s(301), s(1), PeerHealth::Stale),
        (s(301), s(400), PeerHealth::Silent),
    ] {
        assert_eq!(health::classify(hs, rx, limit), want, "{hs:?} {rx:?}");
    }
    assert_eq!(PeerHealth::Silent.as_str(), "silent");
}

/// A reload that restarts a peer's session (new keepalive) keeps where it was heard from and
/// handshakes it there at once, instead of waiting for the peer's own rekey.
#[test]
fn a_restarted_session_handshakes_the_learned_endpoint() {
    let mut p = connected();
    let mut spec = p.a.peers[0].spec.clone();
    spec.keepalive = Some(25);
    let mut out = Collected::default();
    let changes = p.a.set_peers(vec![spec], &mut collect(&mut out));
    assert_eq!(changes.restarted, vec!["b".to_string()]);
    assert_eq!(out.udp.len(), 1, "handshaken at once");
    assert_eq!(out.udp[0].0, p.b_addr, "at the learned endpoint");
}
