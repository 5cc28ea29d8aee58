"""The mitmproxy face: options, hooks, commands. Hooks are short and delegate.

A request for a Qwen API host, from a client allowed to use the token:
- `requestheaders`: get a usable token (waiting for the one shared refresh if needed) and route
  the request; or answer at once with 503 + Retry-After + the login link while a login runs.
- `request`: put the token on the request, as late as possible, so the flow that mitmweb and the
  console show never carries it before it has to (streamed bodies get it in `requestheaders`).
- `responseheaders`: the token has gone upstream: replace it in the flow by a redacted form;
  stream server-sent events; on 401/403 prepare the one retry with a refreshed token.
- `response`: do that retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
from mitmproxy import command, ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from . import oauth, routing, status
from .oauth import OAuthClient, check_oauth_base_url, tls_verification
from .profile import QWEN, api_header_fields
from .store import Credentials, CredentialStore, LockTimeout, mask, resolve_home
from .terminal import TerminalAnnouncer
from .tokens import Snapshot, TokenManager, Unavailable
from .upstream import Resender

log = logging.getLogger(__name__)
# httpx logs every OAuth poll at INFO ("400 Bad Request" each second while a login is pending),
# which reads like an error in mitmdump's output. Our own lines tell the story.
logging.getLogger("httpx").setLevel(logging.WARNING)

META = "qwen"  # flow.metadata key of the flows we handle (saved with flows: never a token in it)
# A 401/403 for a token that a forced refresh produced less than this ago is not the token's
# fault (a model the account may not use, say): it passes through instead of refreshing again.
FORCED_REFRESH_QUIET_S = 60.0
_UNSET = object()


def target_name(flow: http.HTTPFlow) -> str:
    """The host name a request is for, in every proxy mode.

    Regular, upstream and reverse modes know it (CONNECT target, absolute URL, reverse target).
    Transparent, local and WireGuard capture only know an IP: the name comes from the TLS SNI, or
    for plain HTTP from the Host header. Such claims are only trusted because the request is then
    sent to that name (see `QwenAuth._route`), never to the captured IP.
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


def is_local_client(flow: http.HTTPFlow) -> bool:
    """Whether the client runs on this machine: a loopback peer, or traffic captured in local mode
    (which only sees this machine's processes). WireGuard and others face the network."""
    if isinstance(flow.client_conn.proxy_mode, mode_specs.LocalMode):
        return True
    try:
        return _is_loopback_peer(flow.client_conn.peername[0])
    except (IndexError, TypeError, AttributeError):
        return False


# Peers come back again and again: decide each address once.
_is_loopback_peer = functools.lru_cache(maxsize=256)(oauth.is_loopback_host)


@functools.lru_cache(maxsize=8)
def _token_forms(token: str) -> tuple[bytes, bytes, str]:
    """What a flow gets of a token, computed once per token: the Authorization value, its
    redacted form, the masked form for flow metadata."""
    return f"Bearer {token}".encode(), redacted(token).encode(), mask(token)


def replace_headers(headers: http.Headers, new: tuple[tuple[bytes, bytes], ...]) -> None:
    """Set several headers in one pass over the fields (each `headers[k] = v` is a pass of its own).
    Replaced headers keep their place; duplicates of them go; missing ones are appended."""
    wanted = {name.lower(): (name, value) for name, value in new}
    placed = set()
    out = []
    for field in headers.fields:
        key = field[0].lower()
        if key in wanted:
            if key not in placed:
                placed.add(key)
                out.append(wanted[key])
            continue
        out.append(field)
    headers.fields = (*out, *(pair for key, pair in wanted.items() if key not in placed))


def error_body(message: str, type_: str, code: str, **extra: Any) -> bytes:
    """An OpenAI-style error document, which SDKs show to their users."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}
    ).encode()


def redacted(token: str) -> str:
    """The Authorization value a flow keeps once the token went upstream (ASCII, never the token)."""
    return f"Bearer <qwen token redacted: {mask(token).replace('…', '...')}>"


def json_response(status_code: int, body: bytes, **headers: str) -> http.Response:
    return http.Response.make(
        status_code,
        body,
        {"Content-Type": "application/json", "Cache-Control": "no-store", **headers},
    )


@dataclasses.dataclass
class _Handled:
    """What the addon knows about one flow it put a token on. Kept off the flow (memory only)."""

    creds: Credentials
    injected: bool = False
    retry: bool = False


class QwenAuth:
    """Injects Qwen OAuth tokens into Qwen API requests; logs in with the device flow when needed."""

    def __init__(self) -> None:
        self.tokens: TokenManager | None = None
        self.resender: Resender | None = None
        self.hosts: frozenset[str] = frozenset(QWEN.api_hosts)
        self.counters: Counter[str] = Counter()
        self._account: tuple[object, routing.Origin | None] = (_UNSET, None)
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, _Handled] = weakref.WeakKeyDictionary()
        self._background: set[asyncio.Task] = set()
        self._forced: tuple[str, float] = ("", 0.0)  # the token a forced refresh gave, and when
        self._allow_remote = False
        self._route_enabled = True

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
        loader.add_option(
            "qwen_hold",
            int,
            0,
            "Seconds a Qwen request waits for a pending login to finish before it gets the 503; "
            "for clients without retries. 0: answer 503 at once.",
        )
        loader.add_option(
            "qwen_allow_remote",
            bool,
            False,
            "Let clients that are not on this machine use the Qwen token through the proxy. "
            "Off: they get 403.",
        )

    def configure(self, updated: set[str]):
        opts = ctx.options
        # Read here, not per request: every `ctx.options.x` read deep-copies the value.
        self._allow_remote = opts.qwen_allow_remote
        self._route_enabled = opts.qwen_route
        if "qwen_hosts" in updated:
            self._account = (_UNSET, None)  # trust in the account's endpoint depends on the hosts
            try:
                self.hosts = routing.parse_hosts(opts.qwen_hosts)
            except ValueError as e:
                raise exceptions.OptionsError(f"qwen_hosts: {e}") from e
        for name, high in (("qwen_retry_after", 3600), ("qwen_auth_timeout", 86400), ("qwen_hold", 3600)):
            value = getattr(opts, name)
            if name in updated and not 0 <= value <= high:
                raise exceptions.OptionsError(f"{name} must be between 0 and {high} seconds, got {value}")
        if "qwen_retry_after" in updated and opts.qwen_retry_after > 60:
            log.warning(
                "qwen_retry_after=%d: SDKs ignore long Retry-After values and stop retrying",
                opts.qwen_retry_after,
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
        rebuild = {"qwen_home", "qwen_oauth_url", "ssl_verify_upstream_trusted_ca", "ssl_insecure", "mode"}
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
        old_tokens, old_resender = self.tokens, self.resender
        self.tokens, self.resender = None, None
        if old_tokens is not None:
            self._spawn(old_tokens.aclose())
        if old_resender is not None:
            self._spawn(old_resender.aclose())
        verify = tls_verification(opts.ssl_verify_upstream_trusted_ca)
        store = CredentialStore(resolve_home(opts.qwen_home or None))
        self.tokens = TokenManager(
            store,
            OAuthClient(opts.qwen_oauth_url, verify=verify),
            auth_timeout_s=opts.qwen_auth_timeout,
            listener=TerminalAnnouncer(open_browser=opts.qwen_open_browser),
        )
        self.resender = Resender(
            verify=False if opts.ssl_insecure else verify, proxy=_upstream_proxy(opts.mode)
        )

    def _spawn(self, coro) -> asyncio.Task | None:
        """Run `coro` in the background, owned by the addon; its failure is logged."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()  # no loop: nothing of it ever ran
            return None
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

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
                "(or run the qwen.login command, or open the status page: %s)",
                problem,
                _status_page_hint(ctx.options),
            )
        self._warn_if_exposed()

    def _warn_if_exposed(self) -> None:
        opts = ctx.options
        if not opts.qwen_allow_remote or ("proxyauth" in opts and opts.proxyauth):
            return
        exposed = [
            spec
            for spec in opts.mode
            if not isinstance(mode_specs.ProxyMode.parse(spec), mode_specs.LocalMode)
            and not _is_loopback_listen(mode_specs.ProxyMode.parse(spec).listen_host(opts.listen_host))
        ]
        if exposed:
            log.warning(
                "qwen_allow_remote is on and mitmproxy listens beyond loopback (%s) without "
                "proxyauth: anyone who can reach it can use your Qwen account",
                ", ".join(exposed),
            )

    def done(self):
        # Flows still in flight are saved by `-w` on exit: take the token off them first.
        for flow, handled in list(self._flows.items()):
            if handled.injected:
                self._redact(flow, handled)
        if self.tokens is not None:
            self._spawn(self.tokens.aclose())
            self.tokens = None
        if self.resender is not None:
            self._spawn(self.resender.aclose())
            self.resender = None

    # -- hooks -----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.tokens is None:
            return
        name = target_name(flow)
        # The magic host is ours; the reserved path only on Qwen hosts (never shadowing, nor
        # reachable same-origin from, any other site).
        serve_status = name == status.MAGIC_HOST
        if not serve_status:
            if name not in self.hosts:
                account = self._account_origin(self.tokens.credentials)
                if account is None or name != account.host:
                    return
            serve_status = status.is_status_request(name, flow.request.path)
        if not self._allow_remote and not is_local_client(flow):
            self._answer_remote(flow)
            return
        if serve_status:
            self._serve_status(flow)
            return
        creds = self.tokens.usable() or await self._acquire(flow)
        if creds is None:
            return
        self._route(flow, name, creds)
        handled = self._flows[flow] = _Handled(creds)
        if flow.request.stream:
            self._inject(flow, handled)  # the headers leave before `request` runs

    async def request(self, flow: http.HTTPFlow) -> None:
        handled = self._flows.get(flow)
        if handled is None or handled.injected or flow.response or flow.error:
            return
        if not handled.creds.is_usable(self.tokens.clock() if self.tokens else 0):
            # The body took long to arrive and the token expired meanwhile.
            creds = await self._acquire(flow)
            if creds is None:
                return
            handled.creds = creds
        self._inject(flow, handled)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        handled = self._flows.get(flow)
        if handled is None or flow.response is None:
            return
        self._redact(flow, handled)
        response = flow.response
        if response.status_code in (401, 403) and not handled.retry:
            self.counters["upstream_401"] += 1
            handled.retry = True
            response.stream = False  # keep the small error body: the retry decides what the client gets
            return
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            # mitmproxy buffers bodies: without this, SSE answers arrive only when complete.
            response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        handled = self._flows.pop(flow, None)  # the flow is done with: mitmweb may keep it for long
        if handled is None or not handled.retry or not flow.live:
            return
        await self._retry_rejected(flow, handled)

    def error(self, flow: http.HTTPFlow) -> None:
        handled = self._flows.pop(flow, None)
        if handled is not None:
            self._redact(flow, handled)

    # -- getting a token -------------------------------------------------------------------

    async def _acquire(self, flow: http.HTTPFlow) -> Credentials | None:
        """A usable token, or None after answering the flow (503; held up to `qwen_hold` first)."""
        assert self.tokens is not None
        tokens = self.tokens
        hold = ctx.options.qwen_hold
        deadline = tokens.clock() + hold
        while True:
            result = await tokens.acquire()
            if isinstance(result, Credentials):
                return result
            left = deadline - tokens.clock()
            if left <= 0 or not tokens.login_running():
                break
            try:
                await asyncio.wait_for(tokens.wait_login(), left)
            except TimeoutError:
                pass
        self._answer_unavailable(flow, result)
        return None

    # -- what a flow gets ------------------------------------------------------------------

    def _route(self, flow: http.HTTPFlow, name: str, creds: Credentials) -> None:
        """Point the request at the account's endpoint, or at least at the matched name over TLS."""
        request = flow.request
        account = self._account_origin(creds)
        if account is not None and self._route_enabled and name != account.host:
            path = routing.route(request.path, account)
            if path is not None:
                request.scheme, request.host, request.port = account.scheme, account.host, account.port
                request.path = path
                flow.comment = f"qwen: routed to the account's endpoint {account.url}"
                return
        # Send to the name we matched, never to a captured IP that merely claimed it, and over TLS.
        scheme = routing.secure_scheme(request.scheme, name)
        if (request.host, request.scheme) != (name, scheme):
            port = 443 if scheme != request.scheme and request.port == 80 else request.port
            request.scheme, request.host, request.port = scheme, name, port

    def _inject(self, flow: http.HTTPFlow, handled: _Handled) -> None:
        bearer, _, masked = _token_forms(handled.creds.access_token)
        replace_headers(flow.request.headers, ((b"Authorization", bearer), *api_header_fields()))
        handled.injected = True
        flow.metadata[META] = {"token": masked}
        self.counters["injected"] += 1

    def _redact(self, flow: http.HTTPFlow, handled: _Handled) -> None:
        bearer, hidden, _ = _token_forms(handled.creds.access_token)
        headers = flow.request.headers
        fields = headers.fields
        for i, (name, value) in enumerate(fields):
            if value == bearer and name.lower() == b"authorization":
                headers.fields = (*fields[:i], (name, hidden), *fields[i + 1 :])
                return

    async def _retry_rejected(self, flow: http.HTTPFlow, handled: _Handled) -> None:
        """The API rejected the token: refresh once (shared) and send the request once more."""
        assert self.tokens is not None and self.resender is not None and flow.response is not None
        rejected = flow.response.status_code
        forced_token, forced_at = self._forced
        if (
            handled.creds.access_token == forced_token
            and self.tokens.clock() - forced_at < FORCED_REFRESH_QUIET_S
        ):
            log.info("Qwen API answered %d for a token refreshed just now: passing it through", rejected)
            return
        log.info(
            "Qwen API answered %d for %s; refreshing the token and retrying once", rejected, flow.request.url
        )
        try:
            creds = await self.tokens.refresh(rejected=handled.creds)
        except oauth.InvalidGrant:
            self._answer_unavailable(flow, await self.tokens.login_pending())
            return
        except (oauth.OAuthError, LockTimeout, OSError) as e:
            log.warning("token refresh after an upstream %d failed: %s", rejected, e)
            return  # the client gets the upstream's answer as it was
        if creds.access_token != handled.creds.access_token and creds.access_token != forced_token:
            self._forced = (creds.access_token, self.tokens.clock())
        if flow.response.stream:
            # mitmproxy streamed the answer anyway (stream_large_bodies below its size): it has
            # reached the client; the next request gets the new token.
            return
        if flow.request.stream or flow.request.raw_content is None:
            flow.response = json_response(
                503,
                error_body(
                    f"The Qwen API rejected the token ({rejected}); it has been refreshed, but this "
                    "request's body was streamed and cannot be sent again. Retry the request.",
                    "qwen_token_rejected",
                    "retry_request",
                ),
                **{"Retry-After": "0", "X-Should-Retry": "true"},
            )
            flow.comment = f"qwen: upstream {rejected}; token refreshed; streamed body not replayable"
            return
        headers = {"Authorization": f"Bearer {creds.access_token}"}
        try:
            answer = await self.resender.send(flow.request, headers)
        except httpx.HTTPError as e:
            log.warning("retry after an upstream %d failed: %s", rejected, e)
            flow.response = json_response(
                502,
                error_body(
                    f"Retrying the request with a refreshed token failed: {e}",
                    "qwen_retry_failed",
                    "bad_gateway",
                ),
            )
            return
        handled.creds = creds
        flow.response = answer
        flow.comment = (
            f"qwen: upstream answered {rejected}; token refreshed and request retried ({answer.status_code})"
        )
        self.counters["retried"] += 1

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
        kind = "qwen_token_unavailable" if why.code == "token_refresh_failed" else "qwen_login_required"
        flow.request.stream = False  # a response and a streamed request body can't go together
        flow.response = json_response(
            503,
            error_body(why.reason, kind, why.code, **extra),
            # The openai SDKs retry when told so, honouring Retry-After.
            **{"Retry-After": str(retry_after), "X-Should-Retry": "true"},
        )
        flow.metadata[META] = {"answered": why.code}
        flow.comment = f"qwen: answered 503 by the addon: {why.reason}"
        self.counters["unavailable"] += 1

    def _answer_remote(self, flow: http.HTTPFlow) -> None:
        flow.request.stream = False
        flow.response = json_response(
            403,
            error_body(
                "This proxy lends its Qwen login only to clients on its own machine. To allow "
                "others, start it with --set qwen_allow_remote=true (and protect it with proxyauth).",
                "forbidden",
                "qwen_remote_client",
            ),
        )
        flow.comment = "qwen: refused a client that is not on this machine"
        self.counters["refused_remote"] += 1

    def _account_origin(self, creds: Credentials | None) -> routing.Origin | None:
        """The account's API origin, computed once per resource_url (not per request)."""
        if creds is None:
            return None
        key, origin = self._account
        if key != creds.resource_url:
            try:
                origin = routing.parse_origin(creds.api_base())
            except ValueError:
                log.warning("ignoring the account's unusable resource_url %r", creds.resource_url)
                origin = None
            if origin is not None and not routing.trusted_origin(origin, self.hosts, QWEN.trusted_domains):
                log.warning(
                    "the account's endpoint %s is not a Qwen host (qwen_hosts, *.qwen.ai) nor "
                    "https: no token is sent there",
                    origin.url,
                )
                origin = None
            self._account = (creds.resource_url, origin)
        return origin

    # -- status page and commands ----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        assert self.tokens is not None
        snap = self.tokens.snapshot()
        return dataclasses.replace(snap, counters={**snap.counters, **self.counters})

    def _serve_status(self, flow: http.HTTPFlow) -> None:
        assert self.tokens is not None
        page = status.respond(
            flow.request.method,
            target_name(flow),
            flow.request.path,
            flow.request.headers,
            self.snapshot(),
            self.tokens.clock(),
            local_client=is_local_client(flow),
            actions=self,
        )
        flow.request.stream = False
        flow.response = http.Response.make(page.status, page.body, page.headers)
        flow.metadata[META] = {"status_page": True}

    @command.command("qwen.status")
    def status(self) -> str:
        """Show the Qwen login state (never the token)."""
        assert self.tokens is not None
        snap = self.snapshot()
        parts = [f"state: {snap.state.value}"]
        if snap.endpoint:
            parts.append(f"endpoint: {snap.endpoint}")
        if snap.expires_at:
            parts.append(f"expires in: {int(snap.expires_at - self.tokens.clock())} s")
        if snap.login:
            parts.append(f"login: {snap.login.url} code {snap.login.user_code}")
        if snap.last_error:
            parts.append(f"last error: {snap.last_error}")
        if snap.counters:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(snap.counters.items())))
        text = "; ".join(parts)
        log.info("qwen: %s", text)
        return text

    @command.command("qwen.login")
    def login(self) -> str:
        """Start a Qwen device-flow login now."""
        assert self.tokens is not None
        if self.tokens.start_login(force=True):
            return "Qwen login started"
        return "a Qwen login is already pending"

    @command.command("qwen.logout")
    def logout(self) -> str:
        """Delete the shared Qwen credentials (Qwen Code is logged out too)."""
        assert self.tokens is not None
        self._spawn(self.tokens.logout())
        log.warning("qwen: logged out; the next Qwen request starts a new login")
        return "logged out"


def _status_page_hint(opts) -> str:
    """Where the status page is, in the words of the first proxy mode."""
    mode = mode_specs.ProxyMode.parse(opts.mode[0]) if opts.mode else None
    if isinstance(mode, mode_specs.ReverseMode):
        host = mode.listen_host(opts.listen_host) or "127.0.0.1"
        port = mode.listen_port(opts.listen_port)
        if not port:  # -p 0: the port the OS picked
            server = ctx.master.addons.get("proxyserver")
            addrs = server.listen_addrs() if server else []
            port = addrs[0][1] if addrs else port
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{status.PATH_PREFIX}/"
    return f"http://{status.MAGIC_HOST}/ through the proxy"


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("qwen background task failed", exc_info=task.exception())


def _is_loopback_listen(host: str) -> bool:
    return bool(host) and oauth.is_loopback_host(host)


def _upstream_proxy(modes: Sequence[str]) -> str | None:
    """The upstream proxy of mitmproxy's upstream mode, which the retry must use too."""
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.UpstreamMode):
            return f"{mode.scheme}://{mode.address[0]}:{mode.address[1]}"
    return None
