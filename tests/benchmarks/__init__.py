"""Benchmarks of the addon against bare mitmproxy: `make bench` (`python -m tests.benchmarks`).

Not part of `make test`: conftest.py keeps pytest out of this folder. Modules:

- `__main__`: the runner; starts everything, alternates the variants, prints the table.
- `upstream`: a fast local HTTP/1.1 server (small JSON, SSE streams, counters).
- `loadgen`: the load generator (asyncio, raw sockets), one process kept for the whole run.
- `hotpath`: the addon's hooks in-process on mitmproxy test flows: µs/request, cProfile, file I/O.
- `noop_addon`: a script with the addon's hooks doing nothing (mitmproxy's price for any addon).
- `timed_addon`: loads the addon script inside a real mitmdump and times its hooks there.
- `profiled_mitmdump`: mitmdump with a cProfile switch, to profile the steady state only.
- `procs`: child processes, /proc (CPU time, RSS), strace, CPU pinning.
- `report`: the machine's description and the markdown report.
"""
