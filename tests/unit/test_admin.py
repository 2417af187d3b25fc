"""The admin app through uvicorn on a real loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable

import pytest
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST

from meshgate.admin import AdminLimits, AdminServer, build_admin_app, serve_admin
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


# -- limits: idle and slow clients, connection count, request size -----------------------------------------------

TIMEOUT_S = 0.5
LIMITS = AdminLimits(request_timeout_s=TIMEOUT_S, max_connections=4, max_head_bytes=4096, max_tail_bytes=65536)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Both loops: production serves on uvloop, whose transports differ."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def limited() -> AsyncIterator[AdminServer]:
    router = APIRouter()

    @router.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(3 * TIMEOUT_S)  # the app's time does not count against the client
        return {"status": "done"}

    @router.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    server = await serve_admin(build_admin_app(Readiness(), INFO, [router]), "127.0.0.1", 0, LIMITS)
    try:
        yield server
    finally:
        await server.stop()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a kept-alive connection (content-length framed): status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def closed_after(reader: asyncio.StreamReader) -> float:
    """Seconds until the server closes the connection (whatever it still sent is read and dropped)."""
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), 10):
        pass
    return time.monotonic() - started


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n"


async def test_a_connection_that_sends_nothing_is_closed(limited: AdminServer) -> None:
    reader, writer = await connect(limited.port)
    assert TIMEOUT_S * 0.8 < await closed_after(reader) < TIMEOUT_S + 2
    writer.close()


async def send_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: Iterable[bytes], pause_s: float
) -> float | None:
    """Send the pieces ``pause_s`` apart; seconds until the server closed, or None if it never did meanwhile."""
    started = time.monotonic()
    for piece in pieces:
        if reader.at_eof():
            return time.monotonic() - started
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            return time.monotonic() - started
        await asyncio.sleep(pause_s)
    return None


async def test_half_a_request_trickled_byte_by_byte_is_closed(limited: AdminServer) -> None:
    """Slowloris: every byte arrives before the previous one could time out, the request never ends."""
    reader, writer = await connect(limited.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Slow: " + b"a" * 100
    closed = await send_until_closed(reader, writer, (bytes([byte]) for byte in request), TIMEOUT_S / 5)
    assert closed is not None
    assert TIMEOUT_S * 0.8 < closed < TIMEOUT_S + 2
    writer.close()


async def test_a_body_that_never_ends_is_closed(limited: AdminServer, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await connect(limited.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: admin\r\nContent-Length: 100\r\n\r\nonly part of it")
    assert await closed_after(reader) < TIMEOUT_S + 2
    writer.close()
    await asyncio.sleep(0.1)  # the app, waiting for the rest, learns that the client is gone: no error logged
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_keep_alive_connection_serves_requests_and_the_app_time_is_not_the_clients(
    limited: AdminServer,
) -> None:
    reader, writer = await connect(limited.port)
    for _ in range(3):  # each within the timeout of the previous answer, together longer than it
        writer.write(GET_HEALTHZ)
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(TIMEOUT_S / 2)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: admin\r\n\r\n")
    status, body = await read_response(reader)
    assert (status, json.loads(body)) == (200, {"status": "done"})
    writer.write(GET_HEALTHZ)  # the clock restarted with the slow answer
    assert (await read_response(reader))[0] == 200
    assert await closed_after(reader) < TIMEOUT_S + 2  # and idle again: closed
    writer.close()


async def test_connections_past_the_cap_are_refused_503_until_one_closes(limited: AdminServer) -> None:
    held = [await connect(limited.port) for _ in range(LIMITS.max_connections)]
    reader, writer = await connect(limited.port)
    refused = await asyncio.wait_for(reader.read(), 10)
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"connection: close" in refused
    writer.close()
    _, held_writer = held.pop()
    held_writer.close()
    await asyncio.sleep(0.2)  # the server sees it close
    reader, writer = await connect(limited.port)
    writer.write(GET_HEALTHZ)
    assert (await read_response(reader))[0] == 200
    writer.close()
    for _, held_writer in held:
        held_writer.close()


async def test_idle_connections_free_their_slots(limited: AdminServer) -> None:
    """Filling the cap with silent connections blocks nobody for longer than the timeout."""
    held = [await connect(limited.port) for _ in range(LIMITS.max_connections)]
    for held_reader, _ in held:
        assert await closed_after(held_reader) < TIMEOUT_S + 2
    reader, writer = await connect(limited.port)
    writer.write(GET_HEALTHZ)
    assert (await read_response(reader))[0] == 200
    for _, held_writer in [*held, (reader, writer)]:
        held_writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(100)),
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Endless: " + b"v" * 10_000,  # a line that never ends
        b"GET /" + b"p" * 10_000,  # a request target that never ends
    ],
    ids=["many-headers", "endless-header-line", "endless-url"],
)
async def test_a_head_over_the_limit_is_refused_431(limited: AdminServer, head: bytes) -> None:
    reader, writer = await connect(limited.port)
    for start in range(0, len(head), 1000):  # in pieces, as a slow client sends it
        writer.write(head[start : start + 1000])
        await writer.drain()
        await asyncio.sleep(0.01)
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head_part  # the admin port's one error shape
    assert json.loads(body) == {
        "error": {"code": "request_header_fields_too_large", "message": "Request Header Fields Too Large"}
    }
    writer.close()
    assert (await http_get(limited.port, "/healthz"))[0] == 200  # the server itself is fine


async def test_a_head_under_the_limit_arriving_in_pieces_is_answered(limited: AdminServer) -> None:
    """Reads that were all head are counted apart from the parser's count, so no byte counts twice: a head of
    three quarters of the limit sent in small pieces is served (it was refused at about half the limit)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 40) for i in range(60))
    assert 0.6 * LIMITS.max_head_bytes < len(head) < 0.8 * LIMITS.max_head_bytes
    reader, writer = await connect(limited.port)
    for start in range(0, len(head), 200):
        writer.write(head[start : start + 200])
        await writer.drain()
        await asyncio.sleep(0.005)
    writer.write(b"\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_an_endless_trailer_line_is_cut_off() -> None:
    """uvicorn stops reading a body nobody reads, but a trailer line grows in the parser until it ends: reads after
    a head are bounded too (max_tail_bytes). The request was answered already (405 for POST /healthz), so the
    connection is closed without a second answer."""
    patient = AdminLimits(request_timeout_s=60, max_tail_bytes=65536)  # only the tail bound can end it in time
    server = await serve_admin(build_admin_app(Readiness(), INFO, []), "127.0.0.1", 0, patient)
    reader, writer = await connect(server.port)
    head = b"POST /healthz HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: "
    writer.write(head)
    await writer.drain()
    assert (await read_response(reader))[0] == 405
    try:
        for _ in range(100):  # 100 x 1 KiB, past the 64 KiB of LIMITS, well within its request timeout
            writer.write(b"v" * 1024)
            await writer.drain()
    except ConnectionError:
        pass
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no second answer
    writer.close()
    await server.stop()


async def test_the_client_is_the_tcp_peer_whatever_x_forwarded_for_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn would otherwise take the address from X-Forwarded-For for peers in FORWARDED_ALLOW_IPS ("*": any).
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    router = APIRouter()

    @router.get("/peer")
    async def peer(request: Request) -> dict[str, str]:
        return {"host": request.client.host if request.client else ""}

    server = await serve_admin(build_admin_app(Readiness(), INFO, [router]), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /peer HTTP/1.1\r\nHost: admin\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert json.loads(raw.partition(b"\r\n\r\n")[2]) == {"host": "127.0.0.1"}
    finally:
        await server.stop()
