#!/usr/bin/env python3
"""A small HTTP/1.1 model stand-in for the namespace lab (stdlib only).

    model_server.py ADDR PORT

GET /hello                      200, a short text body (Content-Length, keep-alive)
GET /bytes/N                    200, N bytes of the pattern (i * 7 + 3) % 251 (Content-Length)
GET /stream?n=N&delay_ms=D      200, chunked, N SSE events "data: chunk I\\n\\n", each flushed,
                                D ms apart (the first is sent at once)

Nagle is off on every connection (without TCP_NODELAY a keep-alive request stalls 40 ms)
and each chunk is flushed, so a streamed response leaves chunk by chunk.
"""

import socket
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_BYTES = 64 * 1024 * 1024
MAX_CHUNKS = 1000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # client address first: tests check the masquerade
        sys.stderr.write("model: %s %s\n" % (self.client_address[0], fmt % args))

    def _send(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/hello":
            self._send(200, b"hello from the model\n")
        elif url.path.startswith("/bytes/"):
            try:
                n = int(url.path[len("/bytes/"):])
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_BYTES:
                self._send(400, b"bad length\n")
                return
            pattern = bytes((i * 7 + 3) % 251 for i in range(251 * 7))
            body = (pattern * (n // len(pattern) + 1))[:n]
            self._send(200, body, "application/octet-stream")
        elif url.path == "/stream":
            q = parse_qs(url.query)
            n = min(int(q.get("n", ["5"])[0]), MAX_CHUNKS)
            delay = int(q.get("delay_ms", ["200"])[0]) / 1000.0
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for i in range(n):
                if i:
                    time.sleep(delay)
                event = ("data: chunk %d\n\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        else:
            self._send(404, b"not found\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that hangs for seconds in
        # a namespace without a resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def main():
    addr, port = sys.argv[1], int(sys.argv[2])
    srv = Server((addr, port), Handler)
    print("model server listening on %s:%d" % (addr, port), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
