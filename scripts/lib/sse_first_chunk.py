#!/usr/bin/env python3
"""Time to the first SSE event over one keep-alive connection (bench helper, stdlib only).

    sse_first_chunk.py HOST PORT COUNT

Sends COUNT sequential `GET /stream?n=2&delay_ms=5` requests to tests/netns/model_server.py on
one connection (Nagle off) and prints "p50_ms p99_ms" of the time from sending a request to
receiving its first event. The loop is bounded by COUNT and a 60 s deadline.
"""

import socket
import sys
import time

REQUEST = b"GET /stream?n=2&delay_ms=5 HTTP/1.1\r\nHost: model\r\n\r\n"
FIRST = b"data: chunk 0"
END = b"\r\n0\r\n\r\n"


def main():
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        buf = b""
        t0 = time.perf_counter()
        sock.sendall(REQUEST)
        first = None
        while not buf.endswith(END):
            data = sock.recv(65536)
            if not data:
                raise SystemExit("connection closed mid-response")
            buf += data
            if first is None and FIRST in buf:
                first = time.perf_counter() - t0
        samples.append(first * 1000)
    samples.sort()
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    print("%.3f %.3f" % (p(0.50), p(0.99)))


if __name__ == "__main__":
    main()
