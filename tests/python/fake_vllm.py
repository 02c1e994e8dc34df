#!/usr/bin/env python3
"""A vLLM-like OpenAI server for the namespace lab (stdlib only, asyncio: thousands of streams).

    fake_vllm.py ADDR PORT [--models a,b] [--token-delay-ms D] [--log FILE] [--tool-calls]
                 [--max-model-len N] [--reject-empty-content]

GET  /v1/models              {"object":"list","data":[{"id":..,"object":"model","owned_by":"vllm"}]}
POST /v1/chat/completions    like vLLM's OpenAI server:
     "stream": true          text/event-stream, chunked: a role chunk, max_tokens content chunks
                             (default 8) D ms apart, a finish chunk (finish_reason "stop"), a usage
                             chunk (choices []) when stream_options.include_usage, `data: [DONE]`
     otherwise               one chat.completion JSON with usage
     unknown model           404 {"object":"error","type":"NotFoundError",..} like vLLM
     no "messages", or a tool without "function" (a Responses-API body)
                             400 {"object":"error","type":"BadRequestError",..} like vLLM's
                             request validation
     --tool-calls            a request with tools (tool_choice not "none") whose last message is
                             the user's is answered with a call of the first tool, as vLLM's tool
                             parsers stream it (an id+name chunk, argument chunks, finish_reason
                             "tool_calls"); after a tool result the answer is text again
     --max-model-len N       prompt (body bytes / 4) + max_tokens beyond N: 400 with vLLM's
                             wording "This model's maximum context length is N tokens. However,
                             you requested M tokens (P in the messages, C in the completion)…"
     --reject-empty-content  400 for an assistant or tool turn with "content": [] (what vLLM's
                             gpt-oss path does)
GET  /health                 200

Test-only request field: "fake_token_delay_ms" overrides D for one request (it reaches the model
because a gateway forwards the body untouched).

--log FILE gets one JSON object per line, flushed at once (tests read it while we run):
  {"ev":"request","id":N,"t":UNIX_S,"method","path","model","body_bytes","auth":BOOL,
   "stream":BOOL,"client":IP,  and for POSTs: "roles":[..],"tools":[names],"has_input":BOOL,
   "empty_content":N (assistant/tool turns with "content": []),"max_tokens"}
  {"ev":"disconnect","id":N,"t":UNIX_S,"sent":CONTENT_CHUNKS_SENT}   client left mid-stream
  {"ev":"done","id":N,"t":UNIX_S,"sent":N}                            stream finished normally
The log never holds a prompt, only sizes. A disconnect is seen at once (a read of EOF runs
alongside the stream), not only at the next write.

Nagle is off on every connection and every SSE event is written and drained on its own.
Keep-alive like uvicorn: an idle connection is closed after 5 s.
"""

import argparse
import asyncio
import json
import resource
import socket
import sys
import time

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024
MAX_TOKENS = 10_000
KEEPALIVE_S = 5.0


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None
        self.n = 0

    def next_id(self):
        self.n += 1
        return self.n

    def write(self, **rec):
        if self.f:
            rec["t"] = round(time.time(), 6)
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()


class BadRequest(Exception):
    pass


async def read_request(reader):
    """(method, path, headers, body) or None at EOF between requests."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE_S)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("headers too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("bad request line")
    method, path, _ = parts
    headers = {}
    for line in lines[1 : 1 + MAX_HEADERS]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while len(body) <= MAX_BODY:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        n = int(headers.get("content-length", "0") or 0)
        if n > MAX_BODY:
            raise BadRequest("body too large")
        if n:
            body = await reader.readexactly(n)
    return method, path, headers, body


def head(status, reason, ctype, length=None, extra=()):
    h = ["HTTP/1.1 %d %s" % (status, reason), "Content-Type: " + ctype, "Server: fake-vllm"]
    if length is None:
        h.append("Transfer-Encoding: chunked")
    else:
        h.append("Content-Length: %d" % length)
    h.extend(extra)
    return ("\r\n".join(h) + "\r\n\r\n").encode()


async def send_json(writer, status, reason, obj):
    body = json.dumps(obj).encode()
    writer.write(head(status, reason, "application/json", len(body)) + body)
    await writer.drain()


def chunk(obj):
    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    def __init__(self, models, delay_ms, log, tool_calls=False, max_model_len=None,
                 reject_empty_content=False):
        self.models = models
        self.delay_ms = delay_ms
        self.log = log
        self.tool_calls = tool_calls
        self.max_model_len = max_model_len
        self.reject_empty_content = reject_empty_content
        self.open_streams = 0

    async def handle(self, reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            for _ in range(1_000_000):  # keep-alive requests per connection, bounded
                try:
                    req = await read_request(reader)
                except BadRequest as e:
                    await send_json(writer, 400, "Bad Request", {"error": str(e)})
                    return
                if req is None:
                    return
                keep = await self.dispatch(reader, writer, peer, *req)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def dispatch(self, reader, writer, peer, method, path, headers, body):
        path = path.split("?", 1)[0]
        rid = self.log.next_id()
        model, stream, req = None, False, {}
        if method == "POST":
            try:
                req = json.loads(body)
                model = req.get("model")
                stream = bool(req.get("stream"))
            except (ValueError, AttributeError):
                req = None
        extra = {}
        if isinstance(req, dict) and method == "POST":
            msgs = req.get("messages") if isinstance(req.get("messages"), list) else []
            extra = dict(
                roles=[m.get("role") for m in msgs if isinstance(m, dict)],
                tools=[tool_name(t) for t in (req.get("tools") or [])],
                has_input="input" in req,
                empty_content=sum(1 for m in msgs if isinstance(m, dict)
                                  and m.get("role") in ("assistant", "tool")
                                  and m.get("content") == []),
                max_tokens=req.get("max_tokens"))
        self.log.write(ev="request", id=rid, method=method, path=path, model=model,
                       body_bytes=len(body), auth="authorization" in headers,
                       stream=stream, client=peer, **extra)
        if method == "GET" and path in ("/v1/models", "/models"):
            await send_json(writer, 200, "OK", {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm",
                 "root": m, "parent": None, "max_model_len": 131072} for m in self.models]})
            return True
        if method == "GET" and path == "/health":
            writer.write(head(200, "OK", "text/plain", 0))
            await writer.drain()
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/chat/completions"):
            await send_json(writer, 404, "Not Found", {"detail": "Not Found"})
            return True
        if not isinstance(req, dict):
            await send_json(writer, 400, "Bad Request", {"object": "error", "message": "bad JSON",
                                                         "type": "BadRequestError", "code": 400})
            return True
        invalid = validate(req)
        if invalid:
            await send_json(writer, 400, "Bad Request", {
                "object": "error", "message": invalid, "type": "BadRequestError",
                "param": None, "code": 400})
            return True
        if model not in self.models:
            await send_json(writer, 404, "Not Found", {
                "object": "error", "message": "The model `%s` does not exist." % model,
                "type": "NotFoundError", "param": None, "code": 404})
            return True
        if self.reject_empty_content and extra.get("empty_content"):
            await send_json(writer, 400, "Bad Request", {
                "object": "error", "type": "BadRequestError", "param": None, "code": 400,
                "message": "1 validation error for Message\ncontent.0\n  Input should be a "
                           "valid dictionary or instance of Content [type=model_type]"})
            return True
        asked = req.get("max_tokens") or req.get("max_completion_tokens")
        prompt_tokens = max(1, len(body) // 4)
        if self.max_model_len and (prompt_tokens + int(asked or 0) > self.max_model_len
                                   or prompt_tokens >= self.max_model_len):
            c = int(asked or 0)
            await send_json(writer, 400, "Bad Request", {"error": {
                "message": "This model's maximum context length is %d tokens. However, you "
                           "requested %d tokens (%d in the messages, %d in the completion). "
                           "Please reduce the length of the messages or completion."
                           % (self.max_model_len, prompt_tokens + c, prompt_tokens, c),
                "type": "BadRequestError", "param": None, "code": 400}})
            return True
        call = self.tool_call_for(req)
        n = max(0, min(int(asked or 8), MAX_TOKENS))
        delay = float(req.get("fake_token_delay_ms", self.delay_ms)) / 1000.0
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        cid = "chatcmpl-fake%d" % rid
        created = int(time.time())
        if call is not None and not stream:
            await send_json(writer, 200, "OK", {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                     "tool_calls": [call]},
                             "logprobs": None, "finish_reason": "tool_calls"}],
                "usage": usage})
            return True
        if not stream:
            if delay:
                await asyncio.sleep(delay * n)
            await send_json(writer, 200, "OK", {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": " ".join(["tok"] * n)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage})
            return True
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        return await self.stream(reader, writer, rid, cid, created, model, n, delay,
                                 usage if include_usage else None, call)

    def tool_call_for(self, req):
        """The tool call this request gets (--tool-calls), or None for a text answer."""
        tools = req.get("tools") or []
        msgs = req.get("messages") or []
        if (not self.tool_calls or not tools or req.get("tool_choice") == "none" or not msgs
                or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "user"):
            return None
        fn = tools[0]["function"]
        params = fn.get("parameters") or {}
        args = {k: "src/main.rs" if (params.get("properties", {}).get(k) or {}).get("type")
                == "string" else 1 for k in params.get("required") or []}
        return {"id": "chatcmpl-tool-%08x" % (hash(json.dumps(args)) & 0xffffffff),
                "type": "function", "function": {"name": fn["name"],
                                                 "arguments": json.dumps(args)}}

    async def stream(self, reader, writer, rid, cid, created, model, n, delay, usage,
                     call=None):
        def ev(delta, finish=None):
            return chunk({"id": cid, "object": "chat.completion.chunk", "created": created,
                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                       "logprobs": None,
                                                       "finish_reason": finish}]})

        # The client sends nothing more while it reads a stream: EOF here means it left.
        eof = asyncio.ensure_future(reader.read(1))
        sent = 0
        self.open_streams += 1
        try:
            writer.write(head(200, "OK", "text/event-stream; charset=utf-8")
                         + ev({"role": "assistant", "content": ""}))
            await writer.drain()
            if call is not None:
                # Like vLLM's tool parsers: id, type and name first, then the arguments in
                # pieces, then finish_reason "tool_calls".
                args = call["function"]["arguments"]
                pieces = [args[i:i + 8] for i in range(0, len(args), 8)] or [""]
                deltas = [{"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"],
                                                        "arguments": ""}}]}]
                deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                           for p in pieces]
                for d in deltas:
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(ev(d))
                    await writer.drain()
                    sent += 1
                usage = dict(usage, completion_tokens=len(pieces),
                             total_tokens=usage["prompt_tokens"] + len(pieces)) \
                    if usage is not None else None
                n = 0
            for i in range(n):
                if delay:
                    done, _ = await asyncio.wait({eof}, timeout=delay)
                    if done:
                        self.log.write(ev="disconnect", id=rid, sent=sent)
                        return False
                elif eof.done():
                    self.log.write(ev="disconnect", id=rid, sent=sent)
                    return False
                writer.write(ev({"content": "tok%d " % i}))
                await writer.drain()
                sent += 1
            tail = ev({}, "tool_calls" if call is not None else "stop")
            if usage is not None:
                tail += chunk({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": [], "usage": usage})
            writer.write(tail + chunk(b"[DONE]") + b"0\r\n\r\n")
            await writer.drain()
            self.log.write(ev="done", id=rid, sent=sent)
            if eof.done():
                return False
            eof.cancel()
            # A pipelined byte would be lost with the cancelled read: this server answers one
            # request at a time (as its clients do), so there is none.
            return True
        except ConnectionError:
            self.log.write(ev="disconnect", id=rid, sent=sent)
            return False
        finally:
            self.open_streams -= 1
            if not eof.done():
                eof.cancel()


def tool_name(t):
    if not isinstance(t, dict):
        return None
    return (t.get("function") or {}).get("name") or t.get("name")


def validate(req):
    """What vLLM's request validation says about a chat body, or None when it is valid."""
    if not isinstance(req.get("messages"), list):
        return ("[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', "
                "'input': ...}]")
    for i, t in enumerate(req.get("tools") or []):
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict) \
                or "name" not in t["function"]:
            return ("[{'type': 'missing', 'loc': ('body', 'tools', %d, 'function'), "
                    "'msg': 'Field required'}]" % i)
    return None


async def main_async(args):
    srv = Server([m for m in args.models.split(",") if m], args.token_delay_ms, Log(args.log),
                 tool_calls=args.tool_calls, max_model_len=args.max_model_len,
                 reject_empty_content=args.reject_empty_content)
    server = await asyncio.start_server(srv.handle, args.addr, args.port, backlog=4096,
                                        limit=MAX_HEADER_BYTES, reuse_address=True)
    print("fake vLLM listening on %s:%d models=%s" % (args.addr, args.port, srv.models),
          flush=True)
    async with server:
        await server.serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--models", default="acme-coder,acme-small")
    p.add_argument("--token-delay-ms", type=float, default=20.0)
    p.add_argument("--log")
    p.add_argument("--tool-calls", action="store_true")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--reject-empty-content", action="store_true")
    args = p.parse_args()
    # Thousands of concurrent streams need as many descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
