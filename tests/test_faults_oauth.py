"""Faults of the OAuth server and of the upstream API. Each test is named after the fault it
injects and shows that the proxy (or the lifecycle) keeps answering afterwards."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from qwenproxy import oauth
from qwenproxy.oauth import OAuthClient
from qwenproxy.standin import Fault
from qwenproxy.store import Credentials, CredentialStore
from qwenproxy.tokens import TokenManager, Unavailable

from .conftest import CHAT, seed, through

HUGE = "x" * (5 * 1024 * 1024)

# -- the login cannot start: faults of the device authorization, through a real mitmdump ---------

DEVICE_CODE_FAULTS = {
    "oauth_server_error_503": Fault(status=503, body="<html>maintenance</html>"),
    "oauth_connection_reset": Fault(reset=True),
    "oauth_answer_not_json": Fault(status=200, body="hello"),
    "oauth_answer_truncated_json": Fault(status=200, body='{"device_code": "d", "user_'),
    "oauth_answer_huge": Fault(status=200, body=HUGE),
    "oauth_answer_missing_fields": Fault(status=200, body={"user_code": "ABCD"}),
    "oauth_answer_wrong_types": Fault(
        status=200, body={"device_code": 1, "user_code": [], "verification_uri": {}, "expires_in": "600"}
    ),
    "oauth_answer_hostile_link": Fault(
        status=200,
        body={
            "device_code": "d",
            "user_code": "U",
            "verification_uri": "javascript:alert(1)",
            "expires_in": 60,
        },
    ),
    "oauth_rejects_client": Fault(status=401, body={"error": "invalid_client"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", DEVICE_CODE_FAULTS.values(), ids=DEVICE_CODE_FAULTS.keys())
def test_device_authorization_fault_gives_a_clear_503_then_a_new_login_works(
    make_standin, start_proxy, fault
):
    standin = make_standin(interval=1)
    standin.add_fault("device_code", fault)
    proxy = start_proxy(mode=f"reverse:{standin.base_url}", standin=standin)
    base = f"http://127.0.0.1:{proxy.port}"

    answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "login_failed" and "login" in error["message"].lower(), error
    assert int(answer.headers["Retry-After"]) >= 1
    proxy.wait_for_log("Qwen login failed")

    # Not stuck: a login started now (the status page's button) goes through.
    assert httpx.post(f"{base}/__qwen__/login", timeout=30).status_code == 200
    standin.approve(standin.wait_for_device_code(10))
    proxy.wait_for_log("Qwen login approved")
    assert httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


@pytest.mark.slow
def test_slow_oauth_server_delays_only_the_first_answer(make_standin, start_proxy):
    standin = make_standin(interval=1)
    standin.add_fault("device_code", Fault(status=None, delay=1.5))
    proxy = start_proxy(mode=f"reverse:{standin.base_url}", standin=standin)
    base = f"http://127.0.0.1:{proxy.port}"
    answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
    assert answer.status_code == 503 and answer.json()["error"]["user_code"]


# -- faults while polling, in-process with a clock that sleeps instantly ------------------------


class FakeTime:
    def __init__(self):
        self.now = time.time()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def poll_through(standin, clock, faults, *, timeout_s: float = 5.0) -> Credentials:
    client = OAuthClient(
        standin.base_url,
        verify=standin.client_ssl_context(),
        clock=clock,
        sleep=clock.sleep,
        timeout_s=timeout_s,
    )
    try:
        auth = await client.start_device_flow()
        for fault in faults:
            standin.add_fault("token", fault)
        standin.approve(auth.user_code)
        return await client.wait_for_approval(auth)
    finally:
        await client.aclose()


POLL_FAULTS = {
    "poll_server_error_500": Fault(status=500),
    "poll_connection_reset": Fault(reset=True),
    "poll_timeout": Fault(status=None, delay=2),
    "poll_answer_not_json": Fault(status=400, body="<html>"),
    "poll_answer_truncated_json": Fault(status=200, body='{"access_token": "a", "refresh'),
    "poll_answer_huge": Fault(status=200, body=HUGE),
    "poll_answer_missing_fields": Fault(status=200, body={"access_token": "a"}),
    "poll_answer_wrong_types": Fault(status=200, body={"access_token": ["a"], "expires_in": {}}),
}


@pytest.mark.parametrize("fault", POLL_FAULTS.values(), ids=POLL_FAULTS.keys())
async def test_polling_fault_is_retried_with_backoff_until_the_login_completes(make_standin, fault):
    clock = FakeTime()
    standin = make_standin(interval=1, min_poll_interval=0, clock=clock)
    creds = await poll_through(standin, clock, [fault, fault], timeout_s=0.5)
    assert isinstance(creds, Credentials)
    assert clock.sleeps == [1, 2, 4]


async def test_slow_down_storm_slows_polling_down_to_a_cap(make_standin):
    clock = FakeTime()
    standin = make_standin(interval=1, min_poll_interval=0, device_code_lifetime=3600, clock=clock)
    storm = [Fault(status=429, body={"error": "slow_down"})] * 20
    creds = await poll_through(standin, clock, storm)
    assert isinstance(creds, Credentials)
    assert clock.sleeps == sorted(clock.sleeps) and max(clock.sleeps) == oauth.MAX_POLL_INTERVAL_S
    assert len(clock.sleeps) == 21


@pytest.mark.parametrize(
    "interval,first_sleep", [(0, oauth.MIN_POLL_INTERVAL_S), (10**9, oauth.MAX_POLL_INTERVAL_S)]
)
async def test_absurd_poll_interval_is_clamped(make_standin, interval, first_sleep):
    clock = FakeTime()
    standin = make_standin(interval=interval, min_poll_interval=0, clock=clock)
    await poll_through(standin, clock, [])
    assert clock.sleeps == [first_sleep]


# -- faults while refreshing -------------------------------------------------------------------


def lifecycle(standin, home, clock, closing, **kwargs) -> TokenManager:
    client = OAuthClient(standin.base_url, verify=standin.client_ssl_context(), clock=clock, timeout_s=0.5)
    m = TokenManager(CredentialStore(home, clock=clock), client, clock=clock, **kwargs)
    closing(m)
    return m


REFRESH_FAULTS = {
    "refresh_server_error_502": Fault(status=502, body="bad gateway"),
    "refresh_connection_reset": Fault(reset=True),
    "refresh_timeout": Fault(status=None, delay=2),
    "refresh_answer_not_json": Fault(status=200, body="<html>"),
    "refresh_answer_huge": Fault(status=200, body=HUGE),
    "refresh_answer_missing_access_token": Fault(status=200, body={"expires_in": 3600}),
    "refresh_rate_limited": Fault(status=429, body={"error": "slow_down"}),
}


@pytest.mark.parametrize("fault", REFRESH_FAULTS.values(), ids=REFRESH_FAULTS.keys())
async def test_refresh_fault_answers_at_once_then_recovers(standin, tmp_path, closing, fault):
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    standin.add_fault("token", fault)
    clock = FakeTime()
    tokens = lifecycle(standin, home, clock, closing, failure_cooldown_s=5)
    answers = await asyncio.gather(*(tokens.acquire() for _ in range(20)))
    assert all(isinstance(a, Unavailable) and a.code == "token_refresh_failed" for a in answers)
    assert all(a.retry_after >= 1 for a in answers)
    assert standin.counts["device_code"] == 0, "a server fault is not a reason to log in again"
    clock.now += 6
    assert isinstance(await tokens.acquire(), Credentials)
    assert standin.counts["token_refresh"] == 1


@pytest.mark.parametrize("expires_in", [-100, 0, 10**12])
async def test_absurd_token_lifetime_causes_no_refresh_storm(standin, tmp_path, closing, expires_in):
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    minted = standin.mint_tokens()
    standin.add_fault("token", Fault(status=200, body={**minted, "expires_in": expires_in}))
    clock = FakeTime()
    tokens = lifecycle(standin, home, clock, closing)
    for _ in range(10):
        assert isinstance(await tokens.acquire(), Credentials)
    assert standin.counts["faults"] == 1, "refreshed once, not once per request"
    expiry = tokens.credentials.expires_at - clock.now
    assert oauth.MIN_TOKEN_LIFETIME_S - 1 <= expiry <= oauth.MAX_TOKEN_LIFETIME_S


@pytest.mark.slow
async def test_refresh_server_error_through_the_proxy_gives_503_and_spares_other_traffic(
    standin, start_proxy, tmp_path
):
    seed(standin, tmp_path / "qwen", expired=True)
    standin.add_fault("token", Fault(status=500), times=100)
    proxy = start_proxy()
    async with through(proxy) as client:
        answer = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
        other = await client.get(f"https://127.0.0.1:{standin.port}/v1/models")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "token_refresh_failed"
    assert other.status_code == 401  # untouched traffic still flows
    assert standin.counts["device_code"] == 0


# -- upstream faults pass to the client as they are ----------------------------------------------


@pytest.mark.slow
async def test_upstream_server_error_passes_through_unchanged(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen")
    standin.add_fault(
        "chat", Fault(status=500, body={"error": {"message": "overloaded", "type": "server_error"}})
    )
    standin.add_fault("chat", Fault(reset=True))
    proxy = start_proxy()
    async with through(proxy) as client:
        first = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
        second = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
        third = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
    assert first.status_code == 500 and first.json()["error"]["message"] == "overloaded"
    assert second.status_code == 502  # mitmproxy's own answer to a reset upstream
    assert third.status_code == 200
    assert standin.counts["device_code"] == 0 and standin.counts["token_refresh"] == 0


@pytest.mark.slow
async def test_upstream_redirect_to_another_host_gets_no_token(standin, start_proxy, tmp_path):
    creds = seed(standin, tmp_path / "qwen")
    elsewhere = f"https://127.0.0.1:{standin.port}/v1/chat/completions"
    standin.add_fault("chat", Fault(status=307, headers={"Location": elsewhere}))
    proxy = start_proxy()
    async with through(proxy, follow_redirects=True) as client:
        answer = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
    assert str(answer.url) == elsewhere
    assert answer.status_code == 401
    followed = standin.requests[-1]
    assert followed.headers["Host"] == f"127.0.0.1:{standin.port}"
    assert creds.access_token not in followed.headers.get("Authorization", "")
