#!/usr/bin/env python3
"""Chat with Qwen through the proxy, using the official openai SDK and nothing Qwen-specific.

    python examples/openai_chat.py                      # proxy in reverse mode on 127.0.0.1:8080
    python examples/openai_chat.py --stream "Write a haiku about proxies"
    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 python examples/openai_chat.py

The API key is a dummy: the proxy replaces it with the Qwen OAuth token. While nobody is logged
in, the proxy answers 503 with Retry-After and the login link; the SDK retries by itself (it
honours Retry-After), so this script simply waits until the login is approved. It prints the link
once, so you know what it is waiting for.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from urllib.parse import urlsplit

import httpx
import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


class LoginNotice:
    """An httpx response hook: shows the proxy's login link the first time a 503 carries one."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, response: httpx.Response) -> None:
        if response.status_code != 503 or self.shown:
            return
        response.read()  # hooks run before the body is read; this one is a small JSON document
        try:
            error = json.loads(response.content)["error"]
            url, code = error["login_url"], error["user_code"]
        except (ValueError, KeyError, TypeError):
            return  # a 503 of another kind: the SDK retries it like any 5xx
        self.shown = True
        print(f"Qwen login required: open {url} and approve code {code}.", file=sys.stderr)
        print("Waiting for the approval; the SDK retries by itself...", file=sys.stderr, flush=True)


def proxy_is_down(base_url: str) -> bool:
    """True when the base URL is on this machine and nothing listens there. (The SDK would
    otherwise retry the connection for minutes, as patiently as it waits for a login.)"""
    url = urlsplit(base_url)
    host = url.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        return False  # e.g. the real API URL, reached through HTTPS_PROXY: nothing to check here
    try:
        socket.create_connection(
            (host, url.port or (443 if url.scheme == "https" else 80)), timeout=3
        ).close()
    except OSError:
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description="Chat with Qwen through the qwenproxy addon.")
    parser.add_argument("prompt", nargs="?", default="Say hello in one short sentence.")
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        help=f"the proxy's OpenAI-compatible base URL (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--model", default="coder-model")
    parser.add_argument("--stream", action="store_true", help="print the reply as it arrives")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=60,
        help="SDK retries; with the proxy's Retry-After of a few seconds, 60 waits minutes for a login",
    )
    args = parser.parse_args()
    if proxy_is_down(args.base_url):
        print(f"Nothing listens at {args.base_url}: is the proxy running?", file=sys.stderr)
        return 1

    client = openai.OpenAI(
        base_url=args.base_url,
        api_key="dummy-key-the-proxy-replaces-it",
        max_retries=args.max_retries,
        timeout=60,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [LoginNotice()]}),
    )
    messages = [{"role": "user", "content": args.prompt}]
    try:
        if args.stream:
            stream = client.chat.completions.create(model=args.model, messages=messages, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        else:
            completion = client.chat.completions.create(model=args.model, messages=messages)
            print(completion.choices[0].message.content)
    except openai.APIConnectionError as e:
        print(f"Cannot reach the proxy at {args.base_url}: {e}. Is it running?", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        # E.g. the login was not approved before the retries ran out: the body says what to do.
        message = e.body.get("message") if isinstance(e.body, dict) else None
        print(f"HTTP {e.status_code}: {message or e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
