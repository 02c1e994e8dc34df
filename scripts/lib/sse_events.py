#!/usr/bin/env python3
"""N concurrent SSE streams at a given aggregate event rate, and the CPU the gateway side spends
per event over a steady window (bench helper, stdlib, asyncio).

    sse_events.py HOST PORT --cafile PEM --sni NAME --path P --model M --streams N
                  --event-interval-ms D --window-s W [--ramp-per-s R] [--pids "P1 P2 ..."]
                  [--deadline-s S]                            key in env MG_KEY (never argv)

Opens N HTTPS connections (R new ones per second) and POSTs on each a streaming chat completion
with usage metering (`stream_options.include_usage`) whose tokens come D ms apart
(`fake_token_delay_ms` of tests/python/fake_vllm.py), as many tokens as the stream needs to
outlast the ramp, one interval and the window: the aggregate rate is N / D events per ms.
Once every stream is open and one interval has passed (all of them streaming), it reads the
utime+stime of PIDS and their children (/proc/PID/stat; nginx's workers are the master's
children) and the events received so far, and again W seconds later: CPU per event (µs), events
per second, events per second per core of that CPU; with --callgrind-pid (a process run under
valgrind --tool=callgrind) also its instructions per event over the window, a measure other
processes' load does not disturb. It samples the summed VmRSS of PIDS every
second (peak) and reads their VmHWM at the end. Every stream is read to `data: [DONE]` and the
end of the chunked body. Prints one JSON line. Everything is bounded by --deadline-s.
"""

import argparse
import asyncio
import glob
import json
import math
import os
import resource
import ssl
import subprocess
import sys
import time

DONE = b"data: [DONE]"
END = b"\r\n0\r\n\r\n"
HZ = os.sysconf("SC_CLK_TCK")


def ticks(pids):
    total = 0
    for pid in pids:
        group = [pid]
        try:
            for task in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                    group += [int(c) for c in f.read().split()]
        except OSError:
            pass
        for p in group:
            try:
                with open("/proc/%d/stat" % p) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return total


def callgrind(pid, op):
    """`callgrind_control -z` (zero) or `-d` (dump) on a process run under callgrind; for -d,
    the instructions (Ir) of the dump it wrote (the newest callgrind.out file of that pid)."""
    subprocess.run(["callgrind_control", op, str(pid)], check=False, capture_output=True,
                   timeout=120)
    if op != "-d":
        return None
    files = sorted(glob.glob(os.environ.get("CALLGRIND_GLOB", "/nonexistent")), key=os.path.getmtime)
    for path in reversed(files):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
    return None


def status_kib(pids, field):
    total = 0
    for pid in pids:
        group = [pid]
        try:
            for task in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                    group += [int(c) for c in f.read().split()]
        except OSError:
            pass
        for p in group:
            try:
                with open("/proc/%d/status" % p) as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
            except (OSError, ValueError):
                pass
    return total


class Stats:
    def __init__(self):
        self.ok = self.non200 = self.broken = self.connect_errors = self.events = 0
        self.open = self.peak_open = self.streaming = 0
        self.errors = {}

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one(args, ctx, request, st):
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args.host, args.port, ssl=ctx, server_hostname=args.sni),
            60)
    except Exception as e:  # noqa: BLE001 - any failure to connect counts
        st.connect_errors += 1
        st.error("connect:" + type(e).__name__)
        return
    st.open += 1
    st.peak_open = max(st.peak_open, st.open)
    buf = b""
    streaming = False
    try:
        writer.write(request)
        await writer.drain()
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            st.non200 += 1
            st.error("status:" + status.decode("latin-1").strip()[:40])
            return
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
                if not streaming:
                    streaming = True
                    st.streaming += 1
            if DONE in buf and buf.endswith(END):
                st.ok += 1
                return
    except Exception as e:  # noqa: BLE001 - resets, TLS errors: a broken stream
        st.broken += 1
        st.error("read:" + type(e).__name__)
    finally:
        st.open -= 1
        writer.close()


async def run(args):
    ctx = ssl.create_default_context(cafile=args.cafile)
    pids = [int(p) for p in args.pids.split()]
    interval = args.event_interval_ms / 1000.0
    ramp_s = args.streams / args.ramp_per_s
    # Enough tokens to outlast the ramp, one interval, the window and a margin.
    tokens = int(math.ceil((ramp_s + interval + args.window_s + 10) / interval)) + 1
    body = json.dumps({"model": args.model, "stream": True, "max_tokens": tokens,
                       "stream_options": {"include_usage": True},
                       "fake_token_delay_ms": args.event_interval_ms,
                       "messages": [{"role": "user", "content": "Write slowly."}]}).encode()
    request = ("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               "Content-Length: %d\r\nConnection: close\r\n\r\n"
               % (args.path, args.sni, os.environ.get("MG_KEY", ""), len(body))).encode() + body
    st = Stats()
    tasks = []
    rss_peak = [0]
    stop = asyncio.Event()

    async def sample_rss():
        while not stop.is_set():
            rss_peak[0] = max(rss_peak[0], status_kib(pids, "VmRSS"))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.ensure_future(sample_rss())
    deadline = time.monotonic() + args.deadline_s
    t0 = time.monotonic()
    for i in range(args.streams):
        tasks.append(asyncio.ensure_future(one(args, ctx, request, st)))
        delay = t0 + (i + 1) / args.ramp_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    ramp = time.monotonic() - t0
    # Steady state: every stream has its first event (or failed), then one more interval.
    while (st.streaming + st.non200 + st.broken + st.connect_errors < args.streams
           and time.monotonic() < deadline):
        await asyncio.sleep(0.05)
    await asyncio.sleep(interval)
    steady_open = st.open
    if args.callgrind_pid:
        await asyncio.to_thread(callgrind, args.callgrind_pid, "-z")
    c0, e0, w0 = ticks(pids), st.events, time.monotonic()
    await asyncio.sleep(args.window_s)
    c1, e1, w1 = ticks(pids), st.events, time.monotonic()
    instructions = None
    if args.callgrind_pid:
        instructions = await asyncio.to_thread(callgrind, args.callgrind_pid, "-d")
    steady_open_end = st.open
    remaining = max(1.0, deadline - time.monotonic())
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    for t in pending:
        t.cancel()
        st.broken += 1
        st.error("deadline")
    stop.set()
    await sampler
    events = e1 - e0
    cpu_s = (c1 - c0) / HZ
    secs = w1 - w0
    per_event_us = cpu_s / events * 1e6 if events else None
    return {"streams": args.streams, "ok": st.ok, "non200": st.non200, "broken": st.broken,
            "connect_errors": st.connect_errors, "errors": st.errors,
            "tokens_per_stream": tokens, "event_interval_ms": args.event_interval_ms,
            "ramp_s": round(ramp, 2), "peak_open": st.peak_open,
            "open_in_window": [steady_open, steady_open_end],
            "window_s": round(secs, 2), "window_events": events,
            "events_per_s": round(events / secs, 1) if secs else None,
            "cpu_pct": round(cpu_s / secs * 100, 1) if secs else None,
            "cpu_us_per_event": round(per_event_us, 2) if per_event_us else None,
            "events_per_s_per_core": round(events / cpu_s) if cpu_s else None,
            "instructions_per_event": round(instructions / events) if instructions and events
            else None,
            "rss_peak_mib": round(rss_peak[0] / 1024, 1),
            "hwm_mib": round(status_kib(pids, "VmHWM") / 1024, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--event-interval-ms", type=float, required=True)
    p.add_argument("--window-s", type=float, default=20)
    p.add_argument("--ramp-per-s", type=float, default=500)
    p.add_argument("--pids", default="")
    p.add_argument("--deadline-s", type=float, default=300)
    p.add_argument("--callgrind-pid", type=int, help="zero and dump callgrind's counters of "
                   "this pid around the window (CALLGRIND_GLOB names its output files)")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.streams + 64:
        sys.exit("RLIMIT_NOFILE %d is too low for %d streams (ulimit -n)" % (hard, args.streams))
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
