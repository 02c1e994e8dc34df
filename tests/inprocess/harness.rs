//! The in-process appliance every gateway test here runs against: a gateway built and served
//! the way the daemon does it ([`modelgate::gateway::Gateway`]), on 127.0.0.1:0 with a fresh
//! self-signed certificate, whose upstreams sit at [`CORP_MODEL`] behind a real WireGuard
//! tunnel (two netstacks over loopback UDP). Also the HTTPS client the tests talk to it with.
//!
//! It never touches the host's network configuration and sends traffic only over loopback.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use modelgate::config::{GatewayConfig, ModelConfig};
use modelgate::demo::{LoopbackPair, LoopbackTls};
use modelgate::gateway::upstream::UpstreamSpec;
use modelgate::gateway::{Gateway, GatewayHandle};
use modelgate::keys::ledger::LedgerWriter;
use modelgate::keys::{KeyRing, Keys};
use modelgate::netstack::{Netstack, TcpTuning, TunnelStream};
use modelgate::policy::{KeyPolicy, Principal};
use serde_json::Value;
use tokio::sync::watch;

/// Where the corp peer serves the model, as the gateway's upstreams address it.
pub const CORP_MODEL: &str = "10.99.0.2:8000";

/// `rel` inside the repository.
pub fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The Python with the `openai` SDK (env `MODELGATE_PYTHON`, default `.venv/bin/python`, which
/// `scripts/test.sh` creates), if it can `import openai`.
pub fn sdk_python() -> Option<PathBuf> {
    let py = std::env::var_os("MODELGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_path(".venv/bin/python"));
    Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(py)
}

/// A fresh real `mg_` key (format and checksum as `key create` makes them) for a principal
/// whose id and name are `id`.
pub fn key(id: &str, policy: KeyPolicy) -> (String, Arc<Principal>) {
    let secret = modelgate::keys::format::generate().expose().to_string();
    let principal = Arc::new(Principal {
        id: id.into(),
        name: id.into(),
        policy,
    });
    (secret, principal)
}

/// An upstream at [`CORP_MODEL`] under `/v1`.
pub fn corp_upstream(name: &str, models: &[(&str, &str)]) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        addr: CORP_MODEL.parse().expect("static address"),
        base_path: "/v1".into(),
        api_key: None,
        models: models
            .iter()
            .map(|(p, u)| (p.to_string(), u.to_string()))
            .collect(),
        max_concurrent: None,
    }
}

/// What a [`Stack`] is started with.
pub struct StackOptions {
    /// False: the corp peer never dials, so the tunnel never comes up.
    pub corp_dials: bool,
    pub keys: Vec<(String, Arc<Principal>)>,
    pub upstreams: Vec<UpstreamSpec>,
    pub config: GatewayConfig,
    pub ledger: Option<LedgerWriter>,
    /// How long a reply's head may take, and then its whole body.
    pub patience: Duration,
    /// `[[model]]` settings (balancing of replicas).
    pub models: Vec<ModelConfig>,
    /// The live key set (watched from a store) instead of a fixed ring of `keys`.
    pub live_keys: Option<Arc<Keys>>,
}

impl StackOptions {
    /// A tunnel that comes up, default `[gateway]` settings, no ledger, 20 s of patience.
    pub fn new(keys: Vec<(String, Arc<Principal>)>, upstreams: Vec<UpstreamSpec>) -> Self {
        StackOptions {
            corp_dials: true,
            keys,
            upstreams,
            config: GatewayConfig::default(),
            ledger: None,
            patience: Duration::from_secs(20),
            models: Vec::new(),
            live_keys: None,
        }
    }
}

/// A running gateway, its tunnel and the corp peer; everything stops when it is dropped.
pub struct Stack {
    pub addr: SocketAddr,
    pub tls: LoopbackTls,
    /// The gateway's live snapshot (routes, replicas' health, scheduler).
    pub handle: GatewayHandle,
    /// The appliance's side of the tunnel (for its peer's handshake).
    _appliance: Netstack,
    /// Kept so the corp peer lives as long as the stack.
    _corp: Netstack,
    patience: Duration,
    _stop: watch::Sender<bool>,
}

/// How the corp peer serves each connection to one of its ports (see [`Stack::start_ports`]).
pub type Serve =
    Arc<dyn Fn(TunnelStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// `f` as a [`Serve`].
pub fn serve<F, Fut>(f: F) -> Serve
where
    F: Fn(TunnelStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |s| Box::pin(f(s)))
}

/// An HTTP/1.1 connection over TLS to the gateway, and the task that drives it.
pub type Connection = (
    SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
);

impl Stack {
    /// Starts the tunnel, serves each connection to [`CORP_MODEL`] on the corp peer with
    /// `serve_model` (in a task of its own), then starts the gateway.
    pub async fn start<F, Fut>(o: StackOptions, serve_model: F) -> Stack
    where
        F: Fn(TunnelStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Stack::start_ports(o, vec![(8000, serve(serve_model))]).await
    }

    /// [`Stack::start`] with the corp peer serving several ports of its tunnel address
    /// (10.99.0.2), each with its own server: replicas of a model. A port not listed refuses
    /// connections.
    pub async fn start_ports(o: StackOptions, ports: Vec<(u16, Serve)>) -> Stack {
        let LoopbackPair { appliance, corp } =
            LoopbackPair::start(&[], o.corp_dials, TcpTuning::default()).unwrap();
        for (port, serve_model) in ports {
            let mut model = corp.listen(port).await.unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = model.accept().await {
                    tokio::spawn(serve_model(s));
                }
            });
        }
        let keys = o
            .live_keys
            .unwrap_or_else(|| Keys::new(KeyRing::for_tests(o.keys)));
        let mut gateway =
            Gateway::new(keys, appliance.clone(), o.upstreams, o.config).models(o.models);
        if let Some(l) = o.ledger {
            gateway = gateway.ledger(l);
        }
        let tls = LoopbackTls::generate().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let running = gateway.start(listener, tls.server.clone(), stop_rx);
        Stack {
            addr,
            tls,
            handle: running.handle,
            _appliance: appliance,
            _corp: corp,
            patience: o.patience,
            _stop: stop_tx,
        }
    }

    /// Waits (bounded: 5 s) until the corp peer's handshake is done and confirmed, so a
    /// request is not refused with 503 for a tunnel still coming up.
    pub async fn wait_tunnel(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let up = self._corp.stats().await.is_ok_and(|s| {
                s.peers
                    .iter()
                    .all(|p| p.health == modelgate::tunnel::PeerHealth::Up)
            });
            if up {
                // The appliance is up once the corp side's confirming keepalive arrived.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the tunnel did not come up within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the gateway as SIGTERM does: the listener closes, open requests get the drain
    /// timeout, then what is still open is cut.
    pub fn stop(&self) {
        let _ = self._stop.send(true);
    }

    /// A fresh HTTPS/1.1 connection.
    pub async fn connect(&self) -> Connection {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.client.clone())
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        (send, tokio::spawn(conn))
    }

    /// One request on a fresh connection (`host: localhost` and `headers`); the whole answer,
    /// each body chunk with its arrival time.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let (mut send, _conn) = self.connect().await;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let start = Instant::now();
        let resp = tokio::time::timeout(self.patience, send.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("no response head within {:?}", self.patience))
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut body = resp.into_body();
        let mut chunks = Vec::new();
        while let Some(f) = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("body not complete within {:?}", self.patience))
        {
            if let Ok(d) = f.unwrap().into_data() {
                chunks.push((start.elapsed(), d));
            }
        }
        Reply {
            status,
            headers,
            chunks,
        }
    }
}

/// A whole answer.
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    /// Body chunks with their arrival time since the request was sent.
    pub chunks: Vec<(Duration, Bytes)>,
}

impl Reply {
    pub fn body(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body()).unwrap_or_else(|e| panic!("{e}: {}", self.body()))
    }

    /// The events of an SSE body as JSON values (comments skipped), and whether it ended
    /// with `[DONE]`. Every event must be `data: ` and JSON, and nothing may follow `[DONE]`.
    pub fn events(&self) -> (Vec<Value>, bool) {
        let body = self.body();
        let mut out = Vec::new();
        let mut done = false;
        for event in body.split("\n\n").filter(|e| !e.is_empty()) {
            if event.starts_with(':') {
                continue;
            }
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad event {event:?}"));
            assert!(!done, "event after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            out.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
        }
        (out, done)
    }
}
