"""A real browser: headless Chromium (Debian's `chromium`) driven by Playwright sees what a person
would, through a real mitmdump/mitmweb with the addon, against the stand-in.

Skipped with a reason where Playwright or Chromium cannot be had (`.ci/install-browser` installs
Chromium; `pip install -e '.[test]'` brings Playwright). Playwright's own browser downloads are
never used: it drives the system's Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
from collections.abc import Callable, Iterator

import httpx
import pytest

from .conftest import CHAT
from .harness import MITMDUMP, Mitmdump, clean_env

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright is not installed (pip install -e '.[test]'): browser tests skipped",
)
CHROMIUM = (
    os.environ.get("QWEN_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
if not CHROMIUM:
    pytest.skip(
        "no Chromium executable (apt-get install chromium, or run .ci/install-browser): browser tests skipped",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
MITMWEB = MITMDUMP.with_name("mitmweb")
WEB_LISTENING = re.compile(r"Web server listening at (http://\S+)")


@pytest.fixture
def launch() -> Iterator[Callable[..., sync_api.Browser]]:
    """Start Chromium, through a proxy or with none at all; closed after the test."""
    with sync_api.sync_playwright() as playwright:
        browsers: list[sync_api.Browser] = []

        def start(proxy: str | None = None) -> sync_api.Browser:
            route = f"--proxy-server={proxy}" if proxy else "--no-proxy-server"
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, route], env=clean_env(), timeout=60_000
            )
            browsers.append(browser)
            return browser

        yield start
        for browser in browsers:
            browser.close()


class Mitmweb(Mitmdump):
    """The same proxy and addon as `Mitmdump`, with mitmweb's UI on `web_port`."""

    web_url: str = ""

    def command(self) -> list[str]:
        return [str(MITMWEB), *super().command()[1:]]

    def start(self, timeout: float = 30) -> Mitmweb:
        super().start(timeout)
        # mitmweb 12 prints the URL with its auth token (`?token=...`); 11 has no token.
        self.web_url = WEB_LISTENING.search(self.wait_for_log(WEB_LISTENING, timeout)).group(1)
        return self


@pytest.fixture
def start_mitmweb(standin, tmp_path, mitm_confdir) -> Iterator[Callable[..., Mitmweb]]:
    if not MITMWEB.exists():
        pytest.skip(f"no mitmweb next to {MITMDUMP}")
    started: list[Mitmweb] = []

    def start(**options) -> Mitmweb:
        # web_port=0 would bind a free port but mitmweb prints 0: pick one ourselves.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            web_port = s.getsockname()[1]
        proxy = Mitmweb(
            confdir=mitm_confdir,
            qwen_home=tmp_path / "qwen",
            oauth_url=standin.base_url,
            upstream_ca=standin.ca_path,
            options={
                "qwen_hosts": ["localhost"],
                "web_open_browser": "false",
                "web_host": "127.0.0.1",
                "web_port": web_port,
                **options,
            },
        ).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def chat_through(proxy: Mitmdump, standin) -> httpx.Response:
    """One API request through the proxy, as any client would send it."""
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with httpx.Client(proxy=proxy.proxy_url, verify=context, timeout=30) as client:
        return client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)


def test_status_page_through_the_proxy_shows_the_pending_logins_user_code(standin, start_proxy, launch):
    proxy = start_proxy()
    answer = chat_through(proxy, standin)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert standin.pending_user_codes() == [error["user_code"]]

    page = launch(proxy=proxy.proxy_url).new_page()
    response = page.goto("http://qwen.auth/", timeout=WAIT_MS)
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/html")

    expect = sync_api.expect
    expect(page.locator("#user-code")).to_have_text(error["user_code"], timeout=WAIT_MS)
    expect(page.locator("#state")).to_have_attribute("data-state", "login_pending")
    expect(page.locator("a.button")).to_have_attribute("href", error["login_url"])
    expect(page.locator("svg.qr")).to_be_visible()

    # The page refreshes itself: once the login is approved it shows the new state, no script.
    standin.approve(error["user_code"])
    expect(page.locator("#state")).to_have_attribute("data-state", "valid", timeout=WAIT_MS)
    expect(page.locator("#user-code")).to_have_count(0)


def test_mitmweb_lists_the_503_flow_and_explains_it(standin, start_mitmweb, launch):
    proxy = start_mitmweb()
    answer = chat_through(proxy, standin)
    assert answer.status_code == 503
    user_code = answer.json()["error"]["user_code"]

    page = launch().new_page()
    page.goto(proxy.web_url, timeout=WAIT_MS)

    expect = sync_api.expect
    row = page.locator("tr", has=page.locator("td.col-path", has_text="/v1/chat/completions"))
    expect(row).to_have_count(1, timeout=WAIT_MS)
    expect(row.locator("td.col-status")).to_have_text("503")

    row.locator("td.col-path").click()
    detail = page.locator(".flow-detail")
    detail.locator("nav a", has_text="Comment").click()
    expect(detail).to_contain_text("qwen: answered 503 by the addon", timeout=WAIT_MS)
    expect(detail).to_contain_text(user_code)


def test_log_in_button_in_reverse_mode_starts_a_login_and_shows_its_code(standin, start_proxy, launch):
    # Reverse mode rewrites the Host header: the form's POST must still pass the same-origin check.
    proxy = start_proxy(mode=f"reverse:{standin.base_url}")
    page = launch().new_page()
    page.goto(f"http://127.0.0.1:{proxy.port}/__qwen__/", timeout=WAIT_MS)

    expect = sync_api.expect
    expect(page.locator("#state")).to_have_attribute("data-state", "logged_out")
    page.get_by_role("button", name="Log in now").click()

    expect(page.locator("#user-code")).to_have_text(re.compile(r"\S"), timeout=WAIT_MS)
    assert page.url == f"http://127.0.0.1:{proxy.port}/__qwen__/"
    assert standin.pending_user_codes() == [page.locator("#user-code").inner_text()]
    assert standin.counts["device_code"] == 1
