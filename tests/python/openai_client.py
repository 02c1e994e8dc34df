#!/usr/bin/env python3
"""The client side of the gateway lab: the openai Python SDK (a real client), run inside the client
namespace by the lab tests (tests/lab/) and on loopback by tests/cursor_compat.rs, with the
interpreter from MODELGATE_PYTHON.

    openai_client.py --base URL --cert PEM COMMAND [options]      key in env MG_KEY (never argv)

COMMAND
  models                              models.list() → {"models":[ids]}
  chat --model M [--stream] [--max-tokens N] [--delay-ms D]
                                      one chat completion → {"content","chunks","times_ms","usage",
                                      "finish_reason"}; with --stream one time per chunk
  error --model M [--op chat|models]  the call must fail → {"class","status","code","type",
                                      "retry_after","elapsed_ms"}
  disconnect --model M --after N      stream, read N content chunks, close → {"closed_at": UNIX_S}
  cut --model M [--max-tokens N] [--delay-ms D]
                                      a stream the gateway cuts: read it until it raises →
                                      {"class","code","type","message","chunks","elapsed_ms"}
                                      ("class": null when it ended normally)
  raw-post --path P --body-file F     POST F's bytes as they are (stdlib http.client, not the SDK:
                                      the exact Cursor body) → {"status","events","times_ms",
                                      "done","usage","content_type","peer_cert_sha256"}
  replay --body-file F [--path P] [--typed]
                                      POST F's JSON with the SDK's own client and parse the stream
                                      into ChatCompletionChunk objects (P default /chat/completions,
                                      relative to --base; --typed: chat.completions.create(**body))
                                      → {"chunks","content","tool_calls":[{"id","name","arguments"}],
                                      "finish_reason","usage"}, or on an HTTP error {"class",
                                      "status","code","type","param","message"}

Prints one JSON line on stdout. Retries are off (max_retries=0), timeouts bounded (--timeout,
default 30 s), so an
error surfaces as the SDK's typed exception (AuthenticationError, NotFoundError, ...).
"""

import argparse
import hashlib
import http.client
import json
import os
import ssl
import sys
import time
from urllib.parse import urlparse

TIMEOUT_S = 30.0


def sdk(args):
    import openai

    return openai.OpenAI(
        base_url=args.base,
        api_key=os.environ.get("MG_KEY", "none"),
        max_retries=0,
        timeout=args.timeout,
        http_client=openai.DefaultHttpxClient(verify=args.cert),
    )


def ms_since(t0):
    return round((time.perf_counter() - t0) * 1000, 3)


def extra(args):
    return {"fake_token_delay_ms": args.delay_ms} if args.delay_ms is not None else None


def cmd_models(args):
    return {"models": sorted(m.id for m in sdk(args).models.list())}


def cmd_chat(args):
    client = sdk(args)
    messages = [{"role": "user", "content": "Say hello."}]
    t0 = time.perf_counter()
    if not args.stream:
        r = client.chat.completions.create(model=args.model, messages=messages,
                                           max_tokens=args.max_tokens, extra_body=extra(args))
        return {"content": r.choices[0].message.content, "chunks": 1, "times_ms": [ms_since(t0)],
                "usage": r.usage.model_dump() if r.usage else None,
                "finish_reason": r.choices[0].finish_reason}
    stream = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=args.max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=extra(args))
    content, times, usage, finish = [], [], None, None
    for ch in stream:
        times.append(ms_since(t0))
        if ch.usage is not None:
            usage = ch.usage.model_dump()
        for c in ch.choices:
            if c.delta.content:
                content.append(c.delta.content)
            finish = c.finish_reason or finish
    return {"content": "".join(content), "chunks": len(times), "times_ms": times,
            "usage": usage, "finish_reason": finish}


def cmd_error(args):
    import openai

    client = sdk(args)
    t0 = time.perf_counter()
    try:
        if args.op == "models":
            client.models.list()
        else:
            client.chat.completions.create(model=args.model, max_tokens=args.max_tokens,
                                           messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"class": type(e).__name__, "status": e.status_code, "code": body.get("code"),
                "type": body.get("type"), "retry_after": e.response.headers.get("retry-after"),
                "elapsed_ms": ms_since(t0)}
    except openai.APIError as e:
        return {"class": type(e).__name__, "status": None, "elapsed_ms": ms_since(t0)}
    return {"class": None, "status": 200, "elapsed_ms": ms_since(t0)}


def cmd_disconnect(args):
    client = sdk(args)
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=args.max_tokens, stream=True, extra_body=extra(args))
    got = 0
    for ch in stream:
        if any(c.delta.content for c in ch.choices):
            got += 1
            if got >= args.after:
                break
    stream.close()  # closes the HTTP response and its connection
    return {"closed_at": time.time(), "content_chunks": got}


def cmd_cut(args):
    import openai

    client = sdk(args)
    t0 = time.perf_counter()
    chunks = 0
    try:
        stream = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=args.max_tokens, stream=True, extra_body=extra(args))
        for _ in stream:
            chunks += 1
            if chunks == 1:
                print(json.dumps({"first_chunk_at": time.time()}), flush=True)
    except openai.APIError as e:
        # APIError itself is what an error event raises; APIConnectionError (a broken body)
        # and the others are its subclasses: the class name tells them apart.
        body = e.body if isinstance(e.body, dict) else {}
        return {"class": type(e).__name__, "code": body.get("code"), "type": body.get("type"),
                "message": e.message, "chunks": chunks, "elapsed_ms": ms_since(t0)}
    except Exception as e:  # a parse failure of a truncated body, say
        return {"class": type(e).__name__, "code": None, "type": None, "message": str(e),
                "chunks": chunks, "elapsed_ms": ms_since(t0)}
    return {"class": None, "chunks": chunks, "elapsed_ms": ms_since(t0)}


def cmd_raw_post(args):
    url = urlparse(args.base)
    ctx = ssl.create_default_context(cafile=args.cert)
    with open(args.body_file, "rb") as f:
        body = f.read()
    conn = http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx,
                                       timeout=args.timeout)
    t0 = time.perf_counter()
    conn.request("POST", url.path.rstrip("/") + args.path, body=body, headers={
        "Authorization": "Bearer " + os.environ.get("MG_KEY", ""),
        "Content-Type": "application/json", "Accept": "text/event-stream",
        "User-Agent": "cursor-shaped-test"})
    resp = conn.getresponse()
    peer = hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest()
    times, buf, done, usage, events = [], b"", False, False, 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        data = resp.read1(65536)
        if not data:
            break
        buf += data
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: "):
                continue  # SSE comments (keep-alives)
            events += 1
            times.append(ms_since(t0))
            payload = ev[len(b"data: "):]
            if payload == b"[DONE]":
                done = True
            elif b'"usage"' in payload and json.loads(payload).get("usage"):
                usage = True
    return {"status": resp.status, "events": events, "times_ms": times, "done": done,
            "usage": usage, "content_type": resp.getheader("content-type"),
            "body_bytes": len(body), "peer_cert_sha256": peer}


def cmd_replay(args):
    import openai
    from openai.types.chat import ChatCompletionChunk

    client = sdk(args)
    with open(args.body_file) as f:
        body = json.load(f)
    try:
        if args.typed:
            stream = client.chat.completions.create(**body)
        else:
            stream = client.post(args.path, body=body, cast_to=ChatCompletionChunk, stream=True,
                                 stream_cls=openai.Stream[ChatCompletionChunk])
        chunks, content, calls, finish, usage = 0, [], {}, None, None
        for ch in stream:
            chunks += 1
            if ch.usage is not None:
                usage = ch.usage.model_dump()
            for c in ch.choices:
                if c.delta.content:
                    content.append(c.delta.content)
                for tc in c.delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                finish = c.finish_reason or finish
    except openai.APIStatusError as e:
        err = (e.body if isinstance(e.body, dict) else {}) or {}
        return {"class": type(e).__name__, "status": e.status_code, "code": err.get("code"),
                "type": err.get("type"), "param": err.get("param"),
                "message": err.get("message")}
    return {"chunks": chunks, "content": "".join(content),
            "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish,
            "usage": usage}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models")
    for name in ("chat", "error", "disconnect", "cut"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--max-tokens", type=int, default=8)
        s.add_argument("--delay-ms", type=float)
        if name == "chat":
            s.add_argument("--stream", action="store_true")
        if name == "error":
            s.add_argument("--op", choices=["chat", "models"], default="chat")
        if name == "disconnect":
            s.add_argument("--after", type=int, default=2)
    s = sub.add_parser("raw-post")
    s.add_argument("--path", required=True)
    s.add_argument("--body-file", required=True)
    s = sub.add_parser("replay")
    s.add_argument("--body-file", required=True)
    s.add_argument("--path", default="/chat/completions")
    s.add_argument("--typed", action="store_true")
    args = p.parse_args()
    out = {"models": cmd_models, "chat": cmd_chat, "error": cmd_error,
           "disconnect": cmd_disconnect, "cut": cmd_cut, "raw-post": cmd_raw_post,
           "replay": cmd_replay}[args.cmd](args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
