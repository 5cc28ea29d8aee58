"""`python -m qwenproxy login | status | logout`: the shared credentials from a terminal.

For headless machines (log in before starting the proxy) and for tests. Uses the same store,
OAuth client and lifecycle as the addon, so a login here is a login for Qwen Code too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from .oauth import OAuthClient, check_oauth_base_url, tls_verification
from .profile import QWEN
from .store import CredentialStore, mask, resolve_home
from .terminal import TerminalAnnouncer
from .tokens import State, TokenManager


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwenproxy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--qwen-home", default=None, help="credential directory (default: $QWEN_HOME or ~/.qwen)"
    )
    parser.add_argument("--oauth-url", default=QWEN.oauth_base_url, help="OAuth server base URL")
    parser.add_argument("--ca", default=None, help="extra CA file (PEM) to trust for the OAuth server")
    sub = parser.add_subparsers(dest="command", required=True)
    login = sub.add_parser("login", help="log in with the device flow and write the shared credential file")
    login.add_argument("--no-browser", action="store_true", help="only print the link")
    login.add_argument(
        "--timeout", type=int, default=0, help="seconds to wait for approval (0: the code's lifetime)"
    )
    sub.add_parser("status", help="show the login state (never the token); exit 0 when a token is usable")
    sub.add_parser("logout", help="delete the shared credential file")
    return parser


def _manager(args, **kwargs) -> TokenManager:
    store = CredentialStore(resolve_home(args.qwen_home))
    client = OAuthClient(args.oauth_url, verify=tls_verification(args.ca))
    return TokenManager(store, client, **kwargs)


async def _login(args) -> int:
    tokens = _manager(
        args,
        auth_timeout_s=args.timeout,
        listener=TerminalAnnouncer(open_browser=not args.no_browser, progress_every_s=15),
    )
    try:
        tokens.start_login(force=True)
        await tokens.wait_login()
        creds = tokens.usable()
        if creds is None:
            return 1
        print(f"Logged in. Credentials written to {tokens.store.path}")
        return 0
    finally:
        await tokens.aclose()


async def _status(args) -> int:
    tokens = _manager(args)
    try:
        creds = tokens.credentials
        snap = tokens.snapshot()
        print(f"credentials: {tokens.store.path}")
        print(f"state:       {snap.state.value}")
        if snap.last_error:
            print(f"problem:     {snap.last_error}")
        if creds is not None:
            left = int(creds.expires_at - time.time())
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(creds.expires_at))
            print(f"endpoint:    {creds.api_base()}")
            print(f"expires:     {when} ({'in ' + str(left) + ' s' if left > 0 else 'expired'})")
            print(f"token:       {mask(creds.access_token)}")
        if snap.state is State.EXPIRED:
            print("The token is refreshed on the next use.")
        elif snap.state is State.LOGGED_OUT:
            print("Not logged in: run `python -m qwenproxy login`.")
        return 0 if snap.state is State.VALID else 1
    finally:
        await tokens.aclose()


async def _logout(args) -> int:
    tokens = _manager(args)
    try:
        existed = tokens.store.path.exists()
        await tokens.logout()
        print(f"Logged out: removed {tokens.store.path}" if existed else "Not logged in; nothing to remove.")
        return 0
    finally:
        await tokens.aclose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_oauth_base_url(args.oauth_url)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    command = {"login": _login, "status": _status, "logout": _logout}[args.command]
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
