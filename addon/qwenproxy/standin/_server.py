"""`StandIn`: the service and its tornado app, running on their own event loop in a thread."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.netutil
from tornado.httpserver import HTTPServer

from ._app import make_app
from ._certs import CertPaths, write_certificates
from ._service import Fault, RecordedRequest, Service, Settings


class StandIn:
    """A local, strict imitation of Qwen's OAuth server and OpenAI-compatible API.

    Serves the device flow (with PKCE S256), token refresh, a verification page at `/authorize`,
    `/v1/chat/completions` and `/v1/models` (also under `/compatible-mode/v1`), and control
    endpoints under `/_standin/`. The server runs on its own event loop in a daemon thread, so
    sync and async tests, subprocesses and curl can all reach it; every control method is
    thread-safe.

    Arguments (all keyword-only):
    - `tls`: serve HTTPS with a throwaway CA (see `ca_path`); False serves plain HTTP.
    - `cert_dir`: where ca.pem, server.pem and server.key go; None uses a temporary directory
      removed on `stop()`.
    - `token_lifetime`, `device_code_lifetime`: seconds, measured with `clock`.
    - `interval`: sent as `interval` in device authorization answers when not None.
    - `min_poll_interval`: polls of one device code closer together than this (less 10% slack)
      get 429 slow_down. None: `interval` if set, else 2 s (Qwen Code's fixed pace). 0 disables.
    - `resource_url`: what token answers carry as `resource_url`; `{port}` is replaced by the
      port. None: the stand-in itself (`localhost:PORT`, or `http://localhost:PORT` without TLS).
    - `rotate_refresh`: a refresh answers with a new refresh token and revokes the old one;
      otherwise it answers with the same refresh token.
    - `clock`: the time source for every expiry and for poll spacing; tests pass a fake one.
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        cert_dir: str | Path | None = None,
        token_lifetime: float = 6 * 3600,
        device_code_lifetime: float = 600,
        interval: int | None = None,
        min_poll_interval: float | None = None,
        resource_url: str | None = None,
        rotate_refresh: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tls = tls
        self._cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._resource_url = resource_url
        self._service = Service(
            Settings(
                token_lifetime=token_lifetime,
                device_code_lifetime=device_code_lifetime,
                interval=interval,
                min_poll_interval=min_poll_interval,
                rotate_refresh=rotate_refresh,
                clock=clock,
            )
        )
        self._certs: CertPaths | None = None
        self._temp_dir: Path | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HTTPServer | None = None
        self._closing: asyncio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> StandIn:
        """Listen on `host`:`port` (0: any free port); return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("this StandIn was already started")
        ssl_context = self._make_ssl_context() if self.tls else None
        # Bound here, in the caller's thread, so a busy port raises right here.
        sockets = tornado.netutil.bind_sockets(port, address=host)
        self._port = sockets[0].getsockname()[1]
        self._service.base_url = self.base_url
        if self._resource_url is None:
            default = f"localhost:{self._port}"
            self._service.resource_url = default if self.tls else f"http://{default}"
        else:
            self._service.resource_url = self._resource_url.replace("{port}", str(self._port))

        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run,
            args=(sockets, ssl_context, ready, failure),
            name=f"qwen-standin-{self._port}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving: release held streams, cut open connections, end the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _make_ssl_context(self) -> ssl.SSLContext:
        cert_dir = self._cert_dir
        if cert_dir is None:
            cert_dir = self._temp_dir = Path(tempfile.mkdtemp(prefix="qwen-standin-"))
        self._certs = write_certificates(cert_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._certs.cert, self._certs.key)
        # HTTP/1.1 only: tornado speaks nothing else, and saying so spares clients a guess.
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _run(
        self,
        sockets: list,
        ssl_context: ssl.SSLContext | None,
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sockets, ssl_context))
        except BaseException as e:  # handed to start(), which re-raises it in the caller
            failure.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, sockets: list, ssl_context: ssl.SSLContext | None) -> None:
        # Created on the server loop: tornado binds the server to the running loop.
        self._closing = asyncio.Event()
        self._server = HTTPServer(make_app(self._service, self._closing), ssl_options=ssl_context)
        self._server.add_sockets(sockets)

    async def _shutdown(self) -> None:
        assert self._server is not None and self._closing is not None
        self._server.stop()
        # Unblock everything that waits (held streams, fault delays) so connections can close.
        self._service.release_streams()
        self._closing.set()
        try:
            await asyncio.wait_for(self._server.close_all_connections(), timeout=5)
        except TimeoutError:
            pass
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    # --- where it is ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("not started")
        return self._port

    @property
    def base_url(self) -> str:
        """`https://localhost:PORT` (or `http://...` without TLS); the certificate covers it."""
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"

    @property
    def api_base_url(self) -> str:
        """Where an OpenAI client points: `{base_url}/v1`."""
        return f"{self.base_url}/v1"

    @property
    def ca_path(self) -> Path | None:
        """The CA certificate (PEM) clients must trust; None without TLS. Known once started."""
        return self._certs.ca if self._certs else None

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client SSLContext trusting `ca_path`, for httpx's `verify=`; None without TLS."""
        if self.ca_path is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_path))

    @property
    def resource_url(self) -> str:
        """What token answers carry as `resource_url`."""
        return self._service.resource_url

    # --- the user's side of the device flow ----------------------------------------------------

    def approve(self, user_code: str | None = None) -> str:
        """Approve a pending device authorization (None: the most recent); return its code.

        Raises LookupError when that code is unknown, expired or already decided.
        """
        return self._service.decide(user_code, approve=True)

    def deny(self, user_code: str | None = None) -> str:
        """Deny a pending device authorization (None: the most recent); return its code."""
        return self._service.decide(user_code, approve=False)

    def pending_user_codes(self) -> list[str]:
        """User codes awaiting a decision and not expired, oldest first."""
        return self._service.pending_user_codes()

    def wait_for_device_code(self, timeout: float = 10) -> str:
        """Block until a device authorization request has arrived; return its user code.

        Each call returns the next code not returned before, in arrival order, so a request that
        came before the call is not missed. Raises TimeoutError.
        """
        return self._service.wait_for_device_code(timeout)

    async def wait_for_device_code_async(self, timeout: float = 10) -> str:
        """`wait_for_device_code` for async tests, without blocking their event loop."""
        return await asyncio.to_thread(self._service.wait_for_device_code, timeout)

    # --- tokens, directly ----------------------------------------------------------------------

    def mint_tokens(self, lifetime: float | None = None) -> dict[str, Any]:
        """Issue a valid token pair without a device flow; returns a token answer's JSON.

        `lifetime` (seconds, may be negative for an already expired token) defaults to
        token_lifetime. Lets tests seed a credential file.
        """
        return self._service.mint_tokens(lifetime)

    def revoke_access_tokens(self) -> int:
        """Revoke every access token issued so far (later ones are fine); return how many."""
        return self._service.revoke_access_tokens()

    def revoke_refresh_tokens(self) -> int:
        """Revoke every refresh token issued so far; return how many."""
        return self._service.revoke_refresh_tokens()

    def expire_access_tokens(self) -> int:
        """Make every access token issued so far expired now; return how many."""
        return self._service.expire_access_tokens()

    # --- faults and streaming ------------------------------------------------------------------

    def add_fault(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """Serve `fault` to the next `times` requests to `endpoint`.

        `endpoint` is one of "device_code", "token", "chat", "models". Faults queue up: one
        added later applies once earlier ones are used up.
        """
        self._service.add_fault(endpoint, fault, times)

    def clear_faults(self) -> None:
        self._service.clear_faults()

    @property
    def stream_chunks(self) -> int:
        """How many content chunks a streamed reply is cut into (default 4)."""
        return self._service.stream_chunks

    @stream_chunks.setter
    def stream_chunks(self, n: int) -> None:
        if n < 1:
            raise ValueError("stream_chunks must be at least 1")
        self._service.stream_chunks = n

    def hold_streams(self) -> None:
        """From now on, streamed replies stop after their first chunk until `release_streams()`."""
        self._service.hold_streams()

    def release_streams(self) -> None:
        """Let held streams finish, and stop holding new ones."""
        self._service.release_streams()

    def wait_first_chunk_sent(self, timeout: float = 10, count: int = 1) -> None:
        """Block until `count` streams, since `hold_streams()`, have flushed their first chunk
        and are held. Raises TimeoutError."""
        self._service.wait_first_chunk_sent(timeout, count)

    async def wait_first_chunk_sent_async(self, timeout: float = 10, count: int = 1) -> None:
        """`wait_first_chunk_sent` for async tests, without blocking their event loop."""
        await asyncio.to_thread(self._service.wait_first_chunk_sent, timeout, count)

    # --- observation ---------------------------------------------------------------------------

    @property
    def counts(self) -> Counter[str]:
        """A snapshot of the request counters: device_code, token, token_poll, token_refresh,
        chat, models, unauthorized (401s served), faults. Missing keys read as 0."""
        return self._service.counts()

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the API requests (chat, models) received, oldest first."""
        return self._service.api_requests()

    @property
    def oauth_requests(self) -> list[RecordedRequest]:
        """A snapshot of the OAuth requests (device_code, token) received, oldest first."""
        return self._service.oauth_requests()

    def reset_counts(self) -> None:
        """Zero the counters and forget recorded requests."""
        self._service.reset_counts()
