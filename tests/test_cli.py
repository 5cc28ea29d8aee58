"""`python -m qwenproxy login | status | logout` as a user runs it, against the stand-in."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .conftest import seed
from .harness import ROOT, clean_env

pytestmark = pytest.mark.slow


def cli(standin, home, *args: str, **kwargs) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qwenproxy",
        "--qwen-home",
        str(home),
        "--oauth-url",
        standin.base_url,
        "--ca",
        str(standin.ca_path),
        *args,
    ]


def run(standin, home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli(standin, home, *args), capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT
    )


def test_login_runs_the_device_flow_in_the_terminal_and_writes_the_file(make_standin, tmp_path):
    standin = make_standin(interval=1)
    home = tmp_path / "qwen"
    proc = subprocess.Popen(
        cli(standin, home, "login", "--no-browser"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        cwd=ROOT,
    )
    shown = []
    for line in proc.stdout:  # the login box names the link and the code
        shown.append(line)
        if re.search(r"code: [A-Z0-9]", line):
            break
    user_code = standin.wait_for_device_code(10)
    assert user_code in shown[-1]
    assert any(f"{standin.base_url}/authorize?" in line for line in shown)
    standin.approve(user_code)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(shown) + rest
    assert "Logged in" in rest
    data = json.loads((home / "oauth_creds.json").read_text())
    assert data["access_token"] not in "".join(shown) + rest, "the token is never printed"


def test_login_reports_a_denial_and_fails(make_standin, tmp_path):
    standin = make_standin(interval=1)
    proc = subprocess.Popen(
        cli(standin, tmp_path / "qwen", "login", "--no-browser"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        cwd=ROOT,
    )
    standin.deny(standin.wait_for_device_code(10))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "denied" in out
    assert not (tmp_path / "qwen" / "oauth_creds.json").exists()


def test_status_shows_state_and_expiry_but_never_the_token(standin, tmp_path):
    home = tmp_path / "qwen"
    out = run(standin, home, "status")
    assert out.returncode == 1 and "logged_out" in out.stdout and "login" in out.stdout

    creds = seed(standin, home)
    out = run(standin, home, "status")
    assert out.returncode == 0, out.stderr
    assert re.search(r"state:\s+valid", out.stdout)
    assert standin.api_base_url in out.stdout
    assert creds.access_token not in out.stdout + out.stderr
    assert creds.access_token[:4] in out.stdout  # the masked form


def test_status_names_the_problem_of_a_corrupt_file(standin, tmp_path):
    home = tmp_path / "qwen"
    home.mkdir()
    (home / "oauth_creds.json").write_text("{not json")
    out = run(standin, home, "status")
    assert out.returncode == 1
    assert "problem:" in out.stdout and "oauth_creds.json" in out.stdout


def test_logout_removes_the_file(standin, tmp_path):
    home = tmp_path / "qwen"
    seed(standin, home)
    out = run(standin, home, "logout")
    assert out.returncode == 0 and "Logged out" in out.stdout
    assert not (home / "oauth_creds.json").exists()
    assert "nothing to remove" in run(standin, home, "logout").stdout


def test_plain_http_oauth_url_to_a_remote_host_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qwenproxy", "--oauth-url", "http://chat.qwen.ai", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(QWEN_HOME=str(tmp_path)),
        cwd=ROOT,
    )
    assert out.returncode == 2 and "https" in out.stderr
