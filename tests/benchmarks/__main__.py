"""`python -m tests.benchmarks` (`make bench`): the addon against bare mitmproxy, in one run.

    make bench                      # full run (~3.5 min on 2 cores)
    make bench ARGS="--quick"       # smoke run (~40 s)
    make bench ARGS="--repeat 7 --output bench.md"
    .venv-3.12/bin/python -m tests.benchmarks      # the other Python / mitmproxy pair

Sections (each can be picked with --only):
  hotpath   the addon's hooks in-process on mitmproxy test flows: µs per request, cProfile, file
            I/O counted with an audit hook and patched os functions
  overhead  req/s, p50, p99 and mitmdump CPU per request through bare mitmdump, mitmdump with a
            no-op addon, with the Qwen addon (valid token) and with the addon while a login is
            pending (the 503 short-circuit); 1 and 32 clients; alternated rounds
  insitu    the addon's hooks timed inside a real mitmdump under load (timed_addon.py)
  profile   cProfile of bare / no-op / addon mitmdump in steady state (profiled_mitmdump.py)
  strace    file syscalls of the real mitmdump process under load, by path
  streaming time to first SSE chunk; RSS of mitmdump while 100 MB of events stream through
  single    single flight: 500 concurrent requests, expired token / no credential
`--quick` skips profile and strace unless named in --only.

The table goes to stdout (and to --output); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import report
from .procs import (
    PYTHON,
    ROOT,
    LoadGen,
    Mitmdump,
    Placement,
    RssSampler,
    Strace,
    Upstream,
    clean_env,
)

NOOP_SCRIPT = Path(__file__).resolve().parent / "noop_addon.py"
TIMED_SCRIPT = Path(__file__).resolve().parent / "timed_addon.py"
SECTIONS = ("hotpath", "overhead", "insitu", "profile", "strace", "streaming", "single")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description="Benchmark the Qwen addon against bare mitmproxy and print a table.",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (short runs, 1 repeat)")
    parser.add_argument("--repeat", type=int, help="alternated repeats per measurement (default 8; quick 1)")
    parser.add_argument(
        "--duration", type=float, help="seconds measured per load run (default 1.0; quick 0.6)"
    )
    parser.add_argument(
        "--warmup", type=float, help="seconds of load before measuring (default 0.3; quick 0.2)"
    )
    parser.add_argument("--clients", default="1,32", help="concurrent keep-alive clients (default 1,32)")
    parser.add_argument(
        "--burst", type=int, help="concurrent requests of the single-flight test (default 500)"
    )
    parser.add_argument(
        "--stream-mb", type=int, help="size of the streamed event stream (default 100; quick 10)"
    )
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin mitmdump and the rest to separate CPUs"
    )
    parser.add_argument(
        "--addon-root",
        type=Path,
        default=ROOT / "addon",
        help="directory with qwen_addon.py and the qwenproxy package (to compare a changed copy)",
    )
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--json", type=Path, help="write the raw results as JSON here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeat = args.repeat or (1 if quick else 8)
    args.duration = args.duration or (0.6 if quick else 1.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if quick else 0.3)
    args.burst = args.burst or 500
    args.stream_mb = args.stream_mb or (10 if quick else 100)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    explicit = bool(args.only)
    args.only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = args.only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if quick and not explicit:
        args.only -= {"strace", "profile"}
    args.addon_root = args.addon_root.resolve()
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.placement = Placement(pin=not args.no_pin)
        self.confdir = tmp / "mitmproxy"
        self.script = args.addon_root / "qwen_addon.py"
        self.pythonpath = str(args.addon_root) if args.addon_root != (ROOT / "addon").resolve() else None
        self.token = "bench-" + secrets.token_hex(24)
        self.results: dict = {
            "args": {
                k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                for k, v in vars(args).items()
            }
        }
        self.children: list = []
        self.upstream: Upstream | None = None
        self.standin = None
        self._loadgen: LoadGen | None = None

    def loadgen(self, spec: dict, placement=None, timeout=None) -> dict:
        if self._loadgen is None:
            self._loadgen = LoadGen(self.placement)
        return self._loadgen.run(spec)

    # -- set-up -----------------------------------------------------------------------------

    def start_upstream(self) -> Upstream:
        if self.upstream is None:
            self.upstream = Upstream(token=self.token, placement=self.placement)
            self.children.append(self.upstream)
        return self.upstream

    def start_standin(self):
        if self.standin is None:
            from qwenproxy.standin import StandIn

            up = self.start_upstream()
            # Refreshed tokens point at the bench upstream, as the seeded ones do.
            self.standin = StandIn(tls=False, resource_url=f"http://localhost:{up.port}").start()
        return self.standin

    def seed(
        self,
        home: Path,
        *,
        token: str | None = None,
        refresh: str | None = None,
        expires_in: float = 6 * 3600,
    ) -> None:
        from qwenproxy.store import Credentials, CredentialStore

        CredentialStore(home).save(
            Credentials(
                access_token=token or self.token,
                refresh_token=refresh or "bench-refresh-" + secrets.token_hex(8),
                token_type="Bearer",
                expiry_date=int((time.time() + expires_in) * 1000),
                resource_url=f"http://localhost:{self.start_upstream().port}",
            )
        )

    def mitmdump(
        self,
        name: str,
        *,
        addon: bool,
        home: Path | None = None,
        script: Path | None = None,
        options: dict[str, object] | None = None,
        **kwargs,
    ) -> Mitmdump:
        options = dict(options or {})
        if addon:
            standin = self.start_standin()
            options |= {
                "qwen_home": home,
                "qwen_hosts": ["localhost"],
                "qwen_oauth_url": standin.base_url,
                "qwen_open_browser": "false",
                "qwen_retry_after": 1,
            }
        t0 = time.perf_counter()
        proxy = Mitmdump(
            confdir=self.confdir,
            script=script or (self.script if addon else None),
            options=options,
            placement=self.placement,
            pythonpath=self.pythonpath,
            name=name,
            **kwargs,
        )
        proxy.startup_s = time.perf_counter() - t0
        self.children.append(proxy)
        return proxy

    def stop(self, child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        if self._loadgen is not None:
            self._loadgen.close()
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {child.name}: {e}")
        if self.standin is not None:
            self.standin.stop()

    def url(self, path: str) -> str:
        return f"http://localhost:{self.start_upstream().port}{path}"

    def upstream_stats(self) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # direct, whatever the env says
        with opener.open(self.url("/_stats"), timeout=10) as r:
            return json.loads(r.read())

    def load(self, proxy: Mitmdump | None, clients: int, duration: float | None = None) -> dict:
        spec = {
            "kind": "closed",
            "host": "127.0.0.1",
            "port": proxy.port if proxy else self.start_upstream().port,
            "url": self.url("/v1/chat/completions") if proxy else "/v1/chat/completions",
            "concurrency": clients,
            "warmup": self.args.warmup,
            "duration": duration or self.args.duration,
        }
        cpu0 = proxy.cpu_seconds() if proxy else None
        result = self.loadgen(spec, self.placement)
        if proxy is not None:
            total = max(1, result["total"])
            result["cpu_us_per_req"] = (proxy.cpu_seconds() - cpu0) * 1e6 / total
        return result

    # -- sections ---------------------------------------------------------------------------

    def run(self) -> dict:
        only = self.args.only
        self.results["machine"] = report.machine(self.placement)
        self.placement.pin_self()
        t0 = time.perf_counter()
        if "hotpath" in only:
            self.hotpath()
        if only & {"overhead", "insitu", "profile", "strace", "streaming"}:
            self.start_upstream()
            home = self.tmp / "qwen-valid"
            self.seed(home)
            log(
                "starting mitmdump: bare, with a no-op addon, with the addon, with the addon and no credentials"
            )
            self.bare = self.mitmdump("bare", addon=False)
            self.noop = self.mitmdump("noop", addon=False, script=NOOP_SCRIPT) if "overhead" in only else None
            self.with_addon = self.mitmdump("addon", addon=True, home=home)
            self.check_injection()
            if "overhead" in only:
                self.pending = self.mitmdump("pending", addon=True, home=self.tmp / "qwen-empty")
                self.overhead()
                self.stop(self.pending)
                self.stop(self.noop)
            if "insitu" in only:
                self.insitu(home)
            if "profile" in only:
                self.profile(home)
            if "strace" in only:
                self.strace()
            if "streaming" in only:
                self.streaming()
            self.stop(self.bare)
            self.stop(self.with_addon)
        if "single" in only:
            self.single_flight()
        self.results["elapsed_s"] = time.perf_counter() - t0
        self.results["machine"]["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        return self.results

    def hotpath(self) -> None:
        quick = self.args.quick
        spec = {"n": 1000 if quick else 5000, "passes": 2 if quick else 5}
        log(f"hot path in-process: {spec['n']} flows x {spec['passes']} passes")
        import subprocess

        env = clean_env()
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        out = subprocess.run(
            [PYTHON, "-m", "tests.benchmarks.hotpath", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
            preexec_fn=self.placement.preexec(proxy=True),
        )
        if out.returncode != 0:
            raise RuntimeError(f"hot path run failed:\n{out.stderr[-4000:]}")
        self.results["hotpath"] = json.loads(out.stdout.strip().splitlines()[-1])

    def check_injection(self) -> None:
        """The addon's mitmdump sends the seeded token; the bare one passes the client's through."""
        for proxy, expected in (
            (self.with_addon, f"Bearer {self.token}"),
            (self.bare, "Bearer client-own-key"),
        ):
            result = self.loadgen(
                {"kind": "burst", "host": "127.0.0.1", "port": proxy.port, "url": self.url("/_echo"), "n": 1},
                self.placement,
            )
            seen = (
                json.loads(result["first_body"] or "{}").get("authorization")
                if result["statuses"] == {"200": 1}
                else None
            )
            if seen != expected:
                raise RuntimeError(
                    f"{proxy.name}: the upstream saw {seen!r}, expected {expected!r}\n{proxy.log}"
                )
        before = self.upstream_stats()
        self.loadgen(
            {
                "kind": "burst",
                "host": "127.0.0.1",
                "port": self.with_addon.port,
                "url": self.url("/v1/chat/completions"),
                "n": 5,
            },
            self.placement,
        )
        after = self.upstream_stats()
        if after["seeded_token"] - before["seeded_token"] != 5:
            raise RuntimeError(
                f"the addon did not inject the seeded token: {before} -> {after}\n{self.with_addon.log}"
            )

    def overhead(self) -> None:
        args = self.args
        variants = {"bare": self.bare, "noop": self.noop, "addon": self.with_addon, "pending": self.pending}
        # The first request starts the login; later ones get the 503 at once.
        first = self.loadgen(
            {
                "kind": "burst",
                "host": "127.0.0.1",
                "port": self.pending.port,
                "url": self.url("/v1/chat/completions"),
                "n": 1,
            },
            self.placement,
        )
        if first["statuses"] != {"503": 1} or not first["user_codes"]:
            raise RuntimeError(f"expected a 503 with a login code, got {first}\n{self.pending.log}")
        log("warming up the three proxies")
        for proxy in variants.values():
            self.load(proxy, 8, duration=max(0.3, args.duration / 3))
        runs: dict = {c: {v: [] for v in variants} for c in args.clients}
        seeded = {"sent": 0, "seeded": 0}
        for i in range(args.repeat):
            for c in args.clients:
                # ABCD then DCBA: alternation cancels linear drift between variants.
                order = list(variants) if i % 2 == 0 else list(reversed(variants))
                for name in order:
                    before = self.upstream_stats() if name == "addon" else None
                    result = self.load(variants[name], c)
                    if before is not None:
                        after = self.upstream_stats()
                        seeded["sent"] += after["requests"] - before["requests"]
                        seeded["seeded"] += after["seeded_token"] - before["seeded_token"]
                    runs[c][name].append(result)
                    log(
                        f"round {i + 1}/{args.repeat} clients={c:<3} {name:<8} {result['rps']:8.0f} req/s"
                        f"  p50 {result['latencies'].get('p50', 0) * 1e3:6.2f} ms  p99 {result['latencies'].get('p99', 0) * 1e3:6.2f} ms"
                        f"  statuses {result['statuses']} errors {result['errors'] or '-'}"
                    )
        direct = {}
        if not args.quick:
            for c in args.clients:
                direct[c] = self.load(None, c)
        self.results["overhead"] = {
            "runs": {str(c): v for c, v in runs.items()},
            "direct": {str(c): v for c, v in direct.items()},
            "seeded": seeded,
        }

    def insitu(self, home: Path) -> None:
        """The addon's hooks timed inside a real mitmdump under load (timed_addon.py)."""
        proxy = self.mitmdump(
            "timed",
            addon=True,
            home=home,
            script=TIMED_SCRIPT,
            env_extra={"QWEN_BENCH_SCRIPT": str(self.script)},
        )
        out = {}
        duration = 0.8 if self.args.quick else 3.0
        self.load(proxy, 8, duration=0.5)
        for c in self.args.clients:
            proxy.hook_times()  # reset
            result = self.load(proxy, c, duration=duration)
            hooks = proxy.hook_times()
            requests = max((h["calls"] for h in hooks.values()), default=0) or 1
            out[str(c)] = {
                "requests": requests,
                "cpu_us_per_req": result["cpu_us_per_req"],
                "hooks": {
                    k: {
                        "calls": v["calls"],
                        "cpu_us": v["cpu_us"] / requests,
                        "wall_us": v["wall_us"] / requests,
                    }
                    for k, v in hooks.items()
                },
            }
            total = sum(v["cpu_us"] for v in out[str(c)]["hooks"].values())
            log(
                f"in situ, {c} clients: hooks {total:.1f} µs CPU per request of the process's {result['cpu_us_per_req']:.0f}"
            )
        self.stop(proxy)
        self.results["insitu"] = out

    def profile(self, home: Path) -> None:
        """cProfile of bare, no-op and addon mitmdump in steady state under load (CPU-time timer)."""
        import pstats

        from .report import profile_groups

        out = {}
        clients = max(self.args.clients)
        seconds = 1.0 if self.args.quick else 3.0
        kinds = {
            "bare": {"addon": False},
            "noop": {"addon": False, "script": NOOP_SCRIPT},
            "addon": {"addon": True, "home": home},
        }
        stats_of = {}
        for name, kw in kinds.items():
            path = self.tmp / f"{name}.prof"
            proxy = self.mitmdump(f"profiled-{name}", profile_to=path, **kw)
            self.load(proxy, clients, duration=0.5)
            proxy.start_profile()
            result = self.load(proxy, clients, duration=seconds)
            proxy.stop_profile()
            self.stop(proxy)
            stats_of[name] = (pstats.Stats(str(path)), result["total"])
        out = profile_groups(stats_of)
        self.results["profile"] = out
        log(
            f"profiles (µs/req under cProfile): { {k: round(v['total_us']) for k, v in out['variants'].items()} }"
        )

    def strace(self) -> None:
        if not Strace.available:
            self.results["strace"] = {"skipped": "strace is not installed"}
            return
        out = {}
        clients = 8
        for proxy in (self.bare, self.with_addon):
            tracer = Strace(proxy.pid, self.tmp / f"strace-{proxy.name}.txt")
            result = self.load(proxy, clients, duration=3.0)
            counts = tracer.stop()
            out[proxy.name] = {"requests": result["total"], "connections": clients, "counts": counts}
            log(f"strace {proxy.name}: {result['total']} requests over {clients} connections: {counts}")
        self.results["strace"] = out

    def streaming(self) -> None:
        args = self.args
        rounds, samples = (1, 3) if args.quick else (3, 5)
        hold_ms = 300
        # Bare mitmdump told to stream every body: the fair baseline for the time to first chunk.
        streaming_bare = self.mitmdump("bare-stream", addon=False, options={"stream_large_bodies": "1"})
        targets = {"direct": None, "addon": self.with_addon, "bare-stream": streaming_bare, "bare": self.bare}
        firsts: dict[str, list] = {k: [] for k in targets}
        totals: dict[str, list] = {k: [] for k in targets}
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                proxy = targets[name]
                path = f"/sse/first?hold_ms={hold_ms}"
                res = self.loadgen(
                    {
                        "kind": "ttfb",
                        "host": "127.0.0.1",
                        "port": proxy.port if proxy else self.start_upstream().port,
                        "url": self.url(path) if proxy else path,
                        "samples": samples,
                    },
                    self.placement,
                )
                firsts[name].append(res["first"]["p50"])
                totals[name].append(res["total"]["p50"])
        self.results["ttfb"] = {
            "hold_ms": hold_ms,
            "samples": rounds * samples,
            "first_ms": {k: statistics.median(v) * 1e3 for k, v in firsts.items()},
            "total_ms": {k: statistics.median(v) * 1e3 for k, v in totals.items()},
        }
        log(f"time to first chunk: {self.results['ttfb']['first_ms']}")

        size = args.stream_mb * 1024 * 1024
        big = {}
        proxies = [self.with_addon] if args.quick else [self.with_addon, streaming_bare, self.bare]
        for proxy in proxies:
            mem0 = proxy.memory_kb()
            with RssSampler(proxy) as sampler:
                res = self.loadgen(
                    {
                        "kind": "drain",
                        "host": "127.0.0.1",
                        "port": proxy.port,
                        "url": self.url(f"/sse/big?bytes={size}"),
                    },
                    self.placement,
                    timeout=600,
                )
            time.sleep(0.3)
            mem1 = proxy.memory_kb()
            big[proxy.name] = {
                "bytes": res["bytes"],
                "seconds": res["seconds"],
                "status": res["status"],
                "rss_before_kb": mem0["VmRSS"],
                "rss_peak_kb": max(sampler.samples or [mem1["VmRSS"]]),
                "rss_after_kb": mem1["VmRSS"],
                "hwm_before_kb": mem0["VmHWM"],
                "hwm_after_kb": mem1["VmHWM"],
                "samples": len(sampler.samples),
            }
            log(f"{args.stream_mb} MB stream through {proxy.name}: {big[proxy.name]}")
        self.results["bigstream"] = {"mb": args.stream_mb, "through": big}
        self.stop(streaming_bare)

    def single_flight(self) -> None:
        args = self.args
        standin = self.start_standin()
        reps = 1 if args.quick else min(3, args.repeat)
        # "bare": the same burst through a fresh bare mitmdump, what mitmproxy alone takes for it.
        out: dict[str, list] = {"bare": [], "expired": [], "no_credentials": []}
        for rep in range(reps):
            for scenario in out:
                home = self.tmp / f"qwen-{scenario}-{rep}"
                if scenario == "expired":
                    minted = standin.mint_tokens()
                    self.seed(
                        home, token=minted["access_token"], refresh=minted["refresh_token"], expires_in=-60
                    )
                standin.reset_counts()
                proxy = self.mitmdump(f"single-{scenario}", addon=scenario != "bare", home=home)
                res = self.loadgen(
                    {
                        "kind": "burst",
                        "host": "127.0.0.1",
                        "port": proxy.port,
                        "url": self.url("/v1/chat/completions"),
                        "n": args.burst,
                    },
                    self.placement,
                    timeout=300,
                )
                counts = standin.counts
                res["refreshes"] = counts["token_refresh"]
                res["device_authorizations"] = counts["device_code"]
                res["startup_s"] = proxy.startup_s
                self.stop(proxy)
                out[scenario].append(res)
                log(
                    f"single flight {scenario}: {res['statuses']} refreshes={res['refreshes']} "
                    f"device_codes={res['device_authorizations']} codes={len(res['user_codes'])} "
                    f"p99 {res['latencies'].get('p99', 0) * 1e3:.0f} ms errors {res['errors'] or '-'}"
                )
        self.results["single"] = out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv_shown = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            results = bench.run()
        finally:
            bench.close()
    results["command"] = (
        f"{Path(PYTHON).relative_to(ROOT) if Path(PYTHON).is_relative_to(ROOT) else PYTHON} -m tests.benchmarks {argv_shown}".strip()
    )
    text = report.render(results)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
