"""A real `mitmdump -s addon/qwen_addon.py` in a subprocess, as users run it.

Waits for events, never sleeps: the listening line and log lines are awaited through a reader
thread and a condition variable.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addon" / "qwen_addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
LISTENING = re.compile(r"listening at (?:\*|[\d.]+|\[[^\]]+\]):(\d+)")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no proxies of this machine, no stray Qwen home."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "QWEN_HOME"}
    env.update(extra)
    return env


class Mitmdump:
    def __init__(
        self,
        *,
        confdir: Path,
        qwen_home: Path,
        oauth_url: str,
        upstream_ca: Path | None = None,
        mode: str = "regular",
        options: dict[str, object] | None = None,
        args: list[str] | None = None,
        listen_host: str = "127.0.0.1",
        with_addon: bool = True,
        script: Path = SCRIPT,
    ):
        self.confdir = confdir
        self.with_addon = with_addon
        self.script = script
        self.options = {
            "confdir": confdir,
            "qwen_home": qwen_home,
            "qwen_oauth_url": oauth_url,
            "qwen_open_browser": "false",
            "qwen_retry_after": 1,
            "flow_detail": 0,
            **({"ssl_verify_upstream_trusted_ca": upstream_ca} if upstream_ca else {}),
            **(options or {}),
        }
        self.mode = mode
        self.listen_host = listen_host
        self.args = args or []
        self.port: int | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(MITMDUMP),
            *(["-s", str(self.script)] if self.with_addon else []),  # without: qwen_* options are ignored
            "--listen-host",
            self.listen_host,
            "-p",
            "0",
            "--mode",
            self.mode,
        ]
        for key, value in self.options.items():
            if isinstance(value, (list, tuple)):
                for item in value:
                    cmd += ["--set", f"{key}={item}"]
            else:
                cmd += ["--set", f"{key}={value}"]
        return cmd + self.args

    def start(self, timeout: float = 30) -> Mitmdump:
        self._proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(PYTHONUNBUFFERED="1"),
            text=True,
            cwd=ROOT,
        )
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for_log(LISTENING, timeout)
        self.port = int(LISTENING.search(line).group(1))
        return self

    def _read(self) -> None:
        assert self._proc and self._proc.stdout
        for line in self._proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exited>")
            self._cond.notify_all()

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = 20, start: int = 0) -> str:
        """The first log line from index `start` on that matches; raises with the log on timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        index = start

        def find():
            nonlocal index
            while index < len(self.lines):
                line = self.lines[index]
                index += 1
                if regex.search(line) or line == "<exited>":
                    return line
            return None

        with self._cond:
            found = self._cond.wait_for(find, timeout)
        if not found or found == "<exited>":
            raise AssertionError(f"no log line matching {regex.pattern!r}; log:\n{self.log}")
        return found

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, timeout: float = 15) -> int:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"mitmdump did not stop on SIGINT; log:\n{self.log}") from None

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
