"""The addon's hooks in-process, without sockets: CPU per request, a profile, and file I/O counts.

    python -m tests.benchmarks.hotpath '{"n": 5000, "passes": 5}'

Runs in its own process (the runner starts it): it installs an audit hook, which cannot be removed.
Prints one JSON line. Flows are mitmproxy test flows (`mitmproxy.test.tflow`); the hooks are called
directly, the way mitmproxy's addon manager calls them, and the same loop with an addon whose hooks
do nothing is the baseline that is subtracted.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import os
import pstats
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from qwenproxy.addon import QwenAuth
from qwenproxy.store import Credentials, CredentialStore

UPSTREAM = "http://localhost:8000"
HOOKS = ("requestheaders", "request", "responseheaders", "response")


class NullAddon:
    """Baseline: hooks that return at once (what the loop and the calls cost by themselves)."""

    async def requestheaders(self, flow):
        return None

    def responseheaders(self, flow):
        return None


def make_flows(
    n: int, host: str, port: int = 8000, scheme: str = "http"
) -> list[tuple[http.HTTPFlow, http.Request, http.Response]]:
    out = []
    for _ in range(n):
        req = tutils.treq(
            host=host, port=port, scheme=scheme.encode(), path=b"/v1/chat/completions", method=b"POST"
        )
        req.headers["Authorization"] = "Bearer client-own-key"
        req.headers["Content-Type"] = "application/json"
        f = tflow.tflow(req=req)
        resp = tutils.tresp(headers=[(b"content-type", b"application/json")])
        out.append((f, req.copy(), resp))
    return out


def reset(flows) -> None:
    for f, original, _ in flows:
        f.request = original.copy()
        f.response = None
        f.metadata.clear()
        f.comment = ""


def hooks_of(addon) -> list[tuple[str, object, bool]]:
    found = []
    for name in HOOKS:
        fn = getattr(addon, name, None)
        if fn is not None:
            found.append((name, fn, asyncio.iscoroutinefunction(fn)))
    return found


async def drive(addon, flows, tick=None) -> None:
    """Every flow through the addon's hooks in mitmproxy's order; the response arrives after the
    request hooks (unless the addon answered it itself)."""
    hooks = hooks_of(addon)
    for f, _, resp in flows:
        if tick is not None:
            tick()
        for name, fn, is_async in hooks:
            if name == "responseheaders" and f.response is None:
                f.response = resp
            if is_async:
                await fn(f)
            else:
                fn(f)


async def timed(addon, flows, passes: int) -> dict:
    """Median wall and CPU µs per request over `passes` passes of all flows."""
    walls, cpus = [], []
    for _ in range(passes):
        reset(flows)
        w0, c0 = time.perf_counter(), time.process_time()
        await drive(addon, flows)
        w1, c1 = time.perf_counter(), time.process_time()
        walls.append((w1 - w0) * 1e6 / len(flows))
        cpus.append((c1 - c0) * 1e6 / len(flows))
    return {"wall_us": statistics.median(walls), "cpu_us": statistics.median(cpus), "passes": walls}


def seed(home: Path, token: str) -> None:
    CredentialStore(home).save(
        Credentials(
            access_token=token,
            refresh_token="bench-refresh-" + secrets.token_hex(8),
            token_type="Bearer",
            expiry_date=int((time.time() + 6 * 3600) * 1000),
            resource_url=UPSTREAM,
        )
    )


# -- file I/O counting ----------------------------------------------------------------------------


class IOCounter:
    """Counts file opens (the `open` audit event: builtins.open, io.open, os.open) and calls of
    os.read / os.stat / os.lstat / os.fstat / os.scandir / os.listdir while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.counts: dict[str, int] = {}
        self.paths: dict[str, int] = {}
        sys.addaudithook(self._audit)
        for name in ("read", "stat", "lstat", "fstat", "scandir", "listdir"):
            self._wrap(name)

    def _bump(self, key: str, path=None) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if path is not None:
            p = f"{key} {os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path}"
            self.paths[p] = self.paths.get(p, 0) + 1

    def _audit(self, event: str, args) -> None:
        if self.active and event == "open":
            self._bump("open", args[0])

    def _wrap(self, name: str) -> None:
        original = getattr(os, name)
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                counter._bump(f"os.{name}", args[0] if args and name != "read" else None)
            return original(*args, **kwargs)

        setattr(os, name, wrapper)


class StepClock:
    """A clock that moves only when ticked: simulated time for the store's change check."""

    def __init__(self, step: float) -> None:
        self.now = time.time()
        self.step = step

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


# -- profile --------------------------------------------------------------------------------------


def short(filename: str) -> str:
    for marker in ("site-packages/", "/addon/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


async def profiled(addon, flows) -> dict:
    reset(flows)
    prof = cProfile.Profile()
    prof.enable()
    await drive(addon, flows)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    n = len(flows)
    rows = []
    by_module: dict[str, float] = {}
    total = 0.0
    for (filename, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        module = short(filename)
        if filename.startswith("~"):
            module = "builtins"
        elif "qwenproxy/" in filename:
            module = "qwenproxy/" + filename.rsplit("qwenproxy/", 1)[1]
        elif "mitmproxy/" in filename:
            module = "mitmproxy/" + filename.rsplit("mitmproxy/", 1)[1].split("/")[0]
        else:
            module = "stdlib/" + Path(filename).name
        by_module[module] = by_module.get(module, 0.0) + tt
        rows.append(
            {
                "func": f"{short(filename)}:{line}({func})" if not filename.startswith("~") else func,
                "calls_per_req": nc / n,
                "tottime_us": tt * 1e6 / n,
                "cumtime_us": ct * 1e6 / n,
            }
        )
    rows = [r for r in rows if "benchmarks/hotpath.py" not in r["func"]]  # the driving loop itself
    rows.sort(key=lambda r: r["tottime_us"], reverse=True)
    cum = sorted(rows, key=lambda r: r["cumtime_us"], reverse=True)
    return {
        "total_us": total * 1e6 / n,
        "top_tottime": rows[:15],
        "top_cumtime": cum[:15],
        "by_module": sorted(((k, v * 1e6 / n) for k, v in by_module.items()), key=lambda kv: -kv[1])[:12],
    }


def configure(tctx, addon, **options) -> None:
    """The benchmark's options; those this version of the addon lacks are left out."""
    wanted = {"qwen_hosts": ["localhost"], "qwen_open_browser": False, "qwen_hold": 0, **options}
    tctx.configure(addon, **{k: v for k, v in wanted.items() if k in tctx.options})


# -- the run --------------------------------------------------------------------------------------


async def run(spec: dict) -> dict:
    n, passes = spec["n"], spec["passes"]
    io_counter = IOCounter()
    tmp = Path(tempfile.mkdtemp(prefix="qwen-bench-hot-"))
    home = tmp / "qwen"
    token = "bench-" + secrets.token_hex(24)
    seed(home, token)
    out: dict = {"n": n, "passes": passes}

    null = NullAddon()
    qwen_flows = make_flows(n, "localhost")
    other_flows = make_flows(n, "example.com", 443, "https")
    with taddons.context(null):
        await drive(null, qwen_flows[:200])
        out["baseline"] = await timed(null, qwen_flows, passes)

    addon = QwenAuth()
    with taddons.context(addon) as tctx:
        configure(tctx, addon, qwen_home=str(home), qwen_oauth_url="http://127.0.0.1:9")
        reset(qwen_flows)
        probe = qwen_flows[0][0]
        await addon.requestheaders(probe)
        for hook in ("request",):
            fn = getattr(addon, hook, None)
            if fn is not None:
                result = fn(probe)
                if asyncio.iscoroutine(result):
                    await result
        out["check"] = {
            "injected": probe.request.headers.get("Authorization") == f"Bearer {token}",
            "host": probe.request.host,
        }
        await drive(addon, qwen_flows[1:200])  # warms caches
        out["inject"] = await timed(addon, qwen_flows, passes)
        out["other_host"] = await timed(addon, other_flows, passes)

        # File I/O on the hot path: real clock, then a simulated clock moving 1 ms per request
        # (n requests = n ms), so the store's throttled change check comes due several times.
        reset(qwen_flows)
        reset(other_flows)
        io_counter.active = True
        w0 = time.perf_counter()
        await drive(addon, qwen_flows)
        await drive(addon, other_flows)
        real_seconds = time.perf_counter() - w0
        io_counter.active = False
        out["io_real_clock"] = {
            "requests": 2 * n,
            "seconds": real_seconds,
            "counts": dict(io_counter.counts),
            "paths": dict(io_counter.paths),
        }

        store = addon.tokens.store if addon.tokens else None
        if store is not None and hasattr(store, "_clock"):
            clock = StepClock(0.001)
            store._clock = clock  # only the change check's pacing; token expiry uses real time
            io_counter.counts.clear()
            io_counter.paths.clear()
            sim_n = 0
            while sim_n < 20000:  # the same flows again and again: 20 simulated seconds
                reset(qwen_flows)
                io_counter.active = True
                await drive(addon, qwen_flows, tick=clock.tick)
                io_counter.active = False
                sim_n += len(qwen_flows)
            out["io_sim_clock"] = {
                "requests": sim_n,
                "simulated_seconds": sim_n * clock.step,
                "counts": dict(io_counter.counts),
                "paths": dict(io_counter.paths),
            }
            store._clock = time.time

        out["profile_inject"] = await profiled(addon, qwen_flows)
        out["profile_other"] = await profiled(addon, other_flows)
        addon.done()

    out["short_circuit"] = await short_circuit(n, passes, tmp)
    return out


async def short_circuit(n: int, passes: int, tmp: Path) -> dict:
    """The 503 path with a login pending at an in-process stand-in."""
    try:
        from qwenproxy.standin import StandIn
    except ImportError:
        return {"skipped": "no stand-in"}
    standin = StandIn(tls=False).start()
    try:
        addon = QwenAuth()
        with taddons.context(addon) as tctx:
            configure(tctx, addon, qwen_home=str(tmp / "empty"), qwen_oauth_url=standin.base_url)
            flows = make_flows(n, "localhost")
            await drive(addon, flows[:50])  # starts the login, waits for its device code
            status = flows[0][0].response.status_code if flows[0][0].response else None
            result = await timed(addon, flows, passes)
            result["status"] = status
            result["device_codes"] = standin.counts["device_code"]
            result["profile"] = await profiled(addon, flows)
            addon.done()
            await asyncio.sleep(0)
        return result
    finally:
        standin.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0]) if argv else {"n": 5000, "passes": 5}
    import logging

    logging.disable(logging.WARNING)  # the login box and its logs are not what we measure
    result = asyncio.run(run(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
