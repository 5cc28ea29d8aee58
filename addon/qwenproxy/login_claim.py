"""One device-flow login at a time across processes sharing a Qwen home.

Qwen Code has no protocol for this (its lock only covers refreshes), so this one is ours, for
our processes: several proxies, or the CLI beside a proxy. A process that wants to log in creates
`qwenproxy-login.json` in the Qwen home, exclusively; it then publishes the login's link and code
there. Other processes that need a login find the claim, show the same link and code, and wait for
the credential file instead of starting a second login (a second browser tab, a second code).

A claim is stale, and is broken, when its process is gone (same host), when its login code has
expired, or when it published nothing for a minute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .store import pid_alive

log = logging.getLogger(__name__)

CLAIM_FILE = "qwenproxy-login.json"
UNPUBLISHED_STALE_S = 60.0
EXPIRY_GRACE_S = 5.0


@dataclass(frozen=True)
class Claim:
    owner: str
    pid: int
    host: str
    started: float
    url: str | None = None
    user_code: str | None = None
    expires_at: float | None = None


def parse_claim(data: bytes) -> Claim | None:
    """A claim from the file's bytes, or None when they are not one."""
    try:
        obj = json.loads(data)
        claim = Claim(**obj)
    except (ValueError, TypeError):
        return None
    typed = (
        isinstance(claim.owner, str)
        and isinstance(claim.pid, int)
        and isinstance(claim.host, str)
        and isinstance(claim.started, (int, float))
        and all(isinstance(v, (str, type(None))) for v in (claim.url, claim.user_code))
        and isinstance(claim.expires_at, (int, float, type(None)))
    )
    return claim if typed else None


class LoginClaims:
    def __init__(
        self,
        home: Path,
        *,
        clock: Callable[[], float] = time.time,
        alive: Callable[[int], bool] = pid_alive,
    ):
        self.path = Path(home) / CLAIM_FILE
        self.clock = clock
        self.alive = alive
        self.host = socket.gethostname()

    def _stale(self, claim: Claim | None) -> bool:
        now = self.clock()
        if claim is None:
            return True
        if claim.host == self.host and not self.alive(claim.pid):
            return True
        if claim.expires_at is not None:
            return now > claim.expires_at + EXPIRY_GRACE_S
        return now - claim.started > UNPUBLISHED_STALE_S

    def _read(self) -> Claim | None | bool:
        """The claim on disk; False when there is none."""
        try:
            return parse_claim(self.path.read_bytes())
        except FileNotFoundError:
            return False

    def current(self) -> Claim | None:
        """The live claim of another login, or None."""
        claim = self._read()
        if claim is False or self._stale(claim or None):
            return None
        return claim or None

    def claim(self, owner: str) -> Claim | None:
        """Claim the login for `owner`. None: it is ours now. Otherwise the live claim that holds it."""
        for _ in range(3):
            mine = Claim(owner=owner, pid=os.getpid(), host=self.host, started=self.clock())
            if self._create(mine):
                return None
            theirs = self._read()
            if theirs is False:
                continue  # released meanwhile: try again
            if not self._stale(theirs or None):
                return theirs or None
            self._break(theirs or None)
        return self.current()

    def publish(self, owner: str, url: str, user_code: str, expires_at: float) -> None:
        """Tell the other processes what to show: the link, the code, when it expires."""
        theirs = self._read()
        if not theirs or theirs.owner != owner:
            return  # broken meanwhile: nothing of ours to update
        claim = Claim(**{**asdict(theirs), "url": url, "user_code": user_code, "expires_at": expires_at})
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.write_text(json.dumps(asdict(claim)))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("could not publish the login claim: %s", e)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def release(self, owner: str) -> None:
        theirs = self._read()
        if theirs and theirs.owner == owner:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _create(self, claim: Claim) -> bool:
        """Create the claim file with its content in one step (a link of a full temp file), so
        that nobody ever reads a claim without content."""
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex}")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as Qwen Code makes it
            tmp.write_text(json.dumps(asdict(claim)))
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            log.debug("could not claim the login (%s); going ahead alone", e)
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _break(self, stale: Claim | None) -> None:
        """Remove a stale claim; only the very file judged stale (renamed first, checked after)."""
        private = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, private)
        except OSError:
            return
        try:
            if parse_claim(private.read_bytes()) == stale:
                log.info("removed a stale login claim%s", f" of pid {stale.pid}" if stale else "")
                return
            # A fresh claim slipped in between read and rename: put it back if the name is free.
            with contextlib.suppress(OSError):
                os.link(private, self.path)
        finally:
            with contextlib.suppress(OSError):
                private.unlink()
