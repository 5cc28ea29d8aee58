"""Child processes of the benchmark: mitmdump, the upstream, the load generator, and what we read
about them from /proc (CPU time, RSS) and strace."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
MITMDUMP = Path(sys.executable).parent / "mitmdump"
LISTENING = re.compile(r"listening at (?:\*|[\d.]+|\[[^\]]+\]):(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def clean_env(**extra: str) -> dict[str, str]:
    """No proxies of this machine, no stray Qwen home; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "QWEN_HOME"}
    env.update(extra)
    return env


class Placement:
    """Which CPUs each side runs on. With 2+ CPUs, mitmdump gets its own CPU and everything else
    (upstream, load generator, this process) shares the rest, so that they do not steal time from
    the process under test; `--no-pin` turns it off."""

    def __init__(self, pin: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.enabled = pin and len(cpus) >= 2
        self.proxy = {cpus[0]} if self.enabled else None
        self.others = set(cpus[1:]) if self.enabled else None

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned"
        return f"mitmdump on CPU {sorted(self.proxy)}, upstream + load generator + runner on CPU {sorted(self.others)}"

    def pin_self(self) -> None:
        if self.enabled:
            os.sched_setaffinity(0, self.others)

    def preexec(self, proxy: bool):
        cpus = self.proxy if proxy else self.others
        if not cpus:
            return None
        return lambda: os.sched_setaffinity(0, cpus)


class Child:
    """A child process whose output is collected by a reader thread; waits for a line."""

    def __init__(self, cmd: list[str], *, env: dict[str, str], preexec=None, name: str = "") -> None:
        self.cmd = cmd
        self.name = name or Path(cmd[0]).name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            cwd=ROOT,
            preexec_fn=preexec,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exited>")
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern | str, timeout: float = 60, start: int = 0) -> re.Match:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        index = start
        found: list[re.Match] = []

        def find() -> bool:
            nonlocal index
            while index < len(self.lines):
                line = self.lines[index]
                index += 1
                if line == "<exited>":
                    return True
                m = regex.search(line)
                if m:
                    found.append(m)
                    return True
            return False

        with self._cond:
            self._cond.wait_for(find, timeout)
        if not found:
            raise RuntimeError(f"{self.name}: no line matching {regex.pattern!r}; output:\n{self.log}")
        return found[0]

    def started(self, pattern: re.Pattern | str, timeout: float = 60) -> re.Match:
        """`wait_for` the line that says it is ready; a child that never says so is killed."""
        try:
            return self.wait_for(pattern, timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def stop(self, timeout: float = 15) -> None:
        proc = self.proc
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- /proc ------------------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in kB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
        return out


class Mitmdump(Child):
    """`mitmdump` on a free loopback port: bare (`script=None`) or with the addon script."""

    def __init__(
        self,
        *,
        confdir: Path,
        script: Path | None,
        options: dict[str, object] | None = None,
        placement: Placement,
        pythonpath: str | None = None,
        name: str = "mitmdump",
        profile_to: Path | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        if profile_to is None:
            cmd = [str(MITMDUMP)]
        else:  # the same mitmdump, with a cProfile switch (see profiled_mitmdump.py)
            cmd = [PYTHON, "-m", "tests.benchmarks.profiled_mitmdump", str(profile_to)]
        self.profile_to = profile_to
        cmd += ["--listen-host", "127.0.0.1", "-p", "0"]
        if script is not None:
            cmd += ["-s", str(script)]
        # flow_detail=0: no line per flow, so printing does not dilute what we compare.
        opts = {"confdir": confdir, "flow_detail": 0, **(options or {})}
        for key, value in opts.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                cmd += ["--set", f"{key}={item}"]
        env = clean_env(PYTHONUNBUFFERED="1", **(env_extra or {}))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        super().__init__(cmd, env=env, preexec=placement.preexec(proxy=True), name=name)
        self.port = int(self.started(LISTENING).group(1))

    def hook_times(self) -> dict:
        """With tests/benchmarks/timed_addon.py: the hook times since the last call (and reset)."""
        mark = len(self.lines)
        self.proc.send_signal(signal.SIGRTMIN + 3)  # timed_addon.DUMP_SIGNAL
        line = self.wait_for(r"HOOKTIMES (\{.*\})", timeout=30, start=mark)
        return json.loads(line.group(1))

    def start_profile(self) -> None:
        self.proc.send_signal(signal.SIGRTMIN + 1)  # profiled_mitmdump.START_SIGNAL

    def stop_profile(self, timeout: float = 60) -> Path:
        mark = len(self.lines)
        self.proc.send_signal(signal.SIGRTMIN + 2)  # profiled_mitmdump.STOP_SIGNAL
        self.wait_for("profile written", timeout=timeout, start=mark)
        assert self.profile_to is not None
        return self.profile_to


class Upstream(Child):
    def __init__(self, *, token: str, placement: Placement) -> None:
        cmd = [PYTHON, "-m", "tests.benchmarks.upstream", "--token", token]
        super().__init__(
            cmd, env=clean_env(PYTHONUNBUFFERED="1"), preexec=placement.preexec(proxy=False), name="upstream"
        )
        self.port = int(self.started(r"^listening (\d+)").group(1))


class LoadGen:
    """The load generator process, kept for the whole run: a spec in, a JSON result out."""

    def __init__(self, placement: Placement) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tests.benchmarks.loadgen", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            cwd=ROOT,
            env=clean_env(),
            preexec_fn=placement.preexec(proxy=False),
        )

    def run(self, spec: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited ({self.proc.wait()})")
        result = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']} (spec {spec})")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread."""

    def __init__(self, child: Child, interval: float = 0.02) -> None:
        self.child = child
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.child.memory_kb()["VmRSS"])
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


STRACE_CALLS = "openat,open,read,pread64,readv,stat,lstat,fstat,newfstatat,statx,access,faccessat,faccessat2"


class Strace:
    """`strace -f -y -p PID` around a stretch of load: file syscalls of every thread, by path."""

    available = shutil.which("strace") is not None

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-y", "-qq", "-e", f"trace={STRACE_CALLS}", "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached to every thread

    def stop(self) -> dict[str, int]:
        """Counts by "syscall path" (sockets and pipes folded into one entry each)."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        counts: dict[str, int] = {}
        call = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)")
        for line in self.out.read_text(errors="replace").splitlines():
            if "resumed>" in line:
                continue
            m = call.match(line)
            if not m or m.group(1) not in STRACE_CALLS.split(","):
                continue
            args = m.group(2)
            path = (
                re.search(r'"([^"]*)"', args)
                if m.group(1) not in ("read", "pread64", "readv", "fstat")
                else None
            )
            fd = re.search(r"^\d+<([^>]*)>", args)
            if path and not (m.group(1) == "newfstatat" and path.group(1) == "" and fd):
                target = path.group(1)
            elif fd:
                target = fd.group(1)
            else:
                target = "?"
            if target.startswith(("socket:", "TCP:", "TCPv6:", "UNIX:")):
                target = "<socket>"
            elif target.startswith("pipe:"):
                target = "<pipe>"
            elif target.startswith("anon_inode:"):
                target = "<" + target + ">"
            key = f"{m.group(1)} {target}"
            counts[key] = counts.get(key, 0) + 1
        return counts
