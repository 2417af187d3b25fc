"""The admin app through uvicorn on a real loopback port."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST

from meshgate.admin import build_admin_app, serve_admin
from meshgate.runtime import Readiness


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


INFO = {"name": "meshgate", "version": "9.9", "service": "extauthz"}


async def test_endpoints() -> None:
    readiness = Readiness()
    router = APIRouter(prefix="/v1")

    @router.get("/limits")
    async def limits() -> dict[str, int]:
        return {"count": 0}

    server = await serve_admin(build_admin_app(readiness, INFO, [router]), "127.0.0.1", 0)
    try:
        assert server.port > 0
        status, _, body = await http_get(server.port, "/")
        index = json.loads(body)
        assert status == 200
        assert index["service"] == "extauthz"
        assert index["version"] == "9.9"
        assert {"/healthz", "/readyz", "/metrics", "/v1/limits", "/openapi.json"} <= set(index["endpoints"])

        assert (await http_get(server.port, "/healthz"))[:1] == (200,)
        status, _, body = await http_get(server.port, "/healthz")
        assert json.loads(body) == {"status": "ok"}

        status, _, body = await http_get(server.port, "/readyz")
        assert status == 200
        readiness.set("policy", False)
        status, _, body = await http_get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "not ready", "draining": False, "checks": {"policy": False}}
        readiness.set("policy", True)
        assert (await http_get(server.port, "/readyz"))[0] == 200
        readiness.start_draining()
        status, _, body = await http_get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["draining"] is True

        status, headers, body = await http_get(server.port, "/metrics")
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE_LATEST
        assert b"# TYPE" in body

        status, _, body = await http_get(server.port, "/openapi.json")
        assert status == 200
        assert "/readyz" in json.loads(body)["paths"]
        assert (await http_get(server.port, "/v1/limits"))[0] == 200
    finally:
        await server.stop()
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_busy_port_fails_loudly() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(OSError, match="in use"):
            await serve_admin(build_admin_app(Readiness(), INFO), "127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()
