//! Raw clients for hostile requests against a [`Stack`]: bytes written as they are over TLS
//! (HTTP/1.1 without a well-behaved client in between), and HTTP/2 frame by frame. A response
//! is read only as far as the tests need it (status, head, body), each read bounded in time.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::harness::Stack;

/// A TLS connection to the stack offering `alpn` (empty: none, so HTTP/1.1).
pub async fn tls(stack: &Stack, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut cfg = (*stack.tls.client).clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(stack.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// What came back on an HTTP/1.1 connection.
#[derive(Debug, Default)]
pub struct H1Reply {
    /// The first response's status, if a complete head arrived.
    pub status: Option<u16>,
    pub head: String,
    pub body: String,
    /// The server closed the connection (EOF or reset) within the wait.
    pub closed: bool,
    /// ... cleanly: TLS close_notify and EOF, not a reset or a truncated TLS stream.
    pub clean_close: bool,
}

/// Writes `bytes` on a fresh HTTP/1.1 connection and reads the first response (head, and a
/// body by Content-Length or chunked), then whether the server closes within `wait`.
pub async fn h1(stack: &Stack, bytes: &[u8], wait: Duration) -> H1Reply {
    let mut io = tls(stack, &[]).await;
    // A server that closes while we still write: what it answered may still be readable.
    let _ = io.write_all(bytes).await;
    read_h1(&mut io, wait).await
}

/// Reads one response from `io` as [`h1`] does.
pub async fn read_h1(io: &mut TlsStream<TcpStream>, wait: Duration) -> H1Reply {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut reply = H1Reply::default();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            if reply.status.is_none() {
                reply.head = String::from_utf8_lossy(&buf[..end]).into_owned();
                reply.status = reply
                    .head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok());
            }
            let body = &buf[end + 4..];
            if body_complete(&reply.head, body) {
                reply.body = decode_body(&reply.head, body);
                break;
            }
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                reply.closed = true;
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    reply.body = decode_body(&reply.head, &buf[end + 4..]);
                }
                return reply;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return reply,
        }
    }
    // The response is in: does the server close the connection now, and how?
    let end = tokio::time::timeout_at(deadline, io.read(&mut chunk)).await;
    reply.closed = matches!(end, Ok(Ok(0)) | Ok(Err(_)));
    reply.clean_close = matches!(end, Ok(Ok(0)));
    reply
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body_complete(head: &str, body: &[u8]) -> bool {
    if let Some(n) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return find(body, b"0\r\n\r\n").is_some_and(|i| i == 0 || body[..i].ends_with(b"\r\n"));
    }
    // No framing: a head-only answer (1xx, 204, 304) or read to EOF.
    head.starts_with("HTTP/1.1 1") || head.contains(" 204 ") || head.contains(" 304 ")
}

fn decode_body(head: &str, body: &[u8]) -> String {
    if !header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return String::from_utf8_lossy(body).into_owned();
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eol) = find(rest, b"\r\n") {
        let Ok(n) = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
        rest = &rest[(eol + 4 + n).min(rest.len())..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP/2 frame types and flags the tests use (RFC 9113 §6).
pub mod frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
}

/// One frame the server sent.
#[derive(Debug, Clone)]
pub struct Frame {
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.ty {
            frame::RST_STREAM => 0,
            frame::GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The `:status` of a HEADERS frame whose block starts with it (as hyper writes it).
    pub fn status(&self) -> Option<u16> {
        (self.ty == frame::HEADERS).then(|| hpack_status(&self.payload))?
    }
}

/// An HTTP/2 connection driven frame by frame.
pub struct H2Raw {
    pub io: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl H2Raw {
    /// A connection that negotiated `h2`, with the preface and an empty SETTINGS sent.
    pub async fn open(stack: &Stack) -> H2Raw {
        let io = tls(stack, &[b"h2"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut c = H2Raw {
            io,
            buf: BytesMut::new(),
        };
        c.io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        c.send(frame::SETTINGS, 0, 0, &[]).await;
        // The server's SETTINGS (acknowledged) and the connection window it opens: a body sent
        // before would overflow the initial 65,535-byte window.
        while let Some(f) = c.next(Duration::from_secs(2)).await {
            if f.ty == frame::SETTINGS && f.flags & frame::ACK == 0 {
                c.send(frame::SETTINGS, frame::ACK, 0, &[]).await;
            }
            if f.ty == frame::WINDOW_UPDATE && f.stream == 0 {
                break;
            }
        }
        c
    }

    /// Writes one frame (errors ignored: the server may have closed already).
    pub async fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) -> bool {
        let mut f = BytesMut::with_capacity(9 + payload.len());
        f.put_uint(payload.len() as u64, 3);
        f.put_u8(ty);
        f.put_u8(flags);
        f.put_u32(stream & 0x7fff_ffff);
        f.put_slice(payload);
        self.io.write_all(&f).await.is_ok() && self.io.flush().await.is_ok()
    }

    /// A request's HEADERS frame (`END_HEADERS`, and `END_STREAM` when `end`).
    pub async fn request(&mut self, stream: u32, fields: &[(&str, &str)], end: bool) -> bool {
        let block = hpack_literals(fields);
        // Split at the default SETTINGS_MAX_FRAME_SIZE: HEADERS, then CONTINUATION frames.
        let pieces: Vec<&[u8]> = block.chunks(16_384).collect();
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let (ty, mut flags) = if i == 0 {
                (frame::HEADERS, if end { frame::END_STREAM } else { 0 })
            } else {
                (frame::CONTINUATION, 0)
            };
            if i == last {
                flags |= frame::END_HEADERS;
            }
            if !self.send(ty, flags, stream, piece).await {
                return false;
            }
        }
        true
    }

    /// The next frame, or `None` at EOF, on an error or after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = self.buf.split_to(9 + len);
                    return Some(Frame {
                        ty: f[3],
                        flags: f[4],
                        stream: u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff,
                        payload: f[9..].to_vec(),
                    });
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Frames until `stop` says so (that frame included), EOF or `wait`; whether the
    /// connection ended (EOF) is the second value.
    pub async fn until(
        &mut self,
        wait: Duration,
        mut stop: impl FnMut(&Frame) -> bool,
    ) -> (Vec<Frame>, bool) {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (out, false);
            }
            match self.next(left).await {
                Some(f) => {
                    let done = stop(&f);
                    out.push(f);
                    if done {
                        return (out, false);
                    }
                }
                None => return (out, Instant::now() < deadline),
            }
        }
    }
}

/// An HPACK block of literal fields without indexing, new names (RFC 7541 §6.2.2).
pub fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        out.push(0x00);
        hpack_string(&mut out, k.as_bytes());
        hpack_string(&mut out, v.as_bytes());
    }
    out
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// The `:status` at the start of a response header block: an indexed static entry (200, 204,
/// 206, 304, 400, 404, 500) or a literal with the static name `:status` (index 8) and a
/// value of three digits, raw or Huffman-coded (the digits' codes, RFC 7541 Appendix B).
fn hpack_status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    let statics = [200, 204, 206, 304, 400, 404, 500];
    if (0x88..=0x8e).contains(&first) {
        return Some(statics[(first - 0x88) as usize]);
    }
    // Literal with indexing (01xxxxxx), without (0000xxxx) or never indexed (0001xxxx), name 8.
    let name = match first {
        0x48 => 8,
        0x08 | 0x18 => first & 0x0f,
        _ => return None,
    };
    if name != 8 {
        return None;
    }
    let len_byte = *block.get(1)?;
    let (huffman, len) = (len_byte & 0x80 != 0, (len_byte & 0x7f) as usize);
    let value = block.get(2..2 + len)?;
    let digits = if huffman {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let mut bits: Vec<bool> = Vec::new();
    for b in bytes {
        for i in (0..8).rev() {
            bits.push(b >> i & 1 == 1);
        }
    }
    let mut out = String::new();
    let mut i = 0;
    let code = |from: usize, n: usize| {
        bits[from..from + n]
            .iter()
            .fold(0u32, |acc, &b| acc << 1 | b as u32)
    };
    while i + 5 <= bits.len() {
        let c5 = code(i, 5);
        if c5 <= 2 {
            out.push((b'0' + c5 as u8) as char);
            i += 5;
            continue;
        }
        if i + 6 > bits.len() {
            break;
        }
        let c6 = code(i, 6);
        if (0x19..=0x1f).contains(&c6) {
            out.push((b'3' + (c6 - 0x19) as u8) as char);
            i += 6;
            continue;
        }
        break; // padding (all ones) or not a digit
    }
    (out.len() == 3).then_some(out)
}
