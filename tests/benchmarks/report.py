"""The machine's description and the markdown report of one benchmark run."""

from __future__ import annotations

import os
import platform
import statistics
import time

TARGET_PCT = 5.0


def machine(placement) -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from mitmproxy.version import VERSION as mitmproxy_version
    except ImportError:  # pragma: no cover
        mitmproxy_version = "?"
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "mitmproxy": mitmproxy_version,
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "placement": placement.describe(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- helpers ------------------------------------------------------------------------------------


def med(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def lat(result: dict, key: str) -> float | None:
    return result["latencies"].get(key)


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# -- the report ---------------------------------------------------------------------------------


def render(results: dict) -> str:
    lines: list[str] = []
    m = results["machine"]
    args = results["args"]
    lines += ["# qwenproxy benchmark", ""]
    lines += [
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory']} RAM; {m['os']}",
        f"- Python {m['python']}, mitmproxy {m['mitmproxy']}; load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end', '?')}",
        f"- Placement: {m['placement']}",
        f"- Run: {m['date']}; {args['repeat']} alternated repeat(s), {args['duration']} s measured per load run "
        f"after {args['warmup']} s warm-up; total {results.get('elapsed_s', 0):.0f} s",
        f"- Reproduce: `make bench` (= `{results.get('command', 'python -m tests.benchmarks')}`); "
        "options: `--quick`, `--repeat N`, `--duration S`, `--only SECTIONS`, `--output FILE`, `--json FILE`",
        "",
    ]
    summary: list[str] = []
    body: list[str] = []
    if "overhead" in results:
        _overhead(results, summary, body)
    if {"hotpath", "insitu", "profile", "strace"} & set(results):
        body += ["## 2. Hot path: what the addon costs per request, and where it goes", ""]
    if "hotpath" in results:
        _hotpath(results, summary, body)
    if "insitu" in results:
        _insitu(results, summary, body)
    if "hotpath" in results:
        _file_io(results, summary, body)
    st = results.get("strace")
    if st and "skipped" not in st:
        body += _strace(st)
    elif st:
        body += [f"strace: {st['skipped']}", ""]
    if "hotpath" in results:
        _hook_profiles(results, summary, body)
    if "profile" in results:
        _profile(results, summary, body)
    if "overhead" in results:
        _short_circuit(results, summary, body)
    if "single" in results:
        _single(results, summary, body)
    if "ttfb" in results or "bigstream" in results:
        _streaming(results, summary, body)
    if summary:
        lines += ["## Summary", ""] + summary + [""]
    return "\n".join(lines + body).rstrip() + "\n"


def _ratios(a_runs: list[dict], b_runs: list[dict], get) -> list[float]:
    ratios = []
    for a, b in zip(a_runs, b_runs, strict=False):
        va, vb = get(a), get(b)
        if va and vb:
            ratios.append(vb / va)
    return ratios


def _paired(a_runs: list[dict], b_runs: list[dict], get) -> float:
    return med(_ratios(a_runs, b_runs, get))


def _spread(a_runs: list[dict], b_runs: list[dict], get) -> str:
    """The interquartile range of the paired ratios: how much the machine's noise moved them."""
    ratios = sorted(_ratios(a_runs, b_runs, get))
    if len(ratios) < 4:
        return ""
    q = statistics.quantiles(ratios, n=4)
    return f" [{q[0]:.2f}–{q[2]:.2f}]"


def _overhead(results, summary, body) -> None:
    data = results["overhead"]
    body += [
        "## 1. Overhead: mitmdump with the addon (valid token) vs bare mitmdump",
        "",
        "Same local upstream (plain HTTP keep-alive, small JSON answer), regular proxy mode, POST "
        "/v1/chat/completions. *No-op addon* is `mitmdump -s tests/benchmarks/noop_addon.py`: the same "
        "hooks doing nothing, i.e. what mitmproxy charges for any script addon with these hooks. "
        "Medians over the repeats; ratios are medians of the ratios of runs made back to back "
        "(ABCD/DCBA order), which cancels drift; [brackets]: interquartile range of those ratios, i.e. "
        "the noise. CPU µs/req is the mitmdump process's own CPU time (/proc, all threads) per request: "
        "mitmdump is CPU-bound on its own core here, so it is the least noisy measure of cost; "
        "req/s and latency also move with whatever else runs on the machine.",
        "",
    ]
    rows = []
    worst_rps, worst_p50, worst_cpu = 0.0, 0.0, 0.0
    own_cpu = []
    for c, runs in data["runs"].items():
        bare, addon, noop = runs["bare"], runs["addon"], runs.get("noop") or []

        def row(metric, get, fmt, c=c, bare=bare, noop=noop, addon=addon):
            values = [fmt(med(get(r) for r in rs)) if rs else "" for rs in (bare, noop, addon)]
            r_bare = _paired(bare, addon, get)
            r_noop = _paired(noop, addon, get) if noop else float("nan")
            rows.append(
                [
                    c,
                    metric,
                    *values,
                    f"{r_bare:.3f} ({pct(r_bare)}){_spread(bare, addon, get)}",
                    f"{r_noop:.3f} ({pct(r_noop)}){_spread(noop, addon, get)}" if noop else "",
                ]
            )
            return r_bare, r_noop

        r_rps, _ = row("req/s", lambda r: r["rps"], lambda v: f"{v:.0f}")
        r_p50, _ = row("p50 ms", lambda r: lat(r, "p50"), ms)
        row("p99 ms", lambda r: lat(r, "p99"), ms)
        r_cpu, r_cpu_noop = row(
            "mitmdump CPU µs/req", lambda r: r.get("cpu_us_per_req"), lambda v: f"{v:.0f}"
        )
        cpu_b = med(r.get("cpu_us_per_req") for r in bare)
        cpu_n = med(r.get("cpu_us_per_req") for r in noop) if noop else float("nan")
        cpu_a = med(r.get("cpu_us_per_req") for r in addon)
        own_cpu.append((c, cpu_a - cpu_b, cpu_a - cpu_n, cpu_n - cpu_b))
        worst_rps = max(worst_rps, (1 - r_rps) * 100)
        worst_p50 = max(worst_p50, (r_p50 - 1) * 100)
        worst_cpu = max(worst_cpu, (r_cpu - 1) * 100)
        direct = data.get("direct", {}).get(c)
        if direct:
            rows.append([c, "req/s direct to upstream (no proxy)", f"{direct['rps']:.0f}", "", "", "", ""])
    body += table(
        [
            "clients",
            "metric",
            "bare mitmdump",
            "no-op addon",
            "Qwen addon",
            "Qwen addon / bare",
            "Qwen addon / no-op",
        ],
        rows,
    )
    body += [""] + [
        f"CPU per request, {c} client(s): the Qwen addon adds {vs_bare:+.0f} µs to bare mitmdump, of which "
        f"{script:+.0f} µs is mitmproxy's price for any script addon with these hooks (no-op) and "
        f"{vs_noop:+.0f} µs is the addon's own work."
        for c, vs_bare, vs_noop, script in own_cpu
    ]
    seeded = data.get("seeded", {})
    if seeded.get("sent"):
        body += [
            "",
            f"Requests through the addon that reached the upstream with the seeded token: "
            f"{seeded['seeded']} of {seeded['sent']}.",
        ]
    errors = {
        f"{c}/{v}": r["errors"]
        for c, runs in data["runs"].items()
        for v, rs in runs.items()
        for r in rs
        if r["errors"]
    }
    if errors:
        body += ["", f"Client errors: {errors}"]
    body.append("")
    summary.append(
        f"- Addon overhead vs bare mitmdump (worst over client counts, paired medians): throughput {-worst_rps:+.1f}%, "
        f"p50 {worst_p50:+.1f}%, mitmdump CPU per request {worst_cpu:+.1f}% "
        f"(target: throughput and p50 within {TARGET_PCT:.0f}%): {verdict(worst_rps <= TARGET_PCT and worst_p50 <= TARGET_PCT)}"
        f"; CPU-based: {verdict(worst_cpu <= TARGET_PCT)}"
    )
    for c, vs_bare, vs_noop, script in own_cpu:
        summary.append(
            f"  - {c} client(s): {vs_bare:+.0f} µs CPU per request = {script:+.0f} µs mitmproxy's price for any "
            f"script addon with these hooks + {vs_noop:+.0f} µs the addon's own work"
        )


def _short_circuit(results, summary, body) -> None:
    data = results["overhead"]
    body += [
        "## 3. Short-circuit: 503 answers while a login is pending vs bare forwarding",
        "",
        "mitmdump with the addon and no credential; the stand-in holds the device code pending "
        "(qwen_open_browser=false). Same rounds as section 1.",
        "",
    ]
    rows = []
    ratios = []
    for c, runs in data["runs"].items():
        bare, pend = runs["bare"], runs["pending"]
        r = _paired(bare, pend, lambda x: x["rps"])
        ratios.append(r)
        statuses = {}
        for x in pend:
            for k, v in x["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        rows.append(
            [
                c,
                f"{med(x['rps'] for x in pend):.0f}",
                f"{med(x['rps'] for x in bare):.0f}",
                f"{r:.2f}×",
                ms(med(lat(x, "p50") for x in pend)),
                ms(med(lat(x, "p50") for x in bare)),
                f"{med(x.get('cpu_us_per_req') for x in pend):.0f} / {med(x.get('cpu_us_per_req') for x in bare):.0f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
            ]
        )
    body += table(
        [
            "clients",
            "503 answers/s",
            "bare forwarding req/s",
            "503 / forwarding",
            "503 p50 ms",
            "forwarding p50 ms",
            "CPU µs/req 503 / fwd",
            "statuses (503 runs)",
        ],
        rows,
    )
    body.append("")
    summary.append(
        f"- 503 short-circuit vs bare forwarding: {min(ratios):.2f}× to {max(ratios):.2f}× the rate: "
        f"{verdict(min(ratios) > 1)} (should be faster)"
    )


def _hotpath(results, summary, body) -> None:
    h = results["hotpath"]
    body += [
        "### The addon's hooks in-process",
        "",
        f"mitmproxy test flows (`mitmproxy.test.tflow`) through the addon's hooks in mitmproxy's order "
        f"(requestheaders, request, responseheaders, response), {h['n']} flows × {h['passes']} passes, "
        "median pass; no sockets. The baseline is the same loop through hooks that do nothing.",
        "",
    ]
    base = h["baseline"]["cpu_us"]
    rows = [["loop baseline (no-op hooks)", f"{h['baseline']['wall_us']:.1f}", f"{base:.1f}", "-"]]
    labels = [("inject", "Qwen host, valid token (inject)"), ("other_host", "other host (passes through)")]
    for key, label in labels:
        rows.append(
            [label, f"{h[key]['wall_us']:.1f}", f"{h[key]['cpu_us']:.1f}", f"{h[key]['cpu_us'] - base:.1f}"]
        )
    sc = h.get("short_circuit", {})
    if "cpu_us" in sc:
        rows.append(
            [
                f"login pending (503 answered; status {sc.get('status')})",
                f"{sc['wall_us']:.1f}",
                f"{sc['cpu_us']:.1f}",
                f"{sc['cpu_us'] - base:.1f}",
            ]
        )
    body += table(["path", "wall µs/req", "CPU µs/req", "net of baseline µs/req"], rows)
    inject_net = h["inject"]["cpu_us"] - base
    ov = results.get("overhead", {}).get("runs", {})
    share = ""
    if ov:
        c = max(ov, key=int)
        cpu_bare = med(r.get("cpu_us_per_req") for r in ov[c]["bare"])
        if cpu_bare == cpu_bare:
            share = (
                f" Bare mitmdump spends {cpu_bare:.0f} µs of CPU per request ({c} clients, section 1): "
                f"the addon's hooks are {inject_net / cpu_bare * 100:.1f}% of that."
            )
            summary.append(
                f"- Addon hooks: {inject_net:.1f} µs CPU per injected request, {inject_net / cpu_bare * 100:.1f}% of bare mitmdump's {cpu_bare:.0f} µs per request"
            )
    check = h.get("check", {})
    body += ["", f"Injection check: token injected = {check.get('injected')}.{share}", ""]


def _file_io(results, summary, body) -> None:
    h = results["hotpath"]
    body += ["### File I/O on the hot path", ""]
    real = h.get("io_real_clock", {})
    sim = h.get("io_sim_clock", {})
    io_rows = []

    def io_row(label, d, seconds):
        counts = d.get("counts", {})
        n = d.get("requests", 0) or 1
        opens = counts.get("open", 0)
        reads = counts.get("os.read", 0)
        stats = sum(v for k, v in counts.items() if k in ("os.stat", "os.lstat", "os.fstat"))
        other = {
            k: v for k, v in counts.items() if k not in ("open", "os.read", "os.stat", "os.lstat", "os.fstat")
        }
        io_rows.append(
            [
                label,
                d.get("requests", 0),
                f"{seconds:.1f}",
                opens,
                reads,
                stats,
                f"{opens / n:.4f} / {reads / n:.4f} / {stats / n:.5f}",
                other or "-",
            ]
        )
        return opens, reads, stats

    if real:
        io_row("real clock (Qwen + other hosts)", real, real.get("seconds", 0))
    sim_counts = None
    if sim:
        sim_counts = io_row("clock moved 1 ms per request", sim, sim.get("simulated_seconds", 0))
    body += [
        "File I/O during the hooks, counted in-process: opens through the `open` audit event "
        "(builtins.open, io.open, os.open) and calls of os.read/os.stat/os.lstat/os.fstat. The second "
        "row moves the store's change-check clock 1 ms per request, so the throttled stat (at most one "
        "per 5 s by design) comes due.",
        "",
    ]
    body += table(
        [
            "run",
            "requests",
            "seconds",
            "opens",
            "reads",
            "stats",
            "per request (open / read / stat)",
            "other",
        ],
        io_rows,
    )
    if sim_counts is not None:
        opens, reads, stats = sim_counts
        allowed = int(sim.get("simulated_seconds", 0) // 5) + 1
        summary.append(
            f"- Hot path file I/O: {opens} opens, {reads} reads, {stats} stats over {sim.get('requests')} requests "
            f"and {sim.get('simulated_seconds'):.0f} simulated s (≤{allowed} stats allowed): "
            f"{verdict(opens == 0 and reads == 0 and stats <= allowed)}"
        )
    body.append("")


def _hook_profiles(results, summary, body) -> None:
    h = results["hotpath"]
    sc = h.get("short_circuit", {})
    body += ["### cProfile of the hooks (in-process)", ""]
    for key, title in (("profile_inject", "Qwen host, valid token"), ("profile_other", "other host")):
        p = h.get(key)
        if not p:
            continue
        body += [
            f"cProfile of the hooks, {title}: {p['total_us']:.1f} µs/req under the profiler "
            "(which inflates small calls ~3×; compare the rows with each other). Top own time:",
            "",
        ]
        rows = [
            [r["func"], f"{r['calls_per_req']:.1f}", f"{r['tottime_us']:.2f}", f"{r['cumtime_us']:.2f}"]
            for r in p["top_tottime"][:12]
        ]
        body += table(["function", "calls/req", "own µs/req", "cumulative µs/req"], rows)
        body += [
            "",
            "By module (own time, µs/req): " + ", ".join(f"{k} {v:.1f}" for k, v in p["by_module"][:8]),
            "",
        ]
    p = sc.get("profile") if isinstance(sc, dict) else None
    if p:
        body += [
            f"cProfile of the 503 path: {p['total_us']:.1f} µs/req under the profiler. Top own time:",
            "",
        ]
        rows = [
            [r["func"], f"{r['calls_per_req']:.1f}", f"{r['tottime_us']:.2f}", f"{r['cumtime_us']:.2f}"]
            for r in p["top_tottime"][:6]
        ]
        body += table(["function", "calls/req", "own µs/req", "cumulative µs/req"], rows) + [""]


def _strace(st: dict) -> list[str]:
    names = [n for n in ("bare", "addon") if n in st]
    first = st[names[0]]
    lines = [
        f"The real processes under load, `strace -f -y -p PID` for ~3.5 s ({first['connections']} keep-alive "
        "client connections, "
        + ", ".join(
            f"{st[n]['requests']} requests through {'bare mitmdump' if n == 'bare' else 'the addon'}"
            for n in names
        )
        + "): every file-related syscall (open, read, stat, access families; socket I/O uses "
        "recvfrom/sendto and is not listed), by path.",
        "",
    ]
    keys = sorted({k for n in names for k in st[n]["counts"]})
    rows = []
    for k in keys:
        syscall, _, path = k.partition(" ")
        note = ""
        if path.endswith("oauth_creds.json"):
            note = "the addon's change check (≤1 per 5 s)"
        elif path.endswith(".py"):
            note = "mitmproxy's script reloader (1 per s)"
        elif path.startswith("/etc/"):
            note = "name resolution, once per upstream connection"
        rows.append([f"`{syscall}`", f"`{path}`"] + [str(st[n]["counts"].get(k, 0)) for n in names] + [note])
    labels = {"bare": "bare mitmdump", "addon": "with addon"}
    lines += table(["syscall", "path", *(labels[n] for n in names), "why"], rows)
    addon = st.get("addon")
    if addon:
        creds = {k: v for k, v in addon["counts"].items() if "oauth_creds" in k}
        opens = sum(v for k, v in creds.items() if k.startswith(("open", "read", "pread")))
        lines += [
            "",
            f"Credential file during {addon['requests']} requests: {opens} opens/reads, "
            f"{sum(creds.values()) - opens} stats.",
        ]
    return lines + [""]


def _single(results, summary, body) -> None:
    data = results["single"]
    body += [
        "## 4. Single flight under load",
        "",
        "A fresh mitmdump with the addon per run; the connections are opened first, then every request "
        "is sent at the same instant (latency from that instant). The stand-in is the OAuth server and "
        "counts refreshes and device authorizations.",
        "",
    ]
    rows = []
    for scenario, runs in data.items():
        if not runs:
            continue
        statuses: dict[str, int] = {}
        for r in runs:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        bare = scenario == "bare"
        rows.append(
            [
                {
                    "bare": "bare mitmdump (baseline)",
                    "expired": "expired token",
                    "no_credentials": "no credential",
                }[scenario],
                runs[0]["latencies"].get("n", 0) + sum(runs[0]["errors"].values()),
                ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                "-" if bare else ", ".join(str(r["refreshes"]) for r in runs),
                "-" if bare else ", ".join(str(r["device_authorizations"]) for r in runs),
                ", ".join(str(len(r["user_codes"])) for r in runs) if scenario == "no_credentials" else "-",
                ms(med(lat(r, "p50") for r in runs)),
                ms(med(lat(r, "p99") for r in runs)),
                ms(med(lat(r, "max") for r in runs)),
                ", ".join(f"{k}: {v}" for r in runs for k, v in r["errors"].items()) or "-",
            ]
        )
    body += table(
        [
            "scenario",
            "concurrent",
            "answers (all runs)",
            "refreshes per run",
            "device authorizations per run",
            "distinct login codes per run",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
        ],
        rows,
    )
    body.append("")
    exp = data.get("expired") or []
    nocred = data.get("no_credentials") or []
    ok = all(r["refreshes"] == 1 and r["device_authorizations"] == 0 for r in exp) and all(
        r["device_authorizations"] == 1 for r in nocred
    )
    base = data.get("bare") or []
    summary.append(
        f"- Single flight ({len(exp)} run(s) each): refreshes per run {[r['refreshes'] for r in exp]}, device authorizations per run "
        f"{[r['device_authorizations'] for r in nocred]} (expect 1 each): {verdict(ok)}; p99 "
        f"{ms(med(lat(r, 'p99') for r in exp))} ms (expired) / {ms(med(lat(r, 'p99') for r in nocred))} ms (no credential)"
        + (
            f" vs {ms(med(lat(r, 'p99') for r in base))} ms for the same burst through bare mitmdump"
            if base
            else ""
        )
    )


def _streaming(results, summary, body) -> None:
    body += ["## 5. Streaming", ""]
    t = results.get("ttfb")
    if t:
        body += [
            f"Time to the first SSE chunk: the upstream sends its first event at once and the rest "
            f"{t['hold_ms']} ms later. Median of {t['samples']} requests each.",
            "",
        ]
        names = {
            "direct": "direct to upstream",
            "addon": "mitmdump with the addon",
            "bare-stream": "bare mitmdump, `stream_large_bodies=1`",
            "bare": "bare mitmdump, defaults (buffers SSE)",
        }
        rows = [
            [names[k], f"{t['first_ms'][k]:.2f}", f"{t['total_ms'][k]:.1f}"]
            for k in names
            if k in t["first_ms"]
        ]
        body += table(["path", "first chunk ms", "whole stream ms"], rows) + [""]
        base = t["first_ms"].get("bare-stream")
        summary.append(
            f"- First SSE chunk: {t['first_ms']['addon']:.2f} ms through the addon vs {t['first_ms']['direct']:.2f} ms "
            f"direct"
            + (f" and {base:.2f} ms through streaming bare mitmdump" if base is not None else "")
            + f" (bare mitmdump with defaults buffers: {t['first_ms']['bare']:.0f} ms)"
        )
    b = results.get("bigstream")
    if b:
        body += [
            f"RSS of mitmdump (/proc VmRSS sampled every 20 ms; VmHWM = peak since start) while a {b['mb']} MB "
            "event stream passes through to a client that reads it as fast as it can:",
            "",
        ]
        rows = []
        for name, d in b["through"].items():
            label = {
                "addon": "mitmdump with the addon (streams SSE)",
                "bare-stream": "bare mitmdump, `stream_large_bodies=1`",
                "bare": "bare mitmdump, defaults (buffers)",
            }.get(name, name)
            rows.append(
                [
                    label,
                    f"{d['bytes'] / 2**20:.0f}",
                    f"{d['bytes'] / 2**20 / d['seconds']:.0f}",
                    f"{d['rss_before_kb'] / 1024:.0f}",
                    f"{d['rss_peak_kb'] / 1024:.0f}",
                    f"{d['rss_after_kb'] / 1024:.0f}",
                    f"{d['hwm_before_kb'] / 1024:.0f} → {d['hwm_after_kb'] / 1024:.0f}",
                ]
            )
        body += table(
            ["through", "MB", "MB/s", "RSS before MB", "RSS peak MB", "RSS after MB", "VmHWM MB"], rows
        ) + [""]
        a = b["through"].get("addon")
        if a:
            growth = max(a["rss_peak_kb"] - a["rss_before_kb"], a["hwm_after_kb"] - a["hwm_before_kb"]) / 1024
            flat = growth < max(32, b["mb"] * 0.1)
            summary.append(
                f"- {b['mb']} MB stream through the addon: RSS +{growth:.0f} MB at peak: {verdict(flat)} (flat)"
            )


# -- whole-process profiles ---------------------------------------------------------------------


def _group(filename: str, func: str) -> str:
    if filename.startswith("~") or filename == "":
        if any(w in func for w in ("recv", "send", "socket", "sock_")):
            return "socket I/O (C)"
        if any(w in func for w in ("select", "poll", "epoll")):
            return "event loop wait (C)"
        return "other C builtins"
    f = filename.replace("\\", "/")
    if "qwenproxy/" in f or "qwen_addon" in f:
        return "qwenproxy (the addon)"
    if "noop_addon" in f or "timed_addon" in f:
        return "bench addon"
    if "mitmproxy/" in f:
        rest = f.rsplit("mitmproxy/", 1)[1]
        if rest.startswith("proxy/layers/http"):
            return "mitmproxy HTTP layer"
        if rest.startswith("proxy/"):
            return "mitmproxy proxy core (server, layers, events)"
        if rest.startswith(("addonmanager", "hooks")):
            return "mitmproxy hook dispatch"
        if rest.startswith("addons/"):
            return "mitmproxy default addons"
        if rest.startswith(("http.py", "coretypes/", "net/", "flow.py", "connection.py")):
            return "mitmproxy HTTP model and parsing"
        return "mitmproxy other (utils, options, ...)"
    if "/asyncio/" in f or f.endswith("selectors.py"):
        return "asyncio (Python)"
    return "other stdlib / libraries"


def _short_func(filename: str, line: int, func: str) -> str:
    if filename.startswith("~"):
        return func
    for marker in ("site-packages/", "/addon/", "/lib/python3"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({func})"


def profile_groups(stats_of: dict) -> dict:
    """Per-request own time by group for each profiled variant, and the functions whose own time
    differs most between variants (addon vs no-op, no-op vs bare)."""
    variants = {}
    funcs: dict[str, dict[str, float]] = {}
    for name, (stats, requests) in stats_of.items():
        n = max(1, requests)
        groups: dict[str, float] = {}
        per_func: dict[str, float] = {}
        total = 0.0
        for (filename, line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
            us = tt * 1e6 / n
            total += us
            g = _group(filename, func)
            groups[g] = groups.get(g, 0.0) + us
            key = _short_func(filename, line, func)
            per_func[key] = per_func.get(key, 0.0) + us
        variants[name] = {"requests": requests, "total_us": total, "groups": groups}
        funcs[name] = per_func

    def diff(a: str, b: str) -> list:
        if a not in funcs or b not in funcs:
            return []
        keys = set(funcs[a]) | set(funcs[b])
        rows = [(k, funcs[b].get(k, 0.0), funcs[a].get(k, 0.0)) for k in keys]
        rows.sort(key=lambda r: r[2] - r[1], reverse=True)
        return [{"func": k, "before_us": x, "after_us": y} for k, x, y in rows[:10]]

    return {
        "variants": variants,
        "addon_minus_noop": diff("addon", "noop"),
        "noop_minus_bare": diff("noop", "bare"),
    }


def _profile(results, summary, body) -> None:
    p = results["profile"]
    v = p["variants"]
    names = [n for n in ("bare", "noop", "addon") if n in v]
    body += [
        "### Where a request's CPU goes in mitmdump (cProfile, thread CPU time)",
        "",
        "Each variant profiled in steady state under load (the profiler is switched on after warm-up); "
        "own time per request, grouped. cProfile inflates Python-heavy code several times, so read the "
        "shares and differences, not the absolute values.",
        "",
    ]
    groups = sorted(
        {g for n in names for g in v[n]["groups"]},
        key=lambda g: -max(v[n]["groups"].get(g, 0) for n in names),
    )
    rows = [[g] + [f"{v[n]['groups'].get(g, 0):.0f}" for n in names] for g in groups]
    rows.append(["**total**"] + [f"**{v[n]['total_us']:.0f}**" for n in names])
    label = {"bare": "bare mitmdump", "noop": "no-op addon", "addon": "Qwen addon"}
    body += table(["group (µs/req under the profiler)"] + [label[n] for n in names], rows) + [""]
    for key, title in (
        ("noop_minus_bare", "no-op addon vs bare"),
        ("addon_minus_noop", "Qwen addon vs no-op addon"),
    ):
        rows = [
            [
                r["func"],
                f"{r['before_us']:.1f}",
                f"{r['after_us']:.1f}",
                f"{r['after_us'] - r['before_us']:+.1f}",
            ]
            for r in p.get(key, [])[:8]
        ]
        if rows:
            body += [f"Largest own-time increases, {title} (µs/req under the profiler):", ""]
            body += table(["function", "before", "after", "Δ"], rows) + [""]
    if all(n in v for n in ("bare", "noop", "addon")):
        bare = v["bare"]["total_us"]
        dispatch = v["bare"]["groups"].get("mitmproxy hook dispatch", 0.0)
        summary.append(
            f"- Profile (cProfile, CPU time): hook dispatch is {dispatch / bare * 100:.0f}% of a bare mitmdump request; "
            f"a script addon with no-op hooks adds {(v['noop']['total_us'] / bare - 1) * 100:+.1f}%, the Qwen addon "
            f"{(v['addon']['total_us'] / bare - 1) * 100:+.1f}% in all (its own code "
            f"{v['addon']['groups'].get('qwenproxy (the addon)', 0.0) / bare * 100:.1f}%, the rest mostly mitmproxy's header code it calls)"
        )


def _insitu(results, summary, body) -> None:
    data = results["insitu"]
    body += [
        "### The addon's hooks timed inside the real mitmdump",
        "",
        "`mitmdump -s tests/benchmarks/timed_addon.py` loads the addon script and wraps each hook with a "
        "thread-CPU-time counter (wrapper cost ~1 µs per hook). Unlike the in-process loop above, the hooks "
        "run here with the caches as mitmproxy's own per-request work leaves them.",
        "",
    ]
    rows = []
    for c, d in data.items():
        hooks = d["hooks"]
        total = sum(h["cpu_us"] for h in hooks.values())
        parts = ", ".join(f"{k} {h['cpu_us']:.1f}" for k, h in hooks.items())
        rows.append(
            [
                c,
                d["requests"],
                f"{total:.1f}",
                parts,
                f"{d['cpu_us_per_req']:.0f}",
                f"{total / d['cpu_us_per_req'] * 100:.1f}%",
            ]
        )
    body += table(
        ["clients", "requests", "hooks CPU µs/req", "per hook", "whole process CPU µs/req", "hooks' share"],
        rows,
    ) + [""]
    worst = max(
        (sum(h["cpu_us"] for h in d["hooks"].values()) / d["cpu_us_per_req"] * 100) for d in data.values()
    )
    summary.append(
        f"- Hooks timed inside the real mitmdump: up to {worst:.1f}% of the process's CPU per request"
    )
