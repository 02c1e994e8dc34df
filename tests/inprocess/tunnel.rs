//! Two modelgate netstacks over loopback UDP, one dialling a listener on the other: the real
//! WireGuard handshake (boringtun), real smoltcp TCP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use modelgate::demo::LoopbackPair;
use modelgate::netstack::{NetError, Netstack, NetstackConfig, TcpTuning};
use modelgate::tunnel::PeerSpec;
use modelgate::wgkey::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The appliance (10.99.0.1) and a corp peer (10.99.0.2) that dials it, as in production.
fn pair() -> LoopbackPair {
    // 200 simultaneous SYNs in the concurrency test: smoltcp has no SYN queue.
    let tcp = TcpTuning {
        listen_backlog: 256,
        ..TcpTuning::default()
    };
    LoopbackPair::start(&[], true, tcp).unwrap()
}

/// Dials until the corp peer's handshake has landed (bounded).
async fn dial_when_up(p: &LoopbackPair, addr: SocketAddr) -> modelgate::netstack::TunnelStream {
    let ns = &p.appliance;
    let start = Instant::now();
    loop {
        match ns.dial(addr).await {
            Ok(s) => {
                println!("tunnel up after {:?}", start.elapsed());
                return s;
            }
            Err(NetError::NoHandshake) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!(
                "dial {addr}: {e}; appliance {:?}; corp {:?}",
                p.appliance.stats().await,
                p.corp.stats().await
            ),
        }
    }
}

fn spawn_echo(mut listener: modelgate::netstack::TunnelListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_through_tunnel_echo_and_bulk() {
    let p = pair();
    spawn_echo(p.corp.listen(7).await.unwrap());
    let target: SocketAddr = "10.99.0.2:7".parse().unwrap();
    let mut s = dial_when_up(&p, target).await;
    s.write_all(b"hello through wireguard").await.unwrap();
    let mut buf = [0u8; 23];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through wireguard");

    // Bulk: 16 MiB each way, content checked, writer and reader concurrent.
    let total = 16usize << 20;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
    });
    let start = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    while got < total {
        let n = match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("read failed at {got} bytes: {e}")),
            Err(_) => panic!(
                "bulk transfer stalled at {got} bytes; appliance {:?}; corp {:?}",
                p.appliance
                    .stats_detailed()
                    .await
                    .map(|s| s.connection_detail),
                p.corp.stats_detailed().await.map(|s| s.connection_detail)
            ),
        };
        assert!(n > 0, "early EOF at {got}");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                ((got + i) % 65536 % 251) as u8,
                "corrupt byte at {}",
                got + i
            );
        }
        got += n;
    }
    writer.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "echoed {} MiB in {:.2}s ({:.0} Mbit/s each way, {} build)",
        total >> 20,
        secs,
        (total as f64 * 8.0) / secs / 1e6,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "echo server closed after our FIN");

    let stats = p.appliance.stats().await.unwrap();
    assert_eq!(stats.peers.len(), 1);
    assert!(
        stats.peers[0].endpoint.is_some(),
        "appliance learned the corp endpoint"
    );
    assert!(stats.peers[0].last_handshake.is_some());
    assert!(stats.peers[0].rx_bytes as usize > total);
    p.appliance.shutdown().await;
    p.corp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections() {
    let p = pair();
    spawn_echo(p.corp.listen(7).await.unwrap());
    let target: SocketAddr = "10.99.0.2:7".parse().unwrap();
    drop(dial_when_up(&p, target).await);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let ns = p.appliance.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = ns.dial(target).await.unwrap();
            let msg = format!("connection {i} says hi");
            for _ in 0..5 {
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("connection stalled")
            .unwrap();
    }
    // All closed connections are reaped (bounded wait).
    let start = Instant::now();
    loop {
        let c = p.appliance.stats().await.unwrap().connections;
        if c == 0 || start.elapsed() > Duration::from_secs(5) {
            assert_eq!(c, 0, "connections left open on the appliance");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_errors() {
    let p = pair();
    let _l = p.corp.listen(7).await.unwrap();
    drop(dial_when_up(&p, "10.99.0.2:7".parse().unwrap()).await);

    // Nothing listens on port 9: the corp stack answers RST.
    let e = p
        .appliance
        .dial("10.99.0.2:9".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e, NetError::Refused);
    // Outside every peer's AllowedIPs.
    let e = p
        .appliance
        .dial("10.20.0.5:80".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e, NetError::NoRoute);
    // Listening twice on one port.
    assert_eq!(p.corp.listen(7).await.unwrap_err(), NetError::AddrInUse);

    // A peer that cannot be reached fails with a specific error, in bounded time: one that
    // never handshakes at once; one whose endpoint never answers (a bound-but-silent UDP port on
    // loopback) when the connect timeout fires.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cases = [
        (
            "no endpoint",
            None,
            TcpTuning::default(),
            NetError::NoHandshake,
            1,
        ),
        (
            "silent endpoint",
            Some(silent.local_addr().unwrap()),
            TcpTuning {
                connect_timeout: Duration::from_millis(600),
                ..TcpTuning::default()
            },
            NetError::TimedOut,
            3,
        ),
    ];
    for (i, (what, endpoint, tcp, error, within_secs)) in cases.into_iter().enumerate() {
        let net = format!("10.{}.0", 98 - i);
        let lonely = Netstack::start(NetstackConfig {
            private_key: PrivateKey::generate(),
            listen: "127.0.0.1:0".parse().unwrap(),
            addresses: vec![format!("{net}.1/24").parse().unwrap()],
            peers: vec![PeerSpec {
                name: "absent".into(),
                public_key: PrivateKey::generate().public_key(),
                allowed_ips: vec![format!("{net}.2/32").parse().unwrap()],
                keepalive: None,
                endpoint,
            }],
            mtu: 1420,
            tcp,
        })
        .unwrap();
        let t = Instant::now();
        let e = lonely
            .dial(format!("{net}.2:80").parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e, error, "{what}");
        assert!(
            t.elapsed() < Duration::from_secs(within_secs),
            "{what}: {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_resets_the_server_side() {
    let p = pair();
    let mut listener = p.corp.listen(8000).await.unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Stream forever until the client goes away, like a model generating tokens.
        let started = Instant::now();
        loop {
            if s.write_all(b"data: token\n\n").await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "server never noticed"
            );
        }
    });
    let mut s = dial_when_up(&p, "10.99.0.2:8000".parse().unwrap()).await;
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await.unwrap();
    let dropped_at = Instant::now();
    drop(s);
    let _ = server.await.unwrap();
    let noticed = dropped_at.elapsed();
    assert!(
        noticed < Duration::from_secs(1),
        "server noticed after {noticed:?}"
    );
}

/// A corp peer that dies (its stack stops: no data, no ACK, no keep-alive answer) no longer
/// leaves a connection hanging: a request written on it fails after `dead_after`, and a silent
/// but live peer keeps its connection through several keep-alive rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_aborts_connections_after_dead_after() {
    let tcp = TcpTuning {
        keepalive: Duration::from_millis(200),
        dead_after: Duration::from_millis(1000),
        ..TcpTuning::default()
    };
    let p = LoopbackPair::start(&[], true, tcp).unwrap();
    let listener = p.corp.listen(8000).await.unwrap();
    spawn_echo(listener);
    let mut s = dial_when_up(&p, "10.99.0.2:8000".parse().unwrap()).await;
    // Live but silent for 3 × dead_after: keep-alive probes are answered, nothing is cut.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // The peer dies.
    p.corp.shutdown().await;
    let t = Instant::now();
    let _ = s.write_all(b"request").await;
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    let waited = t.elapsed();
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("read {n} bytes from a dead peer"),
        Err(_) => panic!("the connection to a dead peer still hangs after 10 s"),
    }
    println!("dead peer noticed after {waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}
