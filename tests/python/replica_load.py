#!/usr/bin/env python3
"""Concurrent streaming load against the gateway, for the replica lab test (tests/lab/replicas.rs):
N worker threads, each sending streamed chat completions one after another over HTTPS (stdlib
only: http.client + ssl), until --requests are sent, --seconds pass or --stop-file exists.

    replica_load.py --url https://gw.test/v1/chat/completions --cert PEM --model M \
        --concurrency N [--requests R] [--seconds S] [--stop-file F] [--max-tokens T] --out FILE

The key comes from env MG_KEY (never argv). Every request appends one JSON line to --out:
  {"t0","t1","status","head","events","done","error"}
where `head` is true once the response head arrived (bytes reached the client: the gateway must
never retry after that), `events` counts SSE data events and `done` means `data: [DONE]` ended it.
At the end one summary line goes to stdout: {"requests","ok","failed_before_head",
"cut_after_head","other_status"}. Every request has a timeout (--timeout, default 30 s); the run
is bounded by --seconds (default 60).
"""

import argparse
import http.client
import json
import os
import ssl
import sys
import threading
import time
from urllib.parse import urlparse


def one(url, ctx, key, body, timeout):
    rec = {"t0": time.time(), "status": 0, "head": False, "events": 0, "done": False, "error": None}
    conn = http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx, timeout=timeout)
    try:
        conn.request("POST", url.path, body=body, headers={
            "Authorization": "Bearer " + key, "Content-Type": "application/json"})
        resp = conn.getresponse()
        rec["head"] = True
        rec["status"] = resp.status
        if resp.status != 200:
            resp.read()
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if line == b"data: [DONE]":
                    rec["done"] = True
                    break
                if line.startswith(b"data: "):
                    rec["events"] += 1
    except Exception as e:  # a reset, a cut stream, a timeout: recorded, never raised
        rec["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        conn.close()
    rec["t1"] = time.time()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=0, help="0: no count limit")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    key = os.environ.get("MG_KEY")
    if not key:
        sys.exit("replica_load.py: set MG_KEY")
    url = urlparse(a.url)
    ctx = ssl.create_default_context(cafile=a.cert)
    body = json.dumps({"model": a.model, "stream": True, "max_tokens": a.max_tokens,
                       "temperature": 0, "messages": [{"role": "user", "content": "Count to ten."}]})
    deadline = time.monotonic() + a.seconds
    lock = threading.Lock()
    sent = [0]
    out = open(a.out, "a")

    def more():
        with lock:
            if a.requests and sent[0] >= a.requests:
                return False
            if time.monotonic() >= deadline or (a.stop_file and os.path.exists(a.stop_file)):
                return False
            sent[0] += 1
            return True

    records = []

    def worker():
        while more():
            rec = one(url, ctx, key, body, a.timeout)
            with lock:
                records.append(rec)
                out.write(json.dumps(rec) + "\n")
                out.flush()

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.close()
    ok = sum(1 for r in records if r["status"] == 200 and r["done"])
    print(json.dumps({
        "requests": len(records),
        "ok": ok,
        "failed_before_head": sum(1 for r in records if not r["head"]),
        "cut_after_head": sum(1 for r in records if r["head"] and r["status"] == 200 and not r["done"]),
        "other_status": sum(1 for r in records if r["head"] and r["status"] != 200),
    }))


if __name__ == "__main__":
    main()
