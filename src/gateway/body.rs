//! The respond step: the upstream's answer on its way to the client, frame by frame (no
//! buffering). [`ProxyBody`] counts the bytes, learns the token usage, fills silences of a
//! stream with SSE keep-alive comments at event boundaries, and when it ends or is dropped —
//! exactly once — settles the admission and emits the audit record.
//!
//! A metered stream (chat/completions or completions, `stream: true`, 2xx) goes through a
//! [`Meter`] and reaches the client in whole events: each event's tokens are charged to the
//! key as they come, and when its TPM or budget is overdrawn the stream ends cleanly (a final
//! chunk with `finish_reason: "length"`, usage if the client asked for it, `[DONE]`) and the
//! upstream connection is dropped, which resets it so the model stops generating. Dropping the
//! client's response drops the upstream connection at once the same way.
//!
//! A body cut short — the upstream connection died mid-answer (model killed, corp peer gone) or
//! the drain period of a shutdown ended ([`DrainCut`]) — never looks like a complete answer:
//! a stream (SSE) ends with one `data:` event carrying an OpenAI-shaped error
//! (`upstream_disconnected` or `server_shutting_down`, type `server_error`) and then closes
//! cleanly, so the SDKs raise a typed `APIError` with the reason instead of failing to parse a
//! truncated body; any other answer is aborted (HTTP/1.1: the connection closes before the
//! body is complete; HTTP/2: `RST_STREAM`), so the client sees an incomplete body error.
//!
//! Per frame: no allocation on an unmetered body beyond the bounded usage tail; no lock unless
//! the key's tokens are charged as they stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

use super::admission::{Settlement, Used, BYTES_PER_TOKEN};
use super::audit::{AuditRecord, Outcome};
use super::drain::{DrainCut, Registration};
use super::error::insert_rate_headers;
use super::fair::Slot;
use super::forward::Forwarded;
use super::meter::Meter;
use super::request::ClientRequest;
use super::upstream::UpstreamBody;
use super::usage::Tail;

/// An upstream answer made ready for the client: everything but the audit record, which the
/// handler attaches last ([`Answer::into_response`]).
pub struct Answer {
    head: Response<()>,
    upstream: UpstreamBody,
    reading: Reading,
    keepalive: Option<KeepAlive>,
    slot: Option<Slot>,
    settlement: Settlement,
    drain: DrainCut,
}

/// The respond step: the client's response head (status, the upstream's content type and
/// cache control, the key's rate-limit headers) and how its body is read; `drain` cuts it at
/// the end of a shutdown's drain period.
pub fn respond(
    forwarded: Forwarded,
    request: &ClientRequest,
    sse_keepalive: Duration,
    settlement: Settlement,
    drain: &DrainCut,
) -> Answer {
    let Forwarded { response, slot } = forwarded;
    let (parts, upstream) = response.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut head = Response::new(());
    *head.status_mut() = parts.status;
    let h: &mut HeaderMap = head.headers_mut();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&name) {
            h.insert(name, v.clone());
        }
    }
    if sse {
        // Ask reverse proxies in front of us (and Cursor's) not to buffer the stream.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    insert_rate_headers(h, settlement.rate_headers());
    // Only successful streams are metered (an error body is JSON, not events).
    let reading = match request.stream.filter(|_| sse && parts.status.is_success()) {
        Some(kind) => Reading::Metered {
            meter: Meter::new(kind, request.inject_usage()),
            client_wants_usage: request.client_wants_usage,
        },
        None => Reading::Tail(Tail::new(sse)),
    };
    Answer {
        head,
        upstream,
        reading,
        keepalive: sse.then(|| KeepAlive::new(sse_keepalive)),
        slot,
        settlement,
        drain: drain.clone(),
    }
}

impl Answer {
    /// The client's response, whose body settles and emits `record` when it ends.
    pub fn into_response(self, mut record: AuditRecord) -> Response {
        record.answered(self.head.status());
        let body = ProxyBody {
            phase: Phase::Open(self.upstream),
            reading: self.reading,
            keepalive: self.keepalive,
            slot: self.slot,
            account: Some(Account {
                settlement: self.settlement,
                record,
            }),
            drain: self.drain,
            drain_reg: None,
        };
        let (parts, ()) = self.head.into_parts();
        Response::from_parts(parts, Body::new(body))
    }
}

/// The upstream body on its way to the client.
struct ProxyBody {
    phase: Phase,
    reading: Reading,
    /// SSE only: comments during silences.
    keepalive: Option<KeepAlive>,
    /// The upstream's concurrency slot (fair share), freed as soon as the body ends.
    slot: Option<Slot>,
    /// Settled and emitted exactly once, when the body ends or is dropped.
    account: Option<Account>,
    /// The end of a shutdown's drain period.
    drain: DrainCut,
    /// Registered the first time the body waits for the upstream.
    drain_reg: Option<Registration>,
}

/// Where the body is between the upstream and the client.
enum Phase {
    /// Frames come from the upstream.
    Open(UpstreamBody),
    /// The gateway ended the stream: its ending went out with the last frame, the upstream is
    /// dropped (reset, so the model stops), and the body ends at the next poll.
    Cut(Cut),
    /// Ended, settled and emitted.
    Ended,
}

/// Why the gateway ended a body early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The key's TPM or budget ran out (a clean `finish_reason: "length"` ending).
    Limit,
    /// The upstream connection failed mid-answer.
    Upstream,
    /// The drain period of a shutdown ended.
    Shutdown,
}

impl Cut {
    /// The SSE event a cut stream ends with (`Limit` has its own ending, from the meter).
    fn event(self) -> &'static [u8] {
        match self {
            Cut::Limit => b"",
            Cut::Upstream => UPSTREAM_DISCONNECTED_EVENT,
            Cut::Shutdown => SHUTTING_DOWN_EVENT,
        }
    }
}

/// The last event of a stream whose upstream connection died: OpenAI's error shape, which the
/// SDKs raise as `APIError` (message, `type`, `code`).
const UPSTREAM_DISCONNECTED_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"The connection to the model server was lost in the middle of this response (the model server or the tunnel to it went away); the response is incomplete. Retry the request.\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_disconnected\"}}\n\n";
/// The last event of a stream still open when a shutdown's drain period ended.
const SHUTTING_DOWN_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"The gateway is restarting and ended this response at the end of its drain period; the response is incomplete. Retry the request.\",\"type\":\"server_error\",\"param\":null,\"code\":\"server_shutting_down\"}}\n\n";

/// Why a body ended with an error (the client sees an incomplete body).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the model server's answer broke off: {0}")]
    Upstream(std::io::Error),
    #[error("the answer was cut at the end of the shutdown's drain period")]
    ShuttingDown,
}

/// How the body's token usage is learnt.
enum Reading {
    /// Whole events through the meter; tokens counted (and charged) as they stream.
    Metered {
        meter: Meter,
        client_wants_usage: bool,
    },
    /// Anything else: the bounded tail, read when the body ends.
    Tail(Tail),
}

/// The settlement and the audit record, finished together.
struct Account {
    settlement: Settlement,
    record: AuditRecord,
}

/// The keep-alive timer of an SSE body: one timer, re-armed by every frame.
struct KeepAlive {
    every: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The bytes sent so far end at an SSE event boundary (a blank line).
    at_boundary: bool,
}

impl KeepAlive {
    fn new(every: Duration) -> KeepAlive {
        KeepAlive {
            every,
            timer: None,
            at_boundary: true,
        }
    }

    fn sent(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.at_boundary = data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
        }
    }

    fn rearm(&mut self) {
        // Re-arm the one timer of this body instead of allocating one per frame.
        let deadline = tokio::time::Instant::now() + self.every;
        match self.timer.as_mut() {
            Some(t) => t.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// The upstream is silent: a comment when the timer fired at an event boundary (`meter_idle`:
    /// no partial event is buffered either).
    fn poll_silence(&mut self, cx: &mut Context<'_>, meter_idle: bool) -> Poll<Bytes> {
        let every = self.every;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        timer.as_mut().reset(tokio::time::Instant::now() + every);
        if self.at_boundary && meter_idle {
            // An SSE comment line: clients ignore it, proxies see traffic.
            return Poll::Ready(Bytes::from_static(b": keep-alive\n\n"));
        }
        // Mid-event: a comment here would corrupt the event; wait for its end.
        let _ = timer.as_mut().poll(cx);
        Poll::Pending
    }
}

impl ProxyBody {
    /// Notes bytes that go to the client.
    fn record(&mut self, data: &[u8]) {
        if let Some(a) = &mut self.account {
            a.record.sent(data.len());
        }
        if let Reading::Tail(t) = &mut self.reading {
            t.push(data);
        }
        if let Some(k) = &mut self.keepalive {
            k.sent(data);
        }
    }

    fn rearm(&mut self) {
        if let Some(k) = &mut self.keepalive {
            k.rearm();
        }
    }

    /// An upstream frame: what goes to the client now, if anything.
    fn on_frame(&mut self, frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
        if let Reading::Tail(_) = self.reading {
            if let Some(data) = frame.data_ref() {
                self.record(data);
            }
            self.rearm();
            return Some(frame);
        }
        // Metered: only data matters (trailers do not occur in SSE over HTTP/1.1).
        let data = frame.into_data().ok()?;
        let out = self.meter_frame(&data);
        if out.is_empty() {
            // Half an event, or a stripped usage chunk: nothing to send yet.
            return None;
        }
        self.record(&out);
        self.rearm();
        Some(Frame::data(out))
    }

    /// Runs a metered frame through the meter: whole events out, tokens charged, and the
    /// clean ending when a limit runs out (after which the upstream is dropped).
    fn meter_frame(&mut self, data: &[u8]) -> Bytes {
        let ProxyBody {
            phase,
            reading,
            account,
            ..
        } = self;
        let Reading::Metered {
            meter,
            client_wants_usage,
        } = reading
        else {
            return Bytes::copy_from_slice(data);
        };
        let mut settlement = account.as_mut().map(|a| &mut a.settlement);
        let mut out = BytesMut::new();
        for ev in meter.push(data) {
            let overdrawn =
                ev.tokens > 0 && settlement.as_mut().is_some_and(|s| !s.charge(ev.tokens));
            if overdrawn {
                let prompt = settlement.as_ref().map_or(0, |s| s.prompt_tokens());
                // The usage the client sees counts what it received; the event that overdrew
                // the limit is charged (the model made it) but not delivered.
                let delivered = meter.tokens.saturating_sub(ev.tokens);
                out.extend_from_slice(&meter.cut_tail(*client_wants_usage, prompt, delivered));
                // Dropping the upstream body resets its connection: the model stops.
                *phase = Phase::Cut(Cut::Limit);
                break;
            }
            if ev.forward {
                out.extend_from_slice(&ev.bytes);
            }
        }
        out.freeze()
    }

    /// The upstream body ended: an unterminated last event goes out as it is.
    fn on_end(&mut self) -> Option<Bytes> {
        let rest = match &mut self.reading {
            Reading::Metered { meter, .. } => meter.finish(),
            Reading::Tail(_) => None,
        };
        if let Some(rest) = &rest {
            self.record(rest);
        }
        self.finish(Outcome::Ok);
        rest
    }

    /// The upstream is silent: a keep-alive comment when one is due.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let meter_idle = match &self.reading {
            Reading::Metered { meter, .. } => meter.at_boundary(),
            Reading::Tail(_) => true,
        };
        match &mut self.keepalive {
            Some(k) => k.poll_silence(cx, meter_idle),
            None => Poll::Pending,
        }
    }

    /// Settles the admission (with the reported usage, or an estimate marked as such) and
    /// emits the audit record. Runs once; later calls do nothing.
    fn finish(&mut self, outcome: Outcome<'_>) {
        // Free the model server's slot first: the upstream connection is done with.
        self.slot = None;
        let cut = match self.phase {
            Phase::Cut(c) => Some(c),
            _ => None,
        };
        self.phase = Phase::Ended;
        let Some(Account {
            mut settlement,
            record,
        }) = self.account.take()
        else {
            return;
        };
        let reported = match &self.reading {
            Reading::Metered { meter, .. } => meter.usage,
            Reading::Tail(t) => t.usage(),
        };
        if cut == Some(Cut::Limit) {
            // A cut stream never saw the upstream's usage chunk: the prompt estimate and the
            // tokens counted so far, which the audit line and metrics log too.
            let counted = match &self.reading {
                Reading::Metered { meter, .. } => meter.tokens,
                Reading::Tail(_) => 0,
            };
            let used = (settlement.prompt_tokens(), counted, true);
            settlement.settle(Some(used));
            record.finish(Outcome::LimitCut, Some((used.0, used.1)));
            return;
        }
        let used = match reported {
            Some((p, c)) => Some((p, c, false)),
            // An error answer without usage: the model generated nothing we can count.
            None if !record.success() => None,
            None => Some(self.estimate(&settlement, record.bytes_out())),
        };
        settlement.settle(used);
        record.finish(outcome, reported);
    }

    /// No usage reported (client left, or no include_usage): the prompt estimate and the
    /// counted or guessed completion tokens, never more than was reserved.
    fn estimate(&self, settlement: &Settlement, bytes_out: u64) -> Used {
        let guess = match &self.reading {
            Reading::Metered { meter, .. } => meter.tokens,
            Reading::Tail(t) => t.estimate(bytes_out, BYTES_PER_TOKEN),
        };
        let completion = guess.min(settlement.reserved_completion());
        (settlement.prompt_tokens(), completion, true)
    }
}

impl ProxyBody {
    /// Ends the body early for `why`. A stream gets its error event (after closing a partly
    /// sent event, so the event parses) and then ends cleanly at the next poll; any other
    /// answer is aborted with `abort`, so the client sees an incomplete body.
    fn cut(&mut self, why: Cut, abort: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &self.keepalive {
            Some(k) => {
                let mut out = BytesMut::with_capacity(2 + why.event().len());
                if !k.at_boundary {
                    out.extend_from_slice(b"\n\n");
                }
                out.extend_from_slice(why.event());
                let out = out.freeze();
                self.record(&out);
                // Dropping the upstream body resets its connection: the model stops.
                self.phase = Phase::Cut(why);
                Poll::Ready(Some(Ok(Frame::data(out))))
            }
            None => {
                self.phase = Phase::Cut(why);
                self.finish(why.outcome());
                Poll::Ready(Some(Err(abort)))
            }
        }
    }

    /// Whether the drain period ended while the upstream is silent (registers the wake-up).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> bool {
        self.drain.poll_cut(&mut self.drain_reg, cx)
    }
}

impl Cut {
    /// How the audit line reports it.
    fn outcome(self) -> Outcome<'static> {
        match self {
            Cut::Limit => Outcome::LimitCut,
            Cut::Upstream => Outcome::UpstreamError,
            Cut::Shutdown => Outcome::ShutdownCut,
        }
    }
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let upstream = match &mut this.phase {
                Phase::Open(_) if this.drain.is_cut() => {
                    return this.cut(Cut::Shutdown, BodyError::ShuttingDown)
                }
                Phase::Open(upstream) => upstream,
                Phase::Cut(why) => {
                    // The ending went out with the last frame.
                    let outcome = why.outcome();
                    this.finish(outcome);
                    return Poll::Ready(None);
                }
                Phase::Ended => return Poll::Ready(None),
            };
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(out) = this.on_frame(frame) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "upstream answer broke off mid-body");
                    return this.cut(Cut::Upstream, BodyError::Upstream(e));
                }
                Poll::Ready(None) => return Poll::Ready(this.on_end().map(|b| Ok(Frame::data(b)))),
                Poll::Pending => {
                    if this.poll_drain(cx) {
                        return this.cut(Cut::Shutdown, BodyError::ShuttingDown);
                    }
                    return this.poll_silence(cx).map(|b| Some(Ok(Frame::data(b))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.phase, &self.keepalive, &self.reading) {
            (Phase::Open(upstream), None, Reading::Tail(_)) => upstream.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Dropping the upstream closes its connection; the netstack resets it.
        self.finish(Outcome::ClientDisconnected);
    }
}
