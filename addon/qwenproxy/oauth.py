"""The Qwen OAuth protocol over httpx: device authorization with PKCE, polling, refresh.

Each exchange turns a response into a typed result or a typed error. Parsing is pure (functions
of status and body), so every odd answer a server can give is tested without a server.
Knows nothing of mitmproxy or of the credential file.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import logging
import math
import secrets
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from .profile import QWEN, Profile
from .store import CredentialError, Credentials

log = logging.getLogger(__name__)

# Bounds on what a server may make us do or hold.
MAX_BODY_BYTES = 64 * 1024
MIN_POLL_INTERVAL_S = 1.0
MAX_POLL_INTERVAL_S = 60.0
MAX_DEVICE_CODE_LIFETIME_S = 3600.0
# A token said to live less than this would be refreshed on every request: treat it as this.
MIN_TOKEN_LIFETIME_S = 60.0
MAX_TOKEN_LIFETIME_S = 366 * 24 * 3600.0
MAX_BACKOFF_S = 30.0
REFRESH_DEADLINE_S = 20.0


class OAuthError(Exception):
    """An OAuth exchange failed. `str()` is a sentence fit for a log line or a 503 body."""

    transient = False

    def __init__(self, message: str, *, error: str | None = None, status: int | None = None):
        super().__init__(message)
        self.error = error
        self.status = status


class ServerUnavailable(OAuthError):
    """Network failure, timeout or 5xx: worth retrying later."""

    transient = True


class ProtocolError(OAuthError):
    """The server answered something that is not the protocol (bad JSON, missing fields)."""

    transient = True


class AccessDenied(OAuthError):
    """The user denied the login."""


class DeviceCodeExpired(OAuthError):
    """The device code expired before the user approved it (or the wait timed out)."""


class InvalidGrant(OAuthError):
    """The grant (refresh token or device code) is dead: only a new device flow helps."""


class ClientRejected(OAuthError):
    """The server rejected the request itself (client id, parameters): a bug or a changed API."""


@dataclass(frozen=True)
class DeviceAuthorization:
    """A started device flow: what to show the user, and what polling needs."""

    device_code: str = dataclasses.field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_at: float  # epoch seconds
    interval: float  # seconds between polls
    code_verifier: str = dataclasses.field(repr=False)

    def seconds_left(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


@dataclass(frozen=True)
class Pending:
    """A poll answer that says: keep waiting (`slow_down` asks for a longer interval)."""

    slow_down: bool = False


# ---------------------------------------------------------------------------------------------
# Pure helpers


def pkce_pair() -> tuple[str, str]:
    """A PKCE (verifier, S256 challenge) pair: 32 random bytes, base64url without padding."""
    verifier = _b64url(secrets.token_bytes(32))
    challenge = _b64url(hashlib.sha256(verifier.encode("ascii")).digest())
    return verifier, challenge


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address (IPv6 in brackets, with a scope, or IPv4-mapped) is this
    machine's loopback."""
    host = host.strip("[]").split("%", 1)[0].lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def check_oauth_base_url(url: str) -> str:
    """The OAuth base URL without trailing slash; https required except for loopback hosts.

    Raises ValueError with a clear reason: refresh tokens must not cross the network in clear.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OAuth URL must be an absolute http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(f"OAuth URL must use https (plain http only to loopback), got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"OAuth URL must not carry a query or fragment, got {url!r}")
    return url.strip().rstrip("/")


def tls_verification(extra_ca: str | None) -> ssl.SSLContext | bool:
    """TLS verification for httpx: the system's CAs, plus an extra CA file if given (mitmproxy's
    `ssl_verify_upstream_trusted_ca`, or the CLI's `--ca`)."""
    if not extra_ca:
        return True
    context = ssl.create_default_context()
    try:
        import certifi  # mitmproxy depends on it

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass
    context.load_verify_locations(extra_ca)
    return context


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _decode_json(status: int, body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:80].decode("utf-8", "replace")
        if status >= 500:
            raise ServerUnavailable(f"OAuth server error {status}", status=status) from None
        raise ProtocolError(
            f"OAuth server answered {status} with a body that is not JSON: {snippet!r}",
            status=status,
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(f"OAuth server answered {status} with JSON that is not an object", status=status)
    return data


def _error_of(status: int, data: dict[str, Any]) -> tuple[str | None, str]:
    error = data.get("error")
    error = error if isinstance(error, str) else None
    desc = data.get("error_description")
    desc = desc if isinstance(desc, str) else ""
    text = f"{error}: {desc}" if error and desc else (error or desc or f"HTTP {status}")
    return error, text[:300]


def _required_str(data: dict[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} lacks a valid {key!r}")
    return value


def parse_device_authorization(
    status: int, body: bytes, *, code_verifier: str, now: float
) -> DeviceAuthorization:
    """Turn the device/code answer into a DeviceAuthorization or raise an OAuthError."""
    if status >= 500:
        raise ServerUnavailable(f"device authorization failed: OAuth server error {status}", status=status)
    data = _decode_json(status, body)
    if status != 200:
        error, text = _error_of(status, data)
        raise ClientRejected(f"device authorization refused: {text}", error=error, status=status)
    what = "device authorization answer"
    device_code = _required_str(data, "device_code", what)
    user_code = _required_str(data, "user_code", what)
    uri = _required_str(data, "verification_uri", what)
    complete = data.get("verification_uri_complete")
    if not isinstance(complete, str) or not complete:
        complete = uri
    for link in (uri, complete):
        if urlsplit(link).scheme not in ("http", "https"):
            raise ProtocolError(f"{what} has a verification link that is not http(s): {link[:80]!r}")
    expires_in = _number(data.get("expires_in"))
    if expires_in is None:
        raise ProtocolError(f"{what} lacks a numeric 'expires_in'")
    interval = _number(data.get("interval"))
    if interval is None:
        interval = QWEN.default_poll_interval_s
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_at=now + _clamp(expires_in, 0.0, MAX_DEVICE_CODE_LIFETIME_S),
        interval=_clamp(interval, MIN_POLL_INTERVAL_S, MAX_POLL_INTERVAL_S),
        code_verifier=code_verifier,
    )


def parse_token_response(
    data: dict[str, Any], *, now: float, previous: Credentials | None = None
) -> Credentials:
    """Credentials from a 200 token answer (device grant or refresh).

    A refresh answer without refresh_token or resource_url keeps the previous ones.
    """
    what = "token answer"
    access = _required_str(data, "access_token", what)
    refresh = data.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        if previous is None:
            raise ProtocolError(f"{what} lacks a valid 'refresh_token'")
        refresh = previous.refresh_token
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or not token_type:
        token_type = "Bearer"
    expires_in = _number(data.get("expires_in"))
    if expires_in is None:
        raise ProtocolError(f"{what} lacks a numeric 'expires_in'")
    resource_url = data.get("resource_url")
    if not isinstance(resource_url, str) or not resource_url.strip():
        resource_url = previous.resource_url if previous else None
    expiry_ms = int((now + _clamp(expires_in, MIN_TOKEN_LIFETIME_S, MAX_TOKEN_LIFETIME_S)) * 1000)
    try:
        return Credentials(
            access_token=access,
            refresh_token=refresh,
            token_type=token_type,
            expiry_date=expiry_ms,
            resource_url=resource_url,
        )
    except CredentialError as e:  # e.g. a blank token or control characters: unusable in a header
        raise ProtocolError(f"{what} holds unusable credentials: {e}") from None


def parse_poll(status: int, body: bytes, *, now: float) -> Credentials | Pending:
    """One device-grant poll answer: Credentials, Pending, or an OAuthError."""
    if status >= 500:
        raise ServerUnavailable(f"OAuth server error {status} while polling", status=status)
    data = _decode_json(status, body)
    if status == 200:
        return parse_token_response(data, now=now)
    error, text = _error_of(status, data)
    if error == "authorization_pending":
        return Pending()
    if error == "slow_down" or status == 429:
        return Pending(slow_down=True)
    if error == "access_denied":
        raise AccessDenied("the login was denied", error=error, status=status)
    if error == "expired_token":
        raise DeviceCodeExpired("the login code expired before it was approved", error=error, status=status)
    if error == "invalid_grant":
        raise InvalidGrant(f"the login code was rejected: {text}", error=error, status=status)
    raise ClientRejected(f"polling for the token failed: {text}", error=error, status=status)


def parse_refresh(status: int, body: bytes, *, now: float, previous: Credentials) -> Credentials:
    """A refresh answer: new Credentials, or InvalidGrant when the refresh token is dead."""
    if status >= 500:
        raise ServerUnavailable(f"token refresh failed: OAuth server error {status}", status=status)
    if status in (400, 401):
        # Whatever the body says: Qwen Code treats these as a dead refresh token.
        try:
            _, text = _error_of(status, _decode_json(status, body))
        except OAuthError:
            text = f"HTTP {status}"
        raise InvalidGrant(f"the refresh token was rejected ({text})", status=status)
    data = _decode_json(status, body)
    if status != 200:
        error, text = _error_of(status, data)
        if status == 429:
            raise ServerUnavailable(f"token refresh rate-limited: {text}", error=error, status=status)
        raise ClientRejected(f"token refresh failed: {text}", error=error, status=status)
    return parse_token_response(data, now=now, previous=previous)


# ---------------------------------------------------------------------------------------------
# The client


Sleep = Callable[[float], Awaitable[None]]


class OAuthClient:
    """Qwen's OAuth endpoints over one httpx.AsyncClient.

    `clock` and `sleep` are injectable so polling logic can be tested without waiting.
    """

    def __init__(
        self,
        base_url: str = QWEN.oauth_base_url,
        profile: Profile = QWEN,
        *,
        verify: Any = True,
        timeout_s: float = 20.0,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = check_oauth_base_url(base_url)
        self.profile = profile
        self.clock = clock
        self.sleep = sleep
        self._http = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,  # a redirect must not carry a refresh token elsewhere
            trust_env=False,  # never send our OAuth traffic through a proxy (it may be us)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, form: dict[str, str], headers: dict[str, str] | None = None):
        """POST a form; return (status, body) with the body read up to MAX_BODY_BYTES."""
        url = self.base_url + path
        try:
            async with self._http.stream(
                "POST",
                url,
                data=form,
                headers={"Accept": "application/json", **(headers or {})},
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise ProtocolError(
                            f"OAuth server answer exceeds {MAX_BODY_BYTES} bytes", status=response.status_code
                        )
                return response.status_code, bytes(body)
        except httpx.TimeoutException as e:
            raise ServerUnavailable(f"OAuth server timed out ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"OAuth server unreachable: {type(e).__name__}: {e}"[:300]) from e

    async def start_device_flow(self) -> DeviceAuthorization:
        """Ask for a device code (with a PKCE S256 challenge)."""
        verifier, challenge = pkce_pair()
        status, body = await self._post(
            self.profile.device_code_path,
            {
                "client_id": self.profile.client_id,
                "scope": self.profile.scope,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
            headers={"x-request-id": str(uuid.uuid4())},
        )
        return parse_device_authorization(status, body, code_verifier=verifier, now=self.clock())

    async def poll_once(self, auth: DeviceAuthorization) -> Credentials | Pending:
        status, body = await self._post(
            self.profile.token_path,
            {
                "grant_type": self.profile.device_grant_type,
                "client_id": self.profile.client_id,
                "device_code": auth.device_code,
                "code_verifier": auth.code_verifier,
            },
        )
        return parse_poll(status, body, now=self.clock())

    async def wait_for_approval(
        self,
        auth: DeviceAuthorization,
        *,
        timeout_s: float = 0,
        on_wait: Callable[[DeviceAuthorization, OAuthError | None], None] | None = None,
    ) -> Credentials:
        """Poll until the user approves; raise AccessDenied, DeviceCodeExpired or another OAuthError.

        Honours `interval` and `slow_down` (RFC 8628: +5 s), retries network errors and 5xx with
        exponential backoff, and gives up when the device code expires or `timeout_s` (0 = the
        code's own lifetime) has passed. Cancellation stops it at once.
        """
        deadline = auth.expires_at
        if timeout_s > 0:
            deadline = min(deadline, self.clock() + timeout_s)
        interval = auth.interval
        failures = 0
        while True:
            now = self.clock()
            delay = interval if failures == 0 else min(interval * 2**failures, MAX_BACKOFF_S)
            if now + delay >= deadline:
                # Sleep what is left, then one last poll: approval may have come in meanwhile.
                delay = max(0.0, deadline - now)
            await self.sleep(delay)
            try:
                result = await self.poll_once(auth)
            except OAuthError as e:
                if not e.transient:
                    raise
                failures += 1
                log.debug("poll failed (%s); retrying", e)
                if on_wait:
                    on_wait(auth, e)
                if self.clock() >= deadline:
                    raise DeviceCodeExpired(f"login gave up: {e}") from e
                continue
            failures = 0
            if isinstance(result, Credentials):
                return result
            if result.slow_down:
                interval = min(interval + 5.0, MAX_POLL_INTERVAL_S)
            if on_wait:
                on_wait(auth, None)
            if self.clock() >= deadline:
                if deadline < auth.expires_at:
                    raise DeviceCodeExpired("login timed out before it was approved")
                raise DeviceCodeExpired("the login code expired before it was approved")

    async def refresh(self, creds: Credentials) -> Credentials:
        """Exchange the refresh token for a new access token, within REFRESH_DEADLINE_S overall.

        The refresh runs under the credential lock; Qwen Code gives up waiting for that lock after
        about 29 s and then starts a login of its own, so a slow server must not hold it longer.
        """
        try:
            async with asyncio.timeout(REFRESH_DEADLINE_S):
                status, body = await self._post(
                    self.profile.token_path,
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": creds.refresh_token,
                        "client_id": self.profile.client_id,
                    },
                )
        except TimeoutError:
            raise ServerUnavailable(f"token refresh took longer than {REFRESH_DEADLINE_S:.0f} s") from None
        return parse_refresh(status, body, now=self.clock(), previous=creds)
