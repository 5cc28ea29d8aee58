"""The token lifecycle: "give me a usable token and its endpoint, now".

One `TokenManager` owns the credentials in memory, the single refresh and the single device-flow
login of this process; the credential file's lock makes the refresh single across processes.

States (derived from the facts, so they never disagree with them):

    logged_out ──► login_pending ──► valid ⇄ refreshing
         ▲              │              │ expired (refreshed on next use)
         └── failed ◄───┘◄─────────────┘ (refresh token dead → login)

The hot path (`usable()`) does no I/O but a throttled `stat` of the credential file.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import oauth
from .login_claim import Claim, LoginClaims
from .oauth import DeviceAuthorization, OAuthClient, OAuthError
from .store import Credentials, CredentialStore, LockTimeout

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    LOGGED_OUT = "logged_out"
    VALID = "valid"
    EXPIRED = "expired"
    REFRESHING = "refreshing"
    LOGIN_PENDING = "login_pending"
    FAILED = "failed"


@dataclass(frozen=True)
class Login:
    """A pending device-flow login, as the user sees it."""

    url: str
    user_code: str
    expires_at: float

    def seconds_left(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


@dataclass(frozen=True)
class Unavailable:
    """No usable token right now: why, and what the user can do about it."""

    reason: str
    retry_after: int
    login: Login | None = None
    code: str = "login_required"


@dataclass(frozen=True)
class Snapshot:
    """What a status view may show. Holds no token."""

    state: State
    endpoint: str | None
    expires_at: float | None
    login: Login | None
    last_error: str | None
    counters: dict[str, int]


class LoginElsewhereFailed(Exception):
    """The login another process ran ended without credentials."""


class LoginListener:
    """Receives the login's story; the terminal module tells it to the user. Defaults do nothing."""

    def login_started(self, login: Login) -> None: ...

    def login_waiting(self, login: Login, problem: str | None) -> None: ...

    def login_succeeded(self, creds: Credentials) -> None: ...

    def login_failed(self, reason: str) -> None: ...


class TokenManager:
    def __init__(
        self,
        store: CredentialStore,
        client: OAuthClient,
        *,
        clock: Callable[[], float] = time.time,
        auth_timeout_s: float = 0,
        failure_cooldown_s: float = 5.0,
        login_wait_s: float = 10.0,
        listener: LoginListener | None = None,
    ):
        self.store = store
        self.client = client
        self.clock = clock
        self.auth_timeout_s = auth_timeout_s
        self.failure_cooldown_s = failure_cooldown_s
        self.login_wait_s = login_wait_s
        self.listener = listener or LoginListener()
        self.claims = LoginClaims(store.home, clock=clock)
        self.follow_poll_s = 1.0
        self._owner = uuid.uuid4().hex
        self.counters: Counter[str] = Counter()

        self._creds: Credentials | None = None
        self._refresh_dead = False  # the refresh token of _creds was rejected
        self._refresh_task: asyncio.Task[Credentials] | None = None
        self._login_task: asyncio.Task[None] | None = None
        self._login: Login | None = None
        self._login_started = asyncio.Event()
        self._last_error: str | None = None
        self._failed_until = 0.0
        self._failure: OAuthError | LockTimeout | OSError | None = None
        self._loaded = False

    # -- reading ---------------------------------------------------------------------------

    def _reload(self) -> None:
        creds = self.store.load()
        if creds != self._creds:
            self._refresh_dead = False
            if creds is not None:
                log.info("credentials loaded from %s (%s)", self.store.path, creds.redacted())
        self._creds = creds
        if creds is None and self.store.problem:
            self._last_error = self.store.problem
        self._loaded = True
        if creds is not None and creds.is_usable(self.clock()) and self.login_running():
            log.info("another process logged in; the pending login is no longer needed")
            assert self._login_task is not None
            self._login_task.cancel()

    def usable(self) -> Credentials | None:
        """A usable token from memory, or None. Notices (throttled) when another process replaced
        the file; does no other I/O."""
        if not self._loaded or self.store.changed():
            self._reload()
        creds = self._creds
        if creds is not None and creds.is_usable(self.clock()):
            return creds
        return None

    @property
    def credentials(self) -> Credentials | None:
        """The credentials in memory, usable or not (loaded from the file on first use)."""
        if not self._loaded:
            self._reload()
        return self._creds

    def snapshot(self) -> Snapshot:
        self.usable()  # (re)load the file first if it is new or changed
        creds = self._creds
        now = self.clock()
        if self.login_running():
            state = State.LOGIN_PENDING
        elif self._refresh_task is not None and not self._refresh_task.done():
            state = State.REFRESHING
        elif creds is not None and creds.is_usable(now):
            state = State.VALID
        elif now < self._failed_until:
            state = State.FAILED
        elif creds is not None and not self._refresh_dead:
            state = State.EXPIRED
        else:
            state = State.LOGGED_OUT
        return Snapshot(
            state=state,
            endpoint=creds.api_base() if creds else None,
            expires_at=creds.expires_at if creds else None,
            login=self._login,
            last_error=self._last_error,
            counters=dict(self.counters),
        )

    # -- the slow path ---------------------------------------------------------------------

    async def acquire(self) -> Credentials | Unavailable:
        """A usable token, refreshing it first if needed; or why there is none (a login has
        then been started)."""
        creds = self.usable()
        if creds is not None:
            return creds
        if self._creds is not None and not self._refresh_dead:
            try:
                return await self.refresh()
            except oauth.InvalidGrant:
                pass  # the refresh token is dead: only a login helps
            except (OAuthError, LockTimeout, OSError) as e:
                current = self._creds
                if current is not None and self.clock() < current.expires_at:
                    return current  # inside the safety buffer but not yet expired: use it
                return Unavailable(
                    reason=f"The Qwen token could not be refreshed: {e}",
                    retry_after=max(1, int(self._failed_until - self.clock())),
                    code="token_refresh_failed",
                )
        return await self.login_pending()

    async def refresh(self, rejected: Credentials | None = None) -> Credentials:
        """Refresh once for everyone waiting; `rejected` is a token the API refused (force).

        Raises the refresh's OAuthError (InvalidGrant: the refresh token is dead), LockTimeout, or
        OSError when the lock could not be taken at all.
        """
        if self._refresh_task is None or self._refresh_task.done():
            if self._failure is not None and self.clock() < self._failed_until:
                raise self._failure  # don't hammer a failing server: same answer for a while
            self._refresh_task = asyncio.create_task(self._refresh(rejected), name="qwen-refresh")
            self._refresh_task.add_done_callback(_retrieve)
        return await asyncio.shield(self._refresh_task)

    async def _refresh(self, rejected: Credentials | None) -> Credentials:
        try:
            async with self.store.lock():
                # Another process may have refreshed while we waited for the lock.
                disk = await self.store.load_async()
                now = self.clock()
                stale = rejected or self._creds
                if (
                    disk is not None
                    and disk.is_usable(now)
                    and (stale is None or disk.access_token != stale.access_token)
                ):
                    log.info("token was refreshed by another process; using it")
                    self._adopt(disk)
                    return disk
                known = [c for c in (disk, self._creds) if c is not None]
                if not known:
                    raise oauth.InvalidGrant("no credentials to refresh")
                # The newer of file and memory: after a save failed (disk full, a symlink), memory
                # holds the only copy of the latest refresh token, which a rotating server
                # requires; the file's older one is already revoked.
                base = max(known, key=lambda c: c.expiry_date)
                log.info("refreshing the Qwen token (%s)", base.redacted())
                new = await self.client.refresh(base)
                saved = await self._save(new)
        except oauth.InvalidGrant as e:
            self._refresh_dead = True
            self._last_error = str(e)
            self.counters["refresh_failures"] += 1
            log.warning("%s; a new login is needed", e)
            raise
        except (OAuthError, LockTimeout, OSError) as e:
            # OSError: the lock could not be taken (a full or read-only disk, no permission).
            self._last_error = f"token refresh failed: {e}"
            self._failure = e
            self._failed_until = self.clock() + self.failure_cooldown_s
            self.counters["refresh_failures"] += 1
            log.warning("token refresh failed: %s", e)
            raise
        self.counters["refreshes"] += 1
        self._adopt(new, saved)
        log.info("token refreshed; valid until %s", _when(new.expires_at))
        return new

    async def _save(self, creds: Credentials) -> str | None:
        """Write the credentials; on failure keep going with them in memory. Returns the problem."""
        try:
            await self.store.save_async(creds)
            return None
        except OSError as e:
            problem = f"could not write {self.store.path} ({e}); the new token is kept in memory only"
            log.error("%s", problem)
            return problem

    async def _persist(self, creds: Credentials) -> str | None:
        """Write new credentials from a login under the lock (another process may be refreshing)."""
        try:
            async with self.store.lock():
                return await self._save(creds)
        except (OSError, LockTimeout) as e:
            problem = f"could not lock {self.store.lock_path} ({e}); the new token is kept in memory only"
            log.error("%s", problem)
            return problem

    def _adopt(self, creds: Credentials, problem: str | None = None) -> None:
        self._creds = creds
        self._refresh_dead = False
        self._failure = None
        self._failed_until = 0.0
        self._last_error = problem
        self._loaded = True

    # -- login -----------------------------------------------------------------------------

    def login_running(self) -> bool:
        return self._login_task is not None and not self._login_task.done()

    def start_login(self, *, force: bool = False) -> bool:
        """Start the device flow in the background unless one runs (or just failed: cooldown).
        Returns whether a new one was started."""
        if self.login_running():
            return False
        if not force and self.clock() < self._failed_until:
            return False
        self._login_started = asyncio.Event()
        self._login_task = asyncio.create_task(self._run_login(), name="qwen-login")
        self._login_task.add_done_callback(_retrieve)
        return True

    async def wait_login(self) -> None:
        """Wait until the running login (if any) has ended, whatever its outcome."""
        task = self._login_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def login_pending(self) -> Unavailable:
        """Make sure a login runs and describe it. Waits (bounded) for the device code so the
        answer can carry the link."""
        self.start_login()
        if self.login_running() and self._login is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._login_started.wait()), self.login_wait_s)
            except TimeoutError:
                pass
        return self.unavailable()

    def unavailable(self) -> Unavailable:
        """The current reason for having no token, without starting anything."""
        now = self.clock()
        login = self._login
        if login is not None:
            left = login.seconds_left(now)
            return Unavailable(
                reason=(
                    f"Qwen login required: open {login.url} and approve code {login.user_code} "
                    f"(expires in {left} s). Retry after approval."
                ),
                retry_after=0,
                login=login,
            )
        if self.login_running():
            return Unavailable(reason="Qwen login is starting; retry shortly.", retry_after=0)
        error = self._last_error or "not logged in"
        return Unavailable(
            reason=f"Qwen login required ({error}); a new login starts on the next request.",
            retry_after=max(1, int(self._failed_until - now)),
            code="login_failed" if self._last_error else "login_required",
        )

    async def _run_login(self) -> None:
        try:
            other = await asyncio.to_thread(self.claims.claim, self._owner)
            if other is None:
                try:
                    creds = await self._device_flow()
                    saved = await self._persist(creds)
                finally:  # after the write: who follows this login finds the token at once
                    self.claims.release(self._owner)
            else:
                creds, saved = await self._follow(other), None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken server must never leave the login stuck
            known = (OAuthError, LockTimeout, LoginElsewhereFailed)
            reason = str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}"
            self._last_error = f"login failed: {reason}"
            self._failed_until = self.clock() + self.failure_cooldown_s
            self.counters["login_failures"] += 1
            if not isinstance(e, (*known, OSError)):
                log.exception("unexpected error in the login")
            self.listener.login_failed(reason)
        else:
            self.counters["logins"] += 1
            self._adopt(creds, saved)
            self.listener.login_succeeded(creds)
        finally:
            self._login = None
            self._login_started.set()

    async def _device_flow(self) -> Credentials:
        auth = await self.client.start_device_flow()
        self._login = _login_of(auth)
        self.claims.publish(self._owner, self._login.url, self._login.user_code, self._login.expires_at)
        self._login_started.set()
        self.counters["login_starts"] += 1
        self.listener.login_started(self._login)
        return await self.client.wait_for_approval(
            auth,
            timeout_s=self.auth_timeout_s,
            on_wait=lambda a, problem: self.listener.login_waiting(
                _login_of(a), str(problem) if problem else None
            ),
        )

    async def _follow(self, claim: Claim) -> Credentials:
        """Another process runs the login: show its link and code, wait for its credentials."""
        log.info("another process (pid %d) is running the Qwen login; waiting for it", claim.pid)
        while True:
            if claim.url and claim.user_code and claim.expires_at:
                login = Login(claim.url, claim.user_code, claim.expires_at)
                if login != self._login:
                    self._login = login
                    self._login_started.set()
                    log.warning(
                        "Qwen login pending in another process: open %s and approve code %s",
                        login.url,
                        login.user_code,
                    )
            await asyncio.sleep(self.follow_poll_s)
            creds = await self.store.load_async()
            if creds is not None and creds.is_usable(self.clock()):
                return creds
            current = await asyncio.to_thread(self.claims.current)
            if current is None or current.owner != claim.owner:
                creds = await self.store.load_async()  # it may have ended just after writing
                if creds is not None and creds.is_usable(self.clock()):
                    return creds
                raise LoginElsewhereFailed("the login in the other process ended without a token")
            claim = current

    # -- other actions ---------------------------------------------------------------------

    async def logout(self) -> None:
        """Forget the credentials here and on disk (Qwen Code shares the file: it logs out too)."""
        # Forget in memory first, so that whoever asks right after sees it logged out.
        self._creds = None
        self._loaded = True
        await self.cancel_login()
        async with self.store.lock():
            await asyncio.to_thread(self.store.delete)
        self._creds = None
        self._refresh_dead = False
        self._last_error = None

    async def cancel_login(self) -> None:
        task = self._login_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def aclose(self) -> None:
        """Cancel background work; the credentials on disk stay as they are."""
        tasks = [t for t in (self._login_task, self._refresh_task) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.client.aclose()


def _login_of(auth: DeviceAuthorization) -> Login:
    return Login(url=auth.verification_uri_complete, user_code=auth.user_code, expires_at=auth.expires_at)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background task's exception as seen: its awaiters handle or log it."""
    if not task.cancelled():
        task.exception()


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
