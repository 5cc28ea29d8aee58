"""The mitmproxy face: options, hooks, commands. Hooks are short and delegate.

For each request to a Qwen API host: a usable token is injected (refreshed first if needed), or,
while no login exists, the request is answered at once with 503 + Retry-After + an OpenAI-style
error that carries the login link, and one device flow runs in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from . import routing
from .oauth import OAuthClient, check_oauth_base_url
from .profile import QWEN, api_headers
from .store import CredentialStore, Credentials, mask, resolve_home
from .terminal import TerminalAnnouncer
from .tokens import TokenManager, Unavailable

log = logging.getLogger(__name__)

META = "qwen"  # flow.metadata key of the flows we handle


def target_name(flow: http.HTTPFlow) -> str:
    """The host name a request is for, in every proxy mode.

    Regular, upstream and reverse modes know it (CONNECT target, absolute URL, reverse target).
    Transparent, local and WireGuard capture only know an IP: the name comes from the TLS SNI, or
    for plain HTTP from the Host header. Such claims are only trusted because the request is then
    sent to that name (see `QwenAuth._inject`), never to the captured IP.
    """
    host = flow.request.host
    if not routing.is_ip(host):
        return routing.normalize_host(host)
    if flow.request.scheme == "https":
        sni = flow.client_conn.sni or flow.server_conn.sni
        return routing.normalize_host(sni) if sni else routing.normalize_host(host)
    header = flow.request.host_header
    if header:
        name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return routing.normalize_host(name)
    return routing.normalize_host(host)


def error_body(message: str, type_: str, code: str, **extra: Any) -> bytes:
    """An OpenAI-style error document, which SDKs show to their users."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}).encode()


class QwenAuth:
    """Injects Qwen OAuth tokens into Qwen API requests; logs in with the device flow when needed."""

    def __init__(self) -> None:
        self.tokens: TokenManager | None = None
        self.hosts: frozenset[str] = frozenset(QWEN.api_hosts)
        self.counters: Counter[str] = Counter()
        self._account: tuple[str | None, routing.Origin | None] = (None, None)
        self._closing: set[asyncio.Task] = set()

    # -- options ---------------------------------------------------------------------------

    def load(self, loader):
        loader.add_option(
            "qwen_home",
            str,
            "",
            "Directory of the Qwen credential file oauth_creds.json, shared with Qwen Code. "
            "Empty: $QWEN_HOME, else ~/.qwen.",
        )
        loader.add_option(
            "qwen_oauth_url",
            str,
            QWEN.oauth_base_url,
            "Base URL of the Qwen OAuth server (device flow and refresh).",
        )
        loader.add_option(
            "qwen_hosts",
            Sequence[str],
            list(QWEN.api_hosts),
            "Qwen API hosts whose requests get the OAuth token. The logged-in account's endpoint "
            "host is always included.",
        )
        loader.add_option(
            "qwen_open_browser",
            bool,
            True,
            "Open the login link in a browser when a device-flow login starts.",
        )
        loader.add_option(
            "qwen_retry_after",
            int,
            5,
            "Retry-After seconds of the 503 answered while a login is pending.",
        )
        loader.add_option(
            "qwen_auth_timeout",
            int,
            0,
            "Seconds to wait for a login's approval; 0: the login code's own lifetime.",
        )
        loader.add_option(
            "qwen_route",
            bool,
            True,
            "Send Qwen API requests to the logged-in account's endpoint (from resource_url), "
            "mapping the path, when the client aimed at another Qwen host.",
        )

    def configure(self, updated: set[str]):
        opts = ctx.options
        if "qwen_hosts" in updated:
            try:
                self.hosts = routing.parse_hosts(opts.qwen_hosts)
            except ValueError as e:
                raise exceptions.OptionsError(f"qwen_hosts: {e}") from e
        if "qwen_retry_after" in updated and not 0 <= opts.qwen_retry_after <= 3600:
            raise exceptions.OptionsError(
                f"qwen_retry_after must be between 0 and 3600 seconds, got {opts.qwen_retry_after}"
            )
        if "qwen_auth_timeout" in updated and not 0 <= opts.qwen_auth_timeout <= 24 * 3600:
            raise exceptions.OptionsError(
                f"qwen_auth_timeout must be between 0 and 86400 seconds, got {opts.qwen_auth_timeout}"
            )
        if "qwen_oauth_url" in updated:
            try:
                check_oauth_base_url(opts.qwen_oauth_url)
            except ValueError as e:
                raise exceptions.OptionsError(f"qwen_oauth_url: {e}") from e
        if "qwen_home" in updated:
            home = resolve_home(opts.qwen_home or None)
            if home.exists() and not home.is_dir():
                raise exceptions.OptionsError(f"qwen_home: {home} exists and is not a directory")
        rebuild = {"qwen_home", "qwen_oauth_url", "ssl_verify_upstream_trusted_ca"}
        if self.tokens is None or updated & rebuild:
            self._build()
        else:
            if "qwen_auth_timeout" in updated:
                self.tokens.auth_timeout_s = opts.qwen_auth_timeout
            if "qwen_open_browser" in updated:
                self.tokens.listener.open_browser = opts.qwen_open_browser

    def _build(self) -> None:
        """(Re)create the token lifecycle from the options; the old one is closed in the background."""
        opts = ctx.options
        old, self.tokens = self.tokens, None
        if old is not None:
            self._close_later(old)
        store = CredentialStore(resolve_home(opts.qwen_home or None))
        client = OAuthClient(opts.qwen_oauth_url, verify=_tls_context(opts.ssl_verify_upstream_trusted_ca))
        self.tokens = TokenManager(
            store,
            client,
            auth_timeout_s=opts.qwen_auth_timeout,
            listener=TerminalAnnouncer(open_browser=opts.qwen_open_browser),
        )

    def _close_later(self, tokens: TokenManager) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing of it ever ran
        task = loop.create_task(tokens.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def running(self):
        assert self.tokens is not None
        creds = self.tokens.usable()
        snapshot = self.tokens.snapshot()
        if creds is not None:
            log.info("Qwen credentials from %s, endpoint %s", self.tokens.store.path, creds.api_base())
        elif self.tokens.credentials is not None:
            log.info("Qwen token expired; it is refreshed on the next Qwen request")
        else:
            problem = f" ({snapshot.last_error})" if snapshot.last_error else ""
            log.warning(
                "not logged in to Qwen%s: the first Qwen API request starts a login "
                "(or run the qwen.login command)",
                problem,
            )

    def done(self):
        if self.tokens is not None:
            self._close_later(self.tokens)
            self.tokens = None

    # -- hooks -----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.tokens is None:
            return
        name = target_name(flow)
        if name not in self.hosts:
            account = self._account_origin(self.tokens.credentials)
            if account is None or name != account.host:
                return
        creds = self.tokens.usable()
        if creds is None:
            result = await self.tokens.acquire()
            if isinstance(result, Unavailable):
                self._answer_unavailable(flow, result)
                return
            creds = result
        self._inject(flow, name, creds)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if META not in flow.metadata or flow.response is None:
            return
        content_type = flow.response.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            # mitmproxy buffers bodies: without this, SSE answers arrive only when complete.
            flow.response.stream = True

    # -- the two outcomes ------------------------------------------------------------------

    def _inject(self, flow: http.HTTPFlow, name: str, creds: Credentials) -> None:
        request = flow.request
        account = self._account_origin(creds)
        routed = False
        if account is not None and ctx.options.qwen_route and name != account.host:
            path = routing.route(request.path, account)
            if path is not None:
                request.scheme, request.host, request.port = account.scheme, account.host, account.port
                request.path = path
                routed = True
        if not routed:
            # Send to the name we matched, never to a captured IP that merely claimed it, and over TLS.
            scheme = routing.secure_scheme(request.scheme, name)
            if (request.host, request.scheme) != (name, scheme):
                port = 443 if scheme != request.scheme and request.port == 80 else request.port
                request.scheme, request.host, request.port = scheme, name, port
        request.headers["Authorization"] = f"Bearer {creds.access_token}"
        for key, value in api_headers().items():
            request.headers[key] = value
        flow.metadata[META] = {"token": mask(creds.access_token), "routed": routed}
        self.counters["injected"] += 1
        if routed:
            flow.comment = f"qwen: routed to the account's endpoint {account.url}"

    def _answer_unavailable(self, flow: http.HTTPFlow, why: Unavailable) -> None:
        retry_after = max(ctx.options.qwen_retry_after, why.retry_after)
        extra: dict[str, Any] = {"retry_after": retry_after}
        if why.login is not None:
            assert self.tokens is not None
            extra.update(
                login_url=why.login.url,
                user_code=why.login.user_code,
                expires_in=why.login.seconds_left(self.tokens.clock()),
            )
        flow.request.stream = False  # a response and a streamed request body can't go together
        flow.response = http.Response.make(
            503,
            error_body(why.reason, "qwen_login_required", why.code, **extra),
            {
                "Content-Type": "application/json",
                "Retry-After": str(retry_after),
                # The openai SDKs retry when told so, honouring Retry-After.
                "X-Should-Retry": "true",
                "Cache-Control": "no-store",
            },
        )
        flow.metadata[META] = {"answered": why.code}
        flow.comment = f"qwen: answered 503 by the addon: {why.reason}"
        self.counters["unavailable"] += 1

    def _account_origin(self, creds: Credentials | None) -> routing.Origin | None:
        """The account's API origin, computed once per resource_url (not per request)."""
        if creds is None:
            return None
        key, origin = self._account
        if key != creds.resource_url or origin is None:
            try:
                origin = routing.parse_origin(creds.api_base())
            except ValueError:
                log.warning("ignoring the account's unusable resource_url %r", creds.resource_url)
                origin = None
            self._account = (creds.resource_url, origin)
        return origin

    # -- commands --------------------------------------------------------------------------

    @command.command("qwen.status")
    def status(self) -> str:
        """Show the Qwen login state (never the token)."""
        assert self.tokens is not None
        snap = self.tokens.snapshot()
        parts = [f"state: {snap.state.value}"]
        if snap.endpoint:
            parts.append(f"endpoint: {snap.endpoint}")
        if snap.expires_at:
            parts.append(f"expires in: {int(snap.expires_at - self.tokens.clock())} s")
        if snap.login:
            parts.append(f"login: {snap.login.url} code {snap.login.user_code}")
        if snap.last_error:
            parts.append(f"last error: {snap.last_error}")
        counters = {**snap.counters, **self.counters}
        if counters:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
        text = "; ".join(parts)
        log.info("qwen: %s", text)
        return text

    @command.command("qwen.login")
    def login(self) -> None:
        """Start a Qwen device-flow login now."""
        assert self.tokens is not None
        if not self.tokens.start_login(force=True):
            log.info("a Qwen login is already pending")

    @command.command("qwen.logout")
    def logout(self) -> None:
        """Delete the shared Qwen credentials (Qwen Code is logged out too)."""
        assert self.tokens is not None
        task = asyncio.get_running_loop().create_task(self.tokens.logout())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.warning("qwen: logged out; the next Qwen request starts a new login")


def _tls_context(extra_ca: str | None) -> ssl.SSLContext | bool:
    """Verification for OAuth calls: the system's CAs, plus mitmproxy's upstream CA file if set."""
    if not extra_ca:
        return True
    context = ssl.create_default_context()
    try:
        import certifi  # mitmproxy depends on it

        context.load_verify_locations(certifi.where())
    except ImportError:
        pass
    context.load_verify_locations(extra_ca)
    return context
