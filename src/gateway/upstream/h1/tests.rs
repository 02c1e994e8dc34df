use super::*;

fn head_of(raw: &[u8], method: &Method) -> Result<Option<Head>, ProtocolError> {
    let mut buf = BytesMut::from(raw);
    parse_head(&mut buf, method)
}

/// Decodes `wire` fed in pieces of `step` bytes; the data and whether the body ended.
fn decode_all(
    mut framing: Framing,
    wire: &[u8],
    step: usize,
) -> Result<(Vec<u8>, bool), ProtocolError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match decode(&mut framing, &mut buf)? {
            Decoded::Data(d) => out.extend_from_slice(&d),
            Decoded::End => return Ok((out, true)),
            Decoded::NeedMore => {
                if fed == wire.len() {
                    return Ok((out, false));
                }
                let n = step.min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
        }
    }
}

#[test]
fn the_request_goes_out_in_origin_form_with_host_and_length() {
    let req = Request::post("http://10.20.0.5:8000/v1/chat/completions?x=1")
        .header("content-type", "application/json")
        .header("authorization", "Bearer up")
        .body(Bytes::from_static(b"{\"a\":1}"))
        .unwrap();
    let (head, rest) = encode_request(&req);
    assert_eq!(
        &head[..],
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 10.20.0.5:8000\r\ncontent-type: application/json\r\nauthorization: Bearer up\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
    );
    assert!(rest.is_empty(), "a small body is inlined");

    let get = Request::get("http://10.20.0.5:8000/v1/models")
        .body(Bytes::new())
        .unwrap();
    let (head, _) = encode_request(&get);
    assert_eq!(
        &head[..],
        b"GET /v1/models HTTP/1.1\r\nhost: 10.20.0.5:8000\r\n\r\n"
    );

    let big = Bytes::from(vec![b'x'; INLINE_BODY + 1]);
    let req = Request::post("http://10.20.0.5:8000/v1/x")
        .body(big.clone())
        .unwrap();
    let (head, rest) = encode_request(&req);
    assert!(head.ends_with(format!("content-length: {}\r\n\r\n", big.len()).as_bytes()));
    assert_eq!(
        rest, big,
        "a large body is written after the head, not copied"
    );
}

#[test]
fn heads_give_status_headers_framing_and_keep_alive() {
    let h = head_of(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.response.status(), 200);
    assert_eq!(h.response.headers()["content-type"], "text/event-stream");
    assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
    assert!(h.keep_alive);

    let h = head_of(
        b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, Framing::Length(12));

    let h = head_of(
        b"HTTP/1.1 400 Bad Request\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, Framing::Done);
    assert!(!h.keep_alive, "Connection: close is honoured");

    let h = head_of(
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert!(!h.keep_alive, "HTTP/1.0 answers are not reused");

    let h = head_of(b"HTTP/1.1 200 OK\r\n\r\n", &Method::POST)
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Close);
    assert!(
        !h.keep_alive,
        "a body delimited by the close ends the connection"
    );

    let h = head_of(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, Framing::Close);

    let h = head_of(
        b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n",
        &Method::HEAD,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, Framing::Done, "a HEAD answer has no body");

    let h = head_of(b"HTTP/1.1 204 No Content\r\n\r\n", &Method::POST)
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Done);
}

#[test]
fn informational_heads_are_skipped_and_partial_heads_wait() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"[..],
    );
    let h = parse_head(&mut buf, &Method::POST).unwrap().unwrap();
    assert_eq!(h.response.status(), 200);
    assert_eq!(&buf[..], b"hi", "the head is consumed, the body is left");

    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
    assert!(parse_head(&mut buf, &Method::POST).unwrap().is_none());
    assert_eq!(buf.len(), 27, "nothing consumed while incomplete");
}

#[test]
fn bad_heads_are_refused_with_a_reason() {
    let cases: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTQ/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ];
    for raw in cases {
        assert!(
            head_of(raw, &Method::POST).is_err(),
            "{:?} must be refused",
            String::from_utf8_lossy(raw)
        );
    }
    let equal = head_of(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3, 3\r\n\r\n",
        &Method::POST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        equal.framing,
        Framing::Length(3),
        "repeated equal lengths are one length"
    );

    let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
    while huge.len() <= MAX_HEAD {
        huge.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let e = head_of(&huge, &Method::POST).unwrap_err();
    assert!(
        matches!(e, ProtocolError::HeadTooLarge | ProtocolError::BadHead(_)),
        "{e:?}"
    );
    let mut partial_huge = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
    partial_huge.resize(MAX_HEAD + 10, b'a');
    assert_eq!(
        head_of(&partial_huge, &Method::POST).unwrap_err(),
        ProtocolError::HeadTooLarge
    );
}

#[test]
fn chunked_bodies_decode_in_any_split() {
    let wire = b"7\r\ndata: 1\r\n10;ext=1\r\ndata: {\"x\":22}\n\n\r\n0\r\nx-trailer: t\r\n\r\n";
    for step in [1, 2, 3, 5, 7, 64, wire.len()] {
        let (data, ended) = decode_all(Framing::Chunked(Chunk::Size), wire, step).unwrap();
        assert_eq!(data, b"data: 1data: {\"x\":22}\n\n", "step {step}");
        assert!(ended, "step {step}");
    }
    // Cut short: not ended, what arrived is handed on.
    let (data, ended) = decode_all(Framing::Chunked(Chunk::Size), &wire[..12], 4).unwrap();
    assert_eq!(data, b"data: 1");
    assert!(!ended);
}

#[test]
fn the_end_of_a_stream_is_known_with_its_last_chunk() {
    // The last event and the terminating chunk in one segment: after the data the state is
    // already Done, so the connection can go back to the pool with that frame.
    let mut framing = Framing::Chunked(Chunk::Size);
    let mut buf = BytesMut::from(&b"5\r\nhello\r\n0\r\n\r\n"[..]);
    assert_eq!(
        decode(&mut framing, &mut buf).unwrap(),
        Decoded::Data(Bytes::from_static(b"hello"))
    );
    assert_eq!(framing, Framing::Done);
    assert!(buf.is_empty());
}

#[test]
fn malformed_chunks_are_refused() {
    let cases: &[&[u8]] = &[
        b"zz\r\nab\r\n",
        b"2\r\nabXY",
        b"2\nab\r\n",
        b"2 junk\r\nab\r\n",
        b"ffffffffffffffff\r\n",
        b"-1\r\n",
    ];
    for wire in cases {
        assert!(
            decode_all(Framing::Chunked(Chunk::Size), wire, 64).is_err(),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
    }
    let long = vec![b'1'; MAX_LINE + 2];
    assert!(decode_all(Framing::Chunked(Chunk::Size), &long, 1 << 20).is_err());
}

#[test]
fn length_and_close_bodies() {
    let (data, ended) = decode_all(Framing::Length(5), b"hello", 2).unwrap();
    assert_eq!((data.as_slice(), ended), (&b"hello"[..], true));
    // Bytes after the length stay in the buffer (the pool then refuses the connection).
    let mut framing = Framing::Length(2);
    let mut buf = BytesMut::from(&b"hiEXTRA"[..]);
    assert_eq!(
        decode(&mut framing, &mut buf).unwrap(),
        Decoded::Data(Bytes::from_static(b"hi"))
    );
    assert_eq!(framing, Framing::Done);
    assert_eq!(&buf[..], b"EXTRA");
    let (data, ended) = decode_all(Framing::Close, b"until the end", 4).unwrap();
    assert_eq!(data, b"until the end");
    assert!(!ended, "only the close ends it");
}

#[test]
fn data_before_malformed_framing_is_handed_on_then_the_body_fails() {
    let mut framing = Framing::Chunked(Chunk::Size);
    let mut buf = BytesMut::from(&b"2\r\nok\r\nzz\r\n"[..]);
    assert_eq!(
        decode(&mut framing, &mut buf).unwrap(),
        Decoded::Data(Bytes::from_static(b"ok"))
    );
    assert_eq!(
        decode(&mut framing, &mut buf).unwrap_err(),
        ProtocolError::BadChunk("no chunk size")
    );
    assert!(decode(&mut framing, &mut buf).is_err(), "and stays failed");
}
