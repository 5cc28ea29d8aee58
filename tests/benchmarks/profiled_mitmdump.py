"""`mitmdump` with a cProfile switch: START_SIGNAL starts profiling, STOP_SIGNAL stops and writes
the stats (real-time signals: mitmproxy itself uses SIGUSR1/SIGUSR2 to dump its state).

    python -m tests.benchmarks.profiled_mitmdump STATS_FILE [mitmdump arguments...]

Lets the runner profile only the steady state of a real mitmdump under load (not its start-up), to
show where mitmproxy's own time goes per request and what an addon adds to it.
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time

START_SIGNAL = signal.SIGRTMIN + 1
STOP_SIGNAL = signal.SIGRTMIN + 2


def main() -> None:
    out = sys.argv[1]
    # Thread CPU time, not wall time: other processes on the machine then do not show up in it.
    profiler = cProfile.Profile(time.thread_time)

    def start(*_):
        profiler.enable()

    def stop(*_):
        profiler.disable()
        profiler.dump_stats(out)
        print(f"profile written to {out}", flush=True)

    signal.signal(START_SIGNAL, start)
    signal.signal(STOP_SIGNAL, stop)
    sys.argv = ["mitmdump", *sys.argv[2:]]
    from mitmproxy.tools.main import mitmdump

    mitmdump()


if __name__ == "__main__":
    main()
