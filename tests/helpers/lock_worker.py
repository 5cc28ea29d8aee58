"""A separate process using the credential store, for the cross-process lock tests.

    lock_worker.py hold HOME
        Take the lock, print "locked", then hold it until stdin closes (or the process is killed).
    lock_worker.py refresh HOME
        Print "ready", wait for a line on stdin (the start barrier), then do what a proxy does
        when its token expired: take the lock, re-read the file, and "refresh" (write a new
        token naming this process) only if the file still holds an unusable token. Prints
        "refreshed <token>" or "reused <token>".

The test puts the package on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from qwenproxy.store import Credentials, CredentialStore

# Stands in for the refresh request's round trip, so that without a working lock the other
# processes would all read the old token while this one is "refreshing".
REFRESH_LATENCY_S = 0.05


async def hold(store: CredentialStore) -> None:
    async with store.lock():
        print("locked", flush=True)
        # Returns when the test closes our stdin (or dies), so no worker outlives a failed test.
        await asyncio.to_thread(sys.stdin.read)


async def refresh(store: CredentialStore) -> None:
    async with store.lock(timeout_s=20):
        creds = store.load()
        if creds is not None and creds.is_usable(time.time()):
            print(f"reused {creds.access_token}", flush=True)
            return
        await asyncio.sleep(REFRESH_LATENCY_S)
        new = Credentials(
            access_token=f"access-from-pid-{os.getpid()}",
            refresh_token=f"refresh-from-pid-{os.getpid()}",
            token_type="Bearer",
            expiry_date=int((time.time() + 3600) * 1000),
        )
        store.save(new)
        print(f"refreshed {new.access_token}", flush=True)


def main() -> None:
    mode, home = sys.argv[1], sys.argv[2]
    store = CredentialStore(home)
    if mode == "hold":
        asyncio.run(hold(store))
    elif mode == "refresh":
        print("ready", flush=True)
        sys.stdin.readline()  # the start barrier
        asyncio.run(refresh(store))
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
