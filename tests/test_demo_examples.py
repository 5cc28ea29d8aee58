"""`make demo` and the examples, run as a user runs them: real processes, real sockets, loopback only."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qwenproxy.standin import StandIn

from .conftest import proxy_for, seed
from .harness import ROOT, clean_env

EXAMPLES = ROOT / "examples"
GREETING = "Hello from the Qwen stand-in."

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.mark.slow
def test_demo_runs_the_whole_story_unattended(tmp_path):
    home = tmp_path / "home"  # the demo must leave the user's home (~/.qwen, ~/.mitmproxy) alone
    home.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenproxy.demo",
            "--port",
            "0",
            "--auto-approve",
            "--approve-delay",
            "0.2",
            "--run-example",
            "--no-browser",
        ],
        env=clean_env(HOME=str(home)),
        check=False,
        cwd=tmp_path,  # the demo finds the addon and the example by itself
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert f"{GREETING} You said: Say hello" in out
    # The story happened: a login box, a 503 for the example, an approval, then a 200.
    assert "Qwen login required" in out and "503 Service Unavailable" in out
    assert "auto-approved login code" in out and "Qwen login approved" in out
    assert "Qwen login required: open https://localhost:" in run.stderr  # the example's own notice
    # Everything it made is gone, and it never wrote to the user's home.
    temp_home = Path(re.search(r"temporary QWEN home\): (\S+)", out).group(1))
    assert not temp_home.parent.exists()
    assert list(home.iterdir()) == []


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, mitm_confdir):
    """A stand-in with a logged-in account, behind a real mitmdump in reverse mode."""
    tmp = tmp_path_factory.mktemp("examples")
    with StandIn(cert_dir=tmp / "standin") as standin:
        seed(standin, tmp / "qwen")
        with proxy_for(standin, mitm_confdir, tmp / "qwen", f"reverse:{standin.base_url}") as proxy:
            yield standin, proxy


class Output:
    """A child's stdout, collected as it arrives (not line by line: chunks carry no newline)."""

    def __init__(self, stream):
        self.text = ""
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(4096):
            with self._cond:
                self.text += chunk.decode()
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 20) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: text in self.text, timeout):
                raise AssertionError(f"{text!r} not in the output within {timeout} s: {self.text!r}")


@pytest.mark.slow
def test_openai_example_prints_a_stream_as_it_arrives(proxied):
    standin, proxy = proxied
    standin.hold_streams()  # the stand-in sends the first chunk, then waits for release
    example = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "openai_chat.py"), "--stream", "how are you"],
        env=clean_env(OPENAI_BASE_URL=f"{proxy.proxy_url}/v1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        output = Output(example.stdout)
        standin.wait_first_chunk_sent(timeout=20)
        output.wait_for("Hello from")  # printed while the rest of the reply is still held
        assert GREETING not in output.text
        standin.release_streams()
        assert example.wait(30) == 0, example.stderr.read()
    finally:
        standin.release_streams()
        if example.poll() is None:
            example.kill()
            example.wait()
    output.wait_for(f"{GREETING} You said: how are you\n")
    sent = standin.requests[-1]
    assert json.loads(sent.body)["stream"] is True
    assert sent.headers["X-DashScope-AuthType"] == "qwen-oauth"
    assert not sent.headers["Authorization"].endswith("dummy-key-the-proxy-replaces-it")


def test_curl_example_is_valid_bash():
    subprocess.run(["bash", "-n", str(EXAMPLES / "curl.sh")], check=True, timeout=10)


@needs_curl
@pytest.mark.slow
@pytest.mark.parametrize("how", ["reverse", "stream", "models"])
def test_curl_example_in_reverse_mode(proxied, how):
    _, proxy = proxied
    run = subprocess.run(
        ["bash", str(EXAMPLES / "curl.sh"), how],
        env=clean_env(PROXY=proxy.proxy_url),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    if how == "models":
        assert "coder-model" in json.loads(run.stdout)["data"][0]["id"]
    elif how == "stream":
        events = [line[6:] for line in run.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
    else:
        assert json.loads(run.stdout)["choices"][0]["message"]["content"].startswith(GREETING)


def test_example_config_documents_every_qwen_option_with_its_default():
    """examples/config.yaml shows each qwen_* option, commented out, with its true default."""
    from mitmproxy import optmanager
    from mitmproxy.test import taddons

    from qwenproxy.addon import QwenAuth

    text = (EXAMPLES / "config.yaml").read_text()
    settings = re.findall(r"^# (qwen_\w+: .*)$", text, re.MULTILINE)
    addon = QwenAuth()
    with taddons.context(addon) as tctx:
        # Options has keys() but is not iterable itself.
        names = {name for name in tctx.options.keys() if name.startswith("qwen_")}  # noqa: SIM118
        documented = {line.split(":")[0] for line in settings}
        assert documented == names, "examples/config.yaml and the addon's options differ"
        defaults = {name: getattr(tctx.options, name) for name in names}
        # Uncommented, the settings load as mitmproxy loads config.yaml, and change nothing.
        optmanager.load(tctx.options, "\n".join(settings))
        assert {name: getattr(tctx.options, name) for name in names} == defaults
