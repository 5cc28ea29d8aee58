"""Shared fixtures: the local Qwen stand-in and a clock tests can move."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwenproxy.standin import StandIn


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
