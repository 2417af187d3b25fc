"""The shared Envoy plumbing works end to end: templates, EnvoyProcess, echo upstream, both ext_authz modes, mTLS."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DENY_BODY, EnvoyFactory, GrpcAuthz, HttpAuthz
from tests.support.http import get
from tests.support.pki import TestCA

pytestmark = pytest.mark.e2e


_get = get


def _echoed(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def test_passthrough_reaches_echo_upstream(envoy_factory: EnvoyFactory) -> None:
    envoy = envoy_factory("passthrough")
    status, _, body = _get(envoy.listener_port(), "/hello?x=1", {"x-test": "yes"})
    assert status == 200
    echoed = _echoed(body)
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/hello?x=1"
    assert echoed["headers"]["x-test"] == "yes"


async def test_grpc_ext_authz_header_reaches_upstream(envoy_factory: EnvoyFactory, grpc_authz: GrpcAuthz) -> None:
    envoy = await asyncio.to_thread(envoy_factory, "extauthz-grpc", authz_port=grpc_authz.port)
    status, _, body = await asyncio.to_thread(
        _get, envoy.listener_port(), "/api", {"x-auth-subject": "forged", "authorization": "Bearer t"}
    )
    assert status == 200
    assert _echoed(body)["headers"]["x-auth-subject"] == "grpc-authz"  # overwritten, not appended
    assert len(grpc_authz.requests) == 1
    http_attrs = grpc_authz.requests[0].attributes.request.http
    assert http_attrs.path == "/api"
    assert http_attrs.headers["authorization"] == "Bearer t"


async def test_grpc_ext_authz_down_fails_closed_with_503(envoy_factory: EnvoyFactory) -> None:
    from tests.support.ports import free_port

    envoy = await asyncio.to_thread(envoy_factory, "extauthz-grpc", authz_port=free_port())
    status, _, _ = await asyncio.to_thread(_get, envoy.listener_port(), "/api")
    assert status == 503


async def test_http_ext_authz_allow_and_deny(envoy_factory: EnvoyFactory, http_authz: HttpAuthz) -> None:
    envoy = await asyncio.to_thread(envoy_factory, "extauthz-http", authz_port=http_authz.port)
    port = envoy.listener_port()

    status, _, body = await asyncio.to_thread(
        _get, port, "/ok", {"authorization": "Bearer t", "x-request-id": "r1", "x-other": "no"}
    )
    assert status == 200
    upstream_headers = _echoed(body)["headers"]
    assert upstream_headers["x-auth-subject"] == "http-authz"
    method, path, seen = http_authz.seen[-1]
    assert (method, path) == ("GET", "/ok")
    assert seen["authorization"] == "Bearer t"
    assert seen["x-request-id"] == "r1"
    assert "x-other" not in seen  # only allowed_headers reach the service

    status, headers, body = await asyncio.to_thread(_get, port, "/deny/this")
    assert status == 403
    assert body == DENY_BODY
    assert headers["x-meshgate-reason"] == "policy_denied"
    assert headers["content-type"] == "application/json"


async def test_mtls_listener_gives_spiffe_principal(
    envoy_factory: EnvoyFactory, grpc_authz: GrpcAuthz, tmp_path: Path
) -> None:
    spiffe_id = "spiffe://cluster.local/ns/shop/sa/checkout"
    ca = TestCA(tmp_path)
    server = ca.server()
    client = ca.spiffe_client(spiffe_id)
    envoy = await asyncio.to_thread(
        envoy_factory,
        "extauthz-grpc-mtls",
        authz_port=grpc_authz.port,
        server_cert=server.cert,
        server_key=server.key,
        client_ca=ca.ca_file,
    )
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    context.load_cert_chain(str(client.cert), str(client.key))

    status, _, body = await asyncio.to_thread(
        _get, envoy.listener_port(), "/svc", {"x-forwarded-client-cert": "By=forged;URI=spiffe://evil/x"}, context
    )
    assert status == 200
    assert grpc_authz.requests[-1].attributes.source.principal == spiffe_id
    xfcc = _echoed(body)["headers"]["x-forwarded-client-cert"]
    assert f"URI={spiffe_id}" in xfcc
    assert "evil" not in xfcc  # SANITIZE_SET replaced the client's header

    # Without a client certificate the handshake is refused.
    bare = ssl.create_default_context(cafile=str(ca.ca_file))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        await asyncio.to_thread(_get, envoy.listener_port(), "/svc", None, bare)
