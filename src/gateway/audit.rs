//! The audit record of one request: one [`AuditRecord`] per POST to a model endpoint, filled in
//! as the request goes through its steps and emitted exactly once, as one `audit` log line and
//! one [`Metrics::record`] call, whether the request was refused or answered.
//!
//! Every line has the same fields, in the same order (README, "HTTP surface"): key id and name,
//! client IP, endpoint, model, upstream (the replica that answered, or the last one tried),
//! retries (tries that failed over to another replica), status, bytes in and out, prompt and
//! completion tokens, TTFB, duration, outcome. What a refusal does not know yet is `-`. Never a
//! prompt, a completion or a secret.
//!
//! Also owns the [`Flight`] of a routed request (an active stream of its key, naming the
//! replica it is at), which ends when the record is emitted. The request's place at the
//! replica (its in-flight count and slot) is the `fair::Slot`, which the response body holds.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::error::ApiError;
use super::request::api_path;
use super::upstream::{Routes, Upstream};
use crate::policy::{Endpoint, Principal};
use crate::telemetry::{Metrics, RequestDone};

/// How a request ended, the audit line's `outcome`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The response body ended normally.
    Ok,
    /// The gateway ended the stream cleanly because the key's budget or TPM ran out.
    LimitCut,
    /// The client went away before the end.
    ClientDisconnected,
    /// The upstream failed mid-body.
    UpstreamError,
    /// The drain period of a shutdown ended with the body still open: the gateway cut it.
    ShutdownCut,
    /// Refused before an answer (auth, policy, limits, routing, upstream failure).
    Refused(&'a ApiError),
}

impl fmt::Display for Outcome<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::LimitCut => f.write_str("limit_cut"),
            Outcome::ClientDisconnected => f.write_str("client_disconnected"),
            Outcome::UpstreamError => f.write_str("upstream_error"),
            Outcome::ShutdownCut => f.write_str("shutdown_cut"),
            // The refusal with its reason, as the operator needs it.
            Outcome::Refused(e) => write!(f, "{e:?}"),
        }
    }
}

/// A value of the audit line, or `-` when it is not known.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// What one request looked like, for the audit line and the metrics.
pub struct AuditRecord {
    started: Instant,
    metrics: Arc<Metrics>,
    client: IpAddr,
    endpoint: Endpoint,
    principal: Option<Arc<Principal>>,
    model: Option<String>,
    /// Set once routed; names the upstream.
    flight: Option<Flight>,
    /// Tries that failed before their answer began and were retried on another replica.
    retries: u32,
    /// The upstream's status (an answered request).
    status: u16,
    bytes_in: Option<usize>,
    bytes_out: u64,
    ttfb: Option<Duration>,
}

impl AuditRecord {
    /// A request that arrived now from `client` at `endpoint`.
    pub fn start(metrics: &Arc<Metrics>, client: IpAddr, endpoint: Endpoint) -> AuditRecord {
        AuditRecord {
            started: Instant::now(),
            metrics: metrics.clone(),
            client,
            endpoint,
            principal: None,
            model: None,
            flight: None,
            retries: 0,
            status: 0,
            bytes_in: None,
            bytes_out: 0,
            ttfb: None,
        }
    }

    pub fn client(&self) -> IpAddr {
        self.client
    }

    pub fn authenticated(&mut self, principal: &Arc<Principal>) {
        self.principal = Some(principal.clone());
    }

    /// The body was read (`bytes_in` bytes) and names `model`.
    pub fn read(&mut self, bytes_in: usize, model: &str) {
        self.bytes_in = Some(bytes_in);
        self.model = Some(model.to_string());
    }

    /// Routed to `upstream` (a try): from now on an active stream of the key, at that replica.
    /// A retry routes again, to another replica; the stream goes on.
    pub fn routed(&mut self, upstream: &Arc<Upstream>) {
        match &mut self.flight {
            Some(f) => f.upstream = upstream.clone(),
            None => {
                if let Some(p) = &self.principal {
                    self.flight = Some(Flight::start(&self.metrics, p, upstream));
                }
            }
        }
    }

    /// The try at the current replica failed before its answer began; another one follows.
    pub fn retried(&mut self) {
        self.retries += 1;
    }

    /// The upstream answered with `status`.
    pub fn answered(&mut self, status: StatusCode) {
        self.status = status.as_u16();
    }

    /// The upstream answered 2xx.
    pub fn success(&self) -> bool {
        StatusCode::from_u16(self.status).is_ok_and(|s| s.is_success())
    }

    /// `len` more bytes of the answer went to the client (the first sets the TTFB).
    pub fn sent(&mut self, len: usize) {
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
        self.bytes_out += len as u64;
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Emits an answered request, with the usage it reported (or was charged, for a cut).
    pub fn finish(self, outcome: Outcome<'_>, usage: Option<(u64, u64)>) {
        let status = self.status;
        self.emit(outcome, status, usage, true);
    }

    /// Emits a refused request. Its model is a metric label only when a route serves it, so
    /// made-up model names cannot grow the series without bound.
    pub fn refused(self, error: &ApiError, routes: &Routes) {
        let served =
            self.flight.is_some() || self.model.as_deref().is_some_and(|m| routes.serves(m));
        self.emit(
            Outcome::Refused(error),
            error.status().as_u16(),
            None,
            served,
        );
    }

    /// The one audit line and metrics record of every request. Ends the flight.
    fn emit(self, outcome: Outcome<'_>, status: u16, usage: Option<(u64, u64)>, served: bool) {
        let duration = self.started.elapsed();
        let key_id = self.principal.as_ref().map_or("-", |p| p.id.as_str());
        let model = self.model.as_deref();
        self.metrics.record(&RequestDone {
            key_id,
            model: model.filter(|_| served).unwrap_or("-"),
            status,
            usage,
            ttfb: self.ttfb,
            duration,
        });
        tracing::info!(
            target: "audit",
            key_id = %key_id,
            key = %OrDash(self.principal.as_ref().map(|p| &p.name)),
            client = %self.client,
            endpoint = %api_path(self.endpoint),
            model = %OrDash(model),
            upstream = %OrDash(self.flight.as_ref().map(|f| &f.upstream.spec.name)),
            retries = self.retries,
            status,
            bytes_in = %OrDash(self.bytes_in),
            bytes_out = self.bytes_out,
            prompt_tokens = %OrDash(usage.map(|u| u.0)),
            completion_tokens = %OrDash(usage.map(|u| u.1)),
            ttfb_ms = %OrDash(self.ttfb.map(|t| t.as_secs_f64() * 1000.0)),
            duration_ms = duration.as_secs_f64() * 1000.0,
            %outcome,
            "request"
        );
    }
}

/// One request between routing and the end of its response: an active stream of its key,
/// at the replica it was routed to, until dropped.
pub struct Flight {
    metrics: Arc<Metrics>,
    key_id: Arc<str>,
    upstream: Arc<Upstream>,
}

impl Flight {
    pub fn start(
        metrics: &Arc<Metrics>,
        principal: &Principal,
        upstream: &Arc<Upstream>,
    ) -> Flight {
        let key_id: Arc<str> = Arc::from(principal.id.as_str());
        metrics.stream_started(&key_id, &principal.name);
        Flight {
            metrics: metrics.clone(),
            key_id,
            upstream: upstream.clone(),
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.metrics.stream_ended(&self.key_id);
    }
}

#[cfg(test)]
mod tests;
