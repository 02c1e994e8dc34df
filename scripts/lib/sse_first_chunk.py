#!/usr/bin/env python3
"""Time to the first SSE event over one keep-alive connection (bench helper, stdlib only).

    sse_first_chunk.py HOST PORT COUNT
    sse_first_chunk.py HOST PORT COUNT --tls CAFILE --sni NAME --post PATH --body JSON
                       [--header 'Name: value']...

Sends COUNT sequential requests on one connection (Nagle off) and prints "p50_ms p99_ms" of the
time from sending a request to receiving its first event. Without options each request is
`GET /stream?n=2&delay_ms=5` to tests/python/model_server.py over plain HTTP; with --post it is a
POST of JSON (e.g. a streaming chat completion) and with --tls the connection is HTTPS, verified
against CAFILE for NAME. Any status but 200 ends the run with an error. The loop is bounded by
COUNT and a 60 s deadline.
"""

import argparse
import socket
import ssl
import sys
import time

GET_REQUEST = b"GET /stream?n=2&delay_ms=5 HTTP/1.1\r\nHost: model\r\n\r\n"
FIRST = b"data: "
END = b"\r\n0\r\n\r\n"


def build_request(args):
    if not args.post:
        return GET_REQUEST
    body = args.body.encode()
    head = ["POST %s HTTP/1.1" % args.post, "Host: %s" % (args.sni or args.host),
            "Content-Type: application/json", "Accept: text/event-stream",
            "Content-Length: %d" % len(body)] + args.header
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--tls", metavar="CAFILE")
    p.add_argument("--sni")
    p.add_argument("--post", metavar="PATH")
    p.add_argument("--body", default="{}")
    p.add_argument("--header", action="append", default=[])
    args = p.parse_args()

    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.tls)
        sock = ctx.wrap_socket(sock, server_hostname=args.sni or args.host)
    request = build_request(args)
    samples = []
    deadline = time.monotonic() + 60
    for _ in range(args.count):
        if time.monotonic() > deadline:
            break
        buf = b""
        t0 = time.perf_counter()
        sock.sendall(request)
        first = None
        while not buf.endswith(END):
            data = sock.recv(65536)
            if not data:
                raise SystemExit("connection closed mid-response")
            buf += data
            if not buf.startswith(b"HTTP/1.1 200"):
                if b"\r\n" in buf:
                    raise SystemExit("unexpected status: %r" % buf.split(b"\r\n", 1)[0])
                continue
            if first is None and FIRST in buf.split(b"\r\n\r\n", 1)[-1]:
                first = time.perf_counter() - t0
        samples.append(first * 1000)
    samples.sort()
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    print("%.3f %.3f" % (p(0.50), p(0.99)))


if __name__ == "__main__":
    sys.exit(main())
