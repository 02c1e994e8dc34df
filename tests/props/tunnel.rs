//! WireGuard ingress: whatever arrives on the UDP socket — random bytes, or bytes shaped like
//! each WireGuard message (type, reserved zeros, the message's length) — is handled without a
//! panic, and no inner packet reaches the netstack without an established session.

use std::net::{IpAddr, SocketAddr};

use modelgate::tunnel::{Output, PeerSpec, WgCore};
use modelgate::wgkey::PrivateKey;
use proptest::prelude::*;

fn core() -> WgCore {
    let peer = PrivateKey::generate();
    WgCore::new(
        &PrivateKey::generate(),
        vec![PeerSpec {
            name: "corp".into(),
            public_key: peer.public_key(),
            allowed_ips: vec!["10.20.0.0/24".parse().unwrap()],
            keepalive: None,
            endpoint: None,
        }],
    )
}

/// A datagram: random, or a WireGuard message shape (initiation 148, response 92, cookie 64,
/// transport ≥ 32 bytes) with random contents.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (1u8..=4, proptest::collection::vec(any::<u8>(), 300)).prop_map(|(ty, mut body)| {
            let len = match ty {
                1 => 148,
                2 => 92,
                3 => 64,
                _ => 32 + (body[0] as usize % 200),
            };
            body.truncate(len);
            body[0] = ty;
            body[1..4].fill(0);
            body
        }),
    ]
}

proptest! {
    #![proptest_config(crate::cases())]

    #[test]
    fn ingress_never_panics_and_never_delivers_without_a_session(
        datagrams in proptest::collection::vec((datagram(), any::<u16>(), any::<bool>()), 1..30),
    ) {
        let mut wg = core();
        let mut delivered = 0;
        for (d, port, local) in datagrams {
            let from = SocketAddr::new(IpAddr::from([198, 51, 100, 2]), port);
            let local = local.then(|| IpAddr::from([192, 0, 2, 1]));
            wg.handle_datagram(from, local, &d, &mut |o| {
                if matches!(o, Output::Ip(_)) {
                    delivered += 1;
                }
            });
        }
        prop_assert_eq!(delivered, 0);
        prop_assert!(wg.stats().iter().all(|p| p.last_handshake.is_none()));
    }
}
