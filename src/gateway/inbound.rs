//! Reading a client's request body: bounded in bytes (`max_body_bytes`), in time
//! (`body_read_timeout`, extended by one second per `body_min_rate` bytes that arrive) and, after
//! an answer given before the body was read (401, 403, 413…), drained for a little while so
//! the client can read that answer.
//!
//! Why the drain: over HTTP/2 an answer that ends while the request body is still open ends
//! with RST_STREAM(NO_ERROR), and curl 7.88 (Debian 12) then often reports "(92) Stream error in
//! the HTTP/2 framing layer" instead of the status; over HTTP/1.1 the connection could not be
//! reused. Reading (and discarding) a small rest of the body first lets the stream end
//! normally. A body that is larger or slower than the drain allows is then cut, as before.
//!
//! Must never: buffer more than `max_body_bytes`, wait for a stalled body past its deadline,
//! or keep what it drains.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::error::ApiError;
use crate::config::GatewayConfig;

/// Most bytes read and thrown away after an early answer.
pub const DRAIN_MAX_BYTES: u64 = 1 << 20;
/// Longest time spent draining after an early answer.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);
/// Most bytes reserved up front from a `Content-Length` (a larger body grows as it arrives,
/// so a header alone never reserves memory).
const MAX_PREALLOC: usize = 1 << 20;

/// How much of a body the gateway takes, and how fast it must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// Time for the whole body, before the extension for bytes received.
    pub timeout: Duration,
    /// Bytes per second that earn one more second (0: none).
    pub min_rate: usize,
}

impl BodyLimits {
    pub fn of(s: &GatewayConfig) -> BodyLimits {
        BodyLimits {
            max_bytes: s.max_body_bytes,
            timeout: s.body_read_timeout,
            min_rate: s.body_min_rate,
        }
    }

    /// When a body that started at `start` and brought `received` bytes so far must be done.
    fn deadline(&self, start: Instant, received: u64) -> Instant {
        let earned = match self.min_rate {
            0 => Duration::ZERO,
            r => Duration::from_millis(received.saturating_mul(1000) / r as u64),
        };
        start + self.timeout + earned
    }
}

/// The request's `Content-Length`, when it has one that parses.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The whole body of a request with `headers`: 413 over `limits.max_bytes` (a
/// `Content-Length` over it is refused unread; either way what follows is drained, see
/// [`drain_in_background`]), 408 when it does not arrive in time.
pub async fn read(headers: &HeaderMap, body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge(limits.max_bytes as u64);
    let content_length = content_length(headers);
    if content_length.is_some_and(|n| n > limits.max_bytes as u64) {
        drain_in_background(headers, body, limits);
        return Err(too_large);
    }
    let start = Instant::now();
    let mut body = body;
    let sleep = tokio::time::sleep_until(limits.deadline(start, 0));
    tokio::pin!(sleep);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut received: u64 = 0;
    loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            _ = &mut sleep => return Err(ApiError::RequestTimeout(limits.timeout, limits.min_rate)),
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => {
                return Err(ApiError::BadRequest(
                    "could not read the request body".into(),
                ))
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers
            },
        };
        received += data.len() as u64;
        if received > limits.max_bytes as u64 {
            drain_in_background(headers, body, limits);
            return Err(too_large);
        }
        if limits.min_rate > 0 && !data.is_empty() {
            sleep.as_mut().reset(limits.deadline(start, received));
        }
        match (&first, &mut rest) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let want = content_length.unwrap_or(0).min(MAX_PREALLOC as u64) as usize;
                let mut b = BytesMut::with_capacity(want.max(f.len() + data.len()));
                b.extend_from_slice(f);
                b.extend_from_slice(&data);
                first = None;
                rest = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// After an answer given before the body was read: reads and discards what is left of `body`
/// in a task of its own, for at most [`DRAIN_MAX_BYTES`] and [`DRAIN_MAX_TIME`] (and never
/// past the body's own deadline), so the answer's stream or connection ends normally. A client
/// that waits for `100 Continue` never sent its body: nothing to drain.
pub fn drain_in_background(headers: &HeaderMap, body: Body, limits: BodyLimits) {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || body_is_done(&body) {
        return;
    }
    tokio::spawn(drain(body, limits));
}

fn body_is_done(body: &Body) -> bool {
    http_body::Body::is_end_stream(body)
}

async fn drain(mut body: Body, limits: BodyLimits) {
    let start = Instant::now();
    let until = (start + DRAIN_MAX_TIME).min(limits.deadline(start, 0));
    let mut left = DRAIN_MAX_BYTES.min(limits.max_bytes as u64);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, body.frame()).await {
        if let Ok(d) = frame.into_data() {
            match left.checked_sub(d.len() as u64) {
                Some(l) => left = l,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn limits(timeout_ms: u64, min_rate: usize) -> BodyLimits {
        BodyLimits {
            max_bytes: 1000,
            timeout: Duration::from_millis(timeout_ms),
            min_rate,
        }
    }

    fn length(n: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, n.into());
        h
    }

    /// A body whose chunks arrive `gap` apart, then end (or stall forever with `stall`).
    fn paced(chunks: Vec<&'static [u8]>, gap: Duration, stall: bool) -> Body {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for c in chunks {
                tokio::time::sleep(gap).await;
                if tx.send(Bytes::from_static(c)).await.is_err() {
                    return;
                }
            }
            if stall {
                // Keeps the sender, so the body never ends.
                let _tx = tx;
                std::future::pending::<()>().await;
            }
        });
        Body::new(Channel(rx))
    }

    /// A body fed by a channel: data frames until the sender goes away.
    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Channel {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_pieces_is_collected_whole() {
        let b = paced(
            vec![b"{\"a\":", b"1", b"}"],
            Duration::from_millis(10),
            false,
        );
        let got = read(&length(7), b, limits(1000, 0)).await.unwrap();
        assert_eq!(&got[..], b"{\"a\":1}");
        let got = read(&HeaderMap::new(), Body::from("x"), limits(1000, 0))
            .await
            .unwrap();
        assert_eq!(&got[..], b"x");
        let got = read(&HeaderMap::new(), Body::empty(), limits(1000, 0))
            .await
            .unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_408_at_its_deadline() {
        let t = Instant::now();
        let b = paced(vec![b"abc"], Duration::from_millis(10), true);
        let e = read(&length(100), b, limits(2000, 0)).await.unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout(..)), "{e:?}");
        assert_eq!(e.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(t.elapsed(), Duration::from_millis(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_earn_time_but_a_trickle_still_times_out() {
        // 10 bytes per second earn 1 s per 10 bytes: a body of 5 × 10 bytes, 900 ms apart,
        // always stays ahead of its deadline (1 s + 1 s per chunk).
        let b = paced(vec![b"0123456789"; 5], Duration::from_millis(900), false);
        assert_eq!(
            read(&HeaderMap::new(), b, limits(1000, 10))
                .await
                .unwrap()
                .len(),
            50
        );
        // 1 byte every 500 ms earns only 100 ms each: behind after about 1.25 s.
        let t = Instant::now();
        let b = paced(vec![b"x"; 20], Duration::from_millis(500), false);
        let e = read(&HeaderMap::new(), b, limits(1000, 10))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout(..)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_limit_is_413_with_or_without_a_length() {
        let e = read(&length(1001), Body::from("x"), limits(1000, 0))
            .await
            .unwrap_err();
        assert_eq!(e, ApiError::PayloadTooLarge(1000));
        let big: &'static [u8] = &[b'x'; 600];
        let b = paced(vec![big, big], Duration::from_millis(1), true);
        let e = read(&HeaderMap::new(), b, limits(1000, 0))
            .await
            .unwrap_err();
        assert_eq!(e, ApiError::PayloadTooLarge(1000));
    }
}
