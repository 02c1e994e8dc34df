//! The HTTP/1.1 the gateway speaks to model servers: the request written in one piece, the
//! response head parsed with `httparse`, the body decoded (`Content-Length`, chunked, or up to
//! the server's close) straight from the buffer the netstack filled.
//!
//! Why not hyper's client: its connection is a state machine of its own that hands each
//! request in and each answer's frame out through channels; run in a task of its own (hyper's
//! pooled client) that is a cross-task hop each way per request, and run inside the request's
//! task (tried twice, README, issue 14) it cost 1.15× the instructions per token event. Here
//! there is nothing between the netstack and the task that sends the answer to the client: the
//! driver wakes that task, which splits the chunk out of the received buffer and hands it on.
//!
//! What is accepted from a model server, and what is refused (the connection is then dropped,
//! never reused): a status line and at most [`MAX_HEADERS`] headers within [`MAX_HEAD`] bytes;
//! 1xx heads other than 101 are skipped; `Transfer-Encoding` whose last coding is `chunked` is
//! decoded (chunk extensions and trailers are read and ignored), any other coding is read to
//! the close; `Content-Length` must be one number (repeated equal values are accepted, like
//! hyper); neither means the body ends at the close. A connection is reused only after an
//! HTTP/1.1 answer without `Connection: close` was read to its end with nothing after it.

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Version};

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Most response headers accepted.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Largest request body copied into the head's buffer (one write, one segment when it fits);
/// a larger one is written after the head without the copy.
pub const INLINE_BODY: usize = 16 << 10;

/// What is wrong with a model server's answer (the connection is not reused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the model server sent a response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the model server sent a malformed response head ({0})")]
    BadHead(String),
    #[error("the model server answered with a protocol switch (101)")]
    Switching,
    #[error("the model server sent conflicting or invalid Content-Length headers")]
    BadLength,
    #[error("the model server sent a malformed chunk ({0})")]
    BadChunk(&'static str),
}

/// The request as it goes on the wire: `METHOD origin-form HTTP/1.1`, `Host` from the URI's
/// authority unless set, the request's headers, `Content-Length` (unless a GET or HEAD with no
/// body), and the body itself when it is at most [`INLINE_BODY`]. Returns the head (with the
/// inlined body) and the body still to write.
pub fn encode_request(req: &Request<Bytes>) -> (BytesMut, Bytes) {
    let body = req.body();
    let mut out = BytesMut::with_capacity(256 + body.len().min(INLINE_BODY));
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(
        req.uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !req.headers().contains_key(hyper::header::HOST) {
        if let Some(a) = req.uri().authority() {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(a.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in req.headers() {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD) && body.is_empty();
    if !bodiless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if body.len() <= INLINE_BODY {
        out.extend_from_slice(body);
        (out, Bytes::new())
    } else {
        (out, body.clone())
    }
}

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Up to the server's close.
    Close,
    /// Read to its end.
    Done,
    /// Malformed chunk framing found after data that was handed on: the next step fails.
    Invalid(&'static str),
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last (zero) chunk: trailer lines up to an empty one.
    Trailers,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once the body was read to its end.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`, consuming it: `Ok(None)` while incomplete.
/// 1xx heads (other than 101) are consumed and skipped.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, ProtocolError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let n = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(ProtocolError::HeadTooLarge);
                }
                return Ok(None);
            }
            Err(e) => return Err(ProtocolError::BadHead(e.to_string())),
        };
        if n > MAX_HEAD {
            return Err(ProtocolError::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| ProtocolError::BadHead(format!("status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProtocolError::Switching);
        }
        if status.is_informational() {
            buf.advance(n);
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        let map = response.headers_mut();
        map.reserve(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ProtocolError::BadHead(format!("header name {:?}", h.name)))?;
            let value = HeaderValue::from_bytes(h.value)
                .map_err(|_| ProtocolError::BadHead(format!("value of {name}")))?;
            map.append(name, value);
        }
        buf.advance(n);
        let framing = framing(&response, method)?;
        let close = has_token(&response, CONNECTION, "close");
        let keep_alive = version == Version::HTTP_11 && !close && framing != Framing::Close;
        return Ok(Some(Head {
            response,
            framing,
            keep_alive,
        }));
    }
}

/// True when a comma-separated header `name` lists `token` (case-insensitive).
fn has_token(r: &Response<()>, name: HeaderName, token: &str) -> bool {
    r.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// RFC 9112 §6.3: how the body of `r` (an answer to `method`) is delimited.
fn framing(r: &Response<()>, method: &Method) -> Result<Framing, ProtocolError> {
    let status = r.status();
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    let codings: Vec<&HeaderValue> = r.headers().get_all(TRANSFER_ENCODING).iter().collect();
    if !codings.is_empty() {
        let last = codings
            .last()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        });
    }
    let mut length: Option<u64> = None;
    for v in r.headers().get_all(CONTENT_LENGTH) {
        for part in v.to_str().map_err(|_| ProtocolError::BadLength)?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ProtocolError::BadLength);
            }
            let n: u64 = part.parse().map_err(|_| ProtocolError::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ProtocolError::BadLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// One step of body decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes (one chunk, or what arrived of it).
    Data(Bytes),
    /// `buf` holds no complete next piece: read more.
    NeedMore,
    /// The body ended (`Framing::Done`).
    End,
}

/// Takes the next piece of the body out of `buf`, advancing `framing`. Chunk framing (sizes, CRLFs, trailers) is consumed as far as `buf`
/// allows, so that after the last data the state says whether the body ended.
pub fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
    loop {
        match framing {
            Framing::Done => return Ok(Decoded::End),
            Framing::Invalid(why) => return Err(ProtocolError::BadChunk(why)),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *framing = Framing::Done;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                return Ok(Decoded::Data(buf.split().freeze()));
            }
            Framing::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *framing = Framing::Chunked(Chunk::DataEnd);
                    // Consume what follows the data while it is here: after a stream's last
                    // event the state then already says whether the body ended. Malformed
                    // framing there fails the next step, not this chunk's data.
                    if let Err(ProtocolError::BadChunk(why)) = skip_framing(framing, buf) {
                        *framing = Framing::Invalid(why);
                    }
                }
                return Ok(Decoded::Data(data));
            }
            Framing::Chunked(_) => {
                let before = *framing;
                skip_framing(framing, buf)?;
                if *framing == before {
                    return Ok(Decoded::NeedMore);
                }
            }
        }
    }
}

/// Consumes chunk framing (CRLF after data, size lines, trailers) from `buf` until data or the
/// end is next, or `buf` runs out.
fn skip_framing(framing: &mut Framing, buf: &mut BytesMut) -> Result<(), ProtocolError> {
    loop {
        match framing {
            Framing::Chunked(Chunk::DataEnd) => {
                if buf.len() < 2 {
                    return Ok(());
                }
                if &buf[..2] != b"\r\n" {
                    return Err(ProtocolError::BadChunk("no CRLF after the chunk's data"));
                }
                buf.advance(2);
                *framing = Framing::Chunked(Chunk::Size);
            }
            Framing::Chunked(Chunk::Size) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(());
                };
                let size = chunk_size(&line)?;
                *framing = if size == 0 {
                    Framing::Chunked(Chunk::Trailers)
                } else {
                    Framing::Chunked(Chunk::Data(size))
                };
            }
            Framing::Chunked(Chunk::Trailers) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(());
                };
                if line.is_empty() {
                    *framing = Framing::Done;
                }
            }
            _ => return Ok(()),
        }
    }
}

/// The next CRLF-terminated line of `buf` (without the CRLF), consumed; `None` while
/// incomplete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(ProtocolError::BadChunk("a line not ended by CRLF"));
            }
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(ProtocolError::BadChunk("a line too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then optional whitespace and `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ProtocolError::BadChunk("no chunk size"));
    }
    if digits > 15 {
        return Err(ProtocolError::BadChunk("chunk size too large"));
    }
    let rest = &line[digits..];
    let rest_ok = rest
        .iter()
        .position(|&b| b == b';')
        .map_or(rest, |i| &rest[..i])
        .iter()
        .all(|&b| b == b' ' || b == b'\t');
    if !rest_ok {
        return Err(ProtocolError::BadChunk("junk after the chunk size"));
    }
    let s = std::str::from_utf8(&line[..digits]).map_err(|_| ProtocolError::BadChunk("size"))?;
    u64::from_str_radix(s, 16).map_err(|_| ProtocolError::BadChunk("size"))
}

#[cfg(test)]
mod tests;
