"""The benchmark's HTTP/1.1 load generator: asyncio and raw sockets, run in its own process.

    python -m tests.benchmarks.loadgen '<json spec>'
    python -m tests.benchmarks.loadgen --serve      # one spec per stdin line

Prints one JSON result line per spec. Specs (`kind`):

- `closed`: `concurrency` keep-alive connections, each sending the next request as soon as the
  previous answer is complete, for `warmup` + `duration` seconds. Only requests that complete
  inside the measured window count (connection set-up and warm-up are excluded).
- `burst`: open `n` connections first, then send one request on each at the same instant; the
  latency of each is measured from that instant (so the proxy's accept backlog is not measured).
- `ttfb`: `samples` sequential streamed requests: time to the first event, and to the end.
- `drain`: one streamed request read to its end, discarding the bytes.

Every kind takes `host`, `port` (where to connect) and `url`: an absolute URL is sent in absolute
form (a regular-mode proxy request), a path in origin form (direct to the upstream).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

BODY = json.dumps({"model": "coder-model", "messages": [{"role": "user", "content": "hello"}]}).encode()


def build_request(
    url: str, method: str = "POST", body: bytes = BODY, auth: str = "Bearer client-own-key"
) -> bytes:
    parts = urlsplit(url)
    host = parts.netloc if parts.netloc else "localhost"
    lines = [
        f"{method} {url} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: {auth}",
        "Accept: */*",
        "User-Agent: qwenproxy-bench/1",
    ]
    if method in ("POST", "PUT"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Response:
    __slots__ = ("status", "body", "first_chunk_at")

    def __init__(self, status: int, body: bytes, first_chunk_at: float | None = None) -> None:
        self.status = status
        self.body = body
        self.first_chunk_at = first_chunk_at


async def read_response(reader: asyncio.StreamReader, keep_body: bool = True) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        return Response(status, await reader.readexactly(length) if length else b"")
    if not chunked:
        return Response(status, await reader.read() if keep_body else b"")
    parts: list[bytes] = []
    first = None
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent to us
            break
        data = await reader.readexactly(size + 2)
        if first is None:
            first = time.perf_counter()
        if keep_body:
            parts.append(data[:-2])
    return Response(status, b"".join(parts), first)


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, limit=1 << 20)


async def closed_loop(spec: dict) -> dict:
    request = build_request(spec["url"], spec.get("method", "POST"))
    warmup, duration = spec["warmup"], spec["duration"]
    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    total = 0

    async def worker() -> None:
        nonlocal total
        reader, writer = await _connect(spec["host"], spec["port"])
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                writer.write(request)
                response = await read_response(reader)
                t1 = time.perf_counter()
                total += 1
                if begin <= t1 < end:
                    latencies.append(t1 - t0)
                    statuses[response.status] += 1
        finally:
            writer.close()

    results = await asyncio.gather(*(worker() for _ in range(spec["concurrency"])), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            errors[type(r).__name__] += 1
    return {
        "requests": len(latencies),
        "total": total,
        "rps": len(latencies) / duration,
        "latencies": _summary(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
    }


async def burst(spec: dict) -> dict:
    request = build_request(spec["url"], spec.get("method", "POST"))
    n = spec["n"]
    gate = asyncio.Semaphore(spec.get("connect_concurrency", 50))

    async def connect():
        async with gate:
            return await _connect(spec["host"], spec["port"])

    conns = await asyncio.gather(*(connect() for _ in range(n)))
    fire = asyncio.Event()
    t0_holder: list[float] = []

    async def one(reader, writer) -> tuple[float, int, bytes]:
        await fire.wait()
        writer.write(request)
        response = await read_response(reader)
        done = time.perf_counter() - t0_holder[0]
        writer.close()
        return done, response.status, response.body

    tasks = [asyncio.ensure_future(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.05)  # every task waits at the gate
    t0_holder.append(time.perf_counter())
    fire.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    latencies, statuses, codes, errors = [], Counter(), set(), Counter()
    first_body = next((r[2] for r in results if not isinstance(r, BaseException)), b"")
    for r in results:
        if isinstance(r, BaseException):
            errors[type(r).__name__] += 1
            continue
        latency, status, body = r
        latencies.append(latency)
        statuses[status] += 1
        if status == 503:
            try:
                code = json.loads(body)["error"].get("user_code")
            except (ValueError, KeyError, TypeError):
                code = None
            if code:
                codes.add(code)
    return {
        "requests": len(latencies),
        "latencies": _summary(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "user_codes": sorted(codes),
        "first_body": first_body[:2000].decode("utf-8", "replace"),
        "errors": dict(errors),
    }


async def ttfb(spec: dict) -> dict:
    request = build_request(spec["url"], "GET")
    firsts, totals = [], []
    reader, writer = await _connect(spec["host"], spec["port"])
    try:
        for _ in range(spec["samples"]):
            t0 = time.perf_counter()
            writer.write(request)
            response = await read_response(reader)
            t1 = time.perf_counter()
            if response.status != 200 or response.first_chunk_at is None:
                raise RuntimeError(f"unexpected answer {response.status}")
            firsts.append(response.first_chunk_at - t0)
            totals.append(t1 - t0)
    finally:
        writer.close()
    return {"first": _summary(firsts), "total": _summary(totals)}


async def drain(spec: dict) -> dict:
    request = build_request(spec["url"], "GET")
    reader, writer = await _connect(spec["host"], spec["port"])
    t0 = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    received = 0
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            received += len(await reader.readexactly(size + 2)) - 2
    else:
        length = None
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while length is None or received < length:
            data = await reader.read(min(1 << 20, (length - received) if length is not None else 1 << 20))
            if not data:
                break
            received += len(data)
    elapsed = time.perf_counter() - t0
    writer.close()
    return {"status": status, "bytes": received, "seconds": elapsed}


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    values = sorted(values)
    n = len(values)

    def pct(p: float) -> float:
        return values[min(n - 1, int(p * n))]

    return {"n": n, "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": values[-1], "min": values[0]}


KINDS = {"closed": closed_loop, "burst": burst, "ttfb": ttfb, "drain": drain}


def main(argv: list[str] | None = None) -> int:
    """One spec from the command line; or, with `--serve`, one spec per stdin line, one result per
    stdout line (the runner keeps one such process, so no run pays for a Python start-up)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        for line in sys.stdin:
            if not line.strip():
                continue
            spec = json.loads(line)
            try:
                result = asyncio.run(KINDS[spec["kind"]](spec))
            except Exception as e:  # reported to the runner, which raises it
                result = {"failed": f"{type(e).__name__}: {e}"}
            print(json.dumps(result), flush=True)
        return 0
    spec = json.loads(argv[0])
    result = asyncio.run(KINDS[spec["kind"]](spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
