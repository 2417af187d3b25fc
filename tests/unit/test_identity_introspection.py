"""OAuth2 token introspection (RFC 7662) against a real local endpoint: answers, caching, single flight, limits,
failures (fail closed, nothing cached, nothing secret logged), and the whole pipeline around it."""

from __future__ import annotations

import asyncio
import http.server
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extauthz.app import ExtauthzService, build_pipeline, watched_files
from extauthz.config import IntrospectionSettings, TokenSource
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.introspection import IntrospectionProvider, IntrospectionRegistry
from extauthz.identity.jwks import JwksRegistry
from extauthz.model import AuthenticationError, CheckInput, IdentityKind, Reason
from extauthz.pipeline import Pipeline
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import generate_rsa_key, mint_token
from tests.support.pki import TestCA

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
    made = IntrospectionProvider(settings_for(server), clock=clock)
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
    provider = IntrospectionProvider(settings_for(server, leeway_s=0), clock=clock)
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
        settings_for(server, leeway_s=5, issuer="https://idp.test", audiences=("orders-api",)), clock=clock
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


async def test_calls_past_max_concurrent_wait_their_turn(server: JwksServer, clock: Clock) -> None:
    """A burst of new tokens is queued, not refused: at most max_concurrent calls at once, all answered."""
    provider = IntrospectionProvider(settings_for(server, max_concurrent=2), clock=clock)
    tokens = [f"burst-{n}" for n in range(12)]
    for token in tokens:
        server.grant(token, {"sub": token})
    server.delay_s = 0.02
    identities = await asyncio.gather(*(introspected(provider, bearer(token)) for token in tokens))
    assert [identity.subject for identity in identities] == tokens
    assert server.introspections == 12
    assert (provider.state.queued, provider.state.inflight) == (0, {})
    await provider.close()


async def test_past_the_queue_a_new_token_is_answered_503_at_once(server: JwksServer, clock: Clock) -> None:
    provider = IntrospectionProvider(settings_for(server, max_concurrent=1), clock=clock)
    server.delay_s = 0.2
    busy = calls("busy")
    queued = [asyncio.ensure_future(introspected(provider, bearer(f"q-{n}"))) for n in range(8)]  # 1 x 8 slots
    await asyncio.sleep(0.05)
    with pytest.raises(RefreshNeeded) as needed:
        provider.authenticate(bearer("one-too-many"))
    await needed.value.refresh()  # returns at once without a call
    assert calls("busy") == busy + 1
    for waiting in queued:
        waiting.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    await provider.close()


async def test_cache_size_zero_still_answers_every_waiter(server: JwksServer, clock: Clock) -> None:
    """The answers of concurrent calls never push one another out before their waiters read them."""
    provider = IntrospectionProvider(settings_for(server, cache_size=0, max_concurrent=4), clock=clock)
    tokens = [f"small-{n}" for n in range(20)]
    for token in tokens:
        server.grant(token, {"sub": token})
    identities = await asyncio.gather(*(introspected(provider, bearer(token)) for token in tokens))
    assert [identity.subject for identity in identities] == tokens
    await provider.close()


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "x", "token_use": "refresh_token"},  # Ory Hydra
        {"sub": "x", "typ": "Refresh"},  # Keycloak
        {"sub": "x", "typ": "Offline"},
        {"sub": "x", "typ": "ID"},
        {"sub": "x", "token_type": "refresh_token"},
        {"sub": "x", "token_type": 7},
    ],
)
async def test_only_access_tokens_are_credentials(server: JwksServer, clock: Clock, claims: dict[str, Any]) -> None:
    """A leaked refresh token must not work against the APIs, whatever the endpoint says about being active."""
    server.grant("not-access", claims)
    provider = IntrospectionProvider(settings_for(server), clock=clock)
    with pytest.raises(AuthenticationError, match="not an access token") as refused:
        await introspected(provider, bearer("not-access"))
    assert refused.value.reason is Reason.INVALID_TOKEN
    server.grant("access", {"sub": "x", "typ": "Bearer", "token_type": "Bearer", "token_use": "access_token"})
    assert (await introspected(provider, bearer("access"))).subject == "x"


async def test_client_credentials_are_form_encoded_before_basic(server: JwksServer, clock: Clock) -> None:
    """RFC 6749 2.3.1: id and secret are form-urlencoded, then joined by ':' and base64'd (a ':' or '+' in them
    would otherwise be read as another id or secret)."""
    server.introspection_client = ("meshgate:eu", "s3cr+t/:& =x")
    provider = IntrospectionProvider(
        settings_for(server, client_id="meshgate:eu", client_secret="s3cr+t/:& =x"), clock=clock
    )
    assert (await introspected(provider, bearer("opaque-alice"))).subject == "alice"


async def test_timeout_seconds_bounds_the_whole_call(clock: Clock) -> None:
    """An endpoint that sends its answer a byte at a time, each within any per-read timeout, is cut off at
    timeout_seconds from the start, and its slot is free again."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"active": true}':
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = IntrospectionSettings(
        endpoint=f"http://127.0.0.1:{port}/introspect", client_id="c", client_secret="s", timeout_s=0.3
    )
    provider = IntrospectionProvider(settings, clock=clock)
    started = asyncio.get_running_loop().time()
    with pytest.raises(RefreshNeeded):
        await introspected(provider, bearer("slow"))
    assert asyncio.get_running_loop().time() - started < 2.5  # bounded: the whole answer would take ~3 s
    assert (provider.state.queued, provider.state.inflight) == (0, {})
    await provider.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("trouble", ["down", "503", "garbage", "list", "wrong-secret"])
async def test_a_failing_endpoint_caches_nothing_and_logs_no_secret(
    server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture, trouble: str
) -> None:
    overrides: dict[str, Any] = {"client_secret": "not-the-secret"} if trouble == "wrong-secret" else {}
    provider = IntrospectionProvider(settings_for(server, **overrides), clock=clock)
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
    provider = IntrospectionProvider(settings_for(server, sources=sources), clock=clock)
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
            self.send_header("Content-Length", "31")
            self.end_headers()
            self.wfile.write(b'{"active": true, "sub": "evil"}')

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


async def test_a_redirect_is_never_followed(redirecting: http.server.HTTPServer, clock: Clock) -> None:
    """Following it would send the client credentials and the token wherever the redirect points."""
    endpoint = f"http://127.0.0.1:{redirecting.server_address[1]}/introspect"
    provider = IntrospectionProvider(
        IntrospectionSettings(endpoint=endpoint, client_id="c", client_secret="s"), clock=clock
    )
    with pytest.raises(RefreshNeeded):
        await introspected(provider, bearer("t"))
    assert [path for path, _ in _Redirecting.seen] == ["/introspect"]
    await provider.close()


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
    identity: {{kinds: [introspection, jwt], scopes_all: [orders:read]}}
  - name: docs
    public: true
    match: {{path_prefixes: [/docs]}}
  - name: no-debug
    effect: deny
    match: {{path_prefixes: [/debug]}}
  - name: no-gold-on-docs-admin
    effect: deny
    match: {{path_prefixes: [/docs/admin]}}
    identity: {{tiers: [gold]}}
{extra_rules}"""


def request(path: str, token: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path=path, headers={"authorization": f"Bearer {token}"})


@pytest.fixture
def policy_file(server: JwksServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(jwks=server.jwks_uri, endpoint=server.introspection_endpoint, extra_rules=""))
    return policy


async def test_the_pipeline_allows_denies_and_fails_closed(server: JwksServer, policy_file: Path) -> None:
    registry = JwksRegistry()
    pipeline = build_pipeline(policy_file, registry)
    await pipeline.start()
    try:
        allowed = await pipeline.check(request("/orders", "opaque-alice"))
        assert (allowed.status, allowed.identity and allowed.identity.subject) == (200, "alice")
        assert ("x-auth-subject", "alice") in allowed.headers_to_set
        assert "authorization" in allowed.headers_to_remove
        # An opaque token is no JWT: the introspection's verdict is the reason given, not "malformed token".
        unknown = await pipeline.check(request("/orders", "opaque-nobody"))
        assert (unknown.status, unknown.reason) == (401, Reason.INACTIVE_TOKEN)
        # The endpoint down: a token not seen yet is answered 503, never let through; a cached one still works.
        server.down()
        failed = await pipeline.check(request("/orders", "opaque-machine"))
        assert (failed.status, failed.reason) == (503, Reason.INTROSPECTION_UNAVAILABLE)
        assert (await pipeline.check(request("/orders", "opaque-alice"))).status == 200
    finally:
        await pipeline.close()
        await registry.close()


async def test_a_jwt_of_a_configured_issuer_is_judged_by_the_jwt_provider_alone(
    server: JwksServer, policy_file: Path
) -> None:
    """Refused by the JWT provider (wrong audience, unknown key): never sent to the endpoint, never let in by it."""
    key, stranger = generate_rsa_key("k1"), generate_rsa_key("k-unknown")
    server.rotate([key])
    claims = {"iss": "https://idp.test", "sub": "eve", "scope": "orders:read", "exp": int(time.time()) + 600}
    server.grant(
        wrong_aud := mint_token(key, "k1", {**claims, "aud": "other-api"}), {"sub": "eve", "scope": "orders:read"}
    )
    unknown_key = mint_token(stranger, "k-unknown", {**claims, "aud": "orders-api"})
    registry = JwksRegistry()
    pipeline = build_pipeline(policy_file, registry)
    await pipeline.start()
    try:
        refused = await pipeline.check(request("/orders", wrong_aud))
        assert (refused.status, refused.reason) == (401, Reason.INVALID_AUDIENCE)
        refused = await pipeline.check(request("/orders", unknown_key))
        assert (refused.status, refused.reason) == (401, Reason.UNKNOWN_KEY)
        assert server.introspections == 0
        good = mint_token(key, "k1", {**claims, "aud": "orders-api"})
        assert (await pipeline.check(request("/orders", good))).status == 200
    finally:
        await pipeline.close()
        await registry.close()


async def test_a_route_decided_without_identity_needs_no_introspection(server: JwksServer, policy_file: Path) -> None:
    """A token sent to a public route (or one a deny rule refuses whoever calls) costs no call and works while the
    endpoint is down; where a deny rule depends on who calls, the identity is still needed."""
    registry = JwksRegistry()
    pipeline = build_pipeline(policy_file, registry)
    await pipeline.start()
    server.down()
    try:
        public = await pipeline.check(request("/docs/intro", "opaque-anyone"))
        assert (public.status, public.reason) == (200, Reason.PUBLIC)
        denied = await pipeline.check(request("/debug/vars", "opaque-anyone"))
        assert (denied.status, denied.reason) == (403, Reason.DENIED_BY_RULE)
        depends = await pipeline.check(request("/docs/admin", "opaque-anyone"))
        assert (depends.status, depends.reason) == (503, Reason.INTROSPECTION_UNAVAILABLE)
        assert server.introspections == 0
    finally:
        await pipeline.close()
        await registry.close()


def append_rule(policy: Path, rule: str) -> None:
    policy.write_text(policy.read_text() + f"  - {rule}\n")


async def test_a_reload_keeps_the_tokens_already_introspected(server: JwksServer, policy_file: Path) -> None:
    service = ExtauthzService(policy_file, deadline_s=1.0, reload_interval_s=60)
    await service.start()
    try:
        assert (await service.pipeline().check(request("/orders", "opaque-alice"))).status == 200
        server.down()
        append_rule(policy_file, "{name: extra, public: true, match: {paths: [/x]}}")
        assert await service.watcher.check_now()
        assert (await service.pipeline().check(request("/orders", "opaque-alice"))).status == 200
        assert server.introspections == 1
    finally:
        await service.close()


async def background_lookups_done(pipeline: Pipeline) -> None:
    """Wait for the lookups a pipeline started for answers it gave meanwhile (each bounded by its deadline)."""
    while pipeline._background:
        await asyncio.gather(*list(pipeline._background))


async def test_a_public_route_answered_meanwhile_gets_the_identity_next_time(
    server: JwksServer, policy_file: Path
) -> None:
    """The answer given while the token is looked up carries no identity (none is known yet), still strips the
    credential, and is not reused: the lookup runs in the background and the next request carries the identity
    headers and the metadata that rate limits key on."""
    registry = JwksRegistry()
    pipeline = build_pipeline(policy_file, registry)
    await pipeline.start()
    try:
        first = await pipeline.check(request("/docs/intro", "opaque-alice"))
        assert (first.status, first.reason, first.reusable) == (200, Reason.PUBLIC, False)
        assert "authorization" in first.headers_to_remove
        assert first.metadata == {}
        await background_lookups_done(pipeline)
        second = await pipeline.check(request("/docs/intro", "opaque-alice"))
        assert (second.status, second.reason, second.reusable) == (200, Reason.PUBLIC, True)
        assert ("x-auth-subject", "alice") in second.headers_to_set
        assert second.metadata["sub"] == "alice"
        assert server.introspections == 1
    finally:
        await pipeline.close()
        await registry.close()


async def test_a_refused_token_on_a_public_route_is_stripped_too(server: JwksServer, policy_file: Path) -> None:
    """Whether the lookup is running or has refused the token, a public route lets the request in without the
    credential: the upstream never sees it."""
    registry = JwksRegistry()
    pipeline = build_pipeline(policy_file, registry)
    await pipeline.start()
    try:
        meanwhile = await pipeline.check(request("/docs/intro", "opaque-nobody"))
        await background_lookups_done(pipeline)
        refused = await pipeline.check(request("/docs/intro", "opaque-nobody"))
        for decision in (meanwhile, refused):
            assert (decision.status, decision.reason) == (200, Reason.PUBLIC)
            assert "authorization" in decision.headers_to_remove
    finally:
        await pipeline.close()
        await registry.close()


async def test_a_cached_refusal_is_raised_afresh_each_time(provider: IntrospectionProvider) -> None:
    """Raising one cached exception again and again would chain its tracebacks (and their frames) without end."""
    with pytest.raises(AuthenticationError):
        await introspected(provider, bearer("opaque-nobody"))
    raised = []
    for _ in range(3):
        with pytest.raises(AuthenticationError) as refused:
            provider.authenticate(bearer("opaque-nobody"))
        raised.append(refused.value)
    assert len({id(error) for error in raised}) == 3
    assert all(error.reason is Reason.INACTIVE_TOKEN for error in raised)


async def test_an_endpoint_behind_a_private_ca_is_trusted_through_its_ca_file(tmp_path: Path, clock: Clock) -> None:
    ca = TestCA(tmp_path)
    cert = ca.server()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert, cert.key)
    async with JwksServer(tls=tls) as server:
        server.grant("opaque-tls", {"sub": "tina"})
        untrusted = IntrospectionProvider(settings_for(server), clock=clock)
        with pytest.raises(RefreshNeeded):
            await introspected(untrusted, bearer("opaque-tls"))
        await untrusted.close()
        trusted = IntrospectionProvider(settings_for(server, ca_file=str(ca.ca_file)), clock=clock)
        assert (await introspected(trusted, bearer("opaque-tls"))).subject == "tina"
        await trusted.close()


def test_a_ca_bundle_replaced_in_place_gives_a_new_state(tmp_path: Path) -> None:
    TestCA(tmp_path)
    settings = IntrospectionSettings(
        endpoint="https://idp/introspect", client_id="c", client_secret="s", ca_file=str(tmp_path / "ca.pem")
    )
    registry = IntrospectionRegistry()
    first = registry.get_or_create(settings)
    assert registry.get_or_create(settings) is first
    (tmp_path / "ca.pem").write_bytes((tmp_path / "ca.pem").read_bytes() + b"\n")
    assert registry.get_or_create(settings) is not first


def test_the_ca_bundles_a_policy_names_are_watched(server: JwksServer, tmp_path: Path) -> None:
    TestCA(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "identity:\n  order: [jwt, introspection]\n"
        f"  jwt: {{issuers: [{{issuer: https://idp, audiences: [a], jwks_uri: {server.jwks_uri}, ca_file: ca.pem}}]}}\n"
        f"  introspection: {{endpoint: {server.introspection_endpoint}, client_id: c, client_secret: s,"
        " ca_file: ca.pem}\n"
    )
    pipeline = build_pipeline(policy, JwksRegistry())
    assert watched_files(policy, pipeline).count(tmp_path / "ca.pem") == 2
