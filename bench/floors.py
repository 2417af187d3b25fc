"""Do-nothing servers: the cost of each transport alone, the floor our services are compared with.

``python -m bench.floors grpc --port N``: grpc.aio Authorization server answering OK to every Check.
``python -m bench.floors http --port N [--answer FILE]``: raw asyncio protocol + httptools answering 200 to every
request (or with the bytes in FILE: extauthz's own allow answer, to price what Envoy does with it).
``python -m bench.floors rls --port N``: grpc.aio RateLimitService answering OK to every ShouldRateLimit.
``--batch-helper-threads`` (grpc, rls): with the scheduling tuning meshgate's runtime applies (``meshgate.threads``).
All on uvloop, all print ``floor-<kind> listening on HOST:PORT`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import httptools
import uvloop
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import status_pb2

from meshgate.threads import batch_helper_threads_while_serving

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))
# No statuses: a do-nothing RLS (Envoy then adds no X-RateLimit headers); the cost measured is the call alone.
_RLS_OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
_HTTP_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class _AllowAll(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:
        return _OK


class _NeverLimit(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        return _RLS_OK


class _HttpAllow(asyncio.Protocol):
    __slots__ = ("_answer", "_parser", "_transport")

    def __init__(self, answer: bytes = _HTTP_OK) -> None:
        self._answer = answer
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(self._answer)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_grpc(host: str, port: int, kind: str = "grpc", batch_helper_threads: bool = False) -> None:
    server = grpc.aio.server()
    if kind == "rls":
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(_NeverLimit(), server)
    else:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_AllowAll(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    tuning: asyncio.Task[None] | None = None
    if batch_helper_threads:  # the tuning meshgate's runtime applies, to price it apart from the services
        serving = asyncio.Event()
        serving.set()
        tuning = asyncio.get_running_loop().create_task(batch_helper_threads_while_serving(serving))
    print(f"floor-{kind} listening on {host}:{bound}", flush=True)
    await _wait_for_signal()
    if tuning is not None:
        tuning.cancel()
    await server.stop(grace=1)


async def serve_http(host: str, port: int, answer: bytes = _HTTP_OK) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _HttpAllow(answer), host, port)
    print(f"floor-http listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await _wait_for_signal()
    server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    parser.add_argument("kind", choices=("grpc", "http", "rls"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--answer", type=Path, help="http: answer with this file's bytes (a whole HTTP response)")
    parser.add_argument(
        "--batch-helper-threads", action="store_true", help="grpc, rls: grpc's helper threads as SCHED_BATCH"
    )
    args = parser.parse_args(argv)
    if args.kind == "http":
        uvloop.run(serve_http(args.host, args.port, args.answer.read_bytes() if args.answer else _HTTP_OK))
    else:
        uvloop.run(serve_grpc(args.host, args.port, args.kind, args.batch_helper_threads))


if __name__ == "__main__":
    main()
