"""Faults of the credential file, its lock and our own process, each injected on purpose.

Every test is named after the fault it injects and ends by showing that the lifecycle (or the
proxy) keeps answering: a later acquire or request gets a token, or a clear 503; never a hang,
never an exception out of the token manager.

Most tests drive a `TokenManager` in this process against the local stand-in (fast, and faults can
be injected exactly). Two run a real mitmdump where only a real process shows the behaviour: the
file deleted under a running proxy, and the proxy stopped while a login is pending.

Nothing here sleeps for a fixed time: tests wait for events (stand-in device codes, log lines,
worker output on pipes) with bounded timeouts. The OAuth client's pause between polls is cut
short the moment the test approves a login (see `QuickPoll`), so a login takes milliseconds.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import stat
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwenproxy import store as store_module
from qwenproxy.oauth import OAuthClient
from qwenproxy.profile import QWEN, Profile
from qwenproxy.store import Credentials, CredentialStore, parse_credentials
from qwenproxy.tokens import State, TokenManager, Unavailable

from .conftest import CHAT, seed, through
from .harness import ROOT, clean_env

WORKER = Path(__file__).parent / "helpers" / "fault_worker.py"
TEMP_NAME = re.compile(r"oauth_creds\.json\.tmp-\d+-[0-9a-f]{32}")


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def standin(make_standin):
    """The stand-in for this module: polls may come every second and as soon as the test likes
    (no slow_down), so an approved login completes at once. `start_proxy` uses it too."""
    return make_standin(interval=1, min_poll_interval=0)


class QuickPoll:
    """The OAuth client's pause between polls, cut short when the test approves the login.

    Without approval it pauses the full interval, as the real one does; `approve()` wakes it,
    so the next poll (which gets the token) comes at once.
    """

    def __init__(self, standin) -> None:
        self.standin = standin
        self.approved = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.approved.wait(), seconds)
        except TimeoutError:
            pass

    async def approve(self) -> str:
        """Wait for the next device authorization at the stand-in and approve it."""
        code = await self.standin.wait_for_device_code_async(10)
        self.standin.approve(code)
        self.approved.set()
        return code


class FakeTime:
    """A clock the test moves; the stand-in keeps real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def lifecycle(
    standin, home: Path, closing, *, profile: Profile = QWEN, clock=time.time, check_interval_s: float = 0
):
    """A TokenManager as the addon builds it, on `home`, with a QuickPoll; check_interval_s=0
    makes it look at the file on every use (the addon's default is 5 s)."""
    poll = QuickPoll(standin)
    store = CredentialStore(home, profile=profile, clock=clock, check_interval_s=check_interval_s)
    client = OAuthClient(standin.base_url, verify=standin.client_ssl_context(), clock=clock, sleep=poll.sleep)
    tokens = TokenManager(store, client, clock=clock, failure_cooldown_s=0)
    closing(tokens)
    return tokens, poll


async def api_status(standin, creds: Credentials) -> int:
    """What the stand-in's API answers to this token: 200 when it works, 401 when not."""
    async with httpx.AsyncClient(verify=standin.client_ssl_context(), trust_env=False, timeout=10) as http:
        response = await http.get(
            creds.api_base() + "/models", headers={"Authorization": f"Bearer {creds.access_token}"}
        )
    return response.status_code


async def soon(awaitable, timeout_s: float = 10):
    """Await something expected to happen promptly; a bug then fails the test instead of hanging it."""
    return await asyncio.wait_for(awaitable, timeout_s)


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def start_worker(*args: str, stdin=asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """tests/helpers/fault_worker.py under `python -S` (it needs only the stdlib and our store)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        str(WORKER),
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(PYTHONPATH=str(ROOT / "addon")),
    )


async def read_line(proc: asyncio.subprocess.Process) -> str:
    line = await soon(proc.stdout.readline())
    if not line:
        stderr = await proc.stderr.read()
        pytest.fail(f"worker exited early with {await proc.wait()}: {stderr.decode()}")
    return line.decode().strip()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


class StoreOs:
    """Stands in for the `os` module inside qwenproxy.store only (so the stand-in's and the event
    loop's own I/O are unaffected): `fail` maps names of os functions to a predicate on their
    arguments; when it holds, the call raises OSError(ENOSPC) as on a full disk."""

    def __init__(self, **fail) -> None:
        self._fail = fail
        self.temp_fds: set[int] = set()
        self.failures: list[str] = []

    def __getattr__(self, name):
        real = getattr(os, name)
        if name == "open":
            return self._open
        if name == "close":
            return self._close
        if name not in self._fail:
            return real

        def call(*args, **kwargs):
            if self._fail[name](self, *args):
                self.failures.append(name)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return call

    def _open(self, path, flags, *args, **kwargs):
        fd = os.open(path, flags, *args, **kwargs)
        if TEMP_NAME.fullmatch(Path(path).name):
            self.temp_fds.add(fd)
        return fd

    def _close(self, fd) -> None:
        self.temp_fds.discard(fd)  # the number may be reused for another file
        os.close(fd)

    def is_temp_credential_fd(self, fd, *_) -> bool:
        return fd in self.temp_fds


# -- the credential file deleted --------------------------------------------------------------


async def test_credential_file_deleted_while_running_means_logged_out(standin, tmp_path, closing):
    """Qwen Code's logout deletes the file. The file is the truth: the stand-in still honours the
    token we hold in memory, but once the file is gone we are logged out too (a login starts, and
    after approval the token flows again and the file is back)."""
    home = tmp_path / "qwen"
    old = seed(standin, home)
    tokens, poll = lifecycle(standin, home, closing)
    assert (await tokens.acquire()).access_token == old.access_token

    os.unlink(home / "oauth_creds.json")
    why = await soon(tokens.acquire())
    assert isinstance(why, Unavailable) and why.code == "login_required"
    assert why.login is not None and why.login.user_code in standin.pending_user_codes()
    assert tokens.snapshot().state is State.LOGIN_PENDING
    assert standin.counts["token_refresh"] == 0, "a deleted file is a logout, not a reason to refresh"

    await soon(poll.approve())
    await soon(tokens.wait_login())
    new = await soon(tokens.acquire())
    assert isinstance(new, Credentials) and new.access_token != old.access_token
    assert await api_status(standin, new) == 200
    assert CredentialStore(home).load() == new
    assert files_in(home) == ["oauth_creds.json"]


@pytest.mark.slow
async def test_credential_file_deleted_under_a_running_mitmdump_gives_503_with_a_login_link(
    standin, start_proxy, tmp_path
):
    """Through a real mitmdump, with the addon's real 5 s file check interval (mitmdump gives no
    way to inject a clock, and this is what users get). Requests keep coming back to back, each
    paced by the previous answer: those inside the interval still get 200 (the stand-in cannot
    tell that the user logged out; only the file can), and the first one after it gets a 503 with
    the login link. Nothing else lets time pass; the loop is bounded by the interval plus slack."""
    home = tmp_path / "qwen"
    seed(standin, home)
    proxy = start_proxy()
    url = f"{standin.base_url}/v1/chat/completions"
    async with through(proxy) as client:
        assert (await client.post(url, json=CHAT)).status_code == 200
        os.unlink(home / "oauth_creds.json")
        deadline = time.monotonic() + QWEN.file_check_interval_s + 10
        before = []
        while True:
            answer = await client.get(f"{standin.base_url}/v1/models")
            if answer.status_code != 200 or time.monotonic() > deadline:
                break
            before.append(answer.status_code)
        print(f"requests answered 200 after the deletion: {len(before)}")
        assert answer.status_code == 503, f"the proxy never noticed the deleted file; log:\n{proxy.log}"
        error = answer.json()["error"]
        assert error["code"] == "login_required"
        assert error["login_url"].startswith(standin.base_url) and error["user_code"] in error["login_url"]
        assert standin.counts["token_refresh"] == 0

        mark = len(proxy.lines)
        standin.approve(error["user_code"])
        proxy.wait_for_log("Qwen login approved", start=mark)
        again = await client.post(url, json=CHAT)
        assert again.status_code == 200, again.text
    assert CredentialStore(home).load() is not None, "the login wrote the file again"
    assert standin.counts["device_code"] == 1


# -- the credential file replaced by Qwen Code ----------------------------------------------------


async def test_credential_file_replaced_by_qwen_code_is_picked_up(standin, tmp_path, closing):
    """Another process (Qwen Code after its own refresh or login) renames a new file over ours."""
    home = tmp_path / "qwen"
    old = seed(standin, home)
    tokens, _ = lifecycle(standin, home, closing)
    assert (await tokens.acquire()).access_token == old.access_token

    minted = standin.mint_tokens()
    # What Qwen Code writes: JSON.stringify(credentials, null, 2), its field order, no newline.
    theirs = {
        "access_token": minted["access_token"],
        "token_type": "Bearer",
        "refresh_token": minted["refresh_token"],
        "resource_url": minted["resource_url"],
        "expiry_date": int((time.time() + 3600) * 1000),
    }
    new_file = tmp_path / "from-qwen-code.json"
    new_file.write_text(json.dumps(theirs, indent=2))
    proc = await start_worker("replace", str(home), str(new_file), stdin=asyncio.subprocess.DEVNULL)
    try:
        assert await read_line(proc) == "replaced"
        assert await soon(proc.wait()) == 0
    finally:
        await kill(proc)

    got = await soon(tokens.acquire())
    assert isinstance(got, Credentials) and got.access_token == minted["access_token"]
    assert await api_status(standin, got) == 200
    assert standin.counts["token_refresh"] == 0 and standin.counts["device_code"] == 0
    assert (home / "oauth_creds.json").read_bytes() == new_file.read_bytes(), "we did not rewrite their file"
    assert tokens.snapshot().state is State.VALID


# -- the credential file made unreadable ----------------------------------------------------------


async def test_credential_file_made_unreadable_is_reported_and_set_aside_by_the_next_login(
    standin, tmp_path, closing, monkeypatch
):
    """Permission denied on the credential file.

    What is simulated: the file really is chmod 000, but the tests run as root, which reads it
    anyway. So `os.open` is patched to refuse (EACCES) opening the credential file for reading
    while its mode grants its owner no read permission, which is what the kernel does for a
    non-root owner. Writes (O_CREAT: the temp file, the lock) and all other paths are untouched.

    An unreadable file counts as no usable credentials (Qwen Code ignores a file it cannot read):
    the reason is reported and a login starts. The login's save moves the unreadable file aside,
    byte for byte and mode kept, rather than overwrite it, and the new token works.
    """
    home = tmp_path / "qwen"
    old = seed(standin, home)
    tokens, poll = lifecycle(standin, home, closing)
    assert (await tokens.acquire()).access_token == old.access_token
    path = home / "oauth_creds.json"
    content = path.read_bytes()
    real_open = os.open

    def as_a_non_root_owner(p, flags, *args, **kwargs):
        if Path(p) == path and not flags & os.O_CREAT and not os.stat(p).st_mode & stat.S_IRUSR:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", as_a_non_root_owner)
    path.chmod(0)

    why = await soon(tokens.acquire())
    assert isinstance(why, Unavailable) and why.login is not None
    assert tokens.snapshot().last_error == f"{path}: cannot read it: Permission denied"

    await soon(poll.approve())
    await soon(tokens.wait_login())
    new = await soon(tokens.acquire())
    assert isinstance(new, Credentials) and new.access_token != old.access_token
    assert await api_status(standin, new) == 200
    assert tokens.snapshot().last_error is None
    [aside] = [p for p in home.iterdir() if p.name.startswith("oauth_creds.json.corrupt-")]
    assert stat.S_IMODE(aside.stat().st_mode) == 0
    assert aside.read_bytes() == content
    assert parse_credentials(path.read_bytes()) == new
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files_in(home) == sorted(["oauth_creds.json", aside.name])


# -- a symlink or a directory in place of the file ------------------------------------------------


async def test_credential_file_symlinked_elsewhere_is_not_written_through_on_refresh(
    standin, tmp_path, closing
):
    """oauth_creds.json is a symbolic link to a file elsewhere (a dotfiles repository, say) that
    holds an expired token. Reading through the link is fine; the refreshed token is not written
    through it: the target stays byte for byte, the token is kept in memory and works, and
    last_error says why."""
    home = tmp_path / "qwen"
    elsewhere = tmp_path / "dotfiles" / "qwen-creds.json"
    seed(standin, elsewhere.parent, expired=True)
    os.rename(elsewhere.parent / "oauth_creds.json", elsewhere)
    home.mkdir()
    (home / "oauth_creds.json").symlink_to(elsewhere)
    target_before = elsewhere.read_bytes()

    tokens, _ = lifecycle(standin, home, closing)
    new = await soon(tokens.acquire())
    assert isinstance(new, Credentials)
    assert standin.counts["token_refresh"] == 1
    assert elsewhere.read_bytes() == target_before
    assert (home / "oauth_creds.json").is_symlink() and os.readlink(home / "oauth_creds.json") == str(
        elsewhere
    )
    assert files_in(home) == ["oauth_creds.json"]
    assert files_in(elsewhere.parent) == ["qwen-creds.json"]
    error = tokens.snapshot().last_error
    assert "symbolic link" in error and "kept in memory" in error

    assert await api_status(standin, new) == 200
    again = await soon(tokens.acquire())
    assert again == new and standin.counts["token_refresh"] == 1, (
        "the token in memory is used, not refreshed again"
    )


async def test_credential_file_symlinked_nowhere_is_not_written_through_on_login(standin, tmp_path, closing):
    """A dangling symbolic link: no credentials, so a login runs; its token is not written
    through the link (the link's target is not created), it is kept in memory and works."""
    home = tmp_path / "qwen"
    home.mkdir()
    target = tmp_path / "elsewhere" / "creds.json"
    target.parent.mkdir()
    (home / "oauth_creds.json").symlink_to(target)

    tokens, poll = lifecycle(standin, home, closing)
    why = await soon(tokens.acquire())
    assert isinstance(why, Unavailable) and why.login is not None
    await soon(poll.approve())
    await soon(tokens.wait_login())
    new = await soon(tokens.acquire())
    assert isinstance(new, Credentials)
    assert await api_status(standin, new) == 200
    assert not os.path.lexists(target) and files_in(target.parent) == []
    assert (home / "oauth_creds.json").is_symlink()
    assert files_in(home) == ["oauth_creds.json"]
    assert "symbolic link" in tokens.snapshot().last_error


async def test_credential_file_is_a_directory_reported_and_login_works_from_memory(
    standin, tmp_path, closing
):
    home = tmp_path / "qwen"
    (home / "oauth_creds.json").mkdir(parents=True)
    (home / "oauth_creds.json" / "keep").write_text("the user's")

    tokens, poll = lifecycle(standin, home, closing)
    why = await soon(tokens.acquire())
    assert isinstance(why, Unavailable) and why.login is not None
    assert "is a directory" in tokens.snapshot().last_error

    await soon(poll.approve())
    await soon(tokens.wait_login())
    new = await soon(tokens.acquire())
    assert isinstance(new, Credentials)
    assert await api_status(standin, new) == 200
    error = tokens.snapshot().last_error
    assert "is a directory" in error and "kept in memory" in error
    assert (home / "oauth_creds.json" / "keep").read_text() == "the user's"
    assert files_in(home) == ["oauth_creds.json"]
    assert files_in(home / "oauth_creds.json") == ["keep"]
    assert await soon(tokens.acquire()) == new


# -- the disk full ------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["write", "fsync"])
async def test_disk_full_on_credential_write_keeps_old_file_and_token_in_memory(
    standin, tmp_path, closing, monkeypatch, failing
):
    """ENOSPC while writing the refreshed token's temp file (`write`) or flushing it (`fsync`,
    where delayed allocation reports it). Simulated by an `os` stand-in inside the store module
    only, failing for the temp credential file's descriptor; the lock file still gets written."""
    home = tmp_path / "qwen"
    old = seed(standin, home, expired=True)
    before = (home / "oauth_creds.json").read_bytes()
    tokens, _ = lifecycle(standin, home, closing)
    full = StoreOs(**{failing: StoreOs.is_temp_credential_fd})
    monkeypatch.setattr(store_module, "os", full)

    new = await soon(tokens.acquire())
    assert full.failures == [failing]
    assert isinstance(new, Credentials) and new.access_token != old.access_token
    assert (home / "oauth_creds.json").read_bytes() == before
    assert files_in(home) == ["oauth_creds.json"], "no temp file, no lock left behind"
    error = tokens.snapshot().last_error
    assert "No space left on device" in error and "kept in memory" in error

    monkeypatch.undo()  # space again: nothing else changed, the token in memory is still used
    assert await api_status(standin, new) == 200
    assert await soon(tokens.acquire()) == new
    assert standin.counts["token_refresh"] == 1


async def test_disk_full_for_every_write_including_the_lock_gives_a_clear_answer(
    standin, tmp_path, closing, monkeypatch
):
    """ENOSPC on every write the store makes, the 32-byte lock id included (an empty file can still
    be created on a full disk; writing to it cannot). The token manager must answer (a token, or a
    clear reason), not raise; and once there is space again, the token flows."""
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    before = (home / "oauth_creds.json").read_bytes()
    tokens, _ = lifecycle(standin, home, closing)
    monkeypatch.setattr(store_module, "os", StoreOs(write=lambda self, *a: True))

    result = await soon(tokens.acquire())
    assert isinstance(result, (Credentials, Unavailable))
    if isinstance(result, Unavailable):
        assert "No space left on device" in result.reason
    assert (home / "oauth_creds.json").read_bytes() == before
    assert files_in(home) == ["oauth_creds.json"]

    monkeypatch.undo()
    assert isinstance(await soon(tokens.acquire()), Credentials)


async def test_disk_full_on_write_then_a_rotating_refresh_uses_the_token_kept_in_memory(
    make_standin, tmp_path, closing, monkeypatch
):
    standin = make_standin(interval=1, min_poll_interval=0, rotate_refresh=True)
    home = tmp_path / "qwen"
    seed(standin, home, expired=True)
    clock = FakeTime()
    tokens, _ = lifecycle(standin, home, closing, clock=clock)
    monkeypatch.setattr(store_module, "os", StoreOs(fsync=StoreOs.is_temp_credential_fd))
    first = await soon(tokens.acquire())
    assert isinstance(first, Credentials) and "kept in memory" in tokens.snapshot().last_error
    monkeypatch.undo()

    clock.now += 7 * 3600  # the token kept in memory expires; the file still has the old one
    second = await soon(tokens.acquire())
    assert isinstance(second, Credentials), second
    assert standin.counts["token_refresh"] == 2 and standin.counts["device_code"] == 0
    assert CredentialStore(home).load() == second, "saved now that there is space"


# -- the lock -------------------------------------------------------------------------------------


SHORT_STALE = Profile(lock_stale_s=0.5)


async def test_lock_left_behind_by_a_killed_process_is_broken_once_stale(standin, tmp_path, closing):
    """A process holding oauth_creds.lock is SIGKILLed: the lock file stays. Two proxies (two
    TokenManagers on the same home, ten callers each) with an expired token wait, break the lock
    once it is stale (0.5 s here, 35 s in Qwen Code), and refresh exactly once between them."""
    home = tmp_path / "qwen"
    old = seed(standin, home, expired=True)
    proc = await start_worker("hold", str(home))
    try:
        assert await read_line(proc) == "locked"
        left = (home / "oauth_creds.lock").read_bytes()
        proc.send_signal(signal.SIGKILL)
        assert await soon(proc.wait()) == -signal.SIGKILL
    finally:
        await kill(proc)
    assert (home / "oauth_creds.lock").read_bytes() == left

    ours, _ = lifecycle(standin, home, closing, profile=SHORT_STALE)
    theirs, _ = lifecycle(standin, home, closing, profile=SHORT_STALE)
    results = await soon(asyncio.gather(*(m.acquire() for m in [ours, theirs] * 10)))
    assert all(isinstance(r, Credentials) for r in results), results
    assert len({r.access_token for r in results}) == 1 and results[0].access_token != old.access_token
    assert standin.counts["token_refresh"] == 1
    assert files_in(home) == ["oauth_creds.json"]
    assert CredentialStore(home).load() == results[0]
    assert await api_status(standin, results[0]) == 200


async def test_lock_held_by_a_live_process_past_the_stale_limit_is_broken(standin, tmp_path, closing):
    """A live process holds the lock and does not let go (hung, or just slow). After the stale
    limit our refresh proceeds anyway (Qwen Code's rule), exactly once; the holder, when it finally
    ends, finds the lock no longer its own and leaves everything as it is."""
    home = tmp_path / "qwen"
    old = seed(standin, home, expired=True)
    proc = await start_worker("hold", str(home))
    try:
        assert await read_line(proc) == "locked"
        tokens, _ = lifecycle(standin, home, closing, profile=SHORT_STALE)
        results = await soon(asyncio.gather(*(tokens.acquire() for _ in range(10))))
        assert proc.returncode is None, "the holder was alive throughout"
        assert all(isinstance(r, Credentials) for r in results), results
        assert {r.access_token for r in results} != {old.access_token}
        assert standin.counts["token_refresh"] == 1
        assert files_in(home) == ["oauth_creds.json"]

        proc.stdin.close()
        assert await read_line(proc) == "taken-over"
        assert await soon(proc.wait()) == 0
    finally:
        await kill(proc)
    assert "no longer ours" in (await proc.stderr.read()).decode()
    assert files_in(home) == ["oauth_creds.json"]
    assert CredentialStore(home).load() == results[0]
    assert await soon(tokens.acquire()) == results[0]
    assert await api_status(standin, results[0]) == 200


# -- our process killed or stopped ----------------------------------------------------------------


async def test_process_killed_in_the_middle_of_writing_credentials_never_tears_the_file(
    standin, tmp_path, closing
):
    """A worker saves credentials A and B alternately in a tight loop (a line per save) and is
    SIGKILLed after k lines, k = 1..20, landing at varied points of the write: 20 kills, in four
    homes at once (five kills in a row each, so later workers write over what earlier kills
    left). After each kill the file parses and is exactly A or B. Temp files a kill leaves behind
    keep their own names and are never read as the credential file; afterwards the lifecycle
    uses each file as usual."""
    versions = {name: seed(standin, tmp_path / name) for name in ("A", "B")}
    files = {name: str(tmp_path / name / "oauth_creds.json") for name in versions}
    exact = {(tmp_path / name / "oauth_creds.json").read_bytes() for name in versions}
    homes = [tmp_path / f"qwen{i}" for i in range(4)]
    seen: list[str] = []
    leftovers: set[str] = set()

    async def kill_after(home: Path, k: int) -> None:
        proc = await start_worker(
            "alternate", str(home), files["A"], files["B"], stdin=asyncio.subprocess.DEVNULL
        )
        try:
            for _ in range(k):
                assert await read_line(proc) in ("A", "B")
            proc.send_signal(signal.SIGKILL)
            assert await soon(proc.wait()) == -signal.SIGKILL
        finally:
            await kill(proc)
        raw = (home / "oauth_creds.json").read_bytes()
        assert raw in exact, f"torn file after {k} saves: {raw!r}"
        loaded = CredentialStore(home).load()
        assert loaded in versions.values()
        seen.append("A" if loaded == versions["A"] else "B")
        others = [n for n in files_in(home) if n not in ("oauth_creds.json", "oauth_creds.lock")]
        assert all(TEMP_NAME.fullmatch(n) for n in others), others
        leftovers.update(f"{home.name}/{n}" for n in others)
        assert stat.S_IMODE((home / "oauth_creds.json").stat().st_mode) == 0o600

    async def kills_in(i: int) -> None:
        for k in range(i + 1, 21, len(homes)):
            await kill_after(homes[i], k)

    await soon(asyncio.gather(*(kills_in(i) for i in range(len(homes)))), 60)
    assert len(seen) == 20
    # Leftover temp files are possible (a kill between creating one and renaming it over the
    # file); they are harmless: distinct names, never loaded. Printed for the record (pytest -s).
    print(f"20 kills; A/B on disk: {seen.count('A')}/{seen.count('B')}; temp files left: {len(leftovers)}")

    for home in homes:
        tokens, _ = lifecycle(standin, home, closing)
        got = await soon(tokens.acquire())
        assert got in versions.values()
        # The next save sweeps the temp files of writers that are gone.
        CredentialStore(home).save(versions["A"])
        assert not [n for n in files_in(home) if TEMP_NAME.fullmatch(n)]
        assert await api_status(standin, got) == 200
    assert standin.counts["token_refresh"] == 0 and standin.counts["device_code"] == 0


@pytest.mark.slow
async def test_process_stopped_while_a_login_is_pending_exits_cleanly(standin, start_proxy, tmp_path):
    """SIGINT to mitmdump while a device-flow login is polling: exit code 0, no lock file, no
    task destroyed while pending, no traceback. A proxy started again on the same home answers
    at once with a fresh login link (nothing left behind wedges it)."""
    home = tmp_path / "qwen"
    proxy = start_proxy()
    url = f"{standin.base_url}/v1/chat/completions"
    async with through(proxy) as client:
        first = await client.post(url, json=CHAT)
    assert first.status_code == 503
    code = first.json()["error"]["user_code"]
    proxy.wait_for_log(code)  # the login box: the login task is running and polling

    assert proxy.stop() == 0, proxy.log
    assert "Task was destroyed but it is pending" not in proxy.log
    assert "Task exception was never retrieved" not in proxy.log
    assert "Traceback" not in proxy.log
    assert not (home / "oauth_creds.lock").exists()
    assert not home.exists() or files_in(home) == []

    again = start_proxy()
    async with through(again) as client:
        second = await client.post(url, json=CHAT)
    assert second.status_code == 503
    assert second.json()["error"]["user_code"] != code
    assert standin.counts["device_code"] == 2
