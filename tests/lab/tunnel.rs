//! modelgate's userspace WireGuard against wireguard-go in the lab: the corp peer configured
//! from the exact `peer add` text, requests through `modelgate run --forward
//! 127.0.0.1:18000=10.20.0.5:8000` to `tests/python/model_server.py`, a NAT port change, an
//! appliance restart, garbage and an unknown peer; and the lab itself (no route inward, the
//! wireguard-go ↔ wireguard-go anchor of the benchmark).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::harness::helper::fnv64;
use crate::harness::lab::{
    Appliance, Lab, EDGE_PUBLIC, MODEL_ADDR, MODEL_PORT, TUNNEL_ADDRESS, WG_PORT,
};
use crate::harness::prereq::{check, Needs};
use crate::harness::proc::{run_ok, Proc};

/// The `--forward` every test uses: appliance-local port → the model server through the tunnel.
const FORWARD_LISTEN: &str = "127.0.0.1:18000";
/// The corp peer's public address as the edge sees it (after the corp's NAT).
const CORP_WAN: &str = "198.51.100.2";

fn forward() -> String {
    format!("{FORWARD_LISTEN}={MODEL_ADDR}:{MODEL_PORT}")
}

/// A lab with `model_server.py` and modelgate forwarding to it; the corp peer is the test's
/// to start. Fields drop in order: processes first, the lab last.
struct Forwarding {
    mg: Proc,
    model: Proc,
    app: Appliance,
    lab: Lab,
}

/// The [`Forwarding`] lab of `test`, or `None` when the test is skipped here.
fn forwarding(test: &str) -> Option<Forwarding> {
    check(test, Needs::LAB)?;
    let lab = Lab::up();
    let model = lab.start_model_server();
    let app = Appliance::init(&lab);
    let mg = app.run(&lab, &[&forward()]);
    Some(Forwarding {
        mg,
        model,
        app,
        lab,
    })
}

/// Retries `GET /hello` through the forward from the edge for up to `ms`; panics with `when`
/// unless it is answered with 200.
fn assert_forward_answers(lab: &Lab, ms: &str, when: &str) -> String {
    let out = lab.helper(&lab.edge, &["http-get-retry", FORWARD_LISTEN, "/hello", ms]);
    assert!(
        out.first().starts_with("ok"),
        "{when}: no 200 through the forward within {ms} ms: {out:?}"
    );
    out.first().to_string()
}

/// Expected body of the model server's `/bytes/N`.
fn pattern_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|j| (((j % 1757) * 7 + 3) % 251) as u8).collect()
}

/// Plain requests through `addr` from namespace `ns`: keep-alive small bodies, a fresh
/// connection, and 1 MiB whose checksum must match.
fn assert_http_works(lab: &Lab, ns: &str, addr: &str) {
    let hello = lab.helper(ns, &["http-get", addr, "/hello", "20", "10000"]);
    let expect_hello = format!("response 200 21 {:016x}", fnv64(b"hello from the model\n"));
    assert_eq!(hello.lines.len(), 20, "{hello:?}");
    assert!(hello.lines.iter().all(|l| *l == expect_hello), "{hello:?}");

    let n = 1 << 20;
    let big = lab.helper(
        ns,
        &["http-get", addr, &format!("/bytes/{n}"), "1", "20000"],
    );
    let expect = format!("response 200 {n} {:016x}", fnv64(&pattern_bytes(n)));
    assert_eq!(big.first(), expect, "1 MiB body through {addr}");
}

/// A streamed (chunked SSE) response must arrive chunk by chunk, not buffered: 6 events 250 ms
/// apart must reach the client spread over ≈ 1.25 s, each ≥ 125 ms after the previous one.
fn assert_stream_is_chunked(lab: &Lab, ns: &str, addr: &str) {
    let out = lab.helper(
        ns,
        &["http-stream", addr, "/stream?n=6&delay_ms=250", "15000"],
    );
    let times: Vec<(usize, f64)> = out
        .lines
        .iter()
        .filter_map(|l| {
            let mut it = l.strip_prefix("chunk ")?.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    assert_eq!(
        out.lines.last().map(String::as_str),
        Some("done 200"),
        "{out:?}"
    );
    assert_eq!(
        times.iter().map(|t| t.0).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "{out:?}"
    );
    for w in times.windows(2) {
        let gap = w[1].1 - w[0].1;
        assert!(
            gap >= 125.0,
            "chunk {} arrived {gap:.1} ms after chunk {}: the stream was buffered ({out:?})",
            w[1].0,
            w[0].0
        );
    }
    eprintln!("stream via {addr}: chunk arrival (ms) {times:?}");
}

fn assert_edge_has_no_lan_route(lab: &Lab) {
    let route = lab.exec(&lab.edge, &["ip", "route", "get", MODEL_ADDR]);
    assert!(
        !route.status.success(),
        "the edge has a kernel route to {MODEL_ADDR}: {}",
        String::from_utf8_lossy(&route.stdout)
    );
    let direct = lab.helper(
        &lab.edge,
        &["tcp-connect", &format!("{MODEL_ADDR}:{MODEL_PORT}"), "2000"],
    );
    assert!(
        direct.first().starts_with("connect err"),
        "a direct connection from the edge into the LAN must fail: {direct:?}"
    );
}

/// Distinct source ports the corp's WireGuard traffic reached the edge from (after NAT).
fn corp_nat_ports(lab: &Lab) -> BTreeSet<u16> {
    lab.edge_wg_sources()
        .into_iter()
        .filter(|(a, _)| a == CORP_WAN)
        .map(|(_, p)| p)
        .collect()
}

/// Client addresses in the model server's request log.
fn model_clients(model: &Proc) -> Vec<String> {
    let clients: BTreeSet<String> = model
        .log()
        .lines()
        .filter_map(|l| {
            Some(
                l.strip_prefix("model: ")?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .collect();
    clients.into_iter().collect()
}

fn wg_keypair() -> (String, String) {
    let sh = |script: &str, key: &str| {
        let out = run_ok(Command::new("sh").args(["-c", script]).env("K", key));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let private = sh("wg genkey", "");
    let public = sh("printf '%s' \"$K\" | wg pubkey", &private);
    (private, public)
}

/// The `PublicKey` of the `[Peer]` section of a wg-quick file (the appliance's key).
fn peer_public_key(conf: &str) -> String {
    let peer = &conf[conf.find("[Peer]").expect("[Peer] section")..];
    peer.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "PublicKey").then(|| v.trim().to_string())
        })
        .expect("PublicKey in [Peer]")
}

/// Lab only: the edge cannot reach the LAN by itself, and the corp's WAN accepts no new
/// inbound connections (its peer has to dial out).
#[test]
fn lab_edge_has_no_route_into_lan() {
    if check("tunnel::lab_edge_has_no_route_into_lan", Needs::LAB).is_none() {
        return;
    }
    let lab = Lab::up();
    let _model = lab.start_model_server();
    assert_edge_has_no_lan_route(&lab);
    // The model server is up: from the corp router (which has the LAN) it answers.
    assert_http_works(&lab, &lab.corp, &format!("{MODEL_ADDR}:{MODEL_PORT}"));
    // Stateful corp firewall: a new connection from the edge to the corp's WAN is dropped
    // (times out) rather than refused.
    let inbound = lab.helper(&lab.edge, &["tcp-connect", "198.51.100.2:22", "1500"]);
    assert!(
        inbound.first().starts_with("connect err TimedOut"),
        "corp WAN must drop new inbound connections: {inbound:?}"
    );
}

/// The lab with the anchor of the benchmark, wireguard-go ↔ wireguard-go: proves the topology
/// (NAT, firewall, forwarding) carries WireGuard before modelgate is involved.
#[test]
fn lab_anchor_wireguard_go_interop() {
    if check("tunnel::lab_anchor_wireguard_go_interop", Needs::LAB).is_none() {
        return;
    }
    let lab = Lab::up();
    let model = lab.start_model_server();
    let (edge_key, edge_pub) = wg_keypair();
    let (corp_key, corp_pub) = wg_keypair();
    let edge_conf = format!(
        "[Interface]\nPrivateKey = {edge_key}\nListenPort = 51820\nAddress = 10.99.0.1/24\n\
         MTU = 1420\n\n[Peer]\nPublicKey = {corp_pub}\nAllowedIPs = 10.99.0.2/32, 10.20.0.0/24\n"
    );
    // The PostUp mirrors what `peer add` prints (forwarding, masquerade, MSS clamp).
    let post_up = "sysctl -q -w net.ipv4.ip_forward=1; nft 'add table ip mg_%i; \
        delete table ip mg_%i; add table ip mg_%i; add chain ip mg_%i nat_out \
        { type nat hook postrouting priority srcnat; }; \
        add rule ip mg_%i nat_out ip saddr 10.99.0.1 masquerade; add chain ip mg_%i mss_clamp \
        { type filter hook forward priority mangle; }; \
        add rule ip mg_%i mss_clamp oifname \"%i\" tcp flags syn tcp option maxseg size set rt mtu'";
    let corp_conf = format!(
        "[Interface]\nPrivateKey = {corp_key}\nAddress = 10.99.0.2/24\nMTU = 1420\n\
         PostUp = {post_up}\n\n\
         [Peer]\nPublicKey = {edge_pub}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.99.0.1/32\n\
         PersistentKeepalive = 25\n"
    );
    let _edge = lab.start_wg(&lab.edge, &lab.wg_edge, &edge_conf);
    let _corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &corp_conf, true);
    assert!(
        lab.wait_handshake(&lab.corp, &lab.wg_corp, 0, Duration::from_secs(10)),
        "wireguard-go ↔ wireguard-go: no handshake within 10 s"
    );
    let target = format!("{MODEL_ADDR}:{MODEL_PORT}");
    assert_http_works(&lab, &lab.edge, &target);
    assert_stream_is_chunked(&lab, &lab.edge, &target);
    assert_eq!(model_clients(&model), ["10.20.0.1"], "masquerade by PostUp");
    assert!(
        !corp_nat_ports(&lab).is_empty(),
        "the edge saw no WireGuard packets from the corp's NAT address: {:?}",
        lab.edge_wg_sources()
    );
}

/// (1) modelgate in the edge, corp wireguard-go configured from the exact `peer add` text
/// (including its PostUp: forwarding, masquerade, MSS clamp): requests through `--forward` reach
/// the model, coming from the corp router's LAN address, and a streamed response arrives chunk
/// by chunk.
#[test]
fn interop_forward_http_and_streaming() {
    let Some(mut f) = forwarding("tunnel::interop_forward_http_and_streaming") else {
        return;
    };
    let Forwarding {
        mg,
        model,
        app,
        lab,
    } = &mut f;
    let _corp = lab.start_wg_with(&lab.corp, &lab.wg_corp, &app.corp_conf, true);
    lab.assert_corp_handshake();
    assert_forward_answers(lab, "10000", "after the handshake");
    assert_http_works(lab, &lab.edge, FORWARD_LISTEN);
    assert_stream_is_chunked(lab, &lab.edge, FORWARD_LISTEN);
    // The tunnel is the only way in: still no kernel route while modelgate forwards.
    assert_edge_has_no_lan_route(lab);
    // PostUp's masquerade: the model sees the corp router, not the appliance's tunnel address.
    assert_eq!(model_clients(model), ["10.20.0.1"], "masquerade by PostUp");
    assert!(mg.is_running(), "modelgate exited");
}

/// (2) The corp peer restarts and comes back from a new NAT source port: the appliance learns
/// the new endpoint from the authenticated handshake and traffic resumes.
#[test]
fn corp_peer_restart_new_nat_port_resumes() {
    let Some(mut f) = forwarding("tunnel::corp_peer_restart_new_nat_port_resumes") else {
        return;
    };
    let Forwarding { mg, app, lab, .. } = &mut f;
    // No ListenPort in the file: wireguard-go picks a random port at each start, and the corp's
    // `masquerade random` maps it to a random WAN port. A fixed one would be kept by conntrack,
    // so pin two different ports in that case.
    let has_port = app.corp_conf.contains("ListenPort");
    let conf_with_port = |port: u16| {
        let mut out: Vec<String> = app
            .corp_conf
            .lines()
            .filter(|l| !l.trim_start().starts_with("ListenPort"))
            .map(str::to_string)
            .collect();
        let i = out.iter().position(|l| l.trim() == "[Interface]").unwrap();
        out.insert(i + 1, format!("ListenPort = {port}"));
        out.join("\n") + "\n"
    };
    let first_conf = if has_port {
        conf_with_port(41001)
    } else {
        app.corp_conf.clone()
    };
    let mut corp = lab.start_wg(&lab.corp, &lab.wg_corp, &first_conf);
    assert_forward_answers(lab, "15000", "before the restart");
    let before = corp_nat_ports(lab);
    let port_before = lab.wg_show(&lab.corp, &lab.wg_corp, "listen-port");

    corp.stop();
    drop(corp);
    let second_conf = if has_port {
        conf_with_port(41002)
    } else {
        app.corp_conf.clone()
    };
    let _corp = lab.start_wg(&lab.corp, &lab.wg_corp, &second_conf);
    let port_after = lab.wg_show(&lab.corp, &lab.wg_corp, "listen-port");
    let resumed = assert_forward_answers(lab, "30000", "after the corp peer restarted");
    let after = corp_nat_ports(lab);
    eprintln!(
        "corp listen port {} → {}; NAT ports seen by the edge {before:?} → {after:?}; resumed: {}",
        port_before.trim(),
        port_after.trim(),
        resumed
    );
    assert!(
        after.len() > before.len(),
        "the restarted peer must come from a new NAT port (edge saw {before:?} then {after:?})"
    );
    assert_http_works(lab, &lab.edge, FORWARD_LISTEN);
    assert!(mg.is_running(), "modelgate exited");
}

/// (3) modelgate restarts (losing its sessions): traffic resumes after a new handshake. The
/// restarted appliance handshakes the peer's stored endpoint at once (see `restart.rs`, which
/// measures it with the corp side idle); should that fail, the corp side's own traffic brings one.
///
/// Choice: the corp side sends traffic into the tunnel (one UDP datagram to the appliance's
/// tunnel address every 500 ms). Left to itself, wireguard-go keeps using its old session, gets no
/// authenticated reply, and starts a new handshake after KEEPALIVE_TIMEOUT + REKEY_TIMEOUT = 15 s
/// (WireGuard paper §6.5); its 25 s persistent keepalives alone would not trigger one. Bound: 45 s.
#[test]
fn appliance_restart_resumes_after_corp_handshake() {
    let Some(mut f) = forwarding("tunnel::appliance_restart_resumes_after_corp_handshake") else {
        return;
    };
    let Forwarding { mg, app, lab, .. } = &mut f;
    let _corp = lab.start_wg(&lab.corp, &lab.wg_corp, &app.corp_conf);
    assert_forward_answers(lab, "15000", "before the restart");
    let handshake_before = lab.latest_handshake(&lab.corp, &lab.wg_corp);
    // `wg show` counts whole seconds, and the restarted appliance handshakes at once: without
    // this the new handshake can fall into the same second as the old one.
    std::thread::sleep(Duration::from_millis(1100));

    mg.stop();
    *mg = app.run(lab, &[&forward()]);
    let tunnel_ip = TUNNEL_ADDRESS.split('/').next().unwrap();
    let _drive = lab.spawn_helper(
        "corp-drive",
        &lab.corp,
        &["udp-drive", &format!("{tunnel_ip}:9"), "120", "500"],
    );
    let resumed = assert_forward_answers(lab, "45000", "after modelgate restarted");
    eprintln!("after the appliance restart: {resumed}");
    assert!(
        lab.latest_handshake(&lab.corp, &lab.wg_corp) > handshake_before,
        "traffic resumed without a new handshake?"
    );
    assert_http_works(lab, &lab.edge, FORWARD_LISTEN);
    assert!(mg.is_running(), "modelgate exited");
}

/// (4) Random datagrams and WireGuard-shaped junk sent to the appliance's UDP port, and a real
/// wireguard-go with a key the appliance does not know, are ignored: modelgate stays up, the
/// stranger never completes a handshake, and the corp peer's traffic still flows.
#[test]
fn garbage_and_unknown_peer_are_ignored() {
    let Some(mut f) = forwarding("tunnel::garbage_and_unknown_peer_are_ignored") else {
        return;
    };
    let Forwarding { mg, app, lab, .. } = &mut f;
    let _corp = lab.start_wg(&lab.corp, &lab.wg_corp, &app.corp_conf);
    assert_forward_answers(lab, "15000", "before the garbage");

    // A stranger in the client namespace that knows the appliance's public key but is not a
    // configured peer; keepalive 1 s plus traffic keep it trying to handshake.
    let (rogue_key, _) = wg_keypair();
    let rogue_conf = format!(
        "[Interface]\nPrivateKey = {rogue_key}\nAddress = 10.99.0.77/32\nMTU = 1420\n\n\
         [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.99.0.1/32\n\
         PersistentKeepalive = 1\n",
        peer_public_key(&app.corp_conf)
    );
    let _rogue = lab.start_wg(&lab.client, &lab.wg_rogue, &rogue_conf);
    let _rogue_drive = lab.spawn_helper(
        "rogue-drive",
        &lab.client,
        &["udp-drive", "10.99.0.1:9", "40", "250"],
    );
    let target = format!("{}:{}", EDGE_PUBLIC, WG_PORT);
    for _ in 0..3 {
        let sent = lab.helper(&lab.client, &["udp-garbage", &target, "3000"]);
        assert!(sent.first().starts_with("sent"), "{sent:?}");
        assert!(
            mg.is_running(),
            "modelgate exited after garbage:\n{}",
            mg.log()
        );
        assert_http_works(lab, &lab.edge, FORWARD_LISTEN);
    }
    // wireguard-go retries its handshake every REKEY_TIMEOUT (5 s): give it two tries.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        lab.latest_handshake(&lab.client, &lab.wg_rogue),
        0,
        "a peer with an unknown key completed a handshake"
    );
    let tx: u64 = lab
        .wg_show(&lab.client, &lab.wg_rogue, "transfer")
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(tx > 0, "the unknown peer never sent anything");
    assert!(mg.is_running(), "modelgate exited");
    assert_http_works(lab, &lab.edge, FORWARD_LISTEN);
    assert_stream_is_chunked(lab, &lab.edge, FORWARD_LISTEN);
    assert!(
        !mg.log().contains("panicked"),
        "modelgate logged a panic:\n{}",
        mg.log()
    );
}
