"""Shared fixtures: the local Qwen stand-in, a clock tests can move, and a real mitmdump with the
addon in front of the stand-in."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from qwenproxy.standin import StandIn
from qwenproxy.store import Credentials, CredentialStore
from qwenproxy.tokens import TokenManager

from .harness import SCRIPT, Mitmdump

# Property tests run beside processes and servers: judge them by their examples, not their speed.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

CHAT = {"model": "coder-model", "messages": [{"role": "user", "content": "hello"}]}


class FakeClock:
    """A clock that moves only when told; pass it as `clock=` wherever time is injected."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_standin(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """Start stand-ins with any `StandIn(...)` arguments; all are stopped after the test.

    TLS certificates go to tmp_path/"standin" unless `cert_dir` is given.
    """
    started: list[StandIn] = []

    def make(**kwargs) -> StandIn:
        kwargs.setdefault("cert_dir", tmp_path / "standin")
        standin = StandIn(**kwargs).start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        standin.stop()


@pytest.fixture
def standin(make_standin: Callable[..., StandIn]) -> StandIn:
    """A running HTTPS stand-in with default settings and the real clock."""
    return make_standin()


# -- a real mitmdump with the addon, in front of the stand-in -------------------------------


@pytest.fixture(scope="session")
def mitm_confdir(tmp_path_factory):
    """One mitmproxy CA for the whole session: generating it is the slow part of a start."""
    return tmp_path_factory.mktemp("mitmproxy")


def proxy_for(standin: StandIn, confdir: Path, qwen_home: Path, mode: str = "regular", **kwargs) -> Mitmdump:
    """A mitmdump (not started) with the addon, whose OAuth server and upstream is `standin` and
    whose Qwen hosts are `localhost`. `kwargs` go to `Mitmdump` (options, args, listen_host)."""
    options = {"qwen_hosts": ["localhost"], **kwargs.pop("options", {})}
    return Mitmdump(
        confdir=confdir,
        qwen_home=qwen_home,
        oauth_url=standin.base_url,
        upstream_ca=standin.ca_path,
        mode=mode,
        options=options,
        **kwargs,
    )


@pytest.fixture
def start_proxy(standin, tmp_path, mitm_confdir):
    started: list[Mitmdump] = []

    def start(
        mode: str = "regular",
        standin: StandIn = standin,
        args=(),
        listen_host="127.0.0.1",
        script=SCRIPT,
        **options,
    ):
        """A started mitmdump for `standin` (the `standin` fixture unless given), Qwen home
        tmp_path/qwen; keyword arguments are mitmproxy options."""
        proxy = proxy_for(
            standin,
            mitm_confdir,
            tmp_path / "qwen",
            mode,
            options=options,
            args=list(args),
            listen_host=listen_host,
            script=script,
        ).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
async def closing():
    """Register TokenManagers to close after the test: `closing(manager)`."""
    managers: list[TokenManager] = []
    yield managers.append
    for m in managers:
        await m.aclose()


def seed(standin, home, *, expired=False) -> Credentials:
    """Write a fresh (or expired) login of the stand-in into `home`, as Qwen Code would."""
    minted = standin.mint_tokens()
    expiry = time.time() + (-60 if expired else minted["expires_in"])
    creds = Credentials(
        access_token=minted["access_token"],
        refresh_token=minted["refresh_token"],
        token_type="Bearer",
        expiry_date=int(expiry * 1000),
        resource_url=minted["resource_url"],
    )
    CredentialStore(home).save(creds)
    return creds


def through(proxy: Mitmdump, **kwargs) -> httpx.AsyncClient:
    """An httpx client that uses the proxy and trusts mitmproxy's CA."""
    return httpx.AsyncClient(
        proxy=proxy.proxy_url,
        verify=ssl.create_default_context(cafile=str(proxy.ca_cert)),
        timeout=30,
        **kwargs,
    )
