"""What the stand-in does, without HTTP: device authorizations, tokens, faults, counters.

The tornado handlers translate requests into calls on `Service` and its exceptions into error
responses. All state sits behind one lock, because the server runs in its own thread while tests
drive it (approve, revoke, wait) from theirs.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
import secrets
import string
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tornado.httputil import HTTPHeaders

from ..profile import QWEN

# Endpoints a Fault can be attached to.
ENDPOINTS = ("device_code", "token", "chat", "models")

# Counter keys that exist from the start, so a test can read counts["chat"] before any request.
COUNT_KEYS = (
    "device_code",  # device authorization requests
    "token",  # every request to the token endpoint
    "token_poll",  # ... of which device-code polls
    "token_refresh",  # ... of which refreshes
    "chat",
    "models",
    "unauthorized",  # 401 responses served, from any endpoint
    "faults",  # requests answered by an injected Fault
)

# A poll is "too fast" (429 slow_down) when it comes sooner than this share of the required
# spacing after the previous poll of the same device code. The 10% slack absorbs timer jitter and
# request latency on a client that does wait the full interval.
POLL_TOLERANCE = 0.9

# RFC 7636: a verifier is 43-128 unreserved characters; an S256 challenge is 43 base64url chars.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")

REFRESH_GRANT = "refresh_token"


@dataclass
class Fault:
    """A canned misbehaviour served instead of the normal answer.

    After waiting `delay` seconds (without blocking the server), either close the connection with
    no answer at all (`reset=True`, a TCP RST), answer `status` with `body` and `headers`, or, when
    `status` is None, carry on with the normal answer (a slow but correct server). A dict body is
    sent as JSON.
    """

    status: int | None = 500
    body: bytes | str | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it. `headers` is case-insensitive."""

    endpoint: str
    method: str
    path: str
    headers: HTTPHeaders
    body: bytes


class OAuthError(Exception):
    """An OAuth error answer: `{"error": ..., "error_description": ...}` with an HTTP status."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


class ApiError(Exception):
    """An OpenAI-style error answer, `{"error": {"message", "type", "code"}}`, with a status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status, self.message, self.type, self.code = status, message, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def unauthorized() -> ApiError:
    return ApiError(401, "Invalid access token or token expired", code="invalid_api_key")


class DeviceState(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    REDEEMED = "redeemed"  # approved and exchanged for tokens; a device code works once


@dataclass
class _DeviceAuthorization:
    device_code: str
    user_code: str
    challenge: str
    expires_at: float
    state: DeviceState = DeviceState.PENDING
    last_poll_at: float | None = None


@dataclass
class _AccessToken:
    expires_at: float
    revoked: bool = False


@dataclass
class Settings:
    """How strict and how long-lived things are; see `StandIn` for the meaning of each."""

    token_lifetime: float = 6 * 3600
    device_code_lifetime: float = 600
    interval: int | None = None
    min_poll_interval: float | None = None
    rotate_refresh: bool = False
    clock: Callable[[], float] = time.time

    @property
    def poll_spacing(self) -> float:
        if self.min_poll_interval is not None:
            return self.min_poll_interval
        if self.interval is not None:
            return self.interval
        return QWEN.default_poll_interval_s


class Service:
    """The stand-in's state and rules. Thread-safe; every public method takes the lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Both set once the server listens and its port is known.
        self.base_url = ""
        self.resource_url = ""
        # Content chunks per streamed reply.
        self.stream_chunks = 4
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._devices: dict[str, _DeviceAuthorization] = {}  # by device_code
        self._by_user_code: dict[str, _DeviceAuthorization] = {}
        self._unclaimed: deque[str] = deque()  # user codes wait_for_device_code has not returned
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, bool] = {}  # refresh token -> revoked
        self._faults: dict[str, deque[list]] = {e: deque() for e in ENDPOINTS}  # [Fault, times]
        self._counts: Counter[str] = Counter(dict.fromkeys(COUNT_KEYS, 0))
        self._api_requests: list[RecordedRequest] = []
        self._oauth_requests: list[RecordedRequest] = []
        # The stream gate: while holding, streams park after their first chunk.
        self._holding = False
        self._parked = 0
        self._wakers: list[Callable[[], None]] = []

    # --- OAuth ---------------------------------------------------------------------------------

    def device_authorization(self, content_type: str | None, body: bytes) -> dict:
        """Start a device authorization (RFC 8628 with PKCE S256); return the JSON answer."""
        form = parse_form(content_type, body)
        check_client(form)
        if not form.get("scope"):
            raise OAuthError(400, "invalid_request", "scope is required")
        challenge = form.get("code_challenge")
        if not challenge:
            raise OAuthError(400, "invalid_request", "code_challenge is required (PKCE)")
        if form.get("code_challenge_method") != "S256":
            raise OAuthError(400, "invalid_request", "code_challenge_method must be S256")
        if not _S256_CHALLENGE.fullmatch(challenge):
            raise OAuthError(400, "invalid_request", "code_challenge is not a base64url SHA-256")
        with self._lock:
            user_code = self._new_user_code()
            auth = _DeviceAuthorization(
                device_code=secrets.token_urlsafe(32),
                user_code=user_code,
                challenge=challenge,
                expires_at=self.settings.clock() + self.settings.device_code_lifetime,
            )
            self._devices[auth.device_code] = auth
            self._by_user_code[user_code] = auth
            self._unclaimed.append(user_code)
            self._changed.notify_all()
        answer = {
            "device_code": auth.device_code,
            "user_code": user_code,
            "verification_uri": f"{self.base_url}/authorize",
            "verification_uri_complete": (
                f"{self.base_url}/authorize?user_code={user_code}&client=qwen-code"
            ),
            "expires_in": json_seconds(self.settings.device_code_lifetime),
        }
        if self.settings.interval is not None:
            answer["interval"] = self.settings.interval
        return answer

    def token(self, content_type: str | None, body: bytes) -> dict:
        """Answer the token endpoint (device-code poll or refresh); return the JSON answer."""
        form = parse_form(content_type, body)
        grant = form.get("grant_type")
        with self._lock:
            if grant == QWEN.device_grant_type:
                self._counts["token_poll"] += 1
            elif grant == REFRESH_GRANT:
                self._counts["token_refresh"] += 1
        check_client(form)
        if grant == QWEN.device_grant_type:
            return self._poll(form)
        if grant == REFRESH_GRANT:
            return self._refresh_grant(form)
        if not grant:
            raise OAuthError(400, "invalid_request", "grant_type is required")
        raise OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")

    def _poll(self, form: Mapping[str, str]) -> dict:
        device_code = form.get("device_code")
        verifier = form.get("code_verifier")
        if not device_code:
            raise OAuthError(400, "invalid_request", "device_code is required")
        with self._lock:
            now = self.settings.clock()
            auth = self._devices.get(device_code)
            if auth is None:
                raise OAuthError(400, "invalid_grant", "unknown device_code")
            if auth.state is DeviceState.REDEEMED:
                raise OAuthError(400, "invalid_grant", "device_code was already used")
            if now >= auth.expires_at:
                raise OAuthError(400, "expired_token", "device_code has expired")
            if not verifier or not _VERIFIER.fullmatch(verifier):
                raise OAuthError(400, "invalid_request", "code_verifier is missing or malformed")
            if s256(verifier) != auth.challenge:
                raise OAuthError(400, "invalid_grant", "code_verifier does not match code_challenge")
            previous, auth.last_poll_at = auth.last_poll_at, now
            spacing = self.settings.poll_spacing
            if previous is not None and now - previous < spacing * POLL_TOLERANCE:
                raise OAuthError(429, "slow_down", f"poll at most every {spacing:g} s")
            if auth.state is DeviceState.PENDING:
                raise OAuthError(400, "authorization_pending", "the user has not yet decided")
            if auth.state is DeviceState.DENIED:
                raise OAuthError(400, "access_denied", "the user denied the authorization")
            auth.state = DeviceState.REDEEMED
            return self._issue_locked(self.settings.token_lifetime, refresh_token=None)

    def _refresh_grant(self, form: Mapping[str, str]) -> dict:
        refresh_token = form.get("refresh_token")
        if not refresh_token:
            raise OAuthError(400, "invalid_request", "refresh_token is required")
        with self._lock:
            if self._refresh.get(refresh_token, True):  # unknown or revoked
                raise OAuthError(400, "invalid_grant", "refresh_token is invalid or revoked")
            if self.settings.rotate_refresh:
                self._refresh[refresh_token] = True
                refresh_token = None
            # The old access token stays valid until its own expiry, as with real servers.
            return self._issue_locked(self.settings.token_lifetime, refresh_token=refresh_token)

    def _issue_locked(self, lifetime: float, refresh_token: str | None) -> dict:
        access_token = secrets.token_urlsafe(32)
        self._access[access_token] = _AccessToken(self.settings.clock() + lifetime)
        if refresh_token is None:
            refresh_token = secrets.token_urlsafe(32)
            self._refresh[refresh_token] = False
        return {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": json_seconds(lifetime),
            "resource_url": self.resource_url,
            "scope": QWEN.scope,
        }

    def _new_user_code(self) -> str:
        while True:
            code = "".join(secrets.choice(string.ascii_uppercase) for _ in range(4))
            code += "-" + "".join(secrets.choice(string.digits) for _ in range(4))
            if code not in self._by_user_code:
                return code

    # --- API -----------------------------------------------------------------------------------

    def authorize_api(self, authorization: str | None) -> None:
        """Raise a 401 ApiError unless `authorization` is `Bearer <known, live access token>`."""
        scheme, _, token = (authorization or "").partition(" ")
        with self._lock:
            record = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
            if record is None or record.revoked or self.settings.clock() >= record.expires_at:
                raise unauthorized()

    # --- the user's side of the device flow ----------------------------------------------------

    def decide(self, user_code: str | None, approve: bool) -> str:
        """Approve or deny `user_code` (None: the most recent pending one); return the code.

        Raises LookupError when there is no such pending code.
        """
        with self._lock:
            if user_code is None:
                pending = self._pending_locked()
                if not pending:
                    raise LookupError("no pending device authorization")
                auth = pending[-1]
            else:
                auth = self._by_user_code.get(user_code.strip().upper())
                if auth is None:
                    raise LookupError(f"unknown user code {user_code!r}")
                if auth.state is not DeviceState.PENDING:
                    raise LookupError(f"user code {user_code!r} is already {auth.state.value}")
                if self.settings.clock() >= auth.expires_at:
                    raise LookupError(f"user code {user_code!r} has expired")
            auth.state = DeviceState.APPROVED if approve else DeviceState.DENIED
            return auth.user_code

    def describe(self, user_code: str) -> str | None:
        """The state of `user_code` for the verification page: a DeviceState value or "expired"."""
        with self._lock:
            auth = self._by_user_code.get(user_code.strip().upper())
            if auth is None:
                return None
            if auth.state is DeviceState.PENDING and self.settings.clock() >= auth.expires_at:
                return "expired"
            return auth.state.value

    def pending_user_codes(self) -> list[str]:
        """User codes still awaiting a decision, oldest first."""
        with self._lock:
            return [a.user_code for a in self._pending_locked()]

    def _pending_locked(self) -> list[_DeviceAuthorization]:
        now = self.settings.clock()
        return [
            a for a in self._by_user_code.values() if a.state is DeviceState.PENDING and now < a.expires_at
        ]

    def wait_for_device_code(self, timeout: float) -> str:
        """Block until a device authorization has arrived that no earlier call returned."""
        with self._changed:
            self._wait_locked(lambda: bool(self._unclaimed), timeout, "device authorization")
            return self._unclaimed.popleft()

    # --- tokens, directly ----------------------------------------------------------------------

    def mint_tokens(self, lifetime: float | None) -> dict:
        with self._lock:
            if lifetime is None:
                lifetime = self.settings.token_lifetime
            return self._issue_locked(lifetime, refresh_token=None)

    def revoke_access_tokens(self) -> int:
        with self._lock:
            live = [t for t in self._access.values() if not t.revoked]
            for t in live:
                t.revoked = True
            return len(live)

    def revoke_refresh_tokens(self) -> int:
        with self._lock:
            live = [t for t, revoked in self._refresh.items() if not revoked]
            self._refresh.update(dict.fromkeys(live, True))
            return len(live)

    def expire_access_tokens(self) -> int:
        with self._lock:
            now = self.settings.clock()
            live = [t for t in self._access.values() if t.expires_at > now]
            for t in live:
                t.expires_at = now
            return len(live)

    # --- faults --------------------------------------------------------------------------------

    def add_fault(self, endpoint: str, fault: Fault, times: int) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults[endpoint].append([fault, times])

    def take_fault(self, endpoint: str) -> Fault | None:
        """The fault the next request to `endpoint` gets, if any (used up one at a time)."""
        with self._lock:
            queue = self._faults[endpoint]
            if not queue:
                return None
            entry = queue[0]
            entry[1] -= 1
            if entry[1] == 0:
                queue.popleft()
            self._counts["faults"] += 1
            return entry[0]

    def clear_faults(self) -> None:
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

    # --- observation ---------------------------------------------------------------------------

    def record(self, endpoint: str, method: str, path: str, headers: HTTPHeaders, body: bytes):
        """Count a request on arrival; keep a copy of it."""
        copy = HTTPHeaders()
        for name, value in headers.get_all():
            copy.add(name, value)
        request = RecordedRequest(endpoint, method, path, copy, body)
        with self._lock:
            self._counts[endpoint] += 1
            if endpoint in ("chat", "models"):
                self._api_requests.append(request)
            else:
                self._oauth_requests.append(request)

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def api_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._api_requests)

    def oauth_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._oauth_requests)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts = Counter(dict.fromkeys(COUNT_KEYS, 0))
            self._api_requests.clear()
            self._oauth_requests.clear()

    # --- the stream gate -----------------------------------------------------------------------

    def hold_streams(self) -> None:
        with self._lock:
            self._holding = True
            self._parked = 0

    def release_streams(self) -> None:
        with self._lock:
            self._holding = False
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def park_stream(self, wake: Callable[[], None]) -> bool:
        """Called by a stream after its first chunk is flushed.

        Returns True when the gate is held: the stream must then wait until `wake` is called.
        """
        with self._lock:
            if not self._holding:
                return False
            self._wakers.append(wake)
            self._parked += 1
            self._changed.notify_all()
            return True

    def wait_first_chunk_sent(self, timeout: float, count: int) -> None:
        with self._changed:
            self._wait_locked(lambda: self._parked >= count, timeout, "held stream")

    def _wait_locked(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not self._changed.wait_for(predicate, timeout):
            raise TimeoutError(f"no {what} within {timeout:g} s")


def parse_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """Parse an OAuth request body strictly: urlencoded, UTF-8, no repeated parameters."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise OAuthError(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise OAuthError(400, "invalid_request", f"malformed form body: {e}") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 section 3.1
            raise OAuthError(400, "invalid_request", f"parameter {name!r} is repeated")
        form[name] = value
    return form


def check_client(form: Mapping[str, str]) -> None:
    if form.get("client_id") != QWEN.client_id:
        raise OAuthError(401, "invalid_client", "unknown client_id")


def json_seconds(seconds: float) -> float:
    """Whole seconds as an int, as real servers send them; fractions (tests only) as they are."""
    return int(seconds) if float(seconds).is_integer() else seconds


def s256(verifier: str) -> str:
    """PKCE S256: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
