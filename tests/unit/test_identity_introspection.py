"""OAuth2 token introspection (RFC 7662) against a real local endpoint: answers, caching, single flight, limits,
failures (fail closed, nothing cached, nothing secret logged), and the whole pipeline around it."""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extauthz.app import build_pipeline
from extauthz.config import IntrospectionSettings, TokenSource
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.http_json import FetchError, fetch_json
from extauthz.identity.introspection import IntrospectionProvider
from extauthz.identity.jwks import JwksRegistry
from extauthz.model import AuthenticationError, CheckInput, IdentityKind, Reason
from meshgate.devservers.jwks_server import JwksServer

NOW = 1_800_000_000.0
SECRET = "introspection-secret"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    async with JwksServer() as running:
        running.grant(
            "opaque-alice",
            {
                "sub": "alice",
                "client_id": "web",
                "scope": "orders:read orders:write",
                "roles": ["reader"],
                "tier": "gold",
                "exp": int(NOW) + 3600,
                "iss": "https://idp.test",
                "aud": ["orders-api", "other"],
            },
        )
        running.grant("opaque-machine", {"client_id": "billing-job", "exp": int(NOW) + 3600})
        yield running


def settings_for(server: JwksServer, **overrides: Any) -> IntrospectionSettings:
    values: dict[str, Any] = {
        "endpoint": server.introspection_endpoint,
        "client_id": "meshgate",
        "client_secret": SECRET,
        "timeout_s": 2.0,
    }
    values.update(overrides)
    return IntrospectionSettings(**values)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def provider(server: JwksServer, clock: Clock) -> AsyncIterator[IntrospectionProvider]:
    made = IntrospectionProvider(settings_for(server), clock)
    yield made
    await made.close()


def bearer(token: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/", headers={"authorization": f"Bearer {token}"})


async def introspected(provider: IntrospectionProvider, inp: CheckInput) -> Any:
    """authenticate, doing the refresh it asks for once (as the pipeline does)."""
    try:
        return provider.authenticate(inp)
    except RefreshNeeded as needed:
        refresh, answer = needed.refresh, (needed.status, needed.reason)
    assert answer == (503, Reason.INTROSPECTION_UNAVAILABLE)  # what the pipeline says if the refresh fails
    await refresh()
    return provider.authenticate(inp)


def calls(result: str) -> float:
    return REGISTRY.get_sample_value("meshgate_introspection_calls_total", {"result": result}) or 0.0


async def test_an_active_token_becomes_an_identity_and_is_cached(
    provider: IntrospectionProvider, server: JwksServer
) -> None:
    identity = await introspected(provider, bearer("opaque-alice"))
    assert identity.kind is IdentityKind.INTROSPECTION
    assert (identity.subject, identity.client, identity.tier) == ("alice", "web", "gold")
    assert identity.roles == {"reader"}
    assert identity.scopes == {"orders:read", "orders:write"}
    assert identity.issuer == "https://idp.test"
    assert identity.credential_header == "authorization"
    assert identity.expires_at == NOW + 60  # cache_seconds, before the token's exp
    assert provider.authenticate(bearer("opaque-alice")) is identity
    assert server.introspections == 1


async def test_a_client_credentials_token_is_named_by_its_client(provider: IntrospectionProvider) -> None:
    identity = await introspected(provider, bearer("opaque-machine"))
    assert (identity.subject, identity.client) == ("billing-job", "billing-job")


async def test_an_inactive_token_is_refused_and_the_refusal_cached(
    provider: IntrospectionProvider, server: JwksServer, clock: Clock
) -> None:
    with pytest.raises(AuthenticationError) as refused:
        await introspected(provider, bearer("opaque-unknown"))
    assert refused.value.reason is Reason.INACTIVE_TOKEN
    with pytest.raises(AuthenticationError):
        provider.authenticate(bearer("opaque-unknown"))
    assert server.introspections == 1
    clock.now += 10.5  # negative_cache_seconds passed: asked again
    with pytest.raises(RefreshNeeded):
        provider.authenticate(bearer("opaque-unknown"))


async def test_a_revoked_token_stops_when_its_cached_answer_runs_out(
    provider: IntrospectionProvider, server: JwksServer, clock: Clock
) -> None:
    await introspected(provider, bearer("opaque-alice"))
    server.revoke("opaque-alice")
    clock.now += 59
    assert provider.authenticate(bearer("opaque-alice")).subject == "alice"
    clock.now += 1.5
    with pytest.raises(AuthenticationError, match="not active"):
        await introspected(provider, bearer("opaque-alice"))


async def test_never_cached_past_the_token_exp(server: JwksServer, clock: Clock) -> None:
    server.grant("short", {"sub": "s", "exp": int(NOW) + 5})
    provider = IntrospectionProvider(settings_for(server, leeway_s=0), clock)
    identity = await introspected(provider, bearer("short"))
    assert identity.expires_at == NOW + 5
    clock.now += 5.5
    with pytest.raises(RefreshNeeded):
        provider.authenticate(bearer("short"))


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "x", "aud": "orders-api", "exp": int(NOW) - 100}, Reason.TOKEN_EXPIRED),
        ({"sub": "x", "aud": "orders-api", "nbf": int(NOW) + 100}, Reason.TOKEN_NOT_YET_VALID),
        ({"sub": "x", "aud": "orders-api", "exp": "soon"}, Reason.INVALID_TOKEN),
        ({"sub": "x", "iss": "https://elsewhere"}, Reason.INVALID_ISSUER),
        ({"sub": "x", "iss": "https://idp.test", "aud": "billing"}, Reason.INVALID_AUDIENCE),
        ({"sub": "x", "iss": "https://idp.test"}, Reason.INVALID_AUDIENCE),
        ({"scope": "a", "aud": ["orders-api"]}, Reason.INVALID_TOKEN),  # neither sub nor client_id
    ],
)
async def test_active_answers_are_still_checked(
    server: JwksServer, clock: Clock, claims: dict[str, Any], reason: Reason
) -> None:
    server.grant("t", claims)
    provider = IntrospectionProvider(
        settings_for(server, leeway_s=5, issuer="https://idp.test", audiences=("orders-api",)), clock
    )
    with pytest.raises(AuthenticationError) as refused:
        await introspected(provider, bearer("t"))
    assert refused.value.reason is reason


async def test_concurrent_requests_for_one_token_share_one_call(
    provider: IntrospectionProvider, server: JwksServer
) -> None:
    server.delay_s = 0.05
    identities = await asyncio.gather(*(introspected(provider, bearer("opaque-alice")) for _ in range(20)))
    assert {identity.subject for identity in identities} == {"alice"}
    assert server.introspections == 1


async def test_past_max_concurrent_a_token_is_not_introspected(server: JwksServer, clock: Clock) -> None:
    provider = IntrospectionProvider(settings_for(server, max_concurrent=1), clock)
    server.delay_s = 0.1
    busy = calls("busy")
    first = asyncio.ensure_future(introspected(provider, bearer("opaque-alice")))
    await asyncio.sleep(0.02)
    with pytest.raises(RefreshNeeded) as needed:
        provider.authenticate(bearer("opaque-machine"))
    await needed.value.refresh()  # returns at once without a call
    assert calls("busy") == busy + 1
    with pytest.raises(RefreshNeeded):
        provider.authenticate(bearer("opaque-machine"))
    assert (await first).subject == "alice"
    assert server.introspections == 1
    await provider.close()


@pytest.mark.parametrize("trouble", ["down", "503", "garbage", "list", "wrong-secret"])
async def test_a_failing_endpoint_caches_nothing_and_logs_no_secret(
    server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture, trouble: str
) -> None:
    overrides: dict[str, Any] = {"client_secret": "not-the-secret"} if trouble == "wrong-secret" else {}
    provider = IntrospectionProvider(settings_for(server, **overrides), clock)
    if trouble == "down":
        server.down()
    elif trouble == "503":
        server.fail(503)
    elif trouble in ("garbage", "list"):
        server.grant("opaque-alice", {})
        server._granted["opaque-alice"] = [1] if trouble == "list" else None  # type: ignore[assignment]
    errors = calls("error")
    with caplog.at_level(logging.WARNING), pytest.raises(RefreshNeeded):
        await introspected(provider, bearer("opaque-alice"))
    assert calls("error") == errors + 1
    assert "token introspection failed" in caplog.text
    assert "opaque-alice" not in caplog.text and SECRET not in caplog.text and "not-the-secret" not in caplog.text
    await provider.close()


async def test_a_token_found_in_another_source_strips_that_source(server: JwksServer, clock: Clock) -> None:
    sources = (TokenSource(header="authorization", prefix="Bearer "), TokenSource(header="x-token"))
    provider = IntrospectionProvider(settings_for(server, sources=sources), clock)
    await introspected(provider, bearer("opaque-alice"))
    other = CheckInput(method="GET", host="h", path="/", headers={"x-token": "opaque-alice"})
    assert provider.authenticate(other).credential_header == "x-token"
    assert provider.request_headers == {"authorization", "x-token"}
    with pytest.raises(AuthenticationError, match="empty"):
        provider.authenticate(bearer(""))
    with pytest.raises(AuthenticationError, match="too large"):
        provider.authenticate(bearer("x" * 20_000))
    assert provider.authenticate(CheckInput(method="GET", host="h", path="/")) is None


class _Redirecting(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_POST(self) -> None:
        self.seen.append((self.path, self.headers.get("authorization", "")))
        if self.path == "/introspect":
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "16")
            self.end_headers()
            self.wfile.write(b'{"active": true}')

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def redirecting() -> Iterator[http.server.HTTPServer]:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Redirecting.seen = []
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_a_call_with_credentials_never_follows_a_redirect(redirecting: http.server.HTTPServer) -> None:
    url = f"http://127.0.0.1:{redirecting.server_address[1]}/introspect"
    with pytest.raises(FetchError, match="307"):
        fetch_json(
            url,
            timeout_s=2,
            max_bytes=1024,
            data=b"token=t",
            headers={"Authorization": "Basic c2VjcmV0"},
            follow_redirects=False,
        )
    assert [path for path, _ in _Redirecting.seen] == ["/introspect"]


def test_fetch_json_refuses_other_schemes() -> None:
    with pytest.raises(FetchError, match="unsupported URL scheme"):
        fetch_json("file:///etc/passwd", timeout_s=1, max_bytes=10)


# -- through the pipeline, from a policy file ----------------------------------------------------------------
POLICY = """\
version: 1
identity:
  order: [jwt, introspection]
  jwt:
    issuers:
      - {{issuer: https://idp.test, audiences: [orders-api], jwks_uri: {jwks}}}
  introspection:
    endpoint: {endpoint}
    client_id: meshgate
    client_secret_env: TEST_INTROSPECTION_SECRET
    audiences: [orders-api]
rules:
  - name: readers
    match: {{path_prefixes: [/orders]}}
    identity: {{kinds: [introspection], scopes_all: [orders:read]}}
"""


async def test_the_pipeline_allows_denies_and_fails_closed(
    server: JwksServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(jwks=server.jwks_uri, endpoint=server.introspection_endpoint))
    registry = JwksRegistry()
    pipeline = build_pipeline(policy, registry)
    await pipeline.start()
    try:

        def request(token: str) -> CheckInput:
            return CheckInput(method="GET", host="h", path="/orders", headers={"authorization": f"Bearer {token}"})

        allowed = await pipeline.check(request("opaque-alice"))
        assert (allowed.status, allowed.identity and allowed.identity.subject) == (200, "alice")
        assert ("x-auth-subject", "alice") in allowed.headers_to_set
        assert "authorization" in allowed.headers_to_remove
        # An opaque token is no JWT: the introspection's verdict is the reason given, not "malformed token".
        unknown = await pipeline.check(request("opaque-nobody"))
        assert (unknown.status, unknown.reason) == (401, Reason.INACTIVE_TOKEN)
        # The endpoint down: a token not seen yet is answered 503, never let through; a cached one still works.
        server.down()
        failed = await pipeline.check(request("opaque-machine"))
        assert (failed.status, failed.reason) == (503, Reason.INTROSPECTION_UNAVAILABLE)
        assert (await pipeline.check(request("opaque-alice"))).status == 200
    finally:
        await pipeline.close()
        await registry.close()
