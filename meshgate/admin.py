"""Admin HTTP side: /healthz, /readyz, /metrics and a self-describing index; served by uvicorn in our loop.

Off the request path, so a framework (validation and OpenAPI for free) is worth its cost here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


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


async def serve_admin(app: FastAPI, host: str, port: int) -> AdminServer:
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
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        server_header=False,
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
