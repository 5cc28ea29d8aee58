"""One device-flow login at a time across processes: the claim file, and two lifecycles (and two
real proxies) sharing a Qwen home."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from qwenproxy.login_claim import CLAIM_FILE, UNPUBLISHED_STALE_S, LoginClaims
from qwenproxy.oauth import OAuthClient
from qwenproxy.store import CredentialStore
from qwenproxy.tokens import TokenManager, Unavailable

from .conftest import CHAT


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def claims(home, clock=None, alive=lambda pid: True) -> LoginClaims:
    return LoginClaims(home, clock=clock or Clock(), alive=alive)


def test_first_claim_wins_and_others_see_its_published_link(tmp_path):
    a, b = claims(tmp_path), claims(tmp_path)
    assert a.claim("a") is None
    seen = b.claim("b")
    assert seen is not None and seen.owner == "a" and seen.url is None
    a.publish("a", "https://chat.qwen.ai/authorize?user_code=X", "X", a.clock() + 600)
    seen = b.current()
    assert (seen.url, seen.user_code) == ("https://chat.qwen.ai/authorize?user_code=X", "X")
    b.release("b")  # not b's: nothing happens
    assert b.current() is not None
    a.release("a")
    assert b.current() is None and b.claim("b") is None


@pytest.mark.parametrize("why", ["dead_process", "code_expired", "never_published", "garbage"])
def test_stale_claims_are_broken(tmp_path, why):
    clock = Clock()
    first = claims(tmp_path, clock)
    assert first.claim("a") is None
    alive = lambda pid: True  # noqa: E731
    if why == "dead_process":
        alive = lambda pid: False  # noqa: E731
    elif why == "code_expired":
        first.publish("a", "https://x/a", "X", clock.now + 10)
        clock.now += 16
    elif why == "never_published":
        clock.now += UNPUBLISHED_STALE_S + 1
    else:
        (tmp_path / CLAIM_FILE).write_text("{not json")
    other = LoginClaims(tmp_path, clock=clock, alive=alive)
    assert other.current() is None
    assert other.claim("b") is None
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["owner"] == "b"


def test_a_live_unpublished_claim_is_respected(tmp_path):
    clock = Clock()
    assert claims(tmp_path, clock).claim("a") is None
    clock.now += UNPUBLISHED_STALE_S - 1
    assert claims(tmp_path, clock).claim("b").owner == "a"


@pytest.fixture
async def two_lifecycles(make_standin, tmp_path):
    standin = make_standin(interval=1, min_poll_interval=0)
    made = []
    for _ in range(2):
        client = OAuthClient(standin.base_url, verify=standin.client_ssl_context())
        m = TokenManager(CredentialStore(tmp_path / "qwen", check_interval_s=0), client)
        m.follow_poll_s = 0.05
        made.append(m)
    yield standin, made
    for m in made:
        await m.aclose()


async def test_two_lifecycles_share_one_login(two_lifecycles):
    standin, (a, b) = two_lifecycles
    first = await a.acquire()
    second = await b.acquire()
    assert isinstance(first, Unavailable) and isinstance(second, Unavailable)
    assert first.login.user_code == second.login.user_code
    assert standin.counts["device_code"] == 1
    standin.approve(first.login.user_code)
    await asyncio.gather(a.wait_login(), b.wait_login())
    assert a.usable() is not None and b.usable() is not None
    assert a.usable().access_token == b.usable().access_token
    assert not (a.store.home / CLAIM_FILE).exists()


async def test_follower_fails_cleanly_when_the_other_login_is_denied(two_lifecycles):
    standin, (a, b) = two_lifecycles
    first = await a.acquire()
    await b.acquire()
    standin.deny(first.login.user_code)
    await asyncio.gather(a.wait_login(), b.wait_login())
    assert "denied" in a.snapshot().last_error
    assert "ended without a token" in b.snapshot().last_error


@pytest.mark.slow
def test_two_proxies_on_one_qwen_home_run_one_login(standin, start_proxy):
    one, two = (start_proxy(mode=f"reverse:{standin.base_url}") for _ in range(2))
    urls = [f"http://127.0.0.1:{p.port}/v1/chat/completions" for p in (one, two)]
    answers = [httpx.post(url, json=CHAT, timeout=30) for url in urls]
    assert [a.status_code for a in answers] == [503, 503]
    codes = {a.json()["error"]["user_code"] for a in answers}
    assert len(codes) == 1 and standin.counts["device_code"] == 1
    standin.approve(codes.pop())
    one.wait_for_log("Qwen login approved")
    assert httpx.post(urls[0], json=CHAT, timeout=30).status_code == 200
    two.wait_for_log("Qwen login approved|credentials loaded")
    assert httpx.post(urls[1], json=CHAT, timeout=30).status_code == 200
