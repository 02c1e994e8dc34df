#!/usr/bin/env python3
"""Measures how long a restarted gateway takes to serve through the tunnel (tests/lab/restart.rs).

    restart_probe.py --base https://NAME --cert PEM --model M [--timeout S]    key in env MG_KEY

Started before the new daemon (it prints {"probe": "started"} first): polls GET /healthz (a fresh HTTPS connection each time, 10 ms
apart; refused while no process listens) until 200, then POSTs a one-token chat completion
(20 ms apart) until one is answered 200 through the tunnel. Prints one JSON line:
{"healthz_ms", "first_200_ms", "recovery_ms", "statuses": {STATUS: COUNT}, "errors"}
(times since the probe started; recovery_ms = first_200_ms - healthz_ms), or with "timeout"
set when --timeout (default 90 s) passed first. stdlib only.
"""

import argparse
import http.client
import json
import os
import ssl
import sys
import time
from urllib.parse import urlparse


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args()
    url = urlparse(args.base)
    ctx = ssl.create_default_context(cafile=args.cert)
    key = os.environ.get("MG_KEY", "")
    body = json.dumps({"model": args.model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}]})
    print(json.dumps({"probe": "started"}), flush=True)
    t0 = time.perf_counter()
    deadline = t0 + args.timeout
    statuses, errors = {}, 0
    out = {"healthz_ms": None, "first_200_ms": None, "recovery_ms": None}

    def once(method, path, payload=None):
        nonlocal errors
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx, timeout=5)
        try:
            headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            r = conn.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            errors += 1
            return None
        finally:
            conn.close()

    while time.perf_counter() < deadline:
        if once("GET", "/healthz") == 200:
            out["healthz_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            break
        time.sleep(0.01)
    while out["healthz_ms"] is not None and time.perf_counter() < deadline:
        status = once("POST", "/v1/chat/completions", body)
        if status is not None:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status == 200:
            out["first_200_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            out["recovery_ms"] = round(out["first_200_ms"] - out["healthz_ms"], 1)
            break
        time.sleep(0.02)
    out.update(statuses=statuses, errors=errors, timeout=out["first_200_ms"] is None)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
