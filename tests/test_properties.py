"""Property-based tests of what parses outside input: resource_url values and option values.
(OAuth answers: test_oauth_parse.py; credential files: test_store.py.)"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions
from mitmproxy.test import taddons

from qwenproxy import routing
from qwenproxy.addon import QwenAuth
from qwenproxy.profile import QWEN
from qwenproxy.store import Credentials

resource_urls = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
        st.sampled_from(["", "https://", "http://", "ftp://", "//", "javascript:"]),
        st.sampled_from(
            ["portal.qwen.ai", "localhost", "127.0.0.1", "evil.test", "a.qwen.ai.evil.test", "[::1]", ""]
        ),
        st.sampled_from(["", ":8443", ":0", ":99999", ":x"]),
        st.sampled_from(["", "/", "/v1", "/v1/", "/compatible-mode/v1", "/x?y#z"]),
    ),
)


@given(resource_urls)
def test_any_resource_url_gives_a_trusted_origin_or_none_and_never_raises_elsewhere(resource_url):
    creds = Credentials("a" * 20, "r" * 20, "Bearer", 1, resource_url)
    base = creds.api_base()
    assert isinstance(base, str)
    try:
        origin = routing.parse_origin(base)
    except ValueError:
        return  # the addon ignores such an endpoint
    if routing.trusted_origin(origin, frozenset(QWEN.api_hosts), QWEN.trusted_domains):
        host = origin.host
        assert (
            host in QWEN.api_hosts
            or host == "qwen.ai"
            or host.endswith(".qwen.ai")
            or host in ("localhost", "127.0.0.1", "::1")
        )
        assert origin.scheme == "https" or host in ("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="module")
def configured():
    addon = QwenAuth()
    with taddons.context(addon) as tctx:
        yield tctx, addon


option_values = st.one_of(
    st.tuples(st.just("qwen_hosts"), st.lists(st.text(max_size=30), max_size=4)),
    st.tuples(
        st.sampled_from(["qwen_retry_after", "qwen_auth_timeout", "qwen_hold"]), st.integers(-(10**9), 10**9)
    ),
    st.tuples(
        st.just("qwen_oauth_url"), st.text(max_size=40) | st.sampled_from(["https://x", "http://127.0.0.1:1"])
    ),
    st.tuples(st.sampled_from(["qwen_open_browser", "qwen_route", "qwen_allow_remote"]), st.booleans()),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(option_values)
def test_any_option_value_is_accepted_or_refused_with_an_options_error(configured, option):
    tctx, addon = configured
    name, value = option
    try:
        tctx.configure(addon, **{name: value})
    except exceptions.OptionsError as e:
        assert name in str(e) or "must" in str(e) or "not" in str(e)
        assert getattr(tctx.options, name) != value or name == "qwen_hosts"  # rolled back
    else:
        assert getattr(tctx.options, name) == value
    assert addon.tokens is not None, "the addon stays configured either way"
