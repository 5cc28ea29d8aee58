"""Qwen's constants, in one place.

Facts from the published Qwen Code CLI (OAuth endpoints, client id, credential file names, headers).
A future provider would be another profile, not another code path.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# Qwen Code's version we identify as in the User-Agent; the API gates OAuth traffic on this shape.
QWEN_CODE_VERSION = "0.24.4"


@dataclass(frozen=True)
class Profile:
    oauth_base_url: str = "https://chat.qwen.ai"
    device_code_path: str = "/api/v1/oauth2/device/code"
    token_path: str = "/api/v1/oauth2/token"
    client_id: str = "f0304373b74a44d2b584a3fb70ca9e56"
    scope: str = "openid profile email model.completion"
    device_grant_type: str = "urn:ietf:params:oauth:grant-type:device_code"
    # Used when a token response carries no resource_url.
    default_api_base: str = "https://dashscope.aliyuncs.com/compatible-mode/v1"
    api_hosts: tuple[str, ...] = (
        "portal.qwen.ai",
        "dashscope.aliyuncs.com",
        "dashscope-intl.aliyuncs.com",
    )
    # An account endpoint (resource_url) outside the configured hosts is trusted with the token
    # only under these domains (or on loopback, for the stand-in).
    trusted_domains: tuple[str, ...] = ("qwen.ai",)
    creds_file: str = "oauth_creds.json"
    lock_file: str = "oauth_creds.lock"
    home_env: str = "QWEN_HOME"
    home_dir: str = ".qwen"
    # A token counts as usable while now < expiry - this buffer (Qwen Code's value).
    expiry_buffer_s: float = 30.0
    # Qwen Code treats a lock older than this as left behind by a dead process.
    lock_stale_s: float = 35.0
    # Qwen Code polls the file's mtime at most this often.
    file_check_interval_s: float = 5.0
    # Qwen Code polls every 2 s when the server sends no interval.
    default_poll_interval_s: float = 2.0


QWEN = Profile()


@functools.cache
def user_agent() -> str:
    """Qwen Code's User-Agent: `QwenCode/<version> (<platform>; <arch>)`."""
    system = platform.system().lower() or "unknown"
    # Node's names, which Qwen Code reports: darwin/linux/win32, x64/arm64.
    system = {"windows": "win32"}.get(system, system)
    machine = platform.machine().lower() or "unknown"
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(machine, machine)
    return f"QwenCode/{QWEN_CODE_VERSION} ({system}; {machine})"


@functools.cache
def api_header_fields() -> tuple[tuple[bytes, bytes], ...]:
    """`api_headers()` as the (name, value) byte pairs of mitmproxy's `Headers.fields`, built once."""
    return tuple((k.encode(), v.encode()) for k, v in api_headers().items())


def api_headers() -> dict[str, str]:
    """The headers Qwen Code sends on API calls, besides Authorization."""
    ua = user_agent()
    return {
        "User-Agent": ua,
        "X-DashScope-UserAgent": ua,
        "X-DashScope-AuthType": "qwen-oauth",
        "X-DashScope-CacheControl": "enable",
    }
