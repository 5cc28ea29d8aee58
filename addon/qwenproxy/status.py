"""The status page and API: what the lifecycle's snapshot says, as JSON or a small HTML page.

Served by the addon through the proxy itself, the way mitmproxy serves mitm.it: at the magic host
`http://qwen.auth/` for proxied clients, and under the reserved path `/__qwen__/` on any host the
addon answers for (which also works in reverse-proxy mode). Pure: no I/O, no mitmproxy imports; the
addon turns a `Page` into a response.

    GET  /             the status; HTML or JSON by Accept (also /status)
    GET  /status.json  the status as JSON
    GET  /qr.svg       a QR code of the pending login's link
    POST /login        start a device-flow login       } loopback clients only,
    POST /logout       forget the shared credentials   } never from another site

No token ever appears: the snapshot holds none, and only its whitelisted fields are shown.
"""

from __future__ import annotations

import functools
import html
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import segno

from .oauth import is_loopback_host
from .tokens import Snapshot, State

MAGIC_HOST = "qwen.auth"
PATH_PREFIX = "/__qwen__"

# Seconds between the HTML page's self-refreshes: fast while something is about to change.
REFRESH_BUSY_S = 3
REFRESH_IDLE_S = 30

_PREFIX_LEN = len(PATH_PREFIX)
_GET = ("GET", "HEAD")
_LAST_ERROR_MAX = 500


def is_status_request(host: str, path: str) -> bool:
    """Whether a request is for the status page: the magic host, or the reserved path on any host.

    `host` is normalized (lowercase, no port). Cheap: it runs on every proxied request.
    """
    if host == MAGIC_HOST:
        return True
    if not path.startswith(PATH_PREFIX):
        return False
    return len(path) == _PREFIX_LEN or path[_PREFIX_LEN] in "/?"


@dataclass(frozen=True)
class Page:
    """A complete answer: the addon sends it as it is."""

    status: int
    headers: dict[str, str]
    body: bytes


class Actions(Protocol):
    """What the POST routes do; each returns a one-line message for the user."""

    def login(self) -> str: ...

    def logout(self) -> str: ...


def respond(
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    snapshot: Snapshot,
    now: float,
    *,
    local_client: bool,
    actions: Actions,
) -> Page:
    """The answer to one status request. Never raises for any request.

    `host` is the normalized host the request is for (the CSRF check compares the `Origin` with it
    and with the `Host` header); `local_client` says whether the peer is on this machine.
    """
    base, route = _split(path)
    method = method.upper()
    if route in ("/", "/status"):
        if method not in _GET:
            return _not_allowed(_GET)
        if _prefers_html(_header(headers, "accept")):
            return _head_only(method, _html_page(snapshot, now, base))
        return _head_only(method, _json_page(200, status_document(snapshot, now)))
    if route == "/status.json":
        if method not in _GET:
            return _not_allowed(_GET)
        return _head_only(method, _json_page(200, status_document(snapshot, now)))
    if route == "/qr.svg":
        if method not in _GET:
            return _not_allowed(_GET)
        svg = _login_qr_svg(snapshot)
        if svg is None:
            return _error(404, "No login is pending, so there is no QR code.", "not_found", "no_login")
        headers = {**_headers("image/svg+xml"), "Content-Security-Policy": "default-src 'none'"}
        return _head_only(method, Page(200, headers, svg.encode()))
    if route in ("/login", "/logout"):
        if method != "POST":
            return _not_allowed(("POST",))
        return _action(route[1:], host, headers, base, local_client=local_client, actions=actions)
    return _error(404, f"No such status page; see GET {base}", "not_found", "not_found")


# -- the document ---------------------------------------------------------------------------


def status_document(snapshot: Snapshot, now: float) -> dict[str, Any]:
    """The status as a JSON-ready dict: only these fields, never a token."""
    login = snapshot.login
    return {
        "state": snapshot.state.value,
        "endpoint": snapshot.endpoint,
        "expires_at": _iso(snapshot.expires_at),
        "expires_in": _seconds_until(snapshot.expires_at, now),
        "login": None
        if login is None
        else {
            "url": login.url,
            "user_code": login.user_code,
            "expires_in": _seconds_until(login.expires_at, now),
        },
        "last_error": _clip(snapshot.last_error),
        "counters": {str(k): int(v) for k, v in snapshot.counters.items()},
    }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return None


def _seconds_until(epoch: float | None, now: float) -> int | None:
    if epoch is None:
        return None
    try:
        return max(0, int(epoch - now))
    except (OverflowError, ValueError):
        return None


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= _LAST_ERROR_MAX:
        return text
    return text[: _LAST_ERROR_MAX - 1] + "…"


# -- POST actions ---------------------------------------------------------------------------


def _action(
    name: str, host: str, headers: Mapping[str, str], base: str, *, local_client: bool, actions: Actions
) -> Page:
    if not local_client:
        return _error(
            403,
            f"The {name} action is allowed only from this machine (a loopback client).",
            "forbidden",
            "not_loopback",
        )
    refusal = cross_site_refusal(host, headers)
    if refusal is not None:
        return _error(403, f"The {name} action was refused: {refusal}.", "forbidden", "cross_site")
    try:
        message = actions.login() if name == "login" else actions.logout()
    except Exception as e:  # the page must answer, whatever the lifecycle does
        return _error(
            500, f"The {name} action failed: {type(e).__name__}: {e}", "server_error", "action_failed"
        )
    if _prefers_html(_header(headers, "accept")):
        # Post/Redirect/Get: back to the page, whose next refresh shows the new state.
        return Page(303, {**_headers("text/plain; charset=utf-8"), "Location": base}, message.encode())
    return _json_page(200, {"ok": True, "message": message})


def cross_site_refusal(host: str, headers: Mapping[str, str]) -> str | None:
    """Why a POST looks like it came from another site (CSRF), or None when it does not.

    Browsers mark their requests: `Sec-Fetch-Site` (which pages cannot forge) and `Origin`. A
    request with neither is not from a browser page. `Origin` must be the host the request went
    to; in reverse mode mitmproxy has rewritten the Host header, so a loopback `Origin` is also
    accepted when the browser itself says the request is same-origin.
    """
    site = (_header(headers, "sec-fetch-site") or "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"the browser marked it as {site}"
    origin = _header(headers, "origin")
    if origin is None:
        return None
    authority = _origin_authority(origin)
    if authority is None:
        return f"its Origin {origin[:100]!r} is not a web origin"
    origin_host, origin_port = authority
    if origin_host == host:
        return None
    host_header = _header(headers, "host")
    if host_header is not None and _authority(host_header) == (origin_host, origin_port):
        return None
    if site == "same-origin" and is_loopback_host(origin_host):
        return None
    return f"its Origin {origin[:100]!r} is another site"


def _origin_authority(origin: str) -> tuple[str, int | None] | None:
    """(host, port or None for the scheme's default) of an Origin header; None for `null` & co."""
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        port = parts.port
    except ValueError:
        return None
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname.rstrip(".").lower(), None if port in (None, default) else port


def _authority(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header; default ports (80, 443) count as None like in Origins."""
    try:
        parts = urlsplit("//" + value.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host.rstrip(".").lower(), None if port in (None, 80, 443) else port


# -- negotiation and plumbing ---------------------------------------------------------------


def _split(path: str) -> tuple[str, str]:
    """(base, route): the page's base path (`/` or `/__qwen__/`) and the route under it."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    base = "/"
    if path.startswith(PATH_PREFIX) and (len(path) == _PREFIX_LEN or path[_PREFIX_LEN] == "/"):
        path = path[_PREFIX_LEN:]
        base = PATH_PREFIX + "/"
    path = path.rstrip("/") or "/"  # "" (the bare prefix) and "/status/" too
    return base, path


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by lowercase name, from mitmproxy's Headers or a plain dict alike."""
    try:
        value = headers.get(name)
        if value is not None:
            return str(value)
        for key, value in headers.items():
            if str(key).lower() == name:
                return str(value)
    except Exception:  # a strange mapping is a request without that header
        return None
    return None


_MEDIA_RANGE = re.compile(r"^\s*([^\s;/]+)/([^\s;/]+)\s*(.*)$")


def _prefers_html(accept: str | None) -> bool:
    """Whether Accept ranks text/html above application/json (ties and */* mean JSON)."""
    if not accept:
        return False
    ranges: list[tuple[str, str, float]] = []
    for item in accept.split(",")[:64]:
        match = _MEDIA_RANGE.match(item)
        if not match:
            continue
        kind, sub, params = match.group(1).lower(), match.group(2).lower(), match.group(3)
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:  # also NaN
                    q = 0.0
        ranges.append((kind, sub, q))
    return _quality(ranges, "text", "html") > _quality(ranges, "application", "json")


def _quality(ranges: list[tuple[str, str, float]], kind: str, sub: str) -> float:
    """The q of a media type: the most specific matching range decides (RFC 9110 12.5.1)."""
    best, specificity = 0.0, -1
    for r_kind, r_sub, q in ranges:
        if (r_kind, r_sub) == (kind, sub):
            rank = 2
        elif r_kind == kind and r_sub == "*":
            rank = 1
        elif (r_kind, r_sub) == ("*", "*"):
            rank = 0
        else:
            continue
        if rank > specificity or (rank == specificity and q > best):
            best, specificity = q, rank
    return best


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json_page(status: int, document: dict[str, Any]) -> Page:
    body = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    return Page(status, _headers("application/json"), body.encode())


def _error(status: int, message: str, type_: str, code: str) -> Page:
    return _json_page(status, {"error": {"message": message, "type": type_, "code": code}})


def _not_allowed(allowed: tuple[str, ...]) -> Page:
    page = _error(
        405,
        f"Method not allowed here; use {' or '.join(allowed)}.",
        "method_not_allowed",
        "method_not_allowed",
    )
    return Page(page.status, {**page.headers, "Allow": ", ".join(allowed)}, page.body)


def _head_only(method: str, page: Page) -> Page:
    return Page(page.status, page.headers, b"") if method == "HEAD" else page


# -- QR codes ---------------------------------------------------------------------------------


def safe_link(url: str) -> str | None:
    """`url` if it may become a link or a QR code: an absolute http(s) URL without whitespace or
    control characters (browsers drop some of those, which could turn it into another scheme)."""
    if not url or len(url) > 2000 or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return url


@functools.lru_cache(maxsize=8)
def _qr(url: str) -> segno.QRCode | None:
    try:
        return segno.make(url, micro=False)
    except (segno.DataOverflowError, ValueError):
        return None


def qr_svg(url: str) -> str | None:
    """An SVG QR code of an http(s) URL (no fixed size: CSS sizes it; usable inline in HTML and as
    an image/svg+xml document); None if there is none."""
    link = safe_link(url)
    qr = _qr(link) if link else None
    if qr is None:
        return None
    out = io.BytesIO()
    qr.save(
        out,
        kind="svg",
        xmldecl=False,
        svgns=True,
        nl=False,
        scale=1,
        border=4,
        dark="#0f172a",
        light="#ffffff",
        omitsize=True,
        svgclass="qr",
        title="QR code of the login link",
    )
    return out.getvalue().decode()


def qr_text(url: str) -> str:
    """A compact QR code of an http(s) URL for a terminal (two modules per character cell, light
    modules drawn as blocks: for the usual light-on-dark terminal). "" when there is none."""
    link = safe_link(url)
    qr = _qr(link) if link else None
    if qr is None:
        return ""
    out = io.StringIO()
    qr.terminal(out=out, compact=True, border=2)
    return out.getvalue().rstrip("\n")


def _login_qr_svg(snapshot: Snapshot) -> str | None:
    return None if snapshot.login is None else qr_svg(snapshot.login.url)


# -- the HTML page ----------------------------------------------------------------------------

_WORDS = {
    State.LOGGED_OUT: ("Logged out", "No Qwen login: the next API request (or “Log in now”) starts one."),
    State.VALID: ("Logged in", "Requests to the Qwen API get the OAuth token."),
    State.EXPIRED: ("Token expired", "It is refreshed on the next API request."),
    State.REFRESHING: ("Refreshing", "The token is being refreshed."),
    State.LOGIN_PENDING: ("Login pending", "Approve the login to continue: requests get 503 until then."),
    State.FAILED: ("Failed", "The last attempt failed; the next request tries again."),
}

_STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #f1f5f9; color: #0f172a;
       font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 560px; margin: 32px auto; padding: 0 16px; }
.card { background: #fff; border-radius: 14px; box-shadow: 0 4px 24px rgba(15, 23, 42, .08);
        padding: 24px 28px; margin-bottom: 16px; }
h1 { font-size: 20px; margin: 0 0 12px; }
.state { display: inline-block; font-weight: 600; border-radius: 999px; padding: 2px 12px; }
.state.valid { background: #dcfce7; color: #166534; }
.state.login_pending, .state.refreshing { background: #fef9c3; color: #854d0e; }
.state.failed { background: #fee2e2; color: #991b1b; }
.state.expired, .state.logged_out { background: #e2e8f0; color: #334155; }
.hint { color: #475569; margin: 8px 0 0; }
.login { text-align: center; }
.code { font: 700 40px/1.2 ui-monospace, SFMono-Regular, Menlo, monospace; letter-spacing: .12em;
        background: #f1f5f9; border-radius: 10px; padding: 14px; margin: 12px 0 16px; word-break: break-all; }
a.button, button { display: inline-block; font: inherit; font-weight: 600; border: 0; cursor: pointer;
                   border-radius: 10px; padding: 12px 24px; text-decoration: none; }
a.button { background: #4f46e5; color: #fff; font-size: 18px; }
.qr { width: 200px; height: 200px; margin: 16px auto 4px; display: block; shape-rendering: crispEdges; }
.url { color: #64748b; font-size: 13px; word-break: break-all; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 6px 16px; margin: 0; }
dt { color: #64748b; } dd { margin: 0; word-break: break-word; }
.actions { display: flex; gap: 12px; flex-wrap: wrap; }
.actions button { background: #e2e8f0; color: #0f172a; }
.actions .primary { background: #4f46e5; color: #fff; }
footer { color: #64748b; font-size: 13px; text-align: center; }
"""

# No script may run on this page; styles and the QR code are inline.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def _html_page(snapshot: Snapshot, now: float, base: str) -> Page:
    e = html.escape
    state = snapshot.state
    title, hint = _WORDS.get(state, (state.value, ""))
    busy = state in (State.LOGIN_PENDING, State.REFRESHING)
    refresh = REFRESH_BUSY_S if busy else REFRESH_IDLE_S
    doc = status_document(snapshot, now)

    parts = [
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<meta http-equiv=refresh content={refresh}>",
        f"<title>Qwen: {e(title)}</title><style>{_STYLE}</style></head><body><main>",
        "<section class=card><h1>Qwen login</h1>",
        f"<span id=state class='state {e(state.value)}' data-state='{e(state.value)}'>{e(title)}</span>",
        f"<p class=hint>{e(hint)}</p></section>",
    ]
    if state is State.LOGIN_PENDING:
        parts.append(_login_section(snapshot, now))
    parts.append("<section class=card><dl>")
    parts.append(f"<dt>Endpoint</dt><dd id=endpoint>{e(snapshot.endpoint or '—')}</dd>")
    if doc["expires_at"] is not None:
        left = doc["expires_in"]
        when = f"{doc['expires_at']} (in {_duration(left)})" if left else f"{doc['expires_at']} (expired)"
        parts.append(f"<dt>Token expires</dt><dd id=expires>{e(when)}</dd>")
    if doc["last_error"]:
        parts.append(f"<dt>Last error</dt><dd id=last-error>{e(doc['last_error'])}</dd>")
    counters = ", ".join(f"{e(k)} {v}" for k, v in sorted(doc["counters"].items())) or "—"
    parts.append(f"<dt>Counters</dt><dd id=counters>{counters}</dd></dl></section>")

    parts.append("<section class='card actions'>")
    if state is not State.LOGIN_PENDING:
        parts.append(
            f"<form method=post action='{e(base)}login'><button class=primary type=submit>Log in now</button></form>"
        )
    if state is not State.LOGGED_OUT:
        parts.append(
            f"<form method=post action='{e(base)}logout'><button type=submit>Log out</button></form>"
        )
    parts.append("</section>")
    parts.append(
        f"<footer>Refreshes every {refresh} s · <a href='{e(base)}status.json'>JSON</a> · "
        "log out and log in act only from this machine</footer></main></body></html>\n"
    )
    headers = {
        **_headers("text/html; charset=utf-8"),
        "Content-Security-Policy": _CSP,
        "X-Frame-Options": "DENY",
        # Not no-referrer: with it, browsers send `Origin: null` on the page's own form POSTs.
        "Referrer-Policy": "same-origin",
    }
    return Page(200, headers, "".join(parts).encode())


def _login_section(snapshot: Snapshot, now: float) -> str:
    e = html.escape
    login = snapshot.login
    if login is None:
        return "<section class='card login'><p>Starting the login…</p></section>"
    link = safe_link(login.url)
    parts = [
        "<section class='card login'>",
        "<p>Open the Qwen login page and approve this code:</p>",
        f"<div id=user-code class=code>{e(login.user_code)}</div>",
    ]
    if link is not None:
        parts.append(
            f"<a id=login-link class=button href='{e(link)}' target=_blank rel='noopener noreferrer'>"
            "Open the Qwen login page</a>"
        )
        svg = qr_svg(link)
        if svg is not None:
            parts.append(svg)
            parts.append("<p class=hint>or scan it with your phone</p>")
    parts.append(f"<p class=url>{e(login.url)}</p>")
    parts.append(f"<p>Expires in <span id=seconds-left>{_seconds_until(login.expires_at, now)}</span> s</p>")
    parts.append("</section>")
    return "".join(parts)


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
