"""Interoperability with the REAL Qwen Code CLI: its own code reads, writes and locks the credential
file next to our `CredentialStore` and `TokenManager`.

tests/interop/qwen_code_driver.mjs imports Qwen Code's credential module (SharedTokenManager,
QwenOAuth2Client, cacheQwenCredentials) from the installed npm package @qwen-code/qwen-code and
calls it; nothing of Qwen Code is copied into this repository. Its hard-coded OAuth URL is rerouted
to the local stand-in, so a refresh by Qwen Code is a real refresh that nothing outside sees.

The package comes from `.ci/install-qwen-code` (into .cache/qwen-code), or from $QWEN_CODE_DIR (the
package directory itself, or an npm prefix it was installed into). Without node or the package these
tests are skipped with a message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qwenproxy.oauth import OAuthClient
from qwenproxy.store import (
    CredentialError,
    Credentials,
    CredentialStore,
    LockTimeout,
    parse_credentials,
)
from qwenproxy.tokens import TokenManager

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "interop" / "qwen_code_driver.mjs"
PACKAGE = "@qwen-code/qwen-code"
# Generous bounds for a loaded CI machine; each step normally takes well under a second.
TIMEOUT = 20.0

ACCESS = "Xq7dKp2LmN9vR4sT1wY6zA3bC8eF5gH0jI2kM4nO6pQ8rS0tU"
REFRESH = "Rf3sH8kL1mN6pQ9tV2wX5yZ0aB4cD7eF1gH3jK5lM7nP9qR"
FAR_FUTURE_MS = int((time.time() + 30 * 86400) * 1000)


def _find_package() -> tuple[Path | None, str]:
    """The installed package's directory, or None and why not."""
    node = shutil.which("node")
    if node is None:
        return None, "node is not installed"
    configured = os.environ.get("QWEN_CODE_DIR")
    base = Path(configured) if configured else ROOT / ".cache" / "qwen-code"
    for candidate in (base, base / "node_modules" / PACKAGE):
        manifest = candidate / "package.json"
        if manifest.is_file():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(manifest.read_text()).get("name") == PACKAGE:
                    return candidate, ""
    where = "$QWEN_CODE_DIR" if configured else ".cache/qwen-code"
    return None, f"{PACKAGE} is not installed in {where} (run .ci/install-qwen-code)"


PACKAGE_DIR, WHY_NOT = _find_package()
if PACKAGE_DIR is None:
    pytest.skip(f"Qwen Code interoperability tests skipped: {WHY_NOT}", allow_module_level=True)

pytestmark = pytest.mark.slow


def fp(token: str) -> str:
    """The driver's fingerprint of a token (it never prints tokens)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def creds(**changes: Any) -> Credentials:
    fields: dict[str, Any] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "token_type": "Bearer",
        "expiry_date": FAR_FUTURE_MS,
        "resource_url": "portal.qwen.ai",
    }
    fields.update(changes)
    return Credentials(**fields)


# --- the driver ------------------------------------------------------------------------------------


class Running:
    """A driver process: its JSON lines as they come, stdin to release it."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc, self.what = proc, what

    async def _line(self) -> dict:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
        if not raw:
            await asyncio.wait_for(self.proc.wait(), TIMEOUT)
            err = (await self.proc.stderr.read()).decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"Qwen Code driver `{self.what}` ended (exit {self.proc.returncode}): {err}")
        return json.loads(raw)

    async def expect_event(self, name: str) -> None:
        while True:
            line = await self._line()
            if line.get("event") == name:
                return
            assert "event" in line, f"`{self.what}` answered {line} before the event {name!r}"

    async def result(self) -> dict:
        """The next line that is not an event."""
        while "event" in (line := await self._line()):
            pass
        return line

    async def send_line(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    async def finish(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


class QwenCode:
    """Runs the driver with Qwen Code's directory set to `home` (HOME points to a temp dir too, so
    nothing can reach the real ~/.qwen)."""

    def __init__(self, home: Path, scratch: Path, module: str | None = None) -> None:
        self.home = home
        self.scratch = scratch
        self.module = module  # the file `info` found Qwen Code's module in; saves a search
        self._running: list[asyncio.subprocess.Process] = []

    def env(self, oauth_url: str | None = None, ca: Path | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.scratch),
            "QWEN_HOME": str(self.home),
            "QWEN_CODE_PACKAGE": str(PACKAGE_DIR),
        }
        if self.module:
            env["QWEN_CODE_MODULE"] = self.module
        if oauth_url:
            env["QWEN_INTEROP_OAUTH_URL"] = oauth_url
        if ca:
            env["NODE_EXTRA_CA_CERTS"] = str(ca)
        return env

    async def start(self, *args: str, oauth_url: str | None = None, ca: Path | None = None) -> Running:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(oauth_url, ca),
            cwd=self.scratch,
        )
        self._running.append(proc)
        return Running(proc, " ".join(args))

    async def run(self, *args: str, stdin: Any = None, **kwargs: Any) -> dict:
        """Run a command to its end; its result line."""
        driver = await self.start(*args, **kwargs)
        assert driver.proc.stdin is not None
        if stdin is not None:
            driver.proc.stdin.write(json.dumps(stdin).encode())
        driver.close_stdin()
        result = await driver.result()
        await driver.finish()
        return result

    async def aclose(self) -> None:
        for proc in self._running:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture(scope="session")
def qwen_code_module(tmp_path_factory) -> str:
    """Find Qwen Code's credential module once; fail (not skip) if the installed package has none."""
    scratch = tmp_path_factory.mktemp("qwen-code-info")
    env = QwenCode(scratch / "qwen", scratch).env()
    done = subprocess.run(
        ["node", str(DRIVER), "info"], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, f"the driver cannot use {PACKAGE_DIR}: {done.stdout} {done.stderr}"
    info = json.loads(done.stdout)
    return info["module"]


@pytest.fixture
async def qwen(tmp_path, qwen_code_module):
    q = QwenCode(tmp_path / "qwen", tmp_path, qwen_code_module)
    yield q
    await q.aclose()


@pytest.fixture
def store(tmp_path) -> CredentialStore:
    return CredentialStore(tmp_path / "qwen")


def seed_from(standin, store: CredentialStore, *, expired: bool, **extra: Any) -> Credentials:
    """Credentials the stand-in knows, saved by our store."""
    minted = standin.mint_tokens()
    expiry = time.time() + (-60 if expired else minted["expires_in"])
    c = Credentials(
        access_token=minted["access_token"],
        refresh_token=minted["refresh_token"],
        token_type="Bearer",
        expiry_date=int(expiry * 1000),
        resource_url=minted["resource_url"],
        extra=extra,
    )
    store.save(c)
    return c


# --- files we write, read by Qwen Code -------------------------------------------------------------


async def test_qwen_code_accepts_a_file_our_store_wrote(qwen, store):
    ours = creds(extra={"scope": "openid profile", "nested": {"a": [1, 2]}})
    store.save(ours)
    seen = await qwen.run("read")
    assert seen == {
        "accepted": True,
        "valid": True,
        "access": fp(ACCESS),
        "refresh": fp(REFRESH),
        "token_type": "Bearer",
        "resource_url": "portal.qwen.ai",
        "expiry_date": FAR_FUTURE_MS,
        "fields": [
            "access_token",
            "token_type",
            "refresh_token",
            "resource_url",
            "expiry_date",
            "scope",
            "nested",
        ],
    }


async def test_qwen_code_uses_the_token_in_our_file_without_refreshing(qwen, store):
    store.save(creds())
    got = await qwen.run("get")  # no OAuth URL: a refresh attempt would fail
    assert got["ok"] is True, got
    assert (got["access"], got["fetches"]) == (fp(ACCESS), 0)


def _save_all(store: CredentialStore, many: list[Credentials]) -> list[str]:
    contents = []
    for c in many:
        store.save(c)
        contents.append(store.path.read_text(encoding="ascii"))
    return contents


def _random_token(rng: random.Random) -> str:
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+/=",
        "äöüßéèñçøåæ€£¥—“”‘’…",
        "中文字符令牌测试🔑🙂",
        '"\\ ',  # JSON escapes
        "\ud800\udfff",  # lone surrogates: our file carries them as \\u escapes
    ]
    n = rng.choice([1, 2, 16, 43, 200, 2048])
    token = "".join(rng.choice(rng.choice(alphabets)) for _ in range(n))
    return token if token.strip() else token + "x"


def _random_creds(rng: random.Random) -> Credentials:
    return Credentials(
        access_token=_random_token(rng),
        refresh_token=_random_token(rng) + rng.choice(["", "\n", "\t"]),  # we allow controls here
        token_type=rng.choice(["Bearer", "bearer", "MAC", "x" * 300]),
        expiry_date=rng.choice(
            [
                1,
                -1,
                1764860000123,
                1764860000123.75,
                2**53,
                -(2**53),
                rng.randrange(1, 2**53),
                rng.random() * 1e13 + 1,
            ]
        ),
        resource_url=rng.choice(
            [None, "", "portal.qwen.ai", "https://dashscope.aliyuncs.com/compatible-mode/v1"]
        ),
        extra=rng.choice([{}, {"scope": "openid"}, {"id_token": _random_token(rng), "n": [1, {"b": None}]}]),
    )


async def test_every_file_our_store_writes_is_accepted_by_qwen_code(qwen, store):
    """300 saved files with awkward but valid values; one Qwen Code process reads them all."""
    rng = random.Random(20260415)
    many = [_random_creds(rng) for _ in range(300)]
    contents = _save_all(store, many)
    result = await qwen.run("read-many", stdin=contents)
    rejected = [c.redacted() for c, ok in zip(many, result["accepted"], strict=True) if not ok]
    assert rejected == []


@pytest.mark.parametrize("expiry_date", [0, 0.5])
async def test_a_file_with_a_zero_expiry_date_is_never_written(qwen, store, expiry_date):
    try:
        c = creds(expiry_date=expiry_date)
    except CredentialError:
        return  # refusing such credentials is a fix too
    store.save(c)
    assert (await qwen.run("read"))["accepted"]


# --- the same bytes judged by both --------------------------------------------------------------

_BASE = {
    "access_token": ACCESS,
    "token_type": "Bearer",
    "refresh_token": REFRESH,
    "resource_url": "portal.qwen.ai",
    "expiry_date": 1764860000123,
}


def _obj(**changes: Any) -> str:
    obj = {**_BASE, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}, indent=2, ensure_ascii=False)


# (id, file content, Qwen Code accepts, we accept). Where the two differ, the comment says why.
JUDGED: list[tuple[str, str, bool, bool]] = [
    ("as-qwen-code-writes-it", _obj(), True, True),
    ("minified", json.dumps(_BASE, separators=(",", ":")), True, True),
    ("trailing-newline", _obj() + "\n", True, True),
    ("no-resource-url", _obj(resource_url=...), True, True),
    ("null-resource-url", _obj(resource_url=None), True, True),
    ("extra-fields", _obj(scope="openid", id_token="x.y.z", nested={"a": [1]}), True, True),
    ("fractional-expiry", _obj(expiry_date=1764860000123.5), True, True),
    ("negative-expiry", _obj(expiry_date=-1), True, True),
    ("unicode-tokens", _obj(access_token="令牌🔑äöü", refresh_token="é" * 50), True, True),
    (
        "duplicate-key-last-wins",
        _obj().replace('"access_token"', '"access_token": "",\n  "access_token"', 1),
        True,
        True,
    ),
    ("refresh-token-with-newline", _obj(refresh_token="abc\ndef"), True, True),
    ("expiry-as-string", _obj(expiry_date="1764860000123"), False, False),
    ("expiry-null", _obj(expiry_date=None), False, False),
    ("expiry-boolean", _obj(expiry_date=True), False, False),
    ("expiry-missing", _obj(expiry_date=...), False, False),
    ("access-token-missing", _obj(access_token=...), False, False),
    ("refresh-token-missing", _obj(refresh_token=...), False, False),
    ("token-type-missing", _obj(token_type=...), False, False),
    ("access-token-empty", _obj(access_token=""), False, False),
    ("refresh-token-number", _obj(refresh_token=123), False, False),
    ("token-type-null", _obj(token_type=None), False, False),
    ("top-level-array", json.dumps([_BASE]), False, False),
    ("top-level-null", "null", False, False),
    ("empty-file", "", False, False),
    ("whitespace-file", "  \n", False, False),
    ("truncated", _obj()[:-20], False, False),
    ("nan-expiry", _obj().replace("1764860000123", "NaN"), False, False),
    ("trailing-garbage", _obj() + "}", False, False),
    ("single-quotes", _obj().replace('"', "'"), False, False),
    # --- where we are stricter: a file Qwen Code uses but we treat as unusable ---
    # A blank token is no token; Qwen Code only checks for a non-empty string.
    ("access-token-blank", _obj(access_token="   "), True, False),
    # Control characters would go into an Authorization header verbatim (header injection).
    ("access-token-with-newline", _obj(access_token="abc\r\nX-Evil: 1"), True, False),
    ("token-type-with-tab", _obj(token_type="Bear\ter"), True, False),
    # JSON.parse turns 1e400 into Infinity, a number; Python's float('inf') is refused by us.
    ("expiry-overflows-to-infinity", _obj().replace("1764860000123", "1e400"), True, False),
    # Beyond 2**53 a JavaScript number is not exact; we refuse what cannot be an epoch-ms time.
    ("expiry-beyond-2**53", _obj(expiry_date=2**53 + 2), True, False),
    # Qwen Code does not look at resource_url's type (it would then build a broken URL).
    ("resource-url-number", _obj(resource_url=42), True, False),
    # --- where we are more lenient: a file Qwen Code ignores but we use ---
    # JSON.parse does not skip a byte order mark; we read UTF-8 with or without one (we never
    # write one).
    ("utf8-bom", "\ufeff" + _obj(), False, True),
    # --- agreed after a fix: validateCredentials tests `!creds.expiry_date`, 0 is falsy ---
    ("zero-expiry", _obj(expiry_date=0), False, False),
]


@pytest.fixture(scope="module")
def qwen_code_judgements(tmp_path_factory, qwen_code_module) -> list[bool]:
    """Qwen Code's verdict on every JUDGED file, from one driver process."""
    scratch = tmp_path_factory.mktemp("qwen-code-judged")
    env = QwenCode(scratch / "qwen", scratch, qwen_code_module).env()
    (scratch / "qwen").mkdir(mode=0o700)
    done = subprocess.run(
        ["node", str(DRIVER), "read-many"],
        input=json.dumps([content for _, content, _, _ in JUDGED]),
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["accepted"]


@pytest.mark.parametrize(("index", "case"), list(enumerate(JUDGED)), ids=[c[0] for c in JUDGED])
def test_both_judge_the_same_file_as_listed(qwen_code_judgements, index, case):
    """Qwen Code's real verdict, and ours, on each file; every difference is listed on purpose."""
    _, content, qwen_accepts, we_accept = case
    try:
        parse_credentials(content.encode("utf-8", "surrogatepass"))
        ours = True
    except ValueError:
        ours = False
    assert (qwen_code_judgements[index], ours) == (qwen_accepts, we_accept)


# --- files Qwen Code writes, read by us ------------------------------------------------------------


async def test_our_store_loads_the_file_qwen_codes_login_writes(qwen, store):
    # The fields and order its device flow passes to cacheQwenCredentials.
    await qwen.run(
        "write",
        stdin={
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "token_type": "Bearer",
            "resource_url": "portal.qwen.ai",
            "expiry_date": FAR_FUTURE_MS,
        },
    )
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert store.load() == creds()
    assert store.problem is None


async def test_unknown_fields_from_qwen_code_survive_our_save(qwen, store):
    await qwen.run("write", stdin={**creds().to_json(), "id_token": "eyJ.x.y", "scope": "openid"})
    loaded = store.load()
    assert loaded is not None and loaded.extra == {"id_token": "eyJ.x.y", "scope": "openid"}
    store.save(dataclasses.replace(loaded, access_token="a-newer-token-from-our-refresh"))
    seen = await qwen.run("read")
    assert seen["accepted"] and seen["access"] == fp("a-newer-token-from-our-refresh")
    assert seen["fields"][-2:] == ["id_token", "scope"]


async def test_a_refresh_by_qwen_code_writes_a_file_we_load_and_drops_unknown_fields(qwen, store, standin):
    """Qwen Code's refresh (SharedTokenManager -> atomicWriteFile) writes only its five fields:
    an extra field another tool put in the file is lost at Qwen Code's next refresh."""
    old = seed_from(standin, store, expired=True, id_token="kept-by-us")
    got = await qwen.run("get", oauth_url=standin.base_url, ca=standin.ca_path)
    assert got["ok"] and got["fetches"] == 1, got
    assert standin.counts["token_refresh"] == 1
    loaded = store.load()
    assert loaded is not None, store.problem
    assert fp(loaded.access_token) == got["access"] != fp(old.access_token)
    assert loaded.refresh_token == old.refresh_token  # the stand-in does not rotate it
    assert loaded.is_usable(time.time())
    assert loaded.extra == {}  # Qwen Code's behaviour, not ours
    assert store.path.stat().st_mode & 0o777 == 0o600


# --- the lock --------------------------------------------------------------------------------------


def waiting_store(home: Path) -> tuple[CredentialStore, asyncio.Event]:
    """A store whose lock() sets the event each time it pauses because the lock is taken."""
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(seconds)

    return CredentialStore(home, sleep=sleep), waiting


async def test_our_lock_waits_while_qwen_code_holds_it(qwen, tmp_path):
    (tmp_path / "qwen").mkdir(mode=0o700)  # acquireLock does not create the directory
    holder = await qwen.start("lock")
    assert await holder.result() == {"locked": True}
    store, waiting = waiting_store(tmp_path / "qwen")

    async def take() -> None:
        async with store.lock():
            assert len(store.lock_path.read_text()) == 32  # ours (a uuid4 hex)

    task = asyncio.create_task(take())
    await asyncio.wait_for(waiting.wait(), TIMEOUT)
    assert not task.done()
    holder.close_stdin()  # Qwen Code releases (releaseLock)
    assert await holder.result() == {"released": True}
    await asyncio.wait_for(task, TIMEOUT)
    assert not store.lock_path.exists()


async def test_qwen_code_waits_while_our_store_holds_the_lock(qwen, store):
    async with store.lock():
        waiter = await qwen.start("lock")
        await waiter.expect_event("lock-busy")
        assert store.lock_is_held()
    assert await waiter.result() == {"locked": True}
    waiter.close_stdin()
    assert await waiter.result() == {"released": True}
    await waiter.finish()
    assert not store.lock_path.exists()


@pytest.mark.parametrize(("age_s", "stale"), [(25, False), (45, True)])
async def test_both_break_a_lock_only_after_35_s(qwen, store, age_s, stale):
    def left_behind() -> None:
        store.lock_path.write_text("a-dead-process")
        then = time.time() - age_s
        os.utime(store.lock_path, (then, then))

    store.home.mkdir(mode=0o700)
    left_behind()
    # Two attempts: breaking a stale lock uses one up in acquireLock.
    got = await qwen.run("lock", "--attempts", "2", "--interval", "10")
    assert got == ({"locked": True} if stale else {"locked": False, "error": "LOCK_TIMEOUT"})

    left_behind()
    if stale:
        async with store.lock(timeout_s=0):
            pass
    else:
        with pytest.raises(LockTimeout):
            async with store.lock(timeout_s=0):
                pass


async def test_a_qwen_code_process_exiting_deletes_our_lock_and_we_cope(qwen, store, caplog):
    """Qwen Code's SharedTokenManager registers exit/SIGINT/SIGTERM handlers that unlink
    oauth_creds.lock whoever holds it. So any Qwen Code process that merely read the file deletes
    our lock when it ends, and another one may then refresh alongside us. Our release must cope."""
    store.save(creds())
    caplog.set_level(logging.WARNING, logger="qwenproxy.store")
    async with store.lock():
        assert (await qwen.run("read"))["accepted"]
        assert not store.lock_path.exists()  # gone, though we still hold it
        assert await qwen.run("lock", "--attempts", "1") == {"locked": True}  # and up for grabs
    assert "no longer ours" in caplog.text
    assert not store.lock_path.exists()


async def test_we_do_not_refresh_while_qwen_code_refreshes(qwen, tmp_path, standin):
    """Qwen Code holds the lock during its refresh; our TokenManager waits for it, then uses the
    token Qwen Code wrote instead of refreshing again."""
    store, waiting = waiting_store(tmp_path / "qwen")
    old = seed_from(standin, store, expired=True)
    refresher = await qwen.start("get", "--gate", oauth_url=standin.base_url, ca=standin.ca_path)
    await refresher.expect_event("fetch")  # Qwen Code holds the lock and is about to refresh
    assert store.lock_is_held()

    client = OAuthClient(standin.base_url, verify=standin.client_ssl_context())
    tokens = TokenManager(store, client)
    try:
        ours = asyncio.create_task(tokens.acquire())
        await asyncio.wait_for(waiting.wait(), TIMEOUT)  # our refresh is waiting for the lock
        assert not ours.done()
        await refresher.send_line()
        theirs = await refresher.result()
        assert theirs["ok"] and theirs["fetches"] == 1, theirs
        got = await asyncio.wait_for(ours, TIMEOUT)
    finally:
        await tokens.aclose()
        await client.aclose()
    assert isinstance(got, Credentials)
    assert fp(got.access_token) == theirs["access"] != fp(old.access_token)
    assert standin.counts["token_refresh"] == 1
    assert tokens.counters["refreshes"] == 0


async def test_qwen_code_does_not_refresh_while_we_refresh(qwen, store, standin, monkeypatch):
    """Our TokenManager holds the lock during its refresh; Qwen Code waits for it, then uses the
    token we wrote instead of refreshing again."""
    old = seed_from(standin, store, expired=True)
    client = OAuthClient(standin.base_url, verify=standin.client_ssl_context())
    entered, go = asyncio.Event(), asyncio.Event()
    real_refresh = client.refresh

    async def gated_refresh(base: Credentials) -> Credentials:
        entered.set()
        await go.wait()
        return await real_refresh(base)

    monkeypatch.setattr(client, "refresh", gated_refresh)
    tokens = TokenManager(store, client)
    try:
        ours = asyncio.create_task(tokens.acquire())
        await asyncio.wait_for(entered.wait(), TIMEOUT)  # we hold the lock and are about to refresh
        assert store.lock_is_held()
        other = await qwen.start("get", oauth_url=standin.base_url, ca=standin.ca_path)
        await other.expect_event("lock-busy")  # Qwen Code found the lock taken
        go.set()
        got = await asyncio.wait_for(ours, TIMEOUT)
        theirs = await other.result()
    finally:
        await tokens.aclose()
        await client.aclose()
    assert isinstance(got, Credentials)
    assert theirs["ok"], theirs
    assert (theirs["fetches"], theirs["access"]) == (0, fp(got.access_token))
    assert fp(got.access_token) != fp(old.access_token)
    assert standin.counts["token_refresh"] == 1
    assert tokens.counters["refreshes"] == 1
