"""Admin HTTP side: /healthz, /readyz, /metrics and a self-describing index; served by uvicorn in our loop.

Off the request path, so a framework (validation and OpenAPI for free) is worth its cost here.

uvicorn's own HTTP/1.1 protocol waits forever for a request's first byte and for the rest of a request once one byte
came (its keep-alive timer starts only after a response and stops at the next byte), accepts any number of
connections and any header size. ``_GuardedHttpToolsProtocol`` adds what a production server has
(``AdminLimits``): a request must arrive whole within ``request_timeout_s`` of the connection opening or of the
previous answer, a connection past ``max_connections`` is answered 503 and closed, a request head over
``max_head_bytes`` 431. Refusals half-close and linger briefly before closing, like the extauthz HTTP listener,
so the client reads the answer instead of a reset. Bodies are bounded where they are read (ratelimit's
``POST /json``: 64 KiB); of a body nobody reads, uvicorn holds at most 64 KiB per connection (it stops reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meshgate.admin_errors import error_json, install_error_handlers

log = logging.getLogger(__name__)


class ReadinessView(Protocol):
    """What /readyz reads; ``meshgate.runtime.Readiness`` implements it."""

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    def snapshot(self) -> dict[str, bool]: ...


_STARTUP_POLLS = 1000  # x 10 ms: uvicorn has no "started" event; bounded wait for it
_STARTUP_POLL_S = 0.01


def build_admin_app(
    readiness: ReadinessView,
    info: Mapping[str, Any],
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """``info`` names the process: ``name``, ``version``, ``service`` (anything else is echoed on ``/``)."""
    app = FastAPI(
        title=f"{info.get('name', 'meshgate')} admin",
        version=str(info.get("version", "0")),
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnect)
    async def client_left(_request: Request, _exc: ClientDisconnect) -> Response:
        # The client went, or was cut off (a body too slow): nobody to answer, nothing to log.
        return Response(status_code=400)

    @app.get("/healthz", summary="Liveness: 200 while the process runs")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 when every check passes and not draining, else 503")
    async def readyz() -> JSONResponse:
        ready = readiness.ready
        body = {
            "status": "ready" if ready else "not ready",
            "draining": readiness.draining,
            "checks": readiness.snapshot(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    for router in extra_routers:
        app.include_router(router)

    @app.get("/", summary="What this process is and which endpoints it serves")
    async def index() -> dict[str, Any]:
        # The OpenAPI schema lists every route, also those of included routers (which FastAPI mounts lazily).
        paths = set(app.openapi().get("paths", {}))
        return {**info, "endpoints": sorted(paths | {"/openapi.json"})}

    return app


@dataclass(frozen=True, slots=True)
class AdminLimits:
    """Bounds on the admin port's clients; the defaults leave room for probes, Prometheus and people."""

    request_timeout_s: float = 10.0  # a whole request, from the connection's start or the previous answer
    max_connections: int = 100  # open at once; past it a new connection gets 503 and is closed
    max_head_bytes: int = 64 * 1024  # request line + headers (431); the extauthz HTTP port's default too
    max_tail_bytes: int = 8 * 1024 * 1024  # what follows a head: body, chunk framing, trailers (413)
    linger_s: float = 1.0  # after a refusal is written and the connection half-closed, wait this long for the peer


class _AdminConfig(uvicorn.Config):
    def __init__(self, app: FastAPI, limits: AdminLimits, **kwargs: Any) -> None:
        super().__init__(app, http=_GuardedHttpToolsProtocol, ws="none", **kwargs)
        self.limits = limits


class _GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``AdminLimits`` (see the module's doc)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._limits = config.limits if isinstance(config, _AdminConfig) else AdminLimits()
        self._timer: asyncio.TimerHandle | None = None
        self._head_pending = True  # the next request's line and headers are not complete yet
        self._head_bytes = 0  # of the head, as the parser's callbacks saw it
        self._head_read_bytes = 0  # of the reads that were all head
        self._tail_read_bytes = 0  # of the reads that were all after the head
        self._messages_begun = 0
        # Set in a parser callback: the rest of the read is parsed but nothing more is kept or run, then this is
        # answered and the connection closed. (An exception raised in a callback would be answered 400 by uvicorn.)
        self._refusal: HTTPStatus | None = None
        self._lingering = False  # refused and half-closed: later input is read and dropped

    # -- connection ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            log.debug("admin: connection refused, %d open", len(self.connections) - 1)
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        head_pending, begun = self._head_pending, self._messages_begun
        super().data_received(data)
        if self._refusal is not None:
            self._refuse(self._refusal)
        elif not head_pending and not self._head_pending and begun == self._messages_begun:
            # All of this read came after the head of the request being received: body, chunk framing, trailers.
            # uvicorn stops reading a body nobody reads, but not a trailer line, which httptools keeps until it ends.
            self._tail_read_bytes += len(data)
            if self._tail_read_bytes > self._limits.max_tail_bytes:
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        elif head_pending and self._head_pending and begun == self._messages_begun:
            # All of this read is one head that is not over yet. httptools keeps a header line until it ends (no
            # callback sees it), so count the reads too, apart from the callbacks' count: an endless header line
            # is bounded, and no byte counts twice against the limit.
            self._head_read_bytes += len(data)
            if self._head_read_bytes > self._limits.max_head_bytes:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    # -- parser callbacks ------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._refusal is not None:
            return
        self._messages_begun += 1
        self._head_pending = True
        self._head_bytes = self._head_read_bytes = self._tail_read_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._within_head(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._within_head(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._head_pending = False
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._head_pending = True  # the next request's
        super().on_message_complete()
        if self._busy():
            self._disarm()  # the app answers now; the clock restarts with its answer

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()
        if not self.transport.is_closing() and not self._busy():
            self._arm()

    def _within_head(self, size: int) -> bool:
        """Count ``size`` more bytes of head; False once the request is refused (nothing more of it is kept)."""
        if self._refusal is not None:
            return False
        self._head_bytes += size
        if self._head_bytes > self._limits.max_head_bytes:
            self._refusal = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            return False
        return True

    # -- the request clock -----------------------------------------------------------------------------------
    def _busy(self) -> bool:
        """A request was read whole and its answer is not finished: the app's time, not the client's."""
        cycle = self.cycle
        return cycle is not None and not cycle.more_body and not cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self._limits.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._busy() or self.transport.is_closing():
            return
        log.debug("admin: connection closed, no whole request within %s s", self._limits.request_timeout_s)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app waits for a body that does not come
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- refusals --------------------------------------------------------------------------------------------
    def _refuse(self, status: HTTPStatus) -> None:
        """Answer ``status`` (unless the app has begun its answer), half-close, drop what follows, then close."""
        self._disarm()
        self._lingering = True
        transport = self.transport
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            # Only when pipelined: an earlier request is still being answered. Its answer, if any comes, is
            # dropped; its next receive() ends.
            cycle.disconnected = True
            cycle.message_event.set()
        if transport.is_closing():
            return
        if started:
            transport.abort()
            return
        answered = cycle is not None and cycle.response_complete  # this request has its answer: no second one
        if not answered:
            self._write_refusal(transport, status)
        if not transport.can_write_eof():  # pragma: no cover - TCP transports can half-close
            transport.close()
            return
        # Closing with unread input makes the kernel send a reset, which can destroy the answer: half-close, let
        # the peer read it and close, and cut it off after linger_s if it does not.
        transport.write_eof()
        self._timer = self.loop.call_later(self._limits.linger_s, transport.abort)

    @staticmethod
    def _write_refusal(transport: asyncio.Transport, status: HTTPStatus) -> None:
        body = error_json(status.value)  # the admin port's one error shape, as the app's errors
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status.value, status.phrase.encode(), len(body), body)
        )


class _NoSignalServer(uvicorn.Server):
    """uvicorn inside our loop: the runtime owns SIGTERM/SIGINT, uvicorn must not replace the handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task


async def serve_admin(app: FastAPI, host: str, port: int, limits: AdminLimits | None = None) -> AdminServer:
    """Bind ``host:port`` (0 = a free port) ourselves: a busy port fails here, loudly, and the port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound_port = int(sock.getsockname()[1])
    config = _AdminConfig(
        app,
        limits or AdminLimits(),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        server_header=False,
        # The client is the TCP peer: the /v1 guard trusts loopback peers, and X-Forwarded-For (which uvicorn
        # honours by default from the addresses in FORWARDED_ALLOW_IPS, an environment variable not ours) would
        # let a request name its own address.
        proxy_headers=False,
    )
    server = _NoSignalServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="meshgate-admin")
    for _ in range(_STARTUP_POLLS):
        if server.started or task.done():
            break
        await asyncio.sleep(_STARTUP_POLL_S)
    if not server.started:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()
        raise RuntimeError(f"admin server did not start on {host}:{bound_port}")
    return AdminServer(server, task, bound_port)
