#!/usr/bin/env python3
"""Holds many concurrent slow SSE streams open through an HTTPS gateway (bench helper, stdlib,
asyncio).

    sse_hold.py HOST PORT --cafile PEM --sni NAME --path P --body JSON --streams N
                [--ramp-per-s R] [--deadline-s S]          key in env MG_KEY (never argv)

Opens N HTTPS connections (R new ones per second), POSTs BODY on each (a streaming chat
completion) and reads every stream to `data: [DONE]` and the end of the chunked body. Prints one
JSON line: {"streams","ok","non200","broken","connect_errors","events","first_event_p50_ms",
"duration_p50_s","duration_max_s","ramp_s","peak_open"} where "broken" counts streams that ended
(EOF, reset, timeout) before [DONE]. Everything is bounded by --deadline-s.
"""

import argparse
import asyncio
import json
import os
import resource
import ssl
import sys
import time

DONE = b"data: [DONE]"
END = b"\r\n0\r\n\r\n"


class Stats:
    def __init__(self):
        self.ok = self.non200 = self.broken = self.connect_errors = self.events = 0
        self.open = self.peak_open = 0
        self.first = []
        self.durations = []
        self.errors = {}

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one(args, ctx, request, st):
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args.host, args.port, ssl=ctx, server_hostname=args.sni),
            30)
    except Exception as e:  # noqa: BLE001 - any failure to connect counts
        st.connect_errors += 1
        st.error("connect:" + type(e).__name__)
        return
    st.open += 1
    st.peak_open = max(st.peak_open, st.open)
    buf = b""
    try:
        writer.write(request)
        await writer.drain()
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            st.non200 += 1
            st.error("status:" + status.decode("latin-1").strip()[:40])
            return
        seen_first = False
        while True:
            data = await reader.read(65536)
            if not data:
                st.broken += 1
                st.error("eof-before-done")
                return
            buf = (buf + data)[-4096:]
            n = data.count(b"data: ")
            if n:
                st.events += n
                if not seen_first:
                    seen_first = True
                    st.first.append((time.perf_counter() - t0) * 1000)
            if DONE in buf and buf.endswith(END):
                st.ok += 1
                st.durations.append(time.perf_counter() - t0)
                return
    except Exception as e:  # noqa: BLE001 - resets, TLS errors: a broken stream
        st.broken += 1
        st.error("read:" + type(e).__name__)
    finally:
        st.open -= 1
        writer.close()


async def run(args):
    ctx = ssl.create_default_context(cafile=args.cafile)
    body = args.body.encode()
    request = ("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               "Content-Length: %d\r\nConnection: close\r\n\r\n"
               % (args.path, args.sni, os.environ.get("MG_KEY", ""), len(body))).encode() + body
    st = Stats()
    tasks = []
    t0 = time.monotonic()
    interval = 1.0 / args.ramp_per_s
    for i in range(args.streams):
        tasks.append(asyncio.ensure_future(one(args, ctx, request, st)))
        # Pace the ramp against the clock, not the sleep, so slow handshakes do not stretch it.
        delay = t0 + (i + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    ramp = time.monotonic() - t0
    remaining = max(1.0, args.deadline_s - ramp)
    done, pending = await asyncio.wait(tasks, timeout=remaining)
    for t in pending:
        t.cancel()
        st.broken += 1
        st.error("deadline")
    st.first.sort()
    st.durations.sort()
    pick = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None
    return {"streams": args.streams, "ok": st.ok, "non200": st.non200, "broken": st.broken,
            "connect_errors": st.connect_errors, "events": st.events,
            "first_event_p50_ms": pick(st.first, 0.5), "duration_p50_s": pick(st.durations, 0.5),
            "duration_max_s": pick(st.durations, 1.0), "ramp_s": round(ramp, 2),
            "peak_open": st.peak_open, "errors": st.errors}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--ramp-per-s", type=float, default=200)
    p.add_argument("--deadline-s", type=float, default=180)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.streams + 64:
        sys.exit("RLIMIT_NOFILE %d is too low for %d streams" % (hard, args.streams))
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
