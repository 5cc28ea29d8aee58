"""`make demo` / `python -m qwenproxy.demo`: the whole story, offline, on this machine.

Starts a local stand-in of Qwen's OAuth and API servers (HTTPS, with a throwaway CA), and a real
`mitmdump -s addon/qwen_addon.py` as a reverse proxy in front of it, with a fresh temporary Qwen
home (the user's ~/.qwen is never touched). Then prints how to try it: the first request gets a
503 with a login link, the link opens the stand-in's page with Approve and Deny buttons, and after
approval requests flow. Ctrl-C stops everything and removes the temporary files.

`--auto-approve` approves logins by itself; `--run-example` runs examples/openai_chat.py against
the proxy once and exits with its status. Together they make an unattended end-to-end run:

    python -m qwenproxy.demo --port 0 --auto-approve --run-example --no-browser
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .standin import StandIn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "addon" / "qwen_addon.py"
EXAMPLE = ROOT / "examples" / "openai_chat.py"
LISTENING = re.compile(r"listening at (?:\*|[\d.]+|\[[^\]]+\]):(\d+)")
CHAT_JSON = '{"model": "coder-model", "messages": [{"role": "user", "content": "Hello"}]}'


def say(text: str = "") -> None:
    """The demo's own lines, marked so they stand out between mitmdump's."""
    for line in text.splitlines() or [""]:
        print(f"[demo] {line}" if line else "[demo]", flush=True)


def mitmdump_command() -> list[str]:
    """mitmdump from this Python environment: only that one can import the addon's package."""
    beside = Path(sys.executable).parent / ("mitmdump.exe" if os.name == "nt" else "mitmdump")
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


def child_env(qwen_home: Path) -> dict[str, str]:
    """Children see the demo's Qwen home and no proxy settings: nothing leaves loopback."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(QWEN_HOME=str(qwen_home), PYTHONUNBUFFERED="1", NO_PROXY="*")
    return env


def shown(path: Path | str) -> str:
    """A path as the user best types it: relative to the current directory when inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


class Mitmdump:
    """The mitmdump subprocess: its output is forwarded to ours, its port read from it."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._forward, name="mitmdump-output", daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if self.port is None and (m := LISTENING.search(line)):
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()  # ended without listening: wait_listening() reports it

    def wait_listening(self, timeout: float) -> int:
        """The port once mitmdump listens; raises RuntimeError if it exits or times out first."""
        self._listening.wait(timeout)
        if self.port is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)  # its output ended: it is exiting
            code = self.proc.poll()
            raise RuntimeError(
                f"mitmdump exited with status {code} before listening"
                if code is not None
                else f"mitmdump did not start listening within {timeout:g} s"
            )
        return self.port

    def stop(self, timeout: float = 10) -> None:
        """SIGINT (mitmdump's clean shutdown: the addon's `done` runs), then kill if it hangs."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT if os.name != "nt" else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say("mitmdump did not stop in time; killing it")
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)


class AutoApprover:
    """Approves every login the stand-in sees, `delay` seconds after it started (like a user)."""

    def __init__(self, standin: StandIn, delay: float):
        self.standin = standin
        self.delay = delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auto-approve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                code = self.standin.wait_for_device_code(timeout=1)
            except TimeoutError:
                continue
            if self._stop.wait(self.delay):
                return
            try:
                self.standin.approve(code)
                say(f"auto-approved login code {code} (as if you clicked Approve)")
            except LookupError as e:  # approved or denied by hand meanwhile, or expired
                say(f"not auto-approving {code}: {e}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def guide(proxy: str, standin: StandIn, qwen_home: Path, *, browser: bool, auto: bool, delay: float) -> str:
    python = shown(sys.executable)
    curl = f"curl -sS {proxy}/chat/completions -H 'Content-Type: application/json' -d '{CHAT_JSON}'"
    example = f"{python} {shown(EXAMPLE)} --base-url {proxy}"
    if auto:
        login = f"The demo approves each login by itself after {delay:g} s (--auto-approve)."
    elif browser:
        login = (
            "The addon opens the link in your browser. The page is served with the demo's throwaway\n"
            "certificate: let the browser proceed to localhost, then click Approve (or Deny)."
        )
    else:
        login = (
            "Open the link yourself (--no-browser). The page is served with the demo's throwaway\n"
            "certificate: let the browser proceed to localhost, then click Approve (or Deny)."
        )
    return f"""\
==========================================================================================
Qwen OAuth proxy demo: everything runs on this machine, nothing reaches the internet.

  stand-in (fake Qwen OAuth + API):  {standin.base_url}
  proxy for clients (reverse mode):  {proxy}
  credentials (temporary QWEN home): {qwen_home}

Try it from another terminal:

  {curl}

  {example} --stream

The first request gets HTTP 503 with a login link, also shown in the box mitmdump prints.
{login}
After approval, requests flow; the openai example rides out the 503s with its own retries.
Ctrl-C stops everything and removes the temporary files.
=========================================================================================="""


def run_example(proxy: Mitmdump, url: str, env: dict[str, str], extra: list[str], timeout: float) -> int:
    """Run examples/openai_chat.py once; it is stopped if mitmdump dies under it."""
    cmd = [sys.executable, str(EXAMPLE), "--base-url", url, *extra]
    say(f"running: {shlex.join([shown(sys.executable), shown(EXAMPLE), *cmd[2:]])}")
    example = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)

    def watch() -> None:
        proxy.proc.wait()
        if example.poll() is None:
            say("mitmdump exited; stopping the example")
            example.terminate()

    threading.Thread(target=watch, name="watch-mitmdump", daemon=True).start()
    try:
        status = example.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"the example did not finish within {timeout:g} s")
        example.kill()
        example.wait()
        return 1
    if proxy.proc.poll() is not None:
        say(f"mitmdump exited with status {proxy.proc.returncode} during the example")
        return status or 1
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwenproxy.demo",
        description="Run the proxy against a local stand-in of Qwen, offline, to try it by hand.",
    )
    parser.add_argument("--port", type=int, default=8080, help="proxy port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--no-browser", action="store_true", help="do not open the login link in a browser")
    parser.add_argument(
        "--auto-approve",
        action="store_true",
        help="approve logins by itself, like a user clicking Approve (no browser then)",
    )
    parser.add_argument(
        "--approve-delay",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds before auto-approving (default 2)",
    )
    parser.add_argument(
        "--run-example",
        action="store_true",
        help="run examples/openai_chat.py against the proxy once, then stop and exit with its status",
    )
    parser.add_argument("--stream", action="store_true", help="with --run-example: stream the reply")
    parser.add_argument(
        "--example-timeout", type=float, default=300, metavar="S", help="with --run-example (default 300)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print("error: --port must be between 0 and 65535", file=sys.stderr)
        return 2
    if not SCRIPT.exists():
        print(f"error: {SCRIPT} not found; run the demo from a checkout (make demo)", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM both end the demo cleanly (SIGINT explicitly: a shell may start
    # background jobs with it ignored).
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    temp = Path(tempfile.mkdtemp(prefix="qwen-demo-"))
    qwen_home, confdir = temp / "qwen", temp / "mitmproxy"
    standin: StandIn | None = None
    proxy: Mitmdump | None = None
    approver: AutoApprover | None = None
    try:
        # Poll interval 1 s: a login completes about a second after approval.
        standin = StandIn(tls=True, cert_dir=temp / "standin", interval=1).start(host="127.0.0.1", port=0)
        say(f"stand-in of Qwen's OAuth and API servers at {standin.base_url}")
        env = child_env(qwen_home)
        options = {
            "qwen_home": qwen_home,
            "qwen_hosts": "localhost",
            "qwen_oauth_url": standin.base_url,
            "ssl_verify_upstream_trusted_ca": standin.ca_path,
            "qwen_retry_after": 2,
            "confdir": confdir,
        }
        browser = not (args.no_browser or args.auto_approve)
        if not browser:
            options["qwen_open_browser"] = "false"
        command = [
            *mitmdump_command(),
            "-s",
            str(SCRIPT),
            "--mode",
            f"reverse:{standin.base_url}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(args.port),
        ]
        for key, value in options.items():
            command += ["--set", f"{key}={value}"]
        say("starting mitmdump with the addon (its output follows)")
        proxy = Mitmdump(command, env)
        try:
            port = proxy.wait_listening(timeout=60)
        except RuntimeError as e:
            say(f"{e}.")
            if args.port:
                say(f"If port {args.port} is in use, try --port 0 (any free port) or another port.")
            return 1
        url = f"http://127.0.0.1:{port}/v1"
        if args.auto_approve:
            approver = AutoApprover(standin, args.approve_delay)
        say(guide(url, standin, qwen_home, browser=browser, auto=args.auto_approve, delay=args.approve_delay))

        if args.run_example:
            status = run_example(proxy, url, env, ["--stream"] if args.stream else [], args.example_timeout)
            say(f"the example exited with status {status}")
            return status
        code = _wait(proxy.proc)
        say(f"mitmdump exited by itself (status {code})")
        return code or 1
    except KeyboardInterrupt:
        say("stopping")
        return 130
    finally:
        # A second Ctrl-C during shutdown must not leave anything behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if approver is not None:
            approver.stop()
        if proxy is not None:
            proxy.stop()
        if standin is not None:
            standin.stop()
        shutil.rmtree(temp, ignore_errors=True)
        say("stopped; temporary files removed")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _wait(proc: subprocess.Popen) -> int:
    """Wait for the process; a timeout keeps Ctrl-C responsive on every platform."""
    while True:
        try:
            return proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
