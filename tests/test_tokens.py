"""The token lifecycle against the stand-in over real sockets and TLS."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenproxy import oauth
from qwenproxy.oauth import OAuthClient
from qwenproxy.standin import Fault
from qwenproxy.store import Credentials, CredentialStore, parse_credentials
from qwenproxy.tokens import State, TokenManager, Unavailable

from .conftest import seed
from .harness import ROOT, clean_env


def make_client(standin, **kwargs) -> OAuthClient:
    return OAuthClient(standin.base_url, verify=standin.client_ssl_context(), **kwargs)


def manager(standin, home: Path, closing, **kwargs) -> TokenManager:
    client_kwargs = {k: kwargs.pop(k) for k in ("sleep", "timeout_s") if k in kwargs}
    if "clock" in kwargs:
        client_kwargs["clock"] = kwargs["clock"]
    store = CredentialStore(
        home, clock=kwargs.get("clock", time.time), check_interval_s=kwargs.pop("check_interval_s", None)
    )
    m = TokenManager(store, make_client(standin, **client_kwargs), **kwargs)
    closing(m)
    return m


async def approve_when_asked(standin, *, deny: bool = False) -> str:
    user_code = await asyncio.to_thread(standin.wait_for_device_code, 10)
    (standin.deny if deny else standin.approve)(user_code)
    return user_code


# -- device flow ----------------------------------------------------------------------------


async def test_device_flow_logs_in_and_writes_a_qwen_code_file(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    tokens = manager(standin, tmp_path / "qwen", closing)
    assert tokens.snapshot().state is State.LOGGED_OUT

    assert tokens.start_login()
    approver = asyncio.create_task(approve_when_asked(standin))
    await tokens.wait_login()
    await approver

    creds = tokens.usable()
    assert creds is not None
    assert tokens.snapshot().state is State.VALID
    assert standin.counts["device_code"] == 1
    path = tmp_path / "qwen" / "oauth_creds.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    # Qwen Code's validation rules.
    assert all(isinstance(data[k], str) and data[k] for k in ("access_token", "refresh_token", "token_type"))
    assert isinstance(data["expiry_date"], int)
    assert parse_credentials(path.read_bytes()) == creds
    # The stand-in checked PKCE: a wrong verifier would have been refused with invalid_grant.
    assert creds.api_base() == standin.api_base_url


async def test_denied_login_is_reported_and_a_fresh_one_can_start(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    tokens = manager(standin, tmp_path / "qwen", closing, failure_cooldown_s=0)
    tokens.start_login()
    await approve_when_asked(standin, deny=True)
    await tokens.wait_login()
    snap = tokens.snapshot()
    assert snap.state is State.LOGGED_OUT
    assert "denied" in snap.last_error
    assert tokens.start_login(), "a failed flow clears so the next caller starts a fresh one"
    await approve_when_asked(standin)
    await tokens.wait_login()
    assert tokens.usable() is not None
    assert standin.counts["device_code"] == 2


async def test_failed_login_has_a_cooldown_instead_of_a_tight_loop(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    standin.add_fault("device_code", Fault(status=400, body={"error": "invalid_client"}))
    tokens = manager(standin, tmp_path / "qwen", closing, failure_cooldown_s=60)
    why = await tokens.acquire()
    assert isinstance(why, Unavailable) and why.code == "login_failed"
    assert "invalid_client" in why.reason
    assert why.retry_after >= 59
    assert not tokens.start_login()
    assert standin.counts["device_code"] == 1


class FakeTime:
    """A clock shared with the stand-in whose sleep advances it: polling without waiting."""

    def __init__(self):
        self.now = time.time()
        self.sleeps: list[float] = []
        self.on_sleep = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))


async def test_polling_obeys_interval_and_slow_down(make_standin):
    clock = FakeTime()
    # The server wants 3 s between polls but advertises 1 s: the second poll gets slow_down.
    standin = make_standin(interval=1, min_poll_interval=3, clock=clock)
    client = make_client(standin, clock=clock, sleep=clock.sleep)
    try:
        auth = await client.start_device_flow()
        clock.on_sleep = lambda n: n == 3 and standin.approve(auth.user_code)
        creds = await client.wait_for_approval(auth)
    finally:
        await client.aclose()
    assert isinstance(creds, Credentials)
    assert clock.sleeps == [1, 1, 6]  # interval, then +5 s after slow_down (RFC 8628)
    assert standin.counts["token_poll"] == 3


async def test_polling_survives_5xx_and_timeouts_with_backoff(make_standin):
    clock = FakeTime()
    standin = make_standin(interval=1, min_poll_interval=0, clock=clock)
    client = make_client(standin, clock=clock, sleep=clock.sleep, timeout_s=0.5)
    try:
        auth = await client.start_device_flow()
        standin.add_fault("token", Fault(status=502, body="<html>bad gateway</html>"), times=2)
        standin.add_fault("token", Fault(delay=3), times=1)  # times out on our side
        standin.approve(auth.user_code)
        creds = await client.wait_for_approval(auth)
    finally:
        await client.aclose()
    assert isinstance(creds, Credentials)
    assert clock.sleeps == [1, 2, 4, 8]  # exponential backoff while the server fails


@pytest.mark.parametrize("deadline", ["code", "timeout"])
async def test_polling_stops_when_the_code_expires_or_the_wait_times_out(make_standin, deadline):
    clock = FakeTime()
    standin = make_standin(interval=1, min_poll_interval=0, device_code_lifetime=10, clock=clock)
    client = make_client(standin, clock=clock, sleep=clock.sleep)
    try:
        auth = await client.start_device_flow()
        with pytest.raises(oauth.DeviceCodeExpired) as info:
            await client.wait_for_approval(auth, timeout_s=4 if deadline == "timeout" else 0)
    finally:
        await client.aclose()
    assert sum(clock.sleeps) == (4 if deadline == "timeout" else 10)
    assert ("timed out" in str(info.value)) == (deadline == "timeout")


async def test_login_is_cancelled_cleanly(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    tokens = manager(standin, tmp_path / "qwen", closing)
    tokens.start_login()
    await asyncio.to_thread(standin.wait_for_device_code, 10)
    await tokens.cancel_login()
    snap = tokens.snapshot()
    assert snap.state is State.LOGGED_OUT and snap.login is None
    assert not (tmp_path / "qwen" / "oauth_creds.lock").exists()


async def test_hundreds_of_callers_cause_one_device_authorization(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    tokens = manager(standin, tmp_path / "qwen", closing)
    answers = await asyncio.gather(*(tokens.acquire() for _ in range(200)))
    assert all(isinstance(a, Unavailable) and a.login is not None for a in answers)
    assert {a.login.user_code for a in answers} == set(standin.pending_user_codes())
    assert standin.counts["device_code"] == 1


# -- refresh --------------------------------------------------------------------------------


async def test_fifty_callers_with_an_expired_token_cause_one_refresh(standin, tmp_path, closing):
    old = seed(standin, tmp_path / "qwen", expired=True)
    tokens = manager(standin, tmp_path / "qwen", closing)
    results = await asyncio.gather(*(tokens.acquire() for _ in range(50)))
    assert all(isinstance(r, Credentials) for r in results)
    assert len({r.access_token for r in results}) == 1
    assert results[0].access_token != old.access_token
    assert standin.counts["token_refresh"] == 1
    on_disk = CredentialStore(tmp_path / "qwen").load()
    assert on_disk.access_token == results[0].access_token
    assert on_disk.refresh_token == old.refresh_token


async def test_dead_refresh_token_starts_a_login_and_keeps_the_file(standin, tmp_path, closing):
    old = seed(standin, tmp_path / "qwen", expired=True)
    standin.revoke_refresh_tokens()
    tokens = manager(standin, tmp_path / "qwen", closing)
    why = await tokens.acquire()
    assert isinstance(why, Unavailable) and why.login is not None
    assert standin.counts["token_refresh"] == 1 and standin.counts["device_code"] == 1
    assert CredentialStore(tmp_path / "qwen").load() == old  # not deleted
    assert "refresh token was rejected" in tokens.snapshot().last_error


async def test_refresh_server_failure_is_retried_after_a_cooldown(standin, tmp_path, closing):
    seed(standin, tmp_path / "qwen", expired=True)
    standin.add_fault("token", Fault(status=503), times=1)
    clock = FakeTime()
    clock.now = time.time()
    tokens = manager(standin, tmp_path / "qwen", closing, failure_cooldown_s=5, clock=clock)
    first = await asyncio.gather(*(tokens.acquire() for _ in range(10)))
    assert all(isinstance(r, Unavailable) and r.code == "token_refresh_failed" for r in first)
    assert tokens.snapshot().state is State.FAILED
    # One attempt met the one fault; a second attempt would have succeeded.
    assert standin.counts["token_refresh"] == 0 and standin.counts["device_code"] == 0
    clock.now += 6
    assert isinstance(await tokens.acquire(), Credentials)
    assert standin.counts["token_refresh"] == 1


async def test_refresh_under_lock_reuses_a_token_another_process_wrote(standin, tmp_path, closing):
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    tokens = manager(standin, home, closing)
    assert tokens.usable() is None
    fresh = seed(standin, home)  # another process refreshed meanwhile
    result = await tokens.acquire()
    assert result.access_token == fresh.access_token
    assert standin.counts["token_refresh"] == 0


async def test_file_replaced_by_another_process_is_picked_up(standin, tmp_path, closing):
    home = tmp_path / "qwen"
    first = seed(standin, home)
    clock = FakeTime()
    tokens = manager(standin, home, closing, clock=clock, check_interval_s=5)
    assert tokens.usable().access_token == first.access_token
    second = seed(standin, home)
    os.utime(home / "oauth_creds.json", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert tokens.usable().access_token == first.access_token  # throttled: no stat yet
    clock.now += 5
    assert tokens.usable().access_token == second.access_token


async def test_login_from_another_process_ends_the_pending_login(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    home = tmp_path / "qwen"
    tokens = manager(standin, home, closing, check_interval_s=0)
    tokens.start_login()
    await asyncio.to_thread(standin.wait_for_device_code, 10)
    fresh = seed(standin, home)
    assert tokens.usable().access_token == fresh.access_token
    await tokens.wait_login()
    assert tokens.snapshot().state is State.VALID


async def test_corrupt_file_is_reported_then_set_aside_by_the_next_login(make_standin, tmp_path, closing):
    standin = make_standin(interval=1)
    home = tmp_path / "qwen"
    home.mkdir()
    (home / "oauth_creds.json").write_text('{"access_token": "abc", "expiry_date": "soon"')
    tokens = manager(standin, home, closing)
    why = await tokens.acquire()
    assert isinstance(why, Unavailable)
    assert "oauth_creds.json" in tokens.snapshot().last_error
    await approve_when_asked(standin)
    await tokens.wait_login()
    assert tokens.usable() is not None
    aside = list(home.glob("oauth_creds.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"access_token": "abc", "expiry_date": "soon"'


def test_two_processes_refreshing_at_once_cause_one_refresh(standin, tmp_path):
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    env = clean_env(PYTHONPATH=str(ROOT / "addon"))
    worker = Path(__file__).parent / "helpers" / "refresh_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(home), standin.base_url, str(standin.ca_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # the start barrier: all go at once
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len(set(outputs)) == 1, outputs
    assert standin.counts["token_refresh"] == 1
