//! Metrics: counters, gauges and histograms kept with atomics on the request path, rendered in
//! the Prometheus text format (version 0.0.4) on `server.metrics_listen` (plain HTTP,
//! `GET /metrics`, loopback by default: metrics are for the operator, not the internet).
//!
//! Owns the metric families and their text form, with plain types only: it never imports the
//! gateway (the gateway's audit record calls in). Each finished or refused request is recorded
//! with one call ([`Metrics::record`]); a request being answered counts as an active stream of
//! its key between [`Metrics::stream_started`] and [`Metrics::stream_ended`]. Peer, upstream
//! and certificate gauges are read at scrape time from the live state ([`Scrape`]), the heap
//! gauges from the allocator ([`heap::read`]), so nothing polls in the background.
//!
//! Hot path: one read lock of a map (to find the series of a known label set) and atomic
//! increments; the write lock is taken only the first time a label set appears.
//!
//! Label cardinality is bounded: `key_id` takes only ids of keys that authenticated (bounded
//! by the key store; refusals without a valid key use `-`), `model` only public model names
//! that a route served (bounded by the routes; a refused request for an unknown model uses
//! `-`), `status` only HTTP statuses, `peer` and `upstream` only names from the config. Series
//! of keys or models that went away stay until the daemon restarts. Choosing the labels is the
//! caller's job.

pub mod heap;
pub mod server;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::tunnel::PeerStats;

/// Upper bounds (seconds) of the latency and TTFB histograms: from a cached 5 ms answer to a
/// ten-minute agent turn.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A histogram with fixed buckets, updated with atomics only.
#[derive(Debug)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..=LATENCY_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// A map of label sets to atomics: read-locked lookups, a write lock only for a new set.
#[derive(Debug)]
struct Family<K, V> {
    series: RwLock<HashMap<K, V>>,
}

impl<K: Eq + Hash + Clone + Ord, V> Family<K, V> {
    fn new() -> Self {
        Family {
            series: RwLock::new(HashMap::new()),
        }
    }

    fn with<R>(&self, key: &K, make: impl FnOnce() -> V, f: impl FnOnce(&V) -> R) -> R {
        if let Some(v) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return f(v);
        }
        let mut w = self.series.write().unwrap_or_else(|p| p.into_inner());
        let v = w.entry(key.clone()).or_insert_with(make);
        f(v)
    }

    /// The series sorted by label set (stable output for diffs and tests).
    fn sorted<R>(&self, f: impl Fn(&K, &V) -> R) -> Vec<R> {
        let r = self.series.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<&K> = r.keys().collect();
        keys.sort();
        keys.into_iter().map(|k| f(k, &r[k])).collect()
    }
}

/// A key's active streams and its name (for `status`).
#[derive(Debug)]
struct Active {
    name: String,
    count: AtomicI64,
}

/// Every metric the daemon records (one per daemon, shared by every gateway snapshot).
#[derive(Debug)]
pub struct Metrics {
    requests: Family<(Arc<str>, Arc<str>, u16), AtomicU64>,
    tokens: Family<Arc<str>, [AtomicU64; 2]>,
    active: Family<Arc<str>, Active>,
    duration: Histogram,
    ttfb: Histogram,
    reloads: [AtomicU64; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A key's active streams, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveStreams {
    pub key_id: String,
    pub key_name: String,
    pub count: u64,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            requests: Family::new(),
            tokens: Family::new(),
            active: Family::new(),
            duration: Histogram::new(),
            ttfb: Histogram::new(),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Counts one answered request.
    pub fn request(&self, key_id: &str, model: &str, status: u16) {
        let k = (Arc::from(key_id), Arc::from(model), status);
        self.requests.with(
            &k,
            || AtomicU64::new(0),
            |c| c.fetch_add(1, Ordering::Relaxed),
        );
    }

    /// Adds prompt and completion tokens to a key's counters.
    pub fn tokens(&self, key_id: &str, prompt: u64, completion: u64) {
        self.tokens.with(
            &Arc::from(key_id),
            || [AtomicU64::new(0), AtomicU64::new(0)],
            |t| {
                t[0].fetch_add(prompt, Ordering::Relaxed);
                t[1].fetch_add(completion, Ordering::Relaxed);
            },
        );
    }

    /// A config reload was applied (`ok`) or refused.
    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted for `(key_id, model, status)` (tests and `status`).
    pub fn request_count(&self, key_id: &str, model: &str, status: u16) -> u64 {
        let k = (Arc::from(key_id), Arc::from(model), status);
        self.requests
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Keys with at least one active stream, by key id.
    pub fn active_streams(&self) -> Vec<ActiveStreams> {
        self.active
            .sorted(|id, a| ActiveStreams {
                key_id: id.to_string(),
                key_name: a.name.clone(),
                count: a.count.load(Ordering::Relaxed).max(0) as u64,
            })
            .into_iter()
            .filter(|a| a.count > 0)
            .collect()
    }

    /// A response of key `key_id` (named `name`) started streaming.
    pub fn stream_started(&self, key_id: &Arc<str>, name: &str) {
        self.stream_delta(key_id, name, 1);
    }

    /// A response of key `key_id` ended (or was dropped).
    pub fn stream_ended(&self, key_id: &Arc<str>) {
        self.stream_delta(key_id, "", -1);
    }

    /// Records one finished or refused request: its counter, tokens, TTFB and latency.
    pub fn record(&self, r: &RequestDone<'_>) {
        self.request(r.key_id, r.model, r.status);
        if let Some((p, c)) = r.usage {
            self.tokens(r.key_id, p, c);
        }
        if let Some(t) = r.ttfb {
            self.ttfb.observe(t);
        }
        self.duration.observe(r.duration);
    }

    fn stream_delta(&self, key_id: &Arc<str>, name: &str, delta: i64) {
        self.active.with(
            key_id,
            || Active {
                name: name.to_string(),
                count: AtomicI64::new(0),
            },
            |a| a.count.fetch_add(delta, Ordering::Relaxed),
        );
    }

    /// The request-path families in the text format.
    pub fn render(&self, out: &mut String) {
        header(
            out,
            "modelgate_requests_total",
            "Requests to the model endpoints (POST /v1/...), by API key id, public model and HTTP status (model \"-\" when none was routed).",
            "counter",
        );
        for line in self.requests.sorted(|(key, model, status), c| {
            format!(
                "modelgate_requests_total{{key_id=\"{}\",model=\"{}\",status=\"{status}\"}} {}",
                escape(key),
                escape(model),
                c.load(Ordering::Relaxed)
            )
        }) {
            out.push_str(&line);
            out.push('\n');
        }
        header(
            out,
            "modelgate_tokens_total",
            "Tokens reported by the model in the response's usage, by API key id and kind (prompt, completion).",
            "counter",
        );
        for line in self.tokens.sorted(|key, t| {
            format!(
                "modelgate_tokens_total{{key_id=\"{k}\",kind=\"prompt\"}} {}\nmodelgate_tokens_total{{key_id=\"{k}\",kind=\"completion\"}} {}",
                t[0].load(Ordering::Relaxed),
                t[1].load(Ordering::Relaxed),
                k = escape(key),
            )
        }) {
            out.push_str(&line);
            out.push('\n');
        }
        header(
            out,
            "modelgate_active_streams",
            "Responses being streamed now, by API key id.",
            "gauge",
        );
        for line in self.active.sorted(|key, a| {
            format!(
                "modelgate_active_streams{{key_id=\"{}\"}} {}",
                escape(key),
                a.count.load(Ordering::Relaxed).max(0)
            )
        }) {
            out.push_str(&line);
            out.push('\n');
        }
        self.duration.render(
            out,
            "modelgate_request_duration_seconds",
            "Time from the request's arrival to the end of its response body.",
        );
        self.ttfb.render(
            out,
            "modelgate_request_ttfb_seconds",
            "Time from the request's arrival to the first response byte from the model.",
        );
        header(
            out,
            "modelgate_config_reloads_total",
            "Config reloads (SIGHUP or `modelgate reload`), by result.",
            "counter",
        );
        for (i, result) in ["ok", "refused"].iter().enumerate() {
            let _ = writeln!(
                out,
                "modelgate_config_reloads_total{{result=\"{result}\"}} {}",
                self.reloads[i].load(Ordering::Relaxed)
            );
        }
    }
}

/// One finished or refused request, as [`Metrics::record`] counts it.
#[derive(Debug, Clone, Copy)]
pub struct RequestDone<'a> {
    /// `-` when no key authenticated.
    pub key_id: &'a str,
    /// A public model name a route serves, or `-` (the caller keeps the label set bounded).
    pub model: &'a str,
    pub status: u16,
    /// `(prompt, completion)` tokens the answer reported.
    pub usage: Option<(u64, u64)>,
    pub ttfb: Option<Duration>,
    pub duration: Duration,
}

/// What a scrape reads from the live daemon besides [`Metrics`].
#[derive(Debug, Default)]
pub struct Scrape {
    pub peers: Vec<PeerStats>,
    /// `(name, reachable, in flight, waiting for a slot)` of every configured upstream.
    pub upstreams: Vec<(String, bool, u64, u64)>,
    pub certificate_not_after: Option<SystemTime>,
    /// Health and failover counters of every configured upstream (replica).
    pub replicas: Vec<ReplicaGauges>,
    /// `(public model, requests waiting for a slot at any of its replicas)`.
    pub models_queued: Vec<(String, u64)>,
}

/// What a scrape shows of one replica's health ([`Scrape::replicas`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaGauges {
    pub upstream: String,
    /// Not ejected now.
    pub healthy: bool,
    pub ejections: u64,
    /// Requests that failed there before their answer began and were retried elsewhere.
    pub retries: u64,
}

/// The replica families: health, ejections, retries, and each model's queue.
fn render_replicas(out: &mut String, scrape: &Scrape) {
    header(
        out,
        "modelgate_upstream_healthy",
        "1 unless the upstream is ejected now (passive health: a failed request or probe ejects it for a capped exponential backoff).",
        "gauge",
    );
    for r in &scrape.replicas {
        let _ = writeln!(
            out,
            "modelgate_upstream_healthy{{upstream=\"{}\"}} {}",
            escape(&r.upstream),
            u8::from(r.healthy)
        );
    }
    for (name, help, pick) in [
        (
            "modelgate_upstream_ejections_total",
            "Times the upstream was ejected after a failure.",
            (|r: &ReplicaGauges| r.ejections) as fn(&ReplicaGauges) -> u64,
        ),
        (
            "modelgate_upstream_retries_total",
            "Requests that failed at the upstream before their answer began and were retried on another replica.",
            |r: &ReplicaGauges| r.retries,
        ),
    ] {
        header(out, name, help, "counter");
        for r in &scrape.replicas {
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", escape(&r.upstream), pick(r));
        }
    }
    header(
        out,
        "modelgate_model_queued",
        "Requests waiting for a slot at any replica of the model (its fair-share queue).",
        "gauge",
    );
    for (model, n) in &scrape.models_queued {
        let _ = writeln!(
            out,
            "modelgate_model_queued{{model=\"{}\"}} {n}",
            escape(model)
        );
    }
}

/// `modelgate_peer_up` and `modelgate_peer_last_receive_age_seconds`: the peer as requests
/// see it (up, or silent / without a handshake) and how long it has been quiet.
fn render_peer_health(out: &mut String, peers: &[PeerStats]) {
    header(
        out,
        "modelgate_peer_up",
        "1 when the peer has a session and was heard from (keepalives count) within its silence limit, else 0.",
        "gauge",
    );
    for p in peers {
        let up = u8::from(p.health == crate::tunnel::PeerHealth::Up);
        let _ = writeln!(
            out,
            "modelgate_peer_up{{peer=\"{}\"}} {up}",
            escape(&p.name)
        );
    }
    header(
        out,
        "modelgate_peer_last_receive_age_seconds",
        "Seconds since the peer's last authenticated packet, keepalives included (absent before the first).",
        "gauge",
    );
    for p in peers {
        if let Some(age) = p.last_received {
            let _ = writeln!(
                out,
                "modelgate_peer_last_receive_age_seconds{{peer=\"{}\"}} {}",
                escape(&p.name),
                age.as_secs_f64()
            );
        }
    }
}

/// The full exposition: request families, then peers, upstreams, the certificate and the heap.
pub fn render(metrics: &Metrics, scrape: &Scrape) -> String {
    let mut out = String::with_capacity(4096);
    metrics.render(&mut out);
    header(
        &mut out,
        "modelgate_peer_last_handshake_age_seconds",
        "Seconds since the peer's latest WireGuard handshake (absent before the first).",
        "gauge",
    );
    for p in &scrape.peers {
        if let Some(age) = p.last_handshake {
            let _ = writeln!(
                out,
                "modelgate_peer_last_handshake_age_seconds{{peer=\"{}\"}} {}",
                escape(&p.name),
                age.as_secs_f64()
            );
        }
    }
    render_peer_health(&mut out, &scrape.peers);
    for (name, help, pick) in [
        (
            "modelgate_peer_receive_bytes_total",
            "Inner IP bytes received from the peer through the tunnel.",
            (|p: &PeerStats| p.rx_bytes) as fn(&PeerStats) -> u64,
        ),
        (
            "modelgate_peer_transmit_bytes_total",
            "Inner IP bytes sent to the peer through the tunnel.",
            |p: &PeerStats| p.tx_bytes,
        ),
    ] {
        header(&mut out, name, help, "counter");
        for p in &scrape.peers {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", escape(&p.name), pick(p));
        }
    }
    header(
        &mut out,
        "modelgate_upstream_up",
        "1 when the upstream answered its last GET /models, else 0.",
        "gauge",
    );
    for (name, up, _, _) in &scrape.upstreams {
        let _ = writeln!(
            out,
            "modelgate_upstream_up{{upstream=\"{}\"}} {}",
            escape(name),
            u8::from(*up)
        );
    }
    header(
        &mut out,
        "modelgate_upstream_in_flight",
        "Requests in flight at the upstream.",
        "gauge",
    );
    for (name, _, n, _) in &scrape.upstreams {
        let _ = writeln!(
            out,
            "modelgate_upstream_in_flight{{upstream=\"{}\"}} {n}",
            escape(name)
        );
    }
    header(
        &mut out,
        "modelgate_upstream_queued",
        "Requests waiting for a slot at a saturated upstream (max_concurrent; fair-share queue).",
        "gauge",
    );
    for (name, _, _, q) in &scrape.upstreams {
        let _ = writeln!(
            out,
            "modelgate_upstream_queued{{upstream=\"{}\"}} {q}",
            escape(name)
        );
    }
    render_replicas(&mut out, scrape);
    if let Some(t) = scrape.certificate_not_after {
        header(
            &mut out,
            "modelgate_certificate_not_after_seconds",
            "Expiry of the HTTPS certificate, UNIX seconds.",
            "gauge",
        );
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(out, "modelgate_certificate_not_after_seconds {secs}");
    }
    heap::render(&mut out, heap::read());
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the text format requires (backslash, quote, line feed).
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests;
