"""Telling the user about a login: the box with the link and code, the browser, progress lines.

Everything goes through `logging`, so it shows in mitmdump's output and in the event log of
mitmweb and the console (printing to stdout would break the console UI).
"""

from __future__ import annotations

import asyncio
import logging
import time
import webbrowser
from collections.abc import Callable

from .status import qr_text
from .store import Credentials
from .tokens import Login, LoginListener

log = logging.getLogger("qwenproxy")

PROGRESS_EVERY_S = 30.0


def login_box(login: Login, now: float) -> str:
    """The block that tells the user what to do, as lines of text."""
    lines = [
        "Qwen login required. Open this link and approve the code:",
        "",
        f"    {login.url}",
        "",
        f"    code: {login.user_code}    (expires in {_duration(login.seconds_left(now))})",
        "",
        "Requests get 503 with this link until you approve; then they flow again.",
    ]
    width = max(len(line) for line in lines)
    border = "+" + "-" * (width + 2) + "+"
    return "\n".join([border, *(f"| {line.ljust(width)} |" for line in lines), border])


def _duration(seconds: int) -> str:
    minutes, secs = divmod(max(0, seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class TerminalAnnouncer(LoginListener):
    """Logs the login's story and opens the browser (when allowed)."""

    def __init__(
        self,
        *,
        open_browser: bool = True,
        clock: Callable[[], float] = time.time,
        progress_every_s: float = PROGRESS_EVERY_S,
    ):
        self.open_browser = open_browser
        self.clock = clock
        self.progress_every_s = progress_every_s
        self._last_progress = 0.0
        self._browser_task: asyncio.Future | None = None

    def login_started(self, login: Login) -> None:
        now = self.clock()
        self._last_progress = now
        qr = qr_text(login.url)
        phone = f"\nOr scan it with a phone:\n{qr}" if qr else ""
        log.warning("\n%s%s", login_box(login, now), phone)
        if self.open_browser:
            # webbrowser may block (it runs a program): keep it off the event loop.
            loop = asyncio.get_running_loop()
            self._browser_task = loop.run_in_executor(None, _open, login.url)

    def login_waiting(self, login: Login, problem: str | None) -> None:
        now = self.clock()
        if now - self._last_progress < self.progress_every_s:
            return
        self._last_progress = now
        left = _duration(login.seconds_left(now))
        if problem:
            log.warning(
                "Qwen login: still waiting for approval of %s (%s left); %s", login.user_code, left, problem
            )
        else:
            log.info("Qwen login: still waiting for approval of %s (%s left)", login.user_code, left)

    def login_succeeded(self, creds: Credentials) -> None:
        log.warning(
            "Qwen login approved: token valid until %s, endpoint %s",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(creds.expires_at)),
            creds.api_base(),
        )

    def login_failed(self, reason: str) -> None:
        log.error("Qwen login failed: %s. The next Qwen request starts a new login.", reason)


def _open(url: str) -> None:
    try:
        if not webbrowser.open(url):
            log.info("no browser could be opened here; open the link above yourself")
    except Exception as e:  # a broken browser setup must not break the login
        log.info("opening the browser failed (%s); open the link above yourself", e)
