"""Where a Qwen request goes: host entries, account origins, path mapping."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwenproxy import routing


@pytest.mark.parametrize(
    "entry,host",
    [
        ("portal.qwen.ai", "portal.qwen.ai"),
        ("Portal.Qwen.AI.", "portal.qwen.ai"),
        (" 127.0.0.1 ", "127.0.0.1"),
        ("[::1]", "::1"),
    ],
)
def test_host_entries_are_normalized(entry, host):
    assert routing.parse_host_entry(entry) == host


@pytest.mark.parametrize(
    "entry", ["", "https://portal.qwen.ai", "portal.qwen.ai/v1", "portal.qwen.ai:443", "a b"]
)
def test_bad_host_entries_are_refused_with_a_reason(entry):
    with pytest.raises(ValueError):
        routing.parse_host_entry(entry)


@pytest.mark.parametrize(
    "base,origin",
    [
        ("https://portal.qwen.ai/v1", routing.Origin("https", "portal.qwen.ai", 443, "/v1")),
        ("https://localhost:8443/v1/", routing.Origin("https", "localhost", 8443, "/v1")),
        ("http://127.0.0.1:9/v1", routing.Origin("http", "127.0.0.1", 9, "/v1")),
    ],
)
def test_origin_of_api_base(base, origin):
    assert routing.parse_origin(base) == origin
    assert routing.parse_origin(origin.url) == origin


@pytest.mark.parametrize(
    "path,mapped",
    [
        ("/compatible-mode/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models?limit=2", "/v1/models?limit=2"),
        ("/v1", "/v1"),
        ("/api/v1/services/aigc", None),
        ("/chat/completions", None),
        ("/v10/x", None),
    ],
)
def test_paths_map_onto_the_account_base(path, mapped):
    account = routing.Origin("https", "portal.qwen.ai", 443, "/v1")
    assert routing.route(path, account) == mapped


@given(prefix=st.sampled_from(routing.COMPATIBLE_BASES), rest=st.text(alphabet="/abcv1?=&-", max_size=40))
def test_mapped_paths_keep_the_api_subpath(prefix, rest):
    account = routing.Origin("https", "h", 443, "/base/v1")
    path = prefix + "/" + rest
    assert routing.route(path, account) == "/base/v1/" + rest


@pytest.mark.parametrize(
    "scheme,host,expected",
    [
        ("http", "portal.qwen.ai", "https"),
        ("https", "portal.qwen.ai", "https"),
        ("http", "127.0.0.1", "http"),
        ("http", "localhost", "http"),
    ],
)
def test_tokens_travel_over_tls_except_to_loopback(scheme, host, expected):
    assert routing.secure_scheme(scheme, host) == expected
