"""The addon with mitmproxy's own test helpers: options, host matching per proxy mode, the
short-circuit. The OAuth server here is a closed loopback port (a real refused connection)."""

import asyncio
import json
import socket
import time
from typing import Optional

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow, tutils

from qwenproxy.addon import QwenAuth, target_name
from qwenproxy.store import Credentials, CredentialStore


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valid_creds(resource_url="portal.qwen.ai", token="tok-" + "x" * 40) -> Credentials:
    return Credentials(
        access_token=token,
        refresh_token="refresh-" + "y" * 30,
        token_type="Bearer",
        expiry_date=int((time.time() + 3600) * 1000),
        resource_url=resource_url,
    )


@pytest.fixture
def addon():
    return QwenAuth()


@pytest.fixture
def tctx(addon, tmp_path):
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            qwen_home=str(tmp_path / "qwen"),
            qwen_oauth_url=f"http://127.0.0.1:{closed_port()}",
            qwen_open_browser=False,
            qwen_retry_after=7,
        )
        yield tctx
        addon.done()


def flow_to(
    host, *, port=443, scheme="https", path="/v1/chat/completions", mode="regular", sni=None, headers=()
):
    req = tutils.treq(host=host, port=port, scheme=scheme.encode(), path=path.encode(), method=b"POST")
    req.headers.clear()
    for k, v in headers:
        req.headers[k] = v
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
    f.client_conn.sni = sni
    f.server_conn.sni = sni
    return f


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,value",
    [
        ("qwen_hosts", ["https://portal.qwen.ai"]),
        ("qwen_hosts", [""]),
        ("qwen_retry_after", -1),
        ("qwen_retry_after", 100000),
        ("qwen_auth_timeout", -5),
        ("qwen_oauth_url", "http://chat.qwen.ai"),
        ("qwen_oauth_url", "not a url"),
    ],
)
def test_invalid_options_fail_fast(tctx, addon, option, value):
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(addon, **{option: value})


def test_qwen_home_that_is_a_file_is_refused(tctx, addon, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(exceptions.OptionsError, match="not a directory"):
        tctx.configure(addon, qwen_home=str(tmp_path / "file"))


def test_defaults_are_qwen_hosts(tctx, addon):
    assert {"portal.qwen.ai", "dashscope.aliyuncs.com", "dashscope-intl.aliyuncs.com"} == addon.hosts
    assert tctx.options.qwen_open_browser is False
    assert tctx.options.qwen_oauth_url.startswith("http://127.0.0.1")


# -- which host a flow is for ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(host="portal.qwen.ai"), "portal.qwen.ai"),
        (dict(host="PORTAL.qwen.ai."), "portal.qwen.ai"),
        (dict(host="portal.qwen.ai", mode="reverse:https://portal.qwen.ai"), "portal.qwen.ai"),
        (dict(host="portal.qwen.ai", mode="upstream:http://127.0.0.1:3128"), "portal.qwen.ai"),
        (dict(host="203.0.113.9", mode="transparent", sni="portal.qwen.ai"), "portal.qwen.ai"),
        (dict(host="203.0.113.9", mode="local", sni="dashscope.aliyuncs.com"), "dashscope.aliyuncs.com"),
        (
            dict(
                host="203.0.113.9",
                port=80,
                scheme="http",
                mode="transparent",
                headers=[("Host", "portal.qwen.ai:80")],
            ),
            "portal.qwen.ai",
        ),
        (dict(host="203.0.113.9", mode="wireguard"), "203.0.113.9"),
    ],
)
def test_target_name_in_each_proxy_mode(kwargs, name):
    assert target_name(flow_to(**kwargs)) == name


# -- the two outcomes ------------------------------------------------------------------------


async def test_token_and_qwen_code_headers_are_injected(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai", headers=[("Authorization", "Bearer sk-dummy"), ("User-Agent", "curl/8")])
    await tctx.cycle(addon, f)
    assert f.request.headers["Authorization"] == "Bearer " + valid_creds().access_token
    assert f.request.headers["X-DashScope-AuthType"] == "qwen-oauth"
    assert f.request.headers["User-Agent"].startswith("QwenCode/")
    assert f.request.headers["X-DashScope-UserAgent"] == f.request.headers["User-Agent"]
    assert f.request.headers["X-DashScope-CacheControl"] == "enable"
    assert f.request.url == "https://portal.qwen.ai/v1/chat/completions"


async def test_other_hosts_and_the_oauth_host_are_untouched(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    for host in ("example.com", "chat.qwen.ai", "portal.qwen.ai.evil.com", "qwen.ai"):
        f = flow_to(host, headers=[("Authorization", "Bearer mine")])
        await tctx.cycle(addon, f)
        assert f.request.headers["Authorization"] == "Bearer mine"
        assert "X-DashScope-AuthType" not in f.request.headers
        assert f.request.host == host


async def test_dashscope_request_is_routed_to_the_account_endpoint(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds("portal.qwen.ai"))
    f = flow_to("dashscope.aliyuncs.com", path="/compatible-mode/v1/chat/completions?x=1")
    await tctx.cycle(addon, f)
    assert f.request.url == "https://portal.qwen.ai/v1/chat/completions?x=1"
    assert f.request.host_header in (None, "portal.qwen.ai")
    assert "routed" in f.comment


async def test_routing_can_be_turned_off(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds("portal.qwen.ai"))
    tctx.configure(addon, qwen_route=False)
    f = flow_to("dashscope.aliyuncs.com", path="/compatible-mode/v1/models")
    await tctx.cycle(addon, f)
    assert f.request.url == "https://dashscope.aliyuncs.com/compatible-mode/v1/models"
    assert f.request.headers["Authorization"].startswith("Bearer tok-")


async def test_plain_http_to_a_qwen_host_is_upgraded_to_tls(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai", port=80, scheme="http")
    await tctx.cycle(addon, f)
    assert (f.request.scheme, f.request.port) == ("https", 443)


async def test_captured_ip_is_replaced_by_the_matched_name(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("203.0.113.9", mode="transparent", sni="portal.qwen.ai")
    await tctx.cycle(addon, f)
    assert f.request.host == "portal.qwen.ai"


async def test_account_endpoint_host_is_matched_even_if_not_configured(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds("https://eu.portal.qwen.ai:8443/v1"))
    f = flow_to("eu.portal.qwen.ai", port=8443)
    await tctx.cycle(addon, f)
    assert f.request.headers["Authorization"].startswith("Bearer tok-")


@pytest.mark.parametrize(
    "resource_url", ["https://qwen.example.test/v1", "http://eu.portal.qwen.ai/v1", "evil.test"]
)
async def test_untrusted_account_endpoints_get_no_token_and_no_routing(tctx, addon, tmp_path, resource_url):
    CredentialStore(tmp_path / "qwen").save(valid_creds(resource_url))
    host = resource_url.split("//")[-1].split("/")[0]
    f = flow_to(host)
    await tctx.cycle(addon, f)
    assert "Authorization" not in f.request.headers
    f = flow_to("dashscope.aliyuncs.com", path="/compatible-mode/v1/models")
    await tctx.cycle(addon, f)
    assert f.request.host == "dashscope.aliyuncs.com", "not routed to the untrusted endpoint"
    assert f.request.headers["Authorization"].startswith("Bearer tok-")


async def test_no_login_answers_503_with_retry_after_and_openai_error(tctx, addon):
    f = flow_to("portal.qwen.ai", headers=[("Authorization", "Bearer sk-dummy")])
    await tctx.cycle(addon, f)
    assert f.response.status_code == 503
    assert f.response.headers["Retry-After"] == "7"
    error = json.loads(f.response.content)["error"]
    assert {"message", "type", "code"} <= error.keys()
    # The OAuth server is unreachable here, so the message says why the login failed.
    assert "login" in error["message"].lower()
    assert f.comment.startswith("qwen: answered 503")
    assert f.request.headers["Authorization"] == "Bearer sk-dummy"


async def test_flows_already_answered_or_dead_are_left_alone(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    f.live = False
    await addon.requestheaders(f)
    assert "Authorization" not in f.request.headers


async def test_event_stream_responses_are_streamed(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    await addon.requestheaders(f)
    f.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream; charset=utf-8")])
    addon.responseheaders(f)
    assert f.response.stream is True

    other = flow_to("example.com")
    other.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")])
    addon.responseheaders(other)
    assert not other.response.stream


async def test_status_command_never_shows_the_token(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    addon.tokens.usable()
    text = addon.status()
    assert "state: valid" in text
    assert valid_creds().access_token not in text


# -- tokens out of views, who may use them, where they may go --------------------------------


async def test_token_is_put_on_late_and_redacted_once_it_went_upstream(tctx, addon, tmp_path):
    creds = valid_creds()
    CredentialStore(tmp_path / "qwen").save(creds)
    f = flow_to("portal.qwen.ai")
    await addon.requestheaders(f)
    # mitmweb and the console pick the flow up after requestheaders: no token yet.
    assert "Authorization" not in f.request.headers
    await addon.request(f)
    assert f.request.headers["Authorization"] == f"Bearer {creds.access_token}"
    f.response = tutils.tresp()
    addon.responseheaders(f)
    assert creds.access_token not in f.request.headers["Authorization"]
    assert f.request.headers["Authorization"].startswith("Bearer <qwen token redacted")
    assert creds.access_token not in json.dumps(f.get_state(), default=repr)


async def test_streamed_request_bodies_get_the_token_in_requestheaders(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    f.request.stream = True
    await addon.requestheaders(f)
    assert f.request.headers["Authorization"].startswith("Bearer tok-")


async def test_failed_flows_are_redacted_too(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    await tctx.cycle(addon, f)
    f.response = None
    f.request.headers["Authorization"] = f"Bearer {valid_creds().access_token}"
    addon.error(f)
    assert "redacted" in f.request.headers["Authorization"]


async def test_replayed_flow_with_a_redacted_header_gets_a_fresh_token(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to(
        "portal.qwen.ai", headers=[("Authorization", "Bearer <qwen token redacted: tok-...(44 chars)>")]
    )
    f.is_replay = "request"
    await tctx.cycle(addon, f)
    assert f.request.headers["Authorization"] == f"Bearer {valid_creds().access_token}"


async def test_remote_clients_get_403_unless_allowed(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    f.client_conn.peername = ("192.0.2.7", 5000)
    await tctx.cycle(addon, f)
    assert f.response.status_code == 403
    assert json.loads(f.response.content)["error"]["code"] == "qwen_remote_client"
    assert "Authorization" not in f.request.headers

    tctx.configure(addon, qwen_allow_remote=True)
    f = flow_to("portal.qwen.ai")
    f.client_conn.peername = ("192.0.2.7", 5000)
    await tctx.cycle(addon, f)
    assert f.request.headers["Authorization"].startswith("Bearer tok-")


@pytest.mark.parametrize(
    "peer,mode,local",
    [
        (("127.0.0.1", 1), "regular", True),
        (("::1", 1, 0, 0), "regular", True),
        (("::ffff:127.0.0.1", 1, 0, 0), "regular", True),
        (("192.0.2.7", 1), "regular", False),
        (("10.0.0.2", 1), "wireguard", False),
        (("192.0.2.7", 1), "local", True),
    ],
)
def test_which_clients_count_as_local(peer, mode, local):
    from qwenproxy.addon import is_local_client

    f = flow_to("portal.qwen.ai", mode=mode)
    f.client_conn.peername = peer
    assert is_local_client(f) is local


@pytest.mark.parametrize(
    "kwargs",
    [
        # A Host header cannot make another destination a Qwen host.
        dict(host="evil.example", headers=[("Host", "portal.qwen.ai")]),
        dict(host="evil.example", sni="portal.qwen.ai"),
        dict(host="portal.qwen.ai.evil.example"),
        dict(host="evilportal.qwen.ai"),
    ],
)
async def test_spoofed_names_do_not_get_the_token(tctx, addon, tmp_path, kwargs):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to(**kwargs)
    await tctx.cycle(addon, f)
    assert "Authorization" not in f.request.headers


async def test_a_captured_flow_claiming_a_qwen_name_is_sent_to_that_name_only(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to(
        "198.51.100.66", port=80, scheme="http", mode="transparent", headers=[("Host", "portal.qwen.ai")]
    )
    await tctx.cycle(addon, f)
    assert f.request.headers["Authorization"].startswith("Bearer tok-")
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "portal.qwen.ai", 443)


async def test_upstream_401_prepares_one_retry_and_buffers_the_error(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    f = flow_to("portal.qwen.ai")
    await addon.requestheaders(f)
    await addon.request(f)
    f.response = tutils.tresp(status_code=401, headers=[(b"content-type", b"text/event-stream")])
    addon.responseheaders(f)
    assert not f.response.stream
    assert addon.counters["upstream_401"] == 1


@pytest.mark.parametrize("option,value", [("qwen_hold", -1), ("qwen_hold", 7200)])
def test_invalid_hold_values_fail_fast(tctx, addon, option, value):
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(addon, **{option: value})


async def test_reserved_status_path_is_served_only_on_qwen_hosts(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    on_other_site = flow_to("evil.example", path="/__qwen__/logout")
    await tctx.cycle(addon, on_other_site)
    assert on_other_site.response is None or on_other_site.response.status_code != 200
    assert (tmp_path / "qwen" / "oauth_creds.json").exists()

    on_qwen = flow_to("portal.qwen.ai", path="/__qwen__/status.json")
    on_qwen.request.method = "GET"
    await tctx.cycle(addon, on_qwen)
    assert json.loads(on_qwen.response.content)["state"] == "valid"

    magic = flow_to("qwen.auth", port=80, scheme="http", path="/status.json")
    magic.request.method = "GET"
    await tctx.cycle(addon, magic)
    assert json.loads(magic.response.content)["state"] == "valid"


async def test_login_and_logout_commands(tctx, addon, tmp_path):
    CredentialStore(tmp_path / "qwen").save(valid_creds())
    assert "state: valid" in tctx.command(addon.status)
    tctx.command(addon.logout)
    await asyncio.wait(addon._background)
    assert not (tmp_path / "qwen" / "oauth_creds.json").exists()
    assert "state: logged_out" in addon.status()
    # The OAuth server of this fixture is a closed port: the login starts, then fails clearly.
    assert tctx.command(addon.login) == "Qwen login started"
    await addon.tokens.wait_login()
    assert "login failed" in addon.status()


@pytest.mark.parametrize(
    "options,warned",
    [
        (dict(qwen_allow_remote=True, listen_host=""), True),
        (dict(qwen_allow_remote=True, listen_host="0.0.0.0"), True),
        (dict(qwen_allow_remote=True, listen_host="127.0.0.1"), False),
        (dict(qwen_allow_remote=True, listen_host="", proxyauth="user:secret"), False),
        (dict(qwen_allow_remote=False, listen_host=""), False),
        (dict(qwen_allow_remote=True, listen_host="", mode=["local"]), False),
    ],
)
async def test_warns_when_anyone_on_the_network_could_use_the_token(tctx, addon, caplog, options, warned):
    # mitmproxy's proxyauth addon (not loaded here) declares it so; its option types predate `|`.
    tctx.options.add_option("proxyauth", Optional[str], None, "")  # noqa: UP045
    tctx.configure(addon, **options)
    with caplog.at_level("WARNING"):
        addon.running()
    assert ("anyone who can reach it can use your Qwen account" in caplog.text) is warned
