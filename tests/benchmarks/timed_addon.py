"""A mitmproxy script that loads the addon script and times its hooks inside the real mitmdump.

    QWEN_BENCH_SCRIPT=addon/qwen_addon.py mitmdump -s tests/benchmarks/timed_addon.py ...

Every hook of every addon in the script's `addons` is wrapped: calls, thread CPU time and wall time
are summed; the real-time signal DUMP_SIGNAL prints one `HOOKTIMES {json}` line and resets the sums.
Thread CPU time is what the hook's own code costs there, with the caches as mitmproxy leaves them
between hooks (which an in-process loop over the hooks does not reproduce). Async hooks are timed
from call to return, so a hook that really suspends would also count other tasks' time; on the
valid-token path none does.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path

DUMP_SIGNAL = signal.SIGRTMIN + 3
HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")

_script = Path(
    os.environ.get("QWEN_BENCH_SCRIPT", Path(__file__).resolve().parents[2] / "addon" / "qwen_addon.py")
)
sys.path.insert(0, str(_script.parent))
try:
    _spec = importlib.util.spec_from_file_location("_qwen_bench_script", _script)
    assert _spec and _spec.loader
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
finally:
    sys.path.remove(str(_script.parent))

totals: dict[str, list[int]] = {}


def _add(name: str, cpu: int, wall: int) -> None:
    entry = totals.setdefault(name, [0, 0, 0])
    entry[0] += 1
    entry[1] += cpu
    entry[2] += wall


def _wrap(name: str, fn):
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                return await fn(*args)
            finally:
                _add(name, time.thread_time_ns() - c0, time.perf_counter_ns() - w0)

        return timed_async

    @functools.wraps(fn)
    def timed(*args):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            _add(name, time.thread_time_ns() - c0, time.perf_counter_ns() - w0)

    return timed


for _addon in _module.addons:
    for _hook in HOOKS:
        _fn = getattr(_addon, _hook, None)
        if _fn is not None:
            setattr(_addon, _hook, _wrap(_hook, _fn))


def _dump(*_) -> None:
    out = {k: {"calls": v[0], "cpu_us": v[1] / 1000, "wall_us": v[2] / 1000} for k, v in totals.items()}
    print("HOOKTIMES " + json.dumps(out), flush=True)
    totals.clear()


signal.signal(DUMP_SIGNAL, _dump)

addons = list(_module.addons)
