#!/usr/bin/env python3
"""Splits sequential requests' latency at the edge into its hops, from a packet capture (bench
helper, stdlib only).

    hops.py CAPTURE.txt

CAPTURE.txt is `tcpdump -r FILE -n -tt -q` of a capture taken in the edge namespace on every
interface (`-i any`, filter `tcp port 443 or udp`) while scripts/lib/sse_first_chunk.py sent its
sequential requests: TLS to and from the client on port 443, WireGuard (UDP) to and from the
corp side. For each request it finds, in order:

    a  the client's first TLS payload packet (request in)
    b  the edge's first WireGuard data packet after a (request out, encrypted)
    c  the first WireGuard data packet back after b (the answer's first bytes in)
    d  the edge's first TLS payload packet to the client after c (the answer out)

and prints one line per hop with p50/p90/p99 in µs: inbound (b-a: TLS, HTTP, auth and
everything up to the tunnel), beyond (c-b: the corp side's WireGuard, its network, the model),
outbound (d-c: tunnel, HTTP and TLS back) and edge (inbound + outbound: the appliance's own share).
Both paths of bench-gateway.sh share the corp side and the model, so `beyond` should agree
between them; a difference in `edge` is the appliance's. WireGuard packets of 128 bytes or less
(keepalives, pure TCP ACKs inside the tunnel) are not data; an exchange the edge answers before
the tunnel carries anything (the TLS handshake) is not a request. Bounded by the file.
"""

import re
import sys

from stages import pct

LINE = re.compile(
    r"^(\d+\.\d+) .*?IP (\S+)\.(\d+) > (\S+)\.(\d+): (?:tcp (\d+)|UDP, length (\d+))")
MIN_WG_DATA = 129


def parse(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            t = float(m.group(1))
            sport, dport = int(m.group(3)), int(m.group(5))
            if m.group(6) is not None:
                n = int(m.group(6))
                if n == 0:
                    continue
                if dport == 443:
                    out.append((t, "tls_in"))
                elif sport == 443:
                    out.append((t, "tls_out"))
            else:
                n = int(m.group(7))
                if n < MIN_WG_DATA:
                    continue
                # The edge's own address faces the client on 443; WireGuard out = from the edge.
                out.append((t, "wg", m.group(2), m.group(4)))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pkts = parse(sys.argv[1])
    # The edge's WireGuard address: the source of the first data datagram after a request.
    hops = {"inbound": [], "beyond": [], "outbound": [], "edge": []}
    state, a, b, c, edge_ip = "idle", 0.0, 0.0, 0.0, None
    for p in pkts:
        t, kind = p[0], p[1]
        if state == "idle":
            if kind == "tls_in":
                state, a = "req", t
        elif state == "req":
            if kind == "tls_out":
                # The edge answered before the tunnel carried anything: a TLS handshake.
                state = "idle"
            elif kind == "wg":
                if edge_ip is None:
                    edge_ip = p[2]
                if p[2] == edge_ip:
                    state, b = "sent", t
        elif state == "sent":
            if kind == "wg" and p[3] == edge_ip:
                state, c = "back", t
        elif state == "back":
            if kind == "tls_out":
                hops["inbound"].append((b - a) * 1e6)
                hops["beyond"].append((c - b) * 1e6)
                hops["outbound"].append((t - c) * 1e6)
                hops["edge"].append((b - a + t - c) * 1e6)
                state = "wait"
        elif state == "wait":
            # The rest of this answer (more events, the end); the next request starts a cycle.
            if kind == "tls_in":
                state, a = "req", t
    n = len(hops["edge"])
    print("requests %d" % n)
    for k in ("inbound", "beyond", "outbound", "edge"):
        xs = sorted(hops[k])
        print("%-8s p50 %7.0f  p90 %7.0f  p99 %7.0f µs" % (
            k, pct(xs, 0.50), pct(xs, 0.90), pct(xs, 0.99)))


if __name__ == "__main__":
    main()
