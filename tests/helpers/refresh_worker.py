"""A separate proxy-like process whose token expired, for the cross-process refresh test.

    refresh_worker.py HOME OAUTH_URL CA_FILE

Prints "ready", waits for a line on stdin (the start barrier), asks its TokenManager for a token
(which refreshes under the file lock) and prints a fingerprint of the token it got.
"""

import asyncio
import hashlib
import ssl
import sys

from qwenproxy.oauth import OAuthClient
from qwenproxy.store import Credentials, CredentialStore
from qwenproxy.tokens import TokenManager


async def main(home: str, url: str, ca: str) -> int:
    tokens = TokenManager(
        CredentialStore(home), OAuthClient(url, verify=ssl.create_default_context(cafile=ca))
    )
    try:
        tokens.usable()
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        result = await tokens.acquire()
        if not isinstance(result, Credentials):
            print(f"unavailable: {result.reason}", flush=True)
            return 1
        print(hashlib.sha256(result.access_token.encode()).hexdigest()[:16], flush=True)
        return 0
    finally:
        await tokens.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
