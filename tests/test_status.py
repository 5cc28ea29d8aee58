"""The status page and API (`qwenproxy.status`): pure, so every case is a direct call."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenproxy.status import (
    MAGIC_HOST,
    PATH_PREFIX,
    Page,
    is_status_request,
    qr_svg,
    qr_text,
    respond,
    safe_link,
)
from qwenproxy.tokens import Login, Snapshot, State

NOW = 1_800_000_000.0
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
LINK = "https://chat.qwen.ai/authorize?user_code=ABCD-1234&client=qwen-code"
TOKEN = "sk-ACCESS-0123456789abcdefghijklmnopqrstuvwxyz"


class RecordingActions:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def login(self) -> str:
        self.calls.append("login")
        return "a Qwen login was started"

    def logout(self) -> str:
        self.calls.append("logout")
        return "logged out"


class BrokenActions:
    def login(self) -> str:
        raise RuntimeError("no event loop")

    def logout(self) -> str:
        raise RuntimeError("no event loop")


def snapshot(state: State = State.VALID, **fields) -> Snapshot:
    values = {
        "state": state,
        "endpoint": "https://portal.qwen.ai/v1",
        "expires_at": NOW + 3600,
        "login": None,
        "last_error": None,
        "counters": {"injected": 7, "unavailable": 2, "refreshes": 1},
    }
    if state is State.LOGIN_PENDING:
        values["login"] = Login(url=LINK, user_code="ABCD-1234", expires_at=NOW + 600)
    if state is State.LOGGED_OUT:
        values.update(endpoint=None, expires_at=None)
    values.update(fields)
    return Snapshot(**values)


def get(
    path: str = "/",
    snap: Snapshot | None = None,
    *,
    host: str = MAGIC_HOST,
    accept: str | None = None,
    method: str = "GET",
) -> Page:
    headers = {"Accept": accept} if accept is not None else {}
    return respond(
        method, host, path, headers, snap or snapshot(), NOW, local_client=True, actions=RecordingActions()
    )


def post(
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str = MAGIC_HOST,
    local_client: bool = True,
    actions=None,
) -> tuple[Page, RecordingActions]:
    actions = actions or RecordingActions()
    page = respond(
        "POST", host, path, headers or {}, snapshot(), NOW, local_client=local_client, actions=actions
    )
    return page, actions


def as_json(page: Page) -> dict:
    assert page.headers["Content-Type"] == "application/json"
    return json.loads(page.body)


def text_of(page: Page) -> str:
    return page.body.decode()


# -- which requests are ours ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "ours"),
    [
        (MAGIC_HOST, "/", True),
        (MAGIC_HOST, "/anything", True),
        ("127.0.0.1", PATH_PREFIX, True),
        ("127.0.0.1", PATH_PREFIX + "/", True),
        ("portal.qwen.ai", PATH_PREFIX + "/status.json", True),
        ("portal.qwen.ai", PATH_PREFIX + "?x=1", True),
        ("portal.qwen.ai", PATH_PREFIX + "x", False),
        ("portal.qwen.ai", "/v1/chat/completions", False),
        ("qwen.auth.example.com", "/", False),
        ("portal.qwen.ai", "/x" + PATH_PREFIX, False),
    ],
)
def test_status_requests_are_the_magic_host_or_the_reserved_path(host, path, ours):
    assert is_status_request(host, path) is ours


# -- GET: the status in each state ------------------------------------------------------------


@pytest.mark.parametrize("state", list(State))
def test_status_json_reports_each_state(state):
    doc = as_json(get("/status.json", snapshot(state)))
    assert doc["state"] == state.value
    assert set(doc) == {"state", "endpoint", "expires_at", "expires_in", "login", "last_error", "counters"}
    assert doc["counters"] == {"injected": 7, "unavailable": 2, "refreshes": 1}


def test_valid_state_json_has_endpoint_and_expiry_in_utc():
    doc = as_json(get("/status.json"))
    assert doc["endpoint"] == "https://portal.qwen.ai/v1"
    assert doc["expires_at"] == "2027-01-15T09:00:00Z"
    assert doc["expires_in"] == 3600
    assert doc["login"] is None and doc["last_error"] is None


def test_logged_out_json_has_nulls():
    doc = as_json(get("/status.json", snapshot(State.LOGGED_OUT)))
    assert doc["endpoint"] is None and doc["expires_at"] is None and doc["expires_in"] is None


def test_expired_token_has_zero_seconds_left_not_negative():
    doc = as_json(get("/status.json", snapshot(State.EXPIRED, expires_at=NOW - 100)))
    assert doc["expires_in"] == 0
    assert doc["expires_at"] == "2027-01-15T07:58:20Z"


def test_pending_login_json_has_link_code_and_seconds_left():
    doc = as_json(get("/status.json", snapshot(State.LOGIN_PENDING)))
    assert doc["login"] == {"url": LINK, "user_code": "ABCD-1234", "expires_in": 600}


def test_failed_state_json_carries_the_last_error():
    doc = as_json(
        get("/status.json", snapshot(State.FAILED, last_error="token refresh failed: OAuth server error 500"))
    )
    assert doc["last_error"] == "token refresh failed: OAuth server error 500"


def test_an_enormous_last_error_is_clipped():
    doc = as_json(get("/status.json", snapshot(State.FAILED, last_error="x" * 10_000)))
    assert len(doc["last_error"]) <= 500


def test_json_never_contains_a_token_or_token_like_field():
    # Snapshot holds no token; anything the page shows comes from its whitelisted fields.
    doc = as_json(get("/status.json", snapshot(State.LOGIN_PENDING, last_error="refresh failed")))
    keys: list[str] = []

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                keys.append(k)
                walk(v)

    walk(doc)
    assert not [
        k
        for k in keys
        if re.search(r"token|secret|authorization|bearer|device_code|verifier", k, re.IGNORECASE)
    ]


def test_status_routes_all_work_under_the_reserved_path_and_the_magic_host():
    for host, path in [
        (MAGIC_HOST, "/"),
        (MAGIC_HOST, "/status"),
        ("h", PATH_PREFIX),
        ("h", PATH_PREFIX + "/"),
        ("h", PATH_PREFIX + "/status"),
        ("h", PATH_PREFIX + "/status.json?pretty=1"),
        (MAGIC_HOST, PATH_PREFIX + "/status.json"),
    ]:
        assert as_json(get(path, host=host))["state"] == "valid", (host, path)


def test_head_gets_the_headers_without_a_body():
    page = get("/", method="HEAD")
    assert page.status == 200 and page.body == b"" and page.headers["Content-Type"] == "application/json"


def test_every_answer_forbids_caching():
    pages = [
        get("/"),
        get("/", accept="text/html"),
        get("/nope"),
        get("/login"),
        post("/login")[0],
        post("/login", local_client=False)[0],
        get("/qr.svg", snapshot(State.LOGIN_PENDING)),
    ]
    assert all(p.headers["Cache-Control"] == "no-store" for p in pages)


# -- Accept negotiation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("text/*", True),
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0.5, application/json", False),
        ("text/html, application/json", False),  # a tie: JSON
        ("application/json;q=0.1, text/html;q=0.2", True),
        ("*/*", False),  # curl
        ("", False),
        (None, False),
        ("text/html;q=0, */*", False),
        ("text/html;q=nope", False),
        ("application/*;q=0.3, text/html;q=0.4", True),
        ("garbage,,;;==", False),
    ],
)
def test_accept_chooses_html_only_when_preferred_over_json(accept, html):
    page = get("/", accept=accept)
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html" if html else "application/json")


def test_status_json_is_json_even_for_browsers():
    assert get("/status.json", accept=BROWSER_ACCEPT).headers["Content-Type"] == "application/json"


# -- the HTML page ----------------------------------------------------------------------------


def test_html_page_of_a_pending_login_shows_code_button_qr_and_seconds_left():
    page = get("/", snapshot(State.LOGIN_PENDING), accept=BROWSER_ACCEPT)
    body = text_of(page)
    assert "<div id=user-code class=code>ABCD-1234</div>" in body
    assert (
        "class=button href='https://chat.qwen.ai/authorize?user_code=ABCD-1234&amp;client=qwen-code'" in body
    )
    assert "<svg" in body and 'class="qr"' in body
    assert "<span id=seconds-left>600</span>" in body
    assert "data-state='login_pending'" in body and "Login pending" in body
    assert "<meta http-equiv=refresh content=3>" in body


def test_html_page_refreshes_slowly_when_nothing_is_about_to_change():
    assert "<meta http-equiv=refresh content=30>" in text_of(get("/", accept="text/html"))
    assert "<meta http-equiv=refresh content=3>" in text_of(
        get("/", snapshot(State.REFRESHING), accept="text/html")
    )


def test_html_page_shows_state_endpoint_expiry_error_and_counters():
    body = text_of(
        get("/", snapshot(State.FAILED, last_error="token refresh failed: boom"), accept="text/html")
    )
    assert "data-state='failed'" in body and ">Failed<" in body
    assert "https://portal.qwen.ai/v1" in body
    assert "2027-01-15T09:00:00Z (in 1 h 00 min)" in body
    assert "token refresh failed: boom" in body
    assert "injected 7" in body and "unavailable 2" in body


def test_html_forms_post_to_the_pages_own_base():
    magic = text_of(get("/", accept="text/html"))
    assert "<form method=post action='/login'>" in magic and "<form method=post action='/logout'>" in magic
    reserved = text_of(get(PATH_PREFIX, host="127.0.0.1", accept="text/html"))
    assert f"<form method=post action='{PATH_PREFIX}/login'>" in reserved
    assert f"action='{PATH_PREFIX}/logout'" in reserved


def test_html_offers_log_in_but_not_log_out_when_logged_out():
    body = text_of(get("/", snapshot(State.LOGGED_OUT), accept="text/html"))
    assert "Log in now" in body and "Log out" not in body


def test_html_page_allows_no_script_and_no_framing():
    headers = get("/", accept="text/html").headers
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"


def test_hostile_login_url_and_user_code_are_escaped_and_not_linked():
    hostile = Login(
        url="javascript:alert(document.cookie)//<script>",
        user_code="<script>alert(1)</script>",
        expires_at=NOW + 60,
    )
    body = text_of(
        get(
            "/",
            snapshot(State.LOGIN_PENDING, login=hostile, last_error="<img src=x onerror=alert(1)>"),
            accept="text/html",
        )
    )
    assert "<script>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<img" not in body
    assert "href='javascript:" not in body and "class=button" not in body
    assert "<svg" not in body  # no QR code of a non-web link either


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        " javascript:alert(1)",
        "java\tscript:alert(1)",
        "JAVASCRIPT:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "https://ok.example/\nx",
        "//no-scheme.example/",
        "https:///no-host",
        "vbscript:msgbox(1)",
        "",
    ],
)
def test_only_http_links_become_links(url):
    assert safe_link(url) is None
    login = Login(url=url, user_code="CODE", expires_at=NOW + 60)
    body = text_of(get("/", snapshot(State.LOGIN_PENDING, login=login), accept="text/html"))
    assert "href=" not in body.split("<footer>")[0]


def test_an_attribute_breaking_link_is_escaped_inside_the_href():
    login = Login(url="https://x.example/?a='onmouseover='alert(1)", user_code="CODE", expires_at=NOW + 60)
    body = text_of(get("/", snapshot(State.LOGIN_PENDING, login=login), accept="text/html"))
    assert "href='https://x.example/?a=&#x27;onmouseover=&#x27;alert(1)'" in body


def test_pending_login_without_a_code_yet_says_it_is_starting():
    body = text_of(get("/", snapshot(State.LOGIN_PENDING, login=None), accept="text/html"))
    assert "Starting the login" in body and "user-code" not in body


# -- QR codes ---------------------------------------------------------------------------------


def test_qr_svg_route_serves_the_pending_links_code():
    page = get("/qr.svg?size=3", snapshot(State.LOGIN_PENDING))
    assert page.status == 200 and page.headers["Content-Type"] == "image/svg+xml"
    assert page.body.startswith(b'<svg xmlns="http://www.w3.org/2000/svg"')


def test_qr_svg_route_is_404_without_a_login():
    assert get("/qr.svg").status == 404


def test_qr_text_is_a_compact_block_drawing():
    text = qr_text(LINK)
    lines = text.split("\n")
    assert len(lines) <= 25 and all(len(line) == len(lines[0]) for line in lines)
    assert set(text) <= set("█▀▄ \n")
    assert qr_text("javascript:alert(1)") == ""
    assert qr_text("https://x.example/" + "a" * 5000) == ""


def test_qr_svg_has_no_fixed_size():
    svg = qr_svg(LINK)
    assert svg is not None and "width=" not in svg.split(">")[0]


# -- 404 and 405 ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/status.xml", PATH_PREFIX + "/login/x", "/..", "//login"])
def test_unknown_paths_get_a_json_404(path):
    page = get(path)
    assert page.status == 404
    assert as_json(page)["error"]["type"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/login", "POST"),
        ("GET", "/logout", "POST"),
        ("DELETE", "/", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
        ("POST", "/status.json", "GET, HEAD"),
        ("PUT", "/qr.svg", "GET, HEAD"),
    ],
)
def test_wrong_methods_get_405_with_allow(method, path, allow):
    page = get(path, method=method)
    assert page.status == 405
    assert page.headers["Allow"] == allow
    assert as_json(page)["error"]["type"] == "method_not_allowed"


# -- POST actions -----------------------------------------------------------------------------


def test_api_client_post_login_runs_the_action_and_answers_json():
    page, actions = post("/login")
    assert page.status == 200
    assert as_json(page) == {"ok": True, "message": "a Qwen login was started"}
    assert actions.calls == ["login"]


def test_post_logout_under_the_reserved_path():
    page, actions = post(PATH_PREFIX + "/logout", host="127.0.0.1")
    assert as_json(page)["ok"] is True and actions.calls == ["logout"]


def test_non_loopback_client_is_refused_and_nothing_happens():
    page, actions = post("/login", local_client=False)
    assert page.status == 403
    error = as_json(page)["error"]
    assert error["type"] == "forbidden" and error["code"] == "not_loopback"
    assert "only from this machine" in error["message"]
    assert actions.calls == []


def test_form_post_from_the_page_redirects_back_to_it():
    headers = {"Accept": BROWSER_ACCEPT, "Origin": "http://qwen.auth", "Sec-Fetch-Site": "same-origin"}
    page, actions = post("/login", headers)
    assert page.status == 303 and page.headers["Location"] == "/"
    assert actions.calls == ["login"]
    page, _ = post(
        PATH_PREFIX + "/logout",
        {**headers, "Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080"},
        host="127.0.0.1",
    )
    assert page.status == 303 and page.headers["Location"] == PATH_PREFIX + "/"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},  # not loopback: rebinding
        {"Origin": "null"},
        {"Origin": "file://"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},
        {"Origin": "http://qwen.auth.evil.example"},
        {"Origin": "http://127.0.0.1:8080"},  # loopback, but no same-origin word from the browser
        {"Origin": "http://[::1"},
    ],
)
def test_cross_site_posts_are_refused(headers):
    page, actions = post("/logout", {"Accept": BROWSER_ACCEPT, **headers})
    assert page.status == 403
    assert as_json(page)["error"]["code"] == "cross_site"
    assert actions.calls == []


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        (MAGIC_HOST, {"Origin": "http://qwen.auth"}),
        (MAGIC_HOST, {"origin": "https://QWEN.AUTH"}),
        ("portal.qwen.ai", {"Origin": "https://portal.qwen.ai", "Sec-Fetch-Site": "same-origin"}),
        ("127.0.0.1", {"Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080"}),
        # reverse mode: mitmproxy rewrote Host to the upstream; the browser vouches for same-origin
        (
            "dashscope.aliyuncs.com",
            {
                "Origin": "http://127.0.0.1:8080",
                "Host": "dashscope.aliyuncs.com",
                "Sec-Fetch-Site": "same-origin",
            },
        ),
        ("dashscope.aliyuncs.com", {"Origin": "http://localhost:8080", "Sec-Fetch-Site": "same-origin"}),
        (MAGIC_HOST, {}),  # curl and other non-browser clients
        (MAGIC_HOST, {"Sec-Fetch-Site": "none"}),
    ],
)
def test_same_origin_and_non_browser_posts_are_accepted(host, headers):
    page, actions = post("/login", headers, host=host)
    assert page.status == 200, page.body
    assert actions.calls == ["login"]


def test_an_action_that_raises_is_a_500_not_a_crash():
    page, _ = post("/login", actions=BrokenActions())
    assert page.status == 500
    assert as_json(page)["error"]["code"] == "action_failed"


# -- never raises -----------------------------------------------------------------------------

header_names = st.sampled_from(["Accept", "accept", "Origin", "origin", "Sec-Fetch-Site", "Host", "X-Other"])
header_values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "null",
            "http://qwen.auth",
            "http://[::1",
            "https://a:99999",
            "text/html;q=NaN",
            "*/*;q=inf",
            "cross-site",
        ]
    ),
)
logins = st.one_of(
    st.none(),
    st.builds(
        Login,
        url=st.text(max_size=300),
        user_code=st.text(max_size=30),
        expires_at=st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9),
    ),
)
snapshots = st.builds(
    Snapshot,
    state=st.sampled_from(list(State)),
    endpoint=st.one_of(st.none(), st.text(max_size=100)),
    expires_at=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    login=logins,
    last_error=st.one_of(st.none(), st.text(max_size=600)),
    counters=st.dictionaries(st.text(max_size=20), st.integers(min_value=0, max_value=2**40), max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "get"]), st.text(max_size=10)),
    host=st.one_of(st.just(MAGIC_HOST), st.text(max_size=30)),
    path=st.one_of(
        st.text(max_size=60),
        st.sampled_from(["/", "/status", "/status.json", "/login", "/logout", "/qr.svg"]).map(
            lambda p: PATH_PREFIX + p
        ),
        st.sampled_from(["/", "/login", "/logout", "/qr.svg?x", "/status.json"]),
    ),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    snap=snapshots,
    local=st.booleans(),
)
def test_respond_never_raises_and_always_answers_a_complete_page(method, host, path, headers, snap, local):
    page = respond(method, host, path, headers, snap, NOW, local_client=local, actions=RecordingActions())
    assert 200 <= page.status < 600
    assert page.headers["Cache-Control"] == "no-store"
    assert isinstance(page.body, bytes)
    if page.headers["Content-Type"] == "application/json" and page.body:
        json.loads(page.body)
