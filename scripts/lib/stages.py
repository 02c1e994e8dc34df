#!/usr/bin/env python3
"""Summarises the stage times a modelgate run logged with MODELGATE_STAGE_TRACE=1 (bench
helper, stdlib only).

    stages.py RUN_LOG

Each `modelgate::stages` line has the microseconds from the handler's start to the key check
(auth), the body read (read), the admission (admit) and the upstream's response head (head).
Prints, per stage (its own share: auth, read−auth, admit−read, head−admit), p50, p90, p99,
p99.9 and max in µs, a histogram of the handler's whole time to the response head, and which
stage took the most time in the slowest 1% of requests.
"""

import re
import sys

FIELD = re.compile(r"\b(auth|read|admit|head)=(\d+)")


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0


def main():
    rows = []
    with open(sys.argv[1], errors="replace") as f:
        for line in f:
            if "modelgate::stages" not in line:
                continue
            d = dict((k, int(v)) for k, v in FIELD.findall(line))
            if len(d) == 4:
                rows.append(d)
    if not rows:
        sys.exit("no modelgate::stages lines in %s (MODELGATE_STAGE_TRACE=1?)" % sys.argv[1])
    stages = {
        "auth": [r["auth"] for r in rows],
        "read": [r["read"] - r["auth"] for r in rows],
        "admit": [r["admit"] - r["read"] for r in rows],
        "upstream": [r["head"] - r["admit"] for r in rows],
        "total": [r["head"] for r in rows],
    }
    print("%d requests; µs per stage" % len(rows))
    print("| stage | p50 | p90 | p99 | p99.9 | max |")
    print("|---|---|---|---|---|---|")
    for name, xs in stages.items():
        s = sorted(xs)
        print("| %s | %d | %d | %d | %d | %d |" % (name, pct(s, .5), pct(s, .9), pct(s, .99),
                                                   pct(s, .999), s[-1]))
    edges = [250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 10 ** 12]
    counts = [0] * len(edges)
    for t in stages["total"]:
        counts[next(i for i, e in enumerate(edges) if t < e)] += 1
    print("\nhandler start → upstream response head:")
    lo = 0
    for e, c in zip(edges, counts):
        print("  %6s–%-6s µs %7d" % (lo, "∞" if e == 10 ** 12 else e, c))
        lo = e
    cut = pct(sorted(stages["total"]), .99)
    slow = [i for i, t in enumerate(stages["total"]) if t >= cut]
    worst = {}
    for i in slow:
        name = max(("auth", "read", "admit", "upstream"), key=lambda n: stages[n][i])
        worst[name] = worst.get(name, 0) + 1
    print("\nslowest 1%% (≥ %d µs, %d requests): largest stage %s" % (cut, len(slow), worst))


if __name__ == "__main__":
    main()
