"""What the user sees in mitmdump's output during a login."""

import logging

from qwenproxy.terminal import TerminalAnnouncer, login_box
from qwenproxy.tokens import Login

from .conftest import FakeClock

LOGIN = Login("https://chat.qwen.ai/authorize?user_code=ABCD-1234&client=qwen-code", "ABCD-1234", 0)


def login_at(clock) -> Login:
    return Login(LOGIN.url, LOGIN.user_code, clock.now + 600)


def test_login_box_names_link_code_and_time_left():
    box = login_box(Login(LOGIN.url, LOGIN.user_code, 1000 + 125), now=1000)
    assert LOGIN.url in box and "code: ABCD-1234" in box and "2 min 05 s" in box
    assert len({len(line) for line in box.splitlines()}) == 1, "a closed box"


async def test_start_shows_box_and_qr_code(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO):
        TerminalAnnouncer(open_browser=False, clock=clock).login_started(login_at(clock))
    assert "ABCD-1234" in caplog.text and "scan it with a phone" in caplog.text
    assert "█" in caplog.text


def test_progress_lines_are_throttled_not_a_flood(caplog):
    clock = FakeClock()
    announcer = TerminalAnnouncer(open_browser=False, clock=clock, progress_every_s=30)
    announcer._last_progress = clock.now
    login = login_at(clock)
    with caplog.at_level(logging.INFO, logger="qwenproxy"):
        for _ in range(120):  # a poll every second for two minutes
            clock.advance(1)
            announcer.login_waiting(login, None)
    lines = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert len(lines) == 4
    assert "(9 min 30 s left)" in lines[0] and "(8 min 00 s left)" in lines[-1]


def test_success_and_failure_are_one_clear_line_each(caplog):
    announcer = TerminalAnnouncer(open_browser=False)
    with caplog.at_level(logging.INFO, logger="qwenproxy"):
        announcer.login_failed("the login was denied")
    assert caplog.records[-1].getMessage().startswith("Qwen login failed: the login was denied.")
