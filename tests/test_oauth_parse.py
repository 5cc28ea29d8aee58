"""What each OAuth answer means, without a server: the pure parsing of `qwenproxy.oauth`."""

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qwenproxy import oauth
from qwenproxy.store import Credentials

NOW = 1_800_000_000.0


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_pkce_pair_is_s256_of_the_verifier():
    import base64
    import hashlib

    verifier, challenge = oauth.pkce_pair()
    assert len(verifier) == 43 and "=" not in verifier
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert oauth.pkce_pair()[0] != verifier


@pytest.mark.parametrize(
    "url",
    ["https://chat.qwen.ai", "https://chat.qwen.ai/", "http://127.0.0.1:8080", "http://localhost:1/x"],
)
def test_oauth_url_accepted(url):
    assert not oauth.check_oauth_base_url(url).endswith("/")


@pytest.mark.parametrize(
    "url",
    ["http://chat.qwen.ai", "chat.qwen.ai", "ftp://x", "https://x/?a=1", "", "http://10.0.0.1"],
)
def test_oauth_url_rejected_unless_https_or_loopback(url):
    with pytest.raises(ValueError):
        oauth.check_oauth_base_url(url)


def test_device_authorization_parsed_and_clamped():
    auth = oauth.parse_device_authorization(
        200,
        body(
            device_code="dc",
            user_code="AB-12",
            verification_uri="https://x/authorize",
            verification_uri_complete="https://x/authorize?user_code=AB-12",
            expires_in=10**9,
            interval=0,
        ),
        code_verifier="v",
        now=NOW,
    )
    assert auth.user_code == "AB-12"
    assert auth.expires_at == NOW + oauth.MAX_DEVICE_CODE_LIFETIME_S
    assert auth.interval == oauth.MIN_POLL_INTERVAL_S
    assert "dc" not in repr(auth) and "'v'" not in repr(auth)


def test_device_authorization_without_interval_uses_qwen_default():
    auth = oauth.parse_device_authorization(
        200,
        body(device_code="d", user_code="u", verification_uri="https://x/a", expires_in=600),
        code_verifier="v",
        now=NOW,
    )
    assert auth.interval == 2.0
    assert auth.verification_uri_complete == "https://x/a"


@pytest.mark.parametrize(
    "status,payload,error",
    [
        (503, b"<html>down</html>", oauth.ServerUnavailable),
        (200, b"{truncated", oauth.ProtocolError),
        (200, b"[1, 2]", oauth.ProtocolError),
        (200, body(user_code="u", verification_uri="https://x", expires_in=1), oauth.ProtocolError),
        (
            200,
            body(device_code="d", user_code="u", verification_uri="javascript:alert(1)", expires_in=1),
            oauth.ProtocolError,
        ),
        (
            200,
            body(device_code="d", user_code="u", verification_uri="https://x", expires_in="600"),
            oauth.ProtocolError,
        ),
        (401, body(error="invalid_client"), oauth.ClientRejected),
    ],
)
def test_device_authorization_failures_are_typed(status, payload, error):
    with pytest.raises(error):
        oauth.parse_device_authorization(status, payload, code_verifier="v", now=NOW)


@pytest.mark.parametrize(
    "status,error,outcome",
    [
        (400, "authorization_pending", oauth.Pending(slow_down=False)),
        (429, "slow_down", oauth.Pending(slow_down=True)),
        (400, "slow_down", oauth.Pending(slow_down=True)),
    ],
)
def test_poll_keeps_waiting(status, error, outcome):
    assert oauth.parse_poll(status, body(error=error), now=NOW) == outcome


@pytest.mark.parametrize(
    "status,payload,error",
    [
        (400, body(error="access_denied"), oauth.AccessDenied),
        (400, body(error="expired_token"), oauth.DeviceCodeExpired),
        (400, body(error="invalid_grant"), oauth.InvalidGrant),
        (400, body(error="invalid_request"), oauth.ClientRejected),
        (502, b"bad gateway", oauth.ServerUnavailable),
        (400, b"not json", oauth.ProtocolError),
    ],
)
def test_poll_failures_are_typed(status, payload, error):
    with pytest.raises(error):
        oauth.parse_poll(status, payload, now=NOW)


def test_poll_success_gives_credentials_in_milliseconds():
    creds = oauth.parse_poll(
        200,
        body(
            access_token="a",
            refresh_token="r",
            token_type="Bearer",
            expires_in=3600,
            resource_url="portal.qwen.ai",
        ),
        now=NOW,
    )
    assert isinstance(creds, Credentials)
    assert creds.expiry_date == int((NOW + 3600) * 1000)
    assert creds.resource_url == "portal.qwen.ai"


PREVIOUS = Credentials("old-a", "old-r", "Bearer", 1, "portal.qwen.ai")


def test_refresh_keeps_refresh_token_and_resource_url_when_absent():
    creds = oauth.parse_refresh(200, body(access_token="new", expires_in=60), now=NOW, previous=PREVIOUS)
    assert (creds.access_token, creds.refresh_token, creds.resource_url) == ("new", "old-r", "portal.qwen.ai")


def test_refresh_takes_rotated_refresh_token():
    creds = oauth.parse_refresh(
        200, body(access_token="new", refresh_token="r2", expires_in=60), now=NOW, previous=PREVIOUS
    )
    assert creds.refresh_token == "r2"


@pytest.mark.parametrize("status", [400, 401])
@pytest.mark.parametrize("payload", [body(error="invalid_grant"), b"", b"<html>"])
def test_refresh_400_or_401_means_dead_refresh_token(status, payload):
    with pytest.raises(oauth.InvalidGrant):
        oauth.parse_refresh(status, payload, now=NOW, previous=PREVIOUS)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_refresh_server_trouble_is_transient(status):
    with pytest.raises(oauth.OAuthError) as info:
        oauth.parse_refresh(status, b"oops", now=NOW, previous=PREVIOUS)
    assert info.value.transient


@pytest.mark.parametrize(
    "expires_in,expected",
    [
        (-5, NOW + oauth.MIN_TOKEN_LIFETIME_S),
        (0, NOW + oauth.MIN_TOKEN_LIFETIME_S),
        (10**12, NOW + oauth.MAX_TOKEN_LIFETIME_S),
    ],
)
def test_absurd_token_lifetimes_are_clamped(expires_in, expected):
    creds = oauth.parse_refresh(
        200, body(access_token="a", expires_in=expires_in), now=NOW, previous=PREVIOUS
    )
    assert creds.expiry_date == int(expected * 1000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=6)
    ),
    max_leaves=20,
)
token_like = st.fixed_dictionaries(
    {},
    optional={
        "access_token": json_values | st.text(min_size=1),
        "refresh_token": json_values | st.text(min_size=1),
        "token_type": json_values,
        "expires_in": json_values | st.integers(),
        "resource_url": json_values,
        "error": st.sampled_from(["authorization_pending", "slow_down", "access_denied", "expired_token"])
        | json_values,
    },
)


@example(status=200, data={"access_token": " ", "refresh_token": "r", "expires_in": 0})
@given(status=st.sampled_from([200, 400, 401, 403, 429, 500, 503]), data=token_like | json_values)
def test_any_json_answer_gives_a_result_or_an_oauth_error(status, data):
    payload = json.dumps(data).encode()
    for parse in (
        lambda: oauth.parse_poll(status, payload, now=NOW),
        lambda: oauth.parse_refresh(status, payload, now=NOW, previous=PREVIOUS),
        lambda: oauth.parse_device_authorization(status, payload, code_verifier="v", now=NOW),
    ):
        try:
            result = parse()
        except oauth.OAuthError as e:
            assert str(e)
        else:
            assert result is not None


@given(status=st.integers(100, 599), payload=st.binary(max_size=200))
def test_any_bytes_give_a_result_or_an_oauth_error(status, payload):
    try:
        oauth.parse_poll(status, payload, now=NOW)
    except oauth.OAuthError:
        pass
