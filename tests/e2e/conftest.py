"""Fixtures that boot real Envoys (meshgate.envoy) in front of the echo upstream, plus tiny in-test authz servers.

- ``echo_upstream``: EchoThread on an ephemeral port (``.port``).
- ``envoy_factory(template, **values) -> EnvoyProcess``: renders ``envoy/<template>.yaml`` (``listen_port``
  defaults to 0, ``upstream_port`` to the echo upstream's port), starts Envoy, stops it after the test.
  ``envoy.listener_port()`` gives the bound port.
- ``grpc_authz``: an allow-all grpc.aio Authorization servicer that records CheckRequests and sets ``headers``.
- ``http_authz``: an HTTP ext_authz server: 200 + ``allow_headers``, or 403 + JSON body when the path starts
  with /deny; records the (method, path, headers) it saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import grpc
import httptools
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from meshgate.devservers.echo import EchoThread
from meshgate.envoy import EnvoyProcess, render

EnvoyFactory = Callable[..., EnvoyProcess]


@pytest.fixture
def echo_upstream() -> Iterator[EchoThread]:
    with EchoThread() as echo:
        yield echo


@pytest.fixture
def envoy_factory(echo_upstream: EchoThread) -> Iterator[EnvoyFactory]:
    started: list[EnvoyProcess] = []

    def factory(template: str, **values: object) -> EnvoyProcess:
        values.setdefault("listen_port", 0)
        values.setdefault("upstream_port", echo_upstream.port)
        envoy = EnvoyProcess()
        started.append(envoy)
        return envoy.start(render(template, **values))

    yield factory
    for envoy in started:
        envoy.stop()


@dataclass
class GrpcAuthz:
    port: int
    requests: list[external_auth_pb2.CheckRequest] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=lambda: {"x-auth-subject": "grpc-authz"})


class _AllowAll(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, state: GrpcAuthz) -> None:
        self.state = state

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.state.requests.append(request)
        headers = [
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, value=v),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in self.state.headers.items()
        ]
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse(headers=headers)
        )


@pytest.fixture
async def grpc_authz() -> AsyncIterator[GrpcAuthz]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    state = GrpcAuthz(port=port)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_AllowAll(state), server)
    await server.start()
    yield state
    await server.stop(grace=None)


@dataclass
class HttpAuthz:
    port: int
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    allow_headers: dict[str, str] = field(
        default_factory=lambda: {"x-auth-subject": "http-authz", "x-meshgate-md-tier": "gold"}
    )


DENY_BODY = b'{"error":{"code":"policy_denied","message":"denied by test","request_id":""}}'


class _HttpAuthzProtocol(asyncio.Protocol):
    def __init__(self, state: HttpAuthz) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_message_complete(self) -> None:
        path = self.url.decode()
        self.state.seen.append((self.parser.get_method().decode(), path, self.headers))
        if path.startswith("/deny"):
            status, headers, body = "403 Forbidden", {"content-type": "application/json"}, DENY_BODY
            headers["x-meshgate-reason"] = "policy_denied"
        else:
            status, headers, body = "200 OK", dict(self.state.allow_headers), b""
        lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


@pytest.fixture
async def http_authz() -> AsyncIterator[HttpAuthz]:
    state = HttpAuthz(port=0)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpAuthzProtocol(state), "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    yield state
    server.close()
