"""A separate process that does something to the credential directory, for tests/test_faults_files.py.

    fault_worker.py alternate HOME A.json B.json
        Save credentials A, print "A", save B, print "B", and so on until killed: a proxy writing
        its credentials in a tight loop, for the "killed in the middle of a write" test. Uses our
        store's save (temp file, fsync, rename), the write that must never leave a torn file.
    fault_worker.py replace HOME NEW.json
        Replace oauth_creds.json as Qwen Code does (its own temp file in the same directory, 0600,
        fsync, rename over the file) with the bytes of NEW.json; print "replaced". Does not use our
        store: this is the other program.
    fault_worker.py hold HOME
        Take the credential lock, print "locked", then hold it until stdin closes (or the process
        is killed). On stdin's end print "still-mine" or "taken-over" (whether the lock file still
        holds what we wrote), release, and exit 0.

The test puts the package on PYTHONPATH. Only the standard library and qwenproxy.store are
imported, so the worker also runs under `python -S` (fast start).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from qwenproxy.store import CredentialStore, parse_credentials


def alternate(home: str, a_path: str, b_path: str) -> None:
    store = CredentialStore(home)
    versions = [
        ("A", parse_credentials(Path(a_path).read_bytes())),
        ("B", parse_credentials(Path(b_path).read_bytes())),
    ]
    out = sys.stdout
    while True:
        for name, creds in versions:
            store.save(creds)
            out.write(name + "\n")
            out.flush()


def replace(home: str, new_path: str) -> None:
    data = Path(new_path).read_bytes()
    target = Path(home) / "oauth_creds.json"
    tmp = target.with_name(f"oauth_creds.json.qwen-code-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    print("replaced", flush=True)


async def hold(home: str) -> None:
    store = CredentialStore(home)
    async with store.lock():
        mine = store.lock_path.read_bytes()
        print("locked", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # returns when the test closes our stdin
        try:
            still = store.lock_path.read_bytes() == mine
        except FileNotFoundError:
            still = False
        print("still-mine" if still else "taken-over", flush=True)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "alternate":
        alternate(*args)
    elif mode == "replace":
        replace(*args)
    elif mode == "hold":
        asyncio.run(hold(*args))
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
