//! `modelgate demo`: the whole product on one machine, no root and no setup.
//!
//! Starts the appliance (HTTPS on loopback with a self-signed certificate, keys, policy, the
//! streaming proxy) and a corp WireGuard peer in the same process, each with its own boringtun
//! and smoltcp stack, joined by a real WireGuard session over loopback UDP. The corp peer
//! routes a "LAN" (10.20.0.0/24) where the echo model listens on 10.20.0.5:8000, exactly as a
//! vLLM server would sit behind a corp router. Nothing here touches the host's network config.

pub mod model;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::gateway::upstream::UpstreamSpec;
use crate::gateway::Gateway;
use crate::keys::Keys;
use crate::netstack::{Netstack, NetstackConfig, TcpTuning};
use crate::tunnel::PeerSpec;
use crate::wgkey::PrivateKey;
use model::EchoModel;

/// An appliance and a corp peer, each a full modelgate netstack, joined by WireGuard over
/// loopback UDP. The appliance (10.99.0.1/24) knows the corp key but not its endpoint; the corp
/// peer (10.99.0.2 plus `corp_lan` addresses) dials out to it, as in production. Used by the demo
/// and by the in-process tests.
pub struct LoopbackPair {
    pub appliance: Netstack,
    pub corp: Netstack,
}

impl LoopbackPair {
    /// `corp_lan`: extra corp-side addresses (e.g. `10.20.0.5/24`); their networks are routed to
    /// the corp peer by the appliance. `corp_dials`: false leaves the corp side without the
    /// appliance's endpoint, so no handshake ever happens (a tunnel that is down).
    pub fn start(
        corp_lan: &[ipnet::IpNet],
        corp_dials: bool,
        tcp: TcpTuning,
    ) -> std::io::Result<LoopbackPair> {
        let appliance_key = PrivateKey::generate();
        let corp_key = PrivateKey::generate();
        let net = |s: &str| s.parse::<ipnet::IpNet>().expect("static address");
        let mut corp_routes = vec![net("10.99.0.2/32")];
        corp_routes.extend(corp_lan.iter().map(|n| n.trunc()));
        let appliance = Netstack::start(NetstackConfig {
            private_key: appliance_key.clone(),
            listen: "127.0.0.1:0".parse().expect("static address"),
            addresses: vec![net("10.99.0.1/24")],
            peers: vec![PeerSpec {
                name: "corp".into(),
                public_key: corp_key.public_key(),
                allowed_ips: corp_routes,
                keepalive: None,
                endpoint: None,
            }],
            mtu: 1420,
            tcp: tcp.clone(),
        })?;
        let mut corp_addresses = vec![net("10.99.0.2/24")];
        corp_addresses.extend_from_slice(corp_lan);
        let corp = Netstack::start(NetstackConfig {
            private_key: corp_key,
            listen: "127.0.0.1:0".parse().expect("static address"),
            addresses: corp_addresses,
            peers: vec![PeerSpec {
                name: "appliance".into(),
                public_key: appliance_key.public_key(),
                allowed_ips: vec![net("10.99.0.1/32")],
                keepalive: Some(25),
                endpoint: corp_dials.then(|| appliance.udp_addr()),
            }],
            mtu: 1420,
            tcp,
        })?;
        Ok(LoopbackPair { appliance, corp })
    }
}

/// Options of `modelgate demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// HTTPS listener; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Run one streamed chat through the full path, print it, and exit.
    pub check: bool,
}

/// A running demo: its public URL and key.
pub struct Demo {
    pub addr: SocketAddr,
    pub key: String,
    pub model: EchoModel,
    pub client_tls: Arc<rustls::ClientConfig>,
    stop: watch::Sender<bool>,
    state_dir: std::path::PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

const CORP_LAN_MODEL: &str = "10.20.0.5:8000";

/// Starts everything and returns once the model has been discovered through the tunnel.
pub async fn start(listen: SocketAddr) -> anyhow::Result<Demo> {
    let state_dir = std::env::temp_dir().join(format!("modelgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)?;
    let LoopbackPair { appliance, corp } =
        LoopbackPair::start(&["10.20.0.5/24".parse()?], true, TcpTuning::default())?;
    let model = EchoModel::new("echo", Duration::from_millis(40));
    let mut listener = corp
        .listen(8000)
        .await
        .map_err(|e| anyhow::anyhow!("demo model: {e}"))?;
    let m = model.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(m.clone().serve_connection(s));
        }
    });

    let (keys, key) = demo_keys(&state_dir)?;
    let tls = LoopbackTls::generate()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let tcp = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen}: {e}; fix: pass a free address with --listen, e.g. --listen 127.0.0.1:0")
    })?;
    let addr = tcp.local_addr()?;
    let upstream = UpstreamSpec {
        name: "corp-model".into(),
        addr: CORP_LAN_MODEL.parse()?,
        base_path: "/v1".into(),
        api_key: None,
        models: vec![],
        max_concurrent: None,
    };
    let gateway = Gateway::new(
        keys,
        appliance.clone(),
        vec![upstream],
        GatewayConfig::default(),
    )
    .start(tcp, tls.server, stop_rx.clone());
    // Keep the corp side alive as long as the demo runs.
    let mut stop_corp = stop_rx.clone();
    tokio::spawn(async move {
        let _ = stop_corp.changed().await;
        corp.shutdown().await;
        appliance.shutdown().await;
    });
    // Wait (bounded) until the model is known through the tunnel.
    for _ in 0..100 {
        if gateway.handle.load().routes.serves("echo") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Demo {
        addr,
        key,
        model,
        client_tls: tls.client,
        stop: stop_tx,
        state_dir,
    })
}

/// The demo's key store (a real one, in the demo's temporary state dir) and one key.
fn demo_keys(state_dir: &std::path::Path) -> anyhow::Result<(Arc<Keys>, String)> {
    let mut store = crate::keys::KeyStore::open(state_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let created = store
        .create(crate::keys::NewKey {
            name: "demo".into(),
            policy: crate::policy::KeyPolicy::default(),
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ring = crate::keys::KeyRing::load(&store, &Default::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((Keys::new(ring), created.secret.expose().to_string()))
}

/// A fresh self-signed certificate for `localhost` and `127.0.0.1`: what the demo serves, and
/// what the in-process tests serve their gateway with.
pub struct LoopbackTls {
    /// Offers `h2` and `http/1.1`, as the daemon's listener does.
    pub server: Arc<rustls::ServerConfig>,
    /// Trusts this certificate and nothing else (`--check`, in-process clients).
    pub client: Arc<rustls::ClientConfig>,
    /// The certificate in PEM, for clients in another process (curl, the openai SDK).
    pub cert_pem: String,
}

impl LoopbackTls {
    pub fn generate() -> anyhow::Result<LoopbackTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])?;
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(LoopbackTls {
            server: Arc::new(server),
            client: Arc::new(client),
            cert_pem: ck.cert.pem(),
        })
    }
}

/// One streamed chat through the public HTTPS port; returns the assembled text.
pub async fn check(demo: &Demo, prompt: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(demo.addr).await?;
    let tls = tokio_rustls::TlsConnector::from(demo.client_tls.clone())
        .connect("localhost".try_into()?, tcp)
        .await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let body = serde_json::json!({
        "model": "echo", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": prompt}]
    });
    let req = hyper::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", demo.key))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let b = resp.into_body().collect().await?.to_bytes();
        anyhow::bail!("HTTP {status}: {}", String::from_utf8_lossy(&b));
    }
    let raw = resp.into_body().collect().await?.to_bytes();
    let mut text = String::new();
    for line in String::from_utf8_lossy(&raw).lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(s);
        }
    }
    Ok(text)
}

/// `modelgate demo`: start, print how to use it, run until Ctrl-C (or `--check`).
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let demo = start(opts.listen).await?;
    let port = demo.addr.port();
    let url = format!("https://localhost:{port}/v1");
    if opts.check {
        let text = check(&demo, "hello from the corp network").await?;
        println!("demo check: streamed through HTTPS → auth → WireGuard → model: {text:?}");
        anyhow::ensure!(
            text == "hello from the corp network",
            "unexpected reply {text:?}"
        );
        return Ok(());
    }
    let key = &demo.key;
    println!(
        r#"modelgate demo is running. Ctrl-C stops it.

  HTTPS    {url}   (self-signed certificate for localhost)
  API key  {key}
  tunnel   appliance 10.99.0.1  <== WireGuard (boringtun, userspace) ==>  corp peer 10.99.0.2
  model    "echo" at 10.20.0.5:8000 on the corp LAN, reachable only through the tunnel

Try it with curl (streams word by word):

  curl -sN -k {url}/chat/completions \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model":"echo","stream":true,"messages":[{{"role":"user","content":"hello from the corp network"}}]}}'

or with the openai Python SDK (pip install openai):

  python3 - <<'PY'
  import openai
  client = openai.OpenAI(base_url="{url}", api_key="{key}",
                         http_client=openai.DefaultHttpxClient(verify=False))  # self-signed demo cert
  for chunk in client.chat.completions.create(model="echo", stream=True,
          messages=[{{"role": "user", "content": "hello from the corp network"}}]):
      if chunk.choices:
          print(chunk.choices[0].delta.content or "", end="", flush=True)
  print()
  PY
"#
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    Ok(())
}
