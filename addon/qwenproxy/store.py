"""The credential file shared with Qwen Code, and its cross-process lock.

`parse_credentials` and `Credentials` are pure: bytes in, a validated value or a `CredentialError`
out. `CredentialStore` does the file I/O: load, atomic save, cheap change detection for the hot path,
and the lock Qwen Code uses to make sure only one process refreshes at a time.
Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .profile import QWEN, Profile

log = logging.getLogger(__name__)

# Known fields in the order Qwen Code writes them.
_KNOWN_FIELDS = ("access_token", "token_type", "refresh_token", "resource_url", "expiry_date")
# Largest integer a JavaScript number holds exactly; Qwen Code reads expiry_date as one.
_MAX_EXPIRY_MS = 2**53
# A credential file is a few hundred bytes; anything this large is not one.
_MAX_FILE_BYTES = 1 << 20
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_JSON_SPACE = " \t\r\n"
_HAS_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class CredentialError(ValueError):
    """The credential file's content is unusable; str() says which file and why."""


class UnsafeFileError(OSError):
    """The store refuses to write to this path (a symlink, a directory, ...); str() says why."""


class LockTimeout(TimeoutError):
    """Another live process held the credential lock for longer than we were willing to wait."""


# --- pure: values and validation -------------------------------------------------------------


def mask(token: str) -> str:
    """A form of a secret that is safe to log: at most its first 4 characters, and its length.

    Tokens shorter than 16 characters show nothing but their length, so at most a quarter of a
    token is ever shown.
    """
    n = len(token)
    length = f"({n} char{'' if n == 1 else 's'})"
    return f"{token[:4]}…{length}" if n >= 16 else f"…{length}"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _expiry_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"field expiry_date must be a number, got {_json_type(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"field expiry_date must be a finite number, got {value}"
    if abs(value) > _MAX_EXPIRY_MS:
        return f"field expiry_date is out of range ({value:.6g} ms)"
    if int(value) == 0:
        # Qwen Code tests `!expiry_date` and ignores such a file.
        return "field expiry_date must not be 0"
    return None


def _field_problems(obj: Mapping[str, Any]) -> list[str]:
    """What is wrong with the known fields of a credential object; empty when nothing is."""
    problems = []
    for name in ("access_token", "refresh_token", "token_type"):
        if name not in obj:
            problems.append(f"field {name} is missing")
            continue
        value = obj[name]
        if not isinstance(value, str):
            problems.append(f"field {name} must be a string, got {_json_type(value)}")
        elif not value.strip():
            problems.append(f"field {name} is empty")
        elif name != "refresh_token" and _CONTROL_CHARS.search(value):
            # These go into an HTTP header verbatim; a newline there would inject headers.
            problems.append(f"field {name} contains control characters")
    if "expiry_date" not in obj:
        problems.append("field expiry_date is missing")
    elif problem := _expiry_problem(obj["expiry_date"]):
        problems.append(problem)
    resource_url = obj.get("resource_url")
    if resource_url is not None and not isinstance(resource_url, str):
        problems.append(f"field resource_url must be a string or null, got {_json_type(resource_url)}")
    return problems


@dataclass(frozen=True)
class Credentials:
    """One Qwen OAuth credential set, validated as Qwen Code validates its file.

    Construction checks the fields (raising `CredentialError`), so any instance can be saved and
    Qwen Code will accept the file. `expiry_date` is normalised to whole epoch milliseconds.
    """

    access_token: str
    refresh_token: str
    token_type: str
    expiry_date: int  # epoch milliseconds, as Qwen Code writes it
    resource_url: str | None = None
    # Fields we do not know, kept so that saving does not drop what another tool wrote.
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        problems = _field_problems({name: getattr(self, name) for name in _KNOWN_FIELDS})
        clashing = sorted(k for k in self.extra if k in _KNOWN_FIELDS)
        if clashing:
            problems.append(f"extra fields repeat known fields: {', '.join(clashing)}")
        if any(not isinstance(k, str) for k in self.extra):
            problems.append("extra field names must be strings")
        if problems:
            raise CredentialError("credentials: " + "; ".join(problems))
        # Floor, so a fractional expiry never counts as later than the file said.
        object.__setattr__(self, "expiry_date", math.floor(self.expiry_date))
        # A private copy: the caller's dict changing later must not change us.
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def expires_at(self) -> float:
        """Expiry in epoch seconds."""
        return self.expiry_date / 1000

    def is_usable(self, now: float, buffer_s: float = QWEN.expiry_buffer_s) -> bool:
        """True while `now` (epoch seconds) is more than `buffer_s` before expiry."""
        return now < self.expires_at - buffer_s

    def api_base(self, default: str = QWEN.default_api_base) -> str:
        """The API base URL for this account, as Qwen Code derives it from `resource_url`.

        `portal.qwen.ai` -> `https://portal.qwen.ai/v1`; no trailing slash; `default` when
        `resource_url` is absent or empty.
        """
        url = (self.resource_url or "").strip()
        if not url:
            return default
        if not _HAS_SCHEME.match(url):
            url = "https://" + url
        url = url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def to_json(self) -> dict[str, Any]:
        """The JSON object Qwen Code writes: its field names and order, then our extra fields."""
        out: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "refresh_token": self.refresh_token,
        }
        if self.resource_url is not None:
            out["resource_url"] = self.resource_url
        out["expiry_date"] = self.expiry_date
        out.update(self.extra)
        return out

    def redacted(self) -> str:
        """A description safe to log: tokens masked, extra fields by name only."""
        parts = [
            f"access_token={mask(self.access_token)}",
            f"refresh_token={mask(self.refresh_token)}",
            f"token_type={self.token_type!r}",
            f"expiry_date={self.expiry_date}",
            f"resource_url={self.resource_url!r}",
        ]
        if self.extra:
            # Values may be secrets too (an id_token, say): names only.
            parts.append(f"extra=<{', '.join(map(str, self.extra))}>")
        return f"Credentials({', '.join(parts)})"

    __repr__ = redacted


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; Python's json accepts them, Qwen Code's JSON.parse does not.
    raise ValueError(f"{name} is not valid JSON")


def parse_credentials(data: bytes | str, source: str = "oauth_creds.json") -> Credentials:
    """Parse and validate a credential file's content, applying Qwen Code's rules.

    Raises `CredentialError` (and nothing else) with `source` and a precise reason for: empty
    content, bytes that are not UTF-8, invalid or truncated JSON, a top level that is not an object,
    and missing, mistyped or empty fields. Fields other than the known five go into `extra`.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise CredentialError(f"{source}: not UTF-8 text (bad byte at offset {e.start})") from None
    else:
        text = data
    if not text.strip(_JSON_SPACE):
        raise CredentialError(f"{source}: file is empty")
    if not text.strip("\x00"):
        # What a crash mid-write leaves behind on some file systems.
        raise CredentialError(f"{source}: file holds only NUL bytes (a write was interrupted?)")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        # Either way the parser ran out of text: what a cut-off write looks like.
        if e.pos >= len(text.rstrip(_JSON_SPACE)) or e.msg.startswith("Unterminated string"):
            raise CredentialError(f"{source}: JSON ends early (truncated file?)") from None
        raise CredentialError(
            f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        # parse_constant's NaN/Infinity, or nesting too deep to parse.
        reason = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise CredentialError(f"{source}: not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise CredentialError(f"{source}: top level must be a JSON object, got {_json_type(obj)}")
    if problems := _field_problems(obj):
        raise CredentialError(f"{source}: " + "; ".join(problems))
    return Credentials(
        access_token=obj["access_token"],
        refresh_token=obj["refresh_token"],
        token_type=obj["token_type"],
        expiry_date=obj["expiry_date"],
        resource_url=obj.get("resource_url"),
        extra={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
    )


def resolve_home(
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    profile: Profile = QWEN,
) -> Path:
    """The directory holding the credential file: `explicit` > `$QWEN_HOME` > `~/.qwen`."""
    if explicit is not None and str(explicit):
        return Path(explicit).expanduser().absolute()
    if from_env := env.get(profile.home_env):
        return Path(from_env).expanduser().absolute()
    return Path.home() / profile.home_dir


# --- I/O: the store ------------------------------------------------------------------------------

# What changed() compares: None for "no file", a tuple of stat fields, or ("error", errno).
# ctime is in it because it moves on every write and rename even when a coarse mtime does not,
# and when a freed inode number is reused by the next write.
_Signature = tuple[Any, ...] | None
_NEVER_SEEN: Any = object()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, st.st_ctime_ns)


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class _NotRegular(Exception):
    def __init__(self, kind: str, sig: _Signature) -> None:
        self.kind, self.sig = kind, sig


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class CredentialStore:
    """The credential file in `home` (usually `~/.qwen`), shared with Qwen Code.

    - `load()` reads and validates it; content problems never raise, they land in `problem`.
    - `changed()` is the hot-path check: at most one `os.stat` per check interval.
    - `save()` replaces the file atomically with mode 0600; a corrupt file is moved aside first.
    - `lock()` is Qwen Code's cross-process lock; hold it around "re-read, refresh, save".

    `clock` (epoch seconds) only paces `changed()`; lock staleness compares the lock file's mtime
    with the real wall clock, because that is what the file system stamps. `sleep` is what the lock
    awaits between attempts (tests inject their own).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        profile: Profile = QWEN,
        clock: Callable[[], float] = time.time,
        check_interval_s: float | None = None,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.home = Path(home)
        self.profile = profile
        self.path = self.home / profile.creds_file
        self.lock_path = self.home / profile.lock_file
        self.problem: str | None = None
        self._clock = clock
        self._sleep = sleep
        self._check_interval_s = (
            profile.file_check_interval_s if check_interval_s is None else check_interval_s
        )
        self._seen: _Signature = _NEVER_SEEN
        self._last_check: float | None = None
        self._warned_for: Any = _NEVER_SEEN

    def _saw(self, sig: _Signature) -> None:
        """Remember the file's signature; having just looked, the next check is an interval away."""
        self._seen = sig
        self._last_check = self._clock()

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.home)!r})"

    # -- reading

    def _read(self) -> tuple[bytes, tuple[int, ...]]:
        """The file's bytes and the signature of exactly the version read.

        Raises FileNotFoundError / NotADirectoryError when absent, `_NotRegular` for directories and
        pipes, other OSErrors as they come.
        """
        # O_NONBLOCK: opening a named pipe must not hang the proxy.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotRegular(_file_kind(st.st_mode), _signature(st))
            chunks, total = [], 0
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
                total += len(chunk)
                if total > _MAX_FILE_BYTES:
                    raise CredentialError(
                        f"{self.path}: file is too large to be credentials ({st.st_size} bytes)"
                    )
            return b"".join(chunks), _signature(st)
        finally:
            os.close(fd)

    def _stat_signature(self) -> _Signature:
        try:
            return _signature(os.stat(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            return ("error", e.errno)

    def load(self) -> Credentials | None:
        """The credentials in the file, or None.

        None with `problem` None: there is no file (or no directory). None with `problem` set: the
        file is there but unusable (corrupt, unreadable, a directory); the reason is logged once per
        version of the file. Never raises for what is in, or wrong with, the file.
        """
        try:
            data, sig = self._read()
        except (FileNotFoundError, NotADirectoryError) as e:
            if isinstance(e, NotADirectoryError) and self.home.exists():
                return self._unusable(f"{self.home} is not a directory", self._stat_signature())
            self._saw(None)
            self.problem, self._warned_for = None, _NEVER_SEEN
            return None
        except _NotRegular as e:
            return self._unusable(f"{self.path} is {e.kind}, not a credential file", e.sig)
        except CredentialError as e:  # too large to read
            return self._unusable(str(e), self._stat_signature())
        except OSError as e:
            reason = e.strerror or str(e)
            return self._unusable(f"{self.path}: cannot read it: {reason}", self._stat_signature())
        try:
            creds = parse_credentials(data, source=str(self.path))
        except CredentialError as e:
            return self._unusable(str(e), sig)
        self._saw(sig)
        self.problem, self._warned_for = None, _NEVER_SEEN
        return creds

    def _unusable(self, problem: str, sig: _Signature) -> None:
        self._saw(sig)
        self.problem = problem
        if self._warned_for != (sig, problem):
            self._warned_for = (sig, problem)
            log.warning("Ignoring the credential file: %s", problem)
        return None

    async def load_async(self) -> Credentials | None:
        """`load()` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.load)

    def changed(self) -> bool:
        """Whether the file differs from what `load()` or `save()` last saw (True before any load).

        Cheap enough for every request: it stats the file at most once per check interval of the
        injected clock and returns False in between without any system call. A load or save counts
        as a check. Never reads the file.
        """
        now = self._clock()
        last = self._last_check
        # A clock that went backwards also triggers a check, so it can never stall them.
        if last is not None and last <= now < last + self._check_interval_s:
            return False
        self._last_check = now
        return self._stat_signature() != self._seen

    # -- writing

    def _ensure_home(self) -> None:
        """Create the directory 0700 if it is missing; an existing directory keeps its mode."""
        if self.home.is_dir():
            return
        self.home.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.home, 0o700)
        except FileExistsError:
            if not self.home.is_dir():
                raise
            return
        # mkdir's mode is filtered by the umask; say exactly what we mean.
        os.chmod(self.home, 0o700)

    def set_aside(self) -> Path | None:
        """Move the current file to `oauth_creds.json.corrupt-<UTC time>` and return that path.

        None when there is no file. The content is kept byte for byte; nothing is deleted.
        """
        try:
            os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        # First to a name only we use, so that the no-clobber step below can never touch a file
        # another process put at `path` in the meantime.
        private = self.path.with_name(f"{self.path.name}.aside-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return None
        base = self.path.with_name(f"{self.path.name}.corrupt-{_utc_stamp()}")
        target = base
        for n in range(1, 1000):
            try:
                os.link(private, target)  # fails, rather than replaces, when the name is taken
            except FileExistsError:
                target = base.with_name(f"{base.name}-{n}")
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # No hard links on this file system: keep the private name, which is unique.
                target = private
                break
            os.unlink(private)
            break
        else:
            target = private
        self._saw(None)
        log.warning("Moved the unusable credential file %s aside to %s", self.path, target)
        return target

    def _prepare_target(self) -> None:
        """Refuse to write through symlinks or over non-files; move a corrupt file aside."""
        try:
            st = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeFileError(
                errno.ELOOP,
                f"{self.path} is a symbolic link (to {os.readlink(self.path)}); not replacing it. "
                "Point QWEN_HOME at the directory the link leads to, or replace the link with "
                "the file",
            )
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(
                errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                f"{self.path} is {_file_kind(st.st_mode)}; not replacing it. Move it away",
            )
        try:
            parse_credentials(self._read()[0], source=str(self.path))
        except (CredentialError, PermissionError):
            self.set_aside()
        except _NotRegular as e:  # it became one since the lstat above
            raise UnsafeFileError(errno.EINVAL, f"{self.path} is {e.kind}; not replacing it") from None
        except FileNotFoundError:
            pass

    def save(self, creds: Credentials) -> None:
        """Write `creds` atomically, as Qwen Code does: a 0600 temp file in the same directory,
        fsync, rename over the file, fsync the directory.

        On any error the temp file is removed, the previous file is untouched, and the error is
        raised. A corrupt previous file is moved aside first (see `set_aside`). A symlink or
        directory at the file's path is refused with `UnsafeFileError`. Our own write does not
        count as a change for `changed()`.
        """
        # ASCII with \u escapes: valid for any string Python holds, lone surrogates included.
        data = json.dumps(creds.to_json(), indent=2, allow_nan=False).encode("ascii")
        self._ensure_home()
        self._prepare_target()
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
        replaced = False
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # the umask may have taken bits away; never added any
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.replace(tmp, self.path)
            replaced = True
            # Stat our inode after the rename (which moves its ctime): a writer who replaces the
            # file after us then still shows as a change.
            sig = _signature(os.fstat(fd))
        except BaseException:
            if not replaced:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        self._fsync_dir()
        self._saw(sig)
        self._sweep_temp_files()
        self.problem, self._warned_for = None, _NEVER_SEEN

    def _sweep_temp_files(self) -> None:
        """Remove temp files that writers killed mid-save left behind (their process is gone)."""
        prefix = f"{self.path.name}.tmp-"
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.home):
                pid = entry.name[len(prefix) :].split("-", 1)[0]
                if entry.name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _fsync_dir(self) -> None:
        """Make the rename durable. The new file is in place already, so a failure is only logged."""
        if os.name == "nt":
            return  # directories cannot be opened for fsync there
        try:
            dfd = os.open(self.home, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            log.warning("Could not open %s to fsync it: %s", self.home, e)
            return
        try:
            os.fsync(dfd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
                log.warning("Could not fsync %s: %s", self.home, e)
        finally:
            os.close(dfd)

    def delete(self) -> bool:
        """Remove the credential file, for an explicit logout. Returns whether there was one.

        A symlink is removed itself, never what it points to; a directory is refused with
        `UnsafeFileError`. The removal does not count as a change for `changed()`.
        """
        try:
            st = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            removed = False
        else:
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeFileError(errno.EISDIR, f"{self.path} is a directory; not removing it")
            try:
                os.unlink(self.path)
                removed = True
            except FileNotFoundError:
                removed = False
        self._saw(None)
        self.problem, self._warned_for = None, _NEVER_SEEN
        return removed

    async def save_async(self, creds: Credentials) -> None:
        """`save()` in a worker thread, so fsync does not stall the event loop."""
        await asyncio.to_thread(self.save, creds)

    # -- the lock

    def _lock_age(self, st: os.stat_result) -> float:
        return time.time() - st.st_mtime

    def _is_stale(self, st: os.stat_result, stale_s: float) -> bool:
        # A lock stamped far in the future (clock skew, a restored backup) would otherwise never age.
        return abs(self._lock_age(st)) > stale_s

    def lock_is_held(self, stale_s: float | None = None) -> bool:
        """Whether a live lock file exists now (held by anyone, us included). One stat."""
        stale_s = self.profile.lock_stale_s if stale_s is None else stale_s
        try:
            st = os.stat(self.lock_path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return not self._is_stale(st, stale_s)

    def _remove_lock_if(self, is_it: Callable[[os.stat_result, bytes], bool]) -> bool:
        """Delete the lock file if `is_it(stat, content)`; otherwise leave it exactly as it was.

        Renaming first makes "check, then delete" safe: the renamed file is ours alone to inspect,
        and if it turns out to be a lock someone took in the meantime, it is linked back unchanged.
        Returns whether a lock file was deleted.
        """
        aside = self.lock_path.with_name(f"{self.lock_path.name}.{uuid.uuid4().hex}")
        try:
            os.rename(self.lock_path, aside)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            st = os.lstat(aside)
            with open(aside, "rb") as f:
                content = f.read(256)
            if is_it(st, content):
                return True
            try:
                os.link(aside, self.lock_path)  # put it back, unless someone took the name
            except FileExistsError:
                log.warning("Lost a foreign lock while checking %s", self.lock_path)
            except OSError:
                with contextlib.suppress(OSError):
                    if not os.path.lexists(self.lock_path):
                        os.rename(aside, self.lock_path)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _try_create_lock(self, owner: str) -> bool:
        try:
            fd = os.open(
                self.lock_path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
        except FileExistsError:
            return False
        try:
            os.write(fd, owner.encode())
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            raise
        os.close(fd)
        return True

    def _break_if_stale(self, stale_s: float) -> bool:
        """Remove the lock if it is stale. True when the caller should retry at once."""
        try:
            st = os.stat(self.lock_path)
        except FileNotFoundError:
            return True  # released meanwhile
        if not self._is_stale(st, stale_s):
            return False
        age = self._lock_age(st)

        def same_stale_lock(now: os.stat_result, _: bytes) -> bool:
            # Only the very file we judged stale, not a fresh one someone created since.
            return (now.st_ino, now.st_dev, now.st_mtime_ns) == (st.st_ino, st.st_dev, st.st_mtime_ns)

        if self._remove_lock_if(same_stale_lock):
            log.warning(
                "Removed a stale credential lock %s (%.0f s old; its holder is gone)",
                self.lock_path,
                age,
            )
        return True

    async def _acquire(self, timeout_s: float, stale_s: float) -> str:
        owner = uuid.uuid4().hex
        self._ensure_home()
        # Patience runs out when our pauses add up to the timeout (exact with an injected sleep),
        # or earlier in real time if a busy loop made those pauses run long.
        started, delay, slept = time.monotonic(), 0.1, 0.0
        while True:
            if self._try_create_lock(owner):
                return owner
            if self._break_if_stale(stale_s):
                continue
            waited = max(slept, time.monotonic() - started)
            if waited >= timeout_s:
                raise LockTimeout(
                    f"{self.lock_path} is held by another process; gave up after {waited:.1f} s. "
                    f"It counts as abandoned after {stale_s:.0f} s; if no Qwen Code or qwenproxy "
                    "process is running, delete the file"
                )
            pause = min(delay, timeout_s - slept)
            await self._sleep(pause)
            slept += pause
            delay = min(delay * 1.5, 2.0)

    def _release(self, owner: str) -> None:
        try:
            removed = self._remove_lock_if(lambda _, content: content == owner.encode())
        except OSError as e:
            # Never mask the body's outcome; a lock we failed to delete goes stale by itself.
            log.warning("Could not release the credential lock %s: %s", self.lock_path, e)
            return
        if not removed:
            log.warning(
                "The credential lock %s was no longer ours on release (held too long and broken as stale?)",
                self.lock_path,
            )

    @contextlib.asynccontextmanager
    async def lock(
        self, timeout_s: float | None = None, *, stale_s: float | None = None
    ) -> AsyncIterator[None]:
        """Hold Qwen Code's cross-process lock (`oauth_creds.lock`) for the `async with` body.

        Waits without blocking the loop (100 ms, x1.5, at most 2 s apart). A lock file older than
        `stale_s` (default: the profile's 35 s) was left by a dead process and is removed. Raises
        `LockTimeout` after `timeout_s` of waiting (default: 5 s more than `stale_s`, so a dead
        holder is always recovered first). Released on exit, exception or cancellation, and only
        if the lock file is still ours. Keep the body shorter than `stale_s`.
        """
        stale_s = self.profile.lock_stale_s if stale_s is None else stale_s
        timeout_s = stale_s + 5.0 if timeout_s is None else timeout_s
        owner = await self._acquire(timeout_s, stale_s)
        try:
            yield
        finally:
            self._release(owner)


__all__ = [
    "CredentialError",
    "CredentialStore",
    "Credentials",
    "LockTimeout",
    "UnsafeFileError",
    "mask",
    "parse_credentials",
    "resolve_home",
]
