"""A minimal, fast HTTP/1.1 keep-alive upstream for the benchmarks.

    python -m tests.benchmarks.upstream [--port 0] [--token TOKEN]

Prints `listening PORT` once it accepts connections. Built on a bare asyncio Protocol so that it
costs a few microseconds per request and mitmproxy stays the bottleneck. Routes (any method):

- `/sse/first?hold_ms=N`: an event stream; the first event at once, the rest after N ms.
- `/sse/big?bytes=N`: an event stream of N bytes, as fast as the reader takes it (flow control).
- `/_stats`: JSON counters (requests; how many carried `Authorization: Bearer TOKEN`); requests to
  `/_...` paths are not counted.
- `/_echo`: JSON of the request's Authorization header.
- anything else (e.g. `/v1/chat/completions`): a small OpenAI-style chat completion.

Authorization is accepted whatever it is; when `--token` is given, requests carrying exactly that
token are counted, so a run can prove the addon injected the seeded token into every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "coder-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
    }
).encode()

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _event(i: int, text: str = "tok") -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "coder-model",
        "choices": [{"index": 0, "delta": {"content": f"{text}{i}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


COMPLETION_RESPONSE = _response("200 OK", COMPLETION)

# One 64 KiB slab of events for the big stream, sent again and again.
_BIG_EVENT = _event(0, "x" * 200)
_BIG_SLAB = _BIG_EVENT * (65536 // len(_BIG_EVENT))
_DONE = b"data: [DONE]\n\n"


class Stats:
    def __init__(self, token: str | None) -> None:
        self.bearer = f"Bearer {token}".encode() if token else None
        self.requests = 0
        self.seeded = 0


class Upstream(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a streamed answer is being written; later requests wait in buf
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self._can_write.set()
        self.transport = None

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            auth = None
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"authorization":
                    auth = value.strip()
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            parts = lines[0].split(b" ")
            target = parts[1] if len(parts) > 1 else b"/"
            self._dispatch(target, auth)

    def _dispatch(self, target: bytes, auth: bytes | None) -> None:
        stats = self.stats
        if target.startswith(b"http"):  # absolute form: keep the path
            target = b"/" + target.split(b"/", 3)[-1]
        path, _, query = target.partition(b"?")
        if not path.startswith(b"/_"):  # the control endpoints are not counted
            stats.requests += 1
            if stats.bearer is not None and auth == stats.bearer:
                stats.seeded += 1
        args = dict(p.split(b"=", 1) for p in query.split(b"&") if b"=" in p)
        assert self.transport is not None
        if path == b"/sse/first":
            self._start(self._sse_first(int(args.get(b"hold_ms", b"300"))))
        elif path == b"/sse/big":
            self._start(self._sse_big(int(args.get(b"bytes", b"104857600"))))
        elif path == b"/_stats":
            body = json.dumps({"requests": stats.requests, "seeded_token": stats.seeded}).encode()
            self.transport.write(_response("200 OK", body))
        elif path == b"/_echo":
            body = json.dumps({"authorization": auth.decode() if auth else None}).encode()
            self.transport.write(_response("200 OK", body))
        else:
            self.transport.write(COMPLETION_RESPONSE)

    def _start(self, coro) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._streamed)

    def _streamed(self, task: asyncio.Task) -> None:
        self.busy = False
        if not task.cancelled() and task.exception() is not None and self.transport is not None:
            self.transport.close()
            return
        self._serve()

    async def _write(self, data: bytes) -> None:
        await self._can_write.wait()
        if self.transport is None:
            raise ConnectionError("client went away")
        self.transport.write(data)

    async def _sse_first(self, hold_ms: int) -> None:
        await self._write(SSE_HEAD + _chunk(_event(0)))
        await asyncio.sleep(hold_ms / 1000)
        for i in range(1, 4):
            await self._write(_chunk(_event(i)))
        await self._write(_chunk(_DONE) + b"0\r\n\r\n")

    async def _sse_big(self, total: int) -> None:
        await self._write(SSE_HEAD)
        sent = 0
        slab = _chunk(_BIG_SLAB)
        while sent < total:
            await self._write(slab)
            sent += len(_BIG_SLAB)
        await self._write(_chunk(_DONE) + b"0\r\n\r\n")


async def serve(host: str, port: int, token: str | None) -> None:
    stats = Stats(token)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(stats), host, port, backlog=4096, reuse_address=True)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", help="count requests carrying this bearer token")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.token))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
