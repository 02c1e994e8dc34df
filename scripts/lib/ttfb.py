#!/usr/bin/env python3
"""Time to the first SSE event of a large streaming POST, each on a fresh HTTPS connection
(bench helper, stdlib only).

    ttfb.py HOST PORT COUNT --cafile PEM --sni NAME --path P --body-file F
                                                       key in env MG_KEY (never argv)

COUNT times: connect (Nagle off), TLS handshake, send the head and the body of F (e.g. a 403 KB
Cursor-shaped chat from tests/fixtures/cursor_requests.py), read until the first `data: ` of
the answer, close. Prints "p50_ms p99_ms p50_after_handshake_ms": from connect() to the first
event, and from the first byte of the request to the first event. Any status but 200 ends the
run with an error. Bounded by COUNT and a 120 s deadline.
"""

import argparse
import os
import socket
import ssl
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body-file", required=True)
    args = p.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read().rstrip(b"\n")
    head = ("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            "Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (args.path, args.sni, os.environ.get("MG_KEY", ""), len(body))).encode()
    request = head + body
    ctx = ssl.create_default_context(cafile=args.cafile)
    total, after = [], []
    deadline = time.monotonic() + 120
    for _ in range(args.count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        raw = socket.create_connection((args.host, args.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_hostname=args.sni)
        t1 = time.perf_counter()
        sock.sendall(request)
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("connection closed before the first event: %r" % buf[:200])
            buf += data
            if b"\r\n" in buf and not buf.startswith(b"HTTP/1.1 200"):
                raise SystemExit("unexpected status: %r" % buf.split(b"\r\n", 1)[0])
            if b"data: " in buf.split(b"\r\n\r\n", 1)[-1] and b"\r\n\r\n" in buf:
                break
        t2 = time.perf_counter()
        total.append((t2 - t0) * 1000)
        after.append((t2 - t1) * 1000)
        sock.close()
    total.sort()
    after.sort()
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]
    print("%.3f %.3f %.3f" % (q(total, 0.5), q(total, 0.99), q(after, 0.5)))


if __name__ == "__main__":
    sys.exit(main())
