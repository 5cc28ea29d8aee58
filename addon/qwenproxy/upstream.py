"""Sending a request upstream again, outside mitmproxy's connection, for the one retry after an
upstream 401/403 (mitmproxy has no way to re-send a request within a flow).

The retry goes to exactly the URL the flow went to, never follows redirects, verifies TLS like
mitmproxy does for upstream connections, and keeps the answer's bytes as they came (encoded).
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx
from mitmproxy import http

# Headers that describe one connection, not the message: never copied onto the retry.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class Resender:
    def __init__(
        self, *, verify: ssl.SSLContext | bool = True, proxy: str | None = None, timeout_s: float = 600
    ):
        self._client = httpx.AsyncClient(
            verify=verify,
            proxy=proxy,
            timeout=httpx.Timeout(timeout_s, connect=30),
            follow_redirects=False,
            trust_env=False,
        )

    async def send(self, request: http.Request, headers: dict[str, str]) -> http.Response:
        """Send `request` again with `headers` replaced; return the answer as a mitmproxy Response.

        Raises httpx.HTTPError on network failure."""
        out: list[tuple[str, str]] = [
            (k, v)
            for k, v in request.headers.items(multi=True)
            if k.lower() not in HOP_BY_HOP and k not in headers
        ]
        out += list(headers.items())
        started = time.time()
        async with self._client.stream(
            request.method, request.url, headers=out, content=request.raw_content or b""
        ) as answer:
            raw = b"".join([chunk async for chunk in answer.aiter_raw()])
        kept: Any = [
            (k.encode(), v.encode()) for k, v in answer.headers.multi_items() if k.lower() not in HOP_BY_HOP
        ]
        kept.append((b"content-length", str(len(raw)).encode()))
        return http.Response(
            http_version=b"HTTP/1.1",
            status_code=answer.status_code,
            reason=answer.reason_phrase.encode("ascii", "replace"),
            headers=tuple(kept),
            content=raw,
            trailers=None,
            timestamp_start=started,
            timestamp_end=time.time(),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
