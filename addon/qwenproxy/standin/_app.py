"""The tornado application: HTTP in front of `Service`.

Handlers stay thin: record the request, apply an injected fault if one is queued, call the service,
and turn its exceptions into the error bodies real servers send (OAuth style on the OAuth
endpoints, OpenAI style on the API).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from ..profile import QWEN
from . import _pages, _payloads
from ._service import ApiError, Fault, OAuthError, Service

logger = logging.getLogger("qwenproxy.standin")

# Where DashScope serves the OpenAI-compatible API, besides portal.qwen.ai's plain /v1.
API_PREFIXES = ("/v1", "/compatible-mode/v1")


def make_app(service: Service, closing: asyncio.Event) -> tornado.web.Application:
    """The stand-in's routes. `closing` is set when the server shuts down (ends fault delays)."""
    args = {"service": service, "closing": closing}
    routes: list[Any] = [
        (QWEN.device_code_path, DeviceCodeHandler, args),
        (QWEN.token_path, TokenHandler, args),
        ("/authorize", AuthorizeHandler, args),
        (r"/_standin/(approve|deny)", DecideHandler, args),
        (r"/_standin/(revoke_access|revoke_refresh|expire_access)", TokensControlHandler, args),
        ("/_standin/counts", CountsHandler, args),
    ]
    for prefix in API_PREFIXES:
        routes.append((prefix + "/chat/completions", ChatHandler, args))
        routes.append((prefix + "/models", ModelsHandler, args))
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_log_request,
    )


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    note = getattr(handler, "note", "")
    logger.info(
        "%s %s %d%s %.1f ms",
        request.method,
        request.uri,
        handler.get_status(),
        f" {note}" if note else "",
        1000 * request.request_time(),
    )


class BaseHandler(tornado.web.RequestHandler):
    endpoint = ""  # the name faults and counters use; empty for pages and controls
    note = ""  # a word for the request log, e.g. the OAuth error code

    def initialize(self, service: Service, closing: asyncio.Event) -> None:
        self.service = service
        self.closing = closing

    def set_default_headers(self) -> None:
        self.set_header("Server", "qwen-standin")

    def compute_etag(self) -> None:
        return None  # an API answers fresh every time; no conditional requests

    def finish(self, chunk: Any = None) -> Any:
        # Counted before the answer leaves, so a client that got its 401 always sees the count.
        if self.get_status() == 401:
            self.service.count("unauthorized")
        return super().finish(chunk)

    def send_json(self, status: int, body: Any, **headers: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.set_header(name.replace("_", "-"), value)
        self.finish(json.dumps(body))

    def send_oauth_error(self, e: OAuthError) -> None:
        self.note = e.error
        self.send_json(e.status, e.body(), Cache_Control="no-store")

    def send_api_error(self, e: ApiError) -> None:
        self.note = e.code or e.type
        self.send_json(e.status, e.body())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (405, 500, ...) as JSON, like the rest of the API.
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": self._reason, "type": kind, "code": None}}))

    def record(self) -> None:
        r = self.request
        self.service.record(self.endpoint, r.method or "", r.path, r.headers, r.body)

    async def fault_served(self) -> bool:
        """Apply the next queued fault for this endpoint; True when it answered the request."""
        fault = self.service.take_fault(self.endpoint)
        if fault is None:
            return False
        self.note = "fault"
        if fault.delay > 0:
            try:
                await asyncio.wait_for(self.closing.wait(), fault.delay)
            except TimeoutError:
                pass
        if fault.reset or self.closing.is_set():
            self._reset_connection()
            return True
        if fault.status is None:
            return False
        self._send_fault(fault)
        return True

    def _send_fault(self, fault: Fault) -> None:
        self.set_status(fault.status)
        body = fault.body
        if isinstance(body, dict):
            self.set_header("Content-Type", "application/json")
            body = json.dumps(body)
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in fault.headers.items():
            self.set_header(name, value)
        self.finish(body)

    def _reset_connection(self) -> None:
        stream = self.detach()
        try:
            # Linger 0: close() sends a TCP RST, the rudest way a connection can end.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        stream.close()


class DeviceCodeHandler(BaseHandler):
    endpoint = "device_code"

    async def post(self) -> None:
        self.record()
        if await self.fault_served():
            return
        try:
            answer = self.service.device_authorization(
                self.request.headers.get("Content-Type"), self.request.body
            )
        except OAuthError as e:
            return self.send_oauth_error(e)
        self.send_json(200, answer, Cache_Control="no-store")


class TokenHandler(BaseHandler):
    endpoint = "token"

    async def post(self) -> None:
        self.record()
        if await self.fault_served():
            return
        try:
            answer = self.service.token(self.request.headers.get("Content-Type"), self.request.body)
        except OAuthError as e:
            return self.send_oauth_error(e)
        self.send_json(200, answer, Cache_Control="no-store", Pragma="no-cache")


class ChatHandler(BaseHandler):
    endpoint = "chat"

    async def post(self) -> None:
        self.record()
        if await self.fault_served():
            return
        try:
            self.service.authorize_api(self.request.headers.get("Authorization"))
            request = _payloads.parse_chat_request(self.request.body)
        except ApiError as e:
            return self.send_api_error(e)
        created = int(self.service.settings.clock())
        if not request.stream:
            return self.send_json(200, _payloads.completion(request, created))
        await self._stream(_payloads.stream_events(request, created, self.service.stream_chunks))

    async def _stream(self, events: list[dict]) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            for i, event in enumerate(events):
                self.write(f"data: {json.dumps(event)}\n\n")
                # Each event goes out on its own, so clients see the reply arrive in pieces.
                await self.flush()
                if i == 0:
                    await self._pass_gate()
            self.write("data: [DONE]\n\n")
            await self.finish()
        except StreamClosedError:
            self.note = "client gone"

    async def _pass_gate(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()

        def wake() -> None:  # called from whichever thread releases the gate
            loop.call_soon_threadsafe(lambda: opened.done() or opened.set_result(None))

        if self.service.park_stream(wake):
            await opened


class ModelsHandler(BaseHandler):
    endpoint = "models"

    async def get(self) -> None:
        self.record()
        if await self.fault_served():
            return
        try:
            self.service.authorize_api(self.request.headers.get("Authorization"))
        except ApiError as e:
            return self.send_api_error(e)
        self.send_json(200, _payloads.models_list(int(self.service.settings.clock())))


class AuthorizeHandler(BaseHandler):
    """The browser side of the device flow: show the code, take the user's decision."""

    def get(self) -> None:
        user_code = self.get_query_argument("user_code", "").strip()
        if not user_code:
            return self._html(200, _pages.enter_code())
        state = self.service.describe(user_code)
        if state is None:
            page = _pages.outcome("Unknown code", f"No device is waiting for {user_code}.", False)
            return self._html(404, page)
        if state == "expired":
            page = _pages.outcome("Code expired", "Start the sign-in again on the device.", False)
            return self._html(410, page)
        if state != "pending":
            page = _pages.outcome("Already handled", f"This code was already {state}.", False)
            return self._html(409, page)
        self._html(200, _pages.confirm(user_code.upper()))

    def post(self) -> None:
        user_code = self.get_body_argument("user_code", "")
        action = self.get_body_argument("action", "")
        if action not in ("approve", "deny") or not user_code:
            page = _pages.outcome("Bad request", "The form needs a user code and a decision.", False)
            return self._html(400, page)
        try:
            self.service.decide(user_code, approve=action == "approve")
        except LookupError as e:
            return self._html(400, _pages.outcome("Cannot do that", str(e), False))
        if action == "approve":
            page = _pages.outcome("Approved", "You may close this page.", True)
        else:
            page = _pages.outcome("Denied", "The device was not given access.", False)
        self._html(200, page)

    def _html(self, status: int, page: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page)


class DecideHandler(BaseHandler):
    """`POST /_standin/approve|deny`: the demo's remote control for the user's decision."""

    def post(self, action: str) -> None:
        user_code = self._argument("user_code")
        try:
            code = self.service.decide(user_code, approve=action == "approve")
        except LookupError as e:
            return self.send_json(404, {"error": "not_found", "error_description": str(e)})
        state = "approved" if action == "approve" else "denied"
        self.send_json(200, {"user_code": code, "state": state})

    def _argument(self, name: str) -> str | None:
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.startswith("application/json") and self.request.body:
            try:
                data = json.loads(self.request.body)
            except ValueError:
                data = None
            value = data.get(name) if isinstance(data, dict) else None
            return value if isinstance(value, str) and value else None
        return self.get_body_argument(name, None) or None


class TokensControlHandler(BaseHandler):
    """`POST /_standin/revoke_access|revoke_refresh|expire_access`: answers how many were hit."""

    def post(self, action: str) -> None:
        do = {
            "revoke_access": self.service.revoke_access_tokens,
            "revoke_refresh": self.service.revoke_refresh_tokens,
            "expire_access": self.service.expire_access_tokens,
        }[action]
        self.send_json(200, {"action": action, "tokens": do()})


class CountsHandler(BaseHandler):
    def get(self) -> None:
        self.send_json(200, dict(self.service.counts()))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        self.note = "not_found"
        message = f"No route for {self.request.method} {self.request.path}"
        error = {"message": message, "type": "invalid_request_error", "code": "not_found"}
        self.send_json(404, {"error": error})
