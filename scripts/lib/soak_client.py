#!/usr/bin/env python3
"""Soak load for an HTTPS gateway (stdlib, asyncio): many concurrent streaming requests on
keep-alive connections that are replaced every few requests, for a fixed time.

    soak_client.py HOST PORT --cafile PEM --sni NAME --path P --body JSON --duration-s S
                   [--concurrency N] [--per-connection K] [--ramp-per-s R]
                   key in env MG_KEY (never argv)

N workers each open an HTTPS/1.1 connection, POST BODY (a streaming chat completion) K times on
it one after the other, reading each chunked SSE body to its end, then close it and open a new
one, until --duration-s is over (the request in flight is finished, bounded by 60 s). Prints
one JSON line: {"requests","ok","non200","broken","connect_errors","events","connections",
"seconds","errors"}; "ok" counts streams that ended with `data: [DONE]` and the last chunk.
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


class Stats:
    def __init__(self):
        self.requests = self.ok = self.non200 = self.broken = self.connect_errors = 0
        self.events = self.connections = 0
        self.errors = {}

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def read_response(reader):
    """(status, body) of one chunked or Content-Length response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = bytearray()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += (await reader.readexactly(size + 2))[:-2]
    else:
        body += await reader.readexactly(int(headers.get("content-length", "0")))
    return status, bytes(body), headers.get("connection", "").lower() == "close"


async def worker(args, ctx, request, st, deadline):
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port, ssl=ctx, server_hostname=args.sni),
                30)
        except Exception as e:  # noqa: BLE001 - any failure to connect counts
            st.connect_errors += 1
            st.error("connect:" + type(e).__name__)
            await asyncio.sleep(1)
            continue
        st.connections += 1
        try:
            for _ in range(args.per_connection):
                if time.monotonic() >= deadline:
                    break
                st.requests += 1
                writer.write(request)
                await writer.drain()
                status, body, close = await asyncio.wait_for(read_response(reader), 60)
                if status != 200:
                    st.non200 += 1
                    st.error("status:%d" % status)
                elif DONE in body:
                    st.ok += 1
                    st.events += body.count(b"data: ")
                else:
                    st.broken += 1
                    st.error("no-done")
                if close:
                    break
        except Exception as e:  # noqa: BLE001 - resets, TLS errors, timeouts: a broken stream
            st.broken += 1
            st.error("read:" + type(e).__name__)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


async def run(args):
    ctx = ssl.create_default_context(cafile=args.cafile)
    body = args.body.encode()
    request = ("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               "Content-Length: %d\r\n\r\n"
               % (args.path, args.sni, os.environ.get("MG_KEY", ""), len(body))).encode() + body
    st = Stats()
    t0 = time.monotonic()
    deadline = t0 + args.duration_s
    tasks = []
    for i in range(args.concurrency):
        tasks.append(asyncio.ensure_future(worker(args, ctx, request, st, deadline)))
        delay = t0 + (i + 1) / args.ramp_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.wait(tasks, timeout=args.duration_s + 90)
    return {"requests": st.requests, "ok": st.ok, "non200": st.non200, "broken": st.broken,
            "connect_errors": st.connect_errors, "events": st.events,
            "connections": st.connections, "seconds": round(time.monotonic() - t0, 1),
            "errors": st.errors}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--per-connection", type=int, default=20)
    p.add_argument("--ramp-per-s", type=float, default=50)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.concurrency + 64:
        sys.exit("RLIMIT_NOFILE %d is too low for %d workers" % (hard, args.concurrency))
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
