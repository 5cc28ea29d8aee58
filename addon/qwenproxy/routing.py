"""Pure decisions about where a request goes: is it for a Qwen API host, and where must it go.

No I/O, no mitmproxy state beyond the fields of a flow handed in, so every proxy mode's case is
tested directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .oauth import is_loopback_host

# The OpenAI-compatible bases clients are configured with: Qwen's portal and DashScope's
# compatible mode. DashScope's native API (/api/v1/...) has no equivalent on the portal.
COMPATIBLE_BASES = ("/compatible-mode/v1", "/v1")


@dataclass(frozen=True)
class Origin:
    """Where an API lives: scheme, host, port and the base path (e.g. `/v1`)."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path}"


def normalize_host(host: str) -> str:
    """Lowercase, no trailing dot, no IPv6 brackets."""
    return host.strip().strip("[]").rstrip(".").lower()


def is_ip(host: str) -> bool:
    # Cheap answer for the common case, a name: IPv4 ends in a digit, IPv6 has a colon.
    if ":" not in host and not host.strip().rstrip(".")[-1:].isdigit():
        return False
    try:
        ipaddress.ip_address(normalize_host(host))
        return True
    except ValueError:
        return False


def parse_host_entry(entry: str) -> str:
    """One `qwen_hosts` entry: a bare host name. Raises ValueError with a reason."""
    host = normalize_host(entry)
    if not host:
        raise ValueError("empty host name")
    if "/" in host or ":" in host and not is_ip(host) or " " in host:
        raise ValueError(f"{entry!r} is not a host name (give names like portal.qwen.ai, no scheme or path)")
    return host


def parse_hosts(entries: Iterable[str]) -> frozenset[str]:
    return frozenset(parse_host_entry(e) for e in entries)


def parse_origin(api_base: str) -> Origin:
    """The Origin of an API base URL such as `https://portal.qwen.ai/v1`."""
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {api_base!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, normalize_host(parts.hostname), port, parts.path.rstrip("/"))


def api_subpath(path: str) -> str | None:
    """The API path after the client's base, e.g. `/compatible-mode/v1/chat/completions` ->
    `/chat/completions` (with the query kept). None for paths outside the compatible API."""
    base, sep, query = path.partition("?")
    for prefix in COMPATIBLE_BASES:
        if base == prefix or base.startswith(prefix + "/"):
            return base[len(prefix) :] + sep + query
    return None


def route(path: str, account: Origin) -> str | None:
    """The path on the account's endpoint for a client path, or None when it can't be mapped."""
    rest = api_subpath(path)
    if rest is None:
        return None
    return account.path + rest


def secure_scheme(scheme: str, host: str) -> str:
    """Tokens travel over TLS, except to loopback (the local stand-in)."""
    return scheme if scheme == "https" or is_loopback_host(host) else "https"


def trusted_origin(origin: Origin, hosts: frozenset[str], domains: Iterable[str]) -> bool:
    """Whether the token may go to an account endpoint: a configured host or one under a trusted
    domain, over TLS; or anything on loopback (the local stand-in)."""
    if is_loopback_host(origin.host):
        return True
    if origin.scheme != "https":
        return False
    return origin.host in hosts or any(origin.host == d or origin.host.endswith("." + d) for d in domains)
