"""JWKS caching against a real JWKS/OIDC server on loopback, with an injected monotonic clock."""

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from extauthz.config import JwtIssuer
from extauthz.identity.base import WITHDRAWALS
from extauthz.identity.jwks import JwksCache, JwksFetchError, JwksRegistry, max_age_of, parse_jwks
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import SigningKey, generate_ec_key, generate_rsa_key, public_jwk
from tests.support.pki import TestCA


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key1() -> SigningKey:
    return generate_rsa_key("k1")


@pytest.fixture(scope="module")
def key2() -> SigningKey:
    return generate_rsa_key("k2")


@pytest.fixture
async def server(key1: SigningKey) -> AsyncIterator[JwksServer]:
    async with JwksServer([key1]) as running:
        yield running


def issuer_for(server: JwksServer, **overrides: object) -> JwtIssuer:
    fields: dict[str, object] = {
        "issuer": server.issuer,
        "jwks_uri": server.jwks_uri,
        "min_refetch_interval_s": 10.0,
        "fetch_timeout_s": 2.0,
    }
    fields.update(overrides)
    return JwtIssuer(**fields)  # type: ignore[arg-type]


def fetches_metric(issuer: str, result: str) -> float:
    return REGISTRY.get_sample_value("meshgate_jwks_fetches_total", {"issuer": issuer, "result": result}) or 0.0


async def test_start_fetches_keys_and_lookups_are_sync(server: JwksServer, key1: SigningKey) -> None:
    cache = JwksCache(issuer_for(server), FakeClock())
    assert cache.key_for("k1") is None
    ok_before = fetches_metric(server.issuer, "ok")
    await cache.start()
    await cache.start()  # idempotent
    try:
        assert server.jwks_fetches == 1
        found = cache.key_for("k1", "RS256")
        assert found is not None
        assert found.key_id == "k1"
        assert cache.key_for("k1") is found
        assert cache.key_for(None) is found  # the sole key serves tokens without kid
        assert cache.key_for("nope") is None
        assert cache.key_count == 1
        assert cache.last_success == 1000.0
        assert fetches_metric(server.issuer, "ok") == ok_before + 1
        assert REGISTRY.get_sample_value("meshgate_jwks_keys", {"issuer": server.issuer}) == 1
    finally:
        await cache.close()


async def test_discovery_finds_the_jwks_uri(server: JwksServer) -> None:
    cache = JwksCache(issuer_for(server, jwks_uri="", discovery=True), FakeClock())
    assert await cache.refresh()
    assert (server.discovery_fetches, server.jwks_fetches) == (1, 1)
    assert await cache.refresh()
    assert server.discovery_fetches == 1  # remembered
    server.fail()
    assert not await cache.refresh()
    server.recover()
    assert await cache.refresh()
    assert server.discovery_fetches == 2  # rediscovered after a failure
    assert cache.key_for("k1") is not None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b'{"issuer": "https://elsewhere", "jwks_uri": "http://127.0.0.1:1/jwks.json"}', "different issuer"),
        (b"[1, 2]", "not a JSON object"),
        (b"not json", "not JSON"),
    ],
)
async def test_bad_discovery_documents(
    server: JwksServer, document: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.discovery_override = document
    cache = JwksCache(issuer_for(server, jwks_uri="", discovery=True), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert message in caplog.text
    assert cache.key_count == 0


async def test_discovery_without_jwks_uri(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    server.discovery_override = f'{{"issuer": "{server.issuer}/"}}'.encode()
    cache = JwksCache(issuer_for(server, jwks_uri="", discovery=True), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "no usable jwks_uri" in caplog.text


async def test_discovery_with_credentials_in_the_jwks_uri(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    # urllib would read "reader:pw@127.0.0.1" as a host name and ask DNS for it: refused before any fetch.
    jwks_uri = server.jwks_uri.replace("http://", "http://reader:hunter2@")
    server.discovery_override = f'{{"issuer": "{server.issuer}", "jwks_uri": "{jwks_uri}"}}'.encode()
    cache = JwksCache(issuer_for(server, jwks_uri="", discovery=True), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "no usable jwks_uri" in caplog.text
    assert "hunter2" not in caplog.text


async def test_failed_first_fetch_is_not_fatal_and_later_refresh_recovers(server: JwksServer) -> None:
    server.down()
    cache = JwksCache(issuer_for(server), FakeClock())
    errors_before = fetches_metric(server.issuer, "error")
    await cache.start()
    try:
        assert cache.key_count == 0
        assert cache.failures == 1
        assert fetches_metric(server.issuer, "error") == errors_before + 1
        # an issuer that never answered reports 0 keys (an alert on == 0 fires), not no sample at all
        assert REGISTRY.get_sample_value("meshgate_jwks_keys", {"issuer": server.issuer}) == 0
        server.up()
        assert await cache.refresh()
        assert cache.key_for("k1") is not None
    finally:
        await cache.close()


async def test_fetch_errors_never_show_a_query_credential(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    server.down()
    cache = JwksCache(issuer_for(server, jwks_uri=f"{server.jwks_uri}?access_token=t0ps3cret"), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "access_token=***" in caplog.text and "t0ps3cret" not in caplog.text


async def test_last_good_keys_survive_outages(server: JwksServer) -> None:
    cache = JwksCache(issuer_for(server), FakeClock())
    assert await cache.refresh()
    server.fail()
    assert not await cache.refresh()
    server.recover()
    server.down()
    assert not await cache.refresh()
    server.up()
    server.jwks_override = b'{"keys": []}'
    assert not await cache.refresh()
    assert cache.failures == 3
    assert cache.key_for("k1") is not None


async def test_refetch_is_rate_limited(server: JwksServer, key1: SigningKey, key2: SigningKey) -> None:
    clock = FakeClock()
    cache = JwksCache(issuer_for(server), clock)
    assert cache.can_refetch()
    await cache.refresh()
    server.rotate([key1, key2])
    assert not cache.can_refetch()
    await cache.refetch_for_unknown_kid()
    assert server.jwks_fetches == 1
    assert cache.key_for("k2") is None
    clock.now += 10.0
    assert cache.can_refetch()
    await cache.refetch_for_unknown_kid()
    assert server.jwks_fetches == 2
    assert cache.key_for("k2") is not None


async def test_a_refresh_keeps_unchanged_keys_and_counts_only_withdrawals(
    server: JwksServer, key1: SigningKey, key2: SigningKey
) -> None:
    """Unchanged keys stay the same objects across fetches (tokens they verified stay cached); a key that leaves
    the set, or a sole key that stops being the sole one (tokens without a kid), is a withdrawal."""
    cache = JwksCache(issuer_for(server), FakeClock())
    assert await cache.refresh()
    first, before = cache.key_for("k1"), WITHDRAWALS.count
    assert await cache.refresh()
    assert cache.key_for("k1") is first
    assert cache.key_for(None) is first  # the sole key serves tokens without a kid
    server.rotate([key1, key2])  # added: k1 stays, but is no longer the only key
    assert await cache.refresh()
    assert cache.key_for("k1") is first
    assert WITHDRAWALS.count == before + 1
    assert await cache.refresh()
    assert WITHDRAWALS.count == before + 1  # nothing changed
    server.rotate([key2])
    assert await cache.refresh()
    assert cache.key_for("k1") is None
    assert WITHDRAWALS.count == before + 2


async def test_concurrent_refetches_share_one_fetch(server: JwksServer) -> None:
    cache = JwksCache(issuer_for(server), FakeClock())
    server.delay_s = 0.05
    await asyncio.gather(*(cache.refetch_for_unknown_kid() for _ in range(20)))
    assert server.jwks_fetches == 1
    assert cache.fetches == 1


async def test_refresh_survives_a_cancelled_waiter(server: JwksServer) -> None:
    cache = JwksCache(issuer_for(server), FakeClock())
    server.delay_s = 0.05
    impatient = asyncio.ensure_future(cache.refresh())
    await asyncio.sleep(0)
    patient = asyncio.ensure_future(cache.refresh())
    await asyncio.sleep(0)
    impatient.cancel()
    assert await patient
    assert cache.key_for("k1") is not None


async def test_fetch_timeout_keeps_old_keys(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = JwksCache(issuer_for(server, fetch_timeout_s=0.1), FakeClock())
    assert await cache.refresh()
    server.delay_s = 5
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "keeping 1 cached keys" in caplog.text
    assert cache.key_for("k1") is not None


async def test_oversized_document_is_refused(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    server.jwks_override = b" " * (1024 * 1024 + 1)
    cache = JwksCache(issuer_for(server), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "larger than" in caplog.text


async def test_only_http_urls_are_fetched(caplog: pytest.LogCaptureFixture) -> None:
    cache = JwksCache(JwtIssuer(issuer="x", jwks_uri="file:///etc/passwd"), FakeClock())
    with caplog.at_level(logging.WARNING):
        assert not await cache.refresh()
    assert "unsupported URL scheme" in caplog.text


async def test_background_refresh_picks_up_new_keys(server: JwksServer, key2: SigningKey) -> None:
    cache = JwksCache(issuer_for(server, refresh_interval_s=0.02), FakeClock())
    await cache.start()
    try:
        server.rotate([key2])
        for _ in range(500):  # bounded wait for the background task
            if cache.key_for("k2") is not None:
                break
            await asyncio.sleep(0.01)
        assert cache.key_for("k2") is not None
        assert cache.key_for("k1") is None  # rotated out
    finally:
        await cache.close()
    fetches = server.jwks_fetches
    await asyncio.sleep(0.05)
    assert server.jwks_fetches == fetches  # closed: no more fetches


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        ("public, max-age=100, must-revalidate", 80.0),  # at 80% of the issuer's max-age
        ('max-age="100"', 80.0),
        ("max-age=5", 10.0),  # never more often than min_refetch_interval_seconds
        ("max-age=100000", 300.0),  # never less often than refresh_interval_seconds
        ("no-cache", 300.0),
        ("no-store, max-age=100", 300.0),
        ("s-maxage=100", 300.0),
        ("x-no-cache-ext=1, max-age=100", 80.0),  # directives are matched whole
        ("max-age=0", 300.0),  # nothing fresh: the normal interval, not a busy loop
        ("max-age=-5", 300.0),
        ("max-age=99999999999999999999", 300.0),
        ("", 300.0),
    ],
)
async def test_background_refresh_comes_before_the_key_sets_max_age(
    server: JwksServer, cache_control: str, expected: float
) -> None:
    server.cache_control = cache_control
    cache = JwksCache(issuer_for(server, refresh_interval_s=300, min_refetch_interval_s=10), FakeClock())
    assert await cache.refresh()
    assert cache._next_delay() == expected


def test_max_age_counts_the_time_a_cache_already_served_it() -> None:
    assert max_age_of("max-age=100", "30") == 70.0
    assert max_age_of("max-age=100", "100") is None
    assert max_age_of("max-age=100", "junk") == 100.0


async def test_a_max_age_refresh_is_never_back_to_back(server: JwksServer) -> None:
    server.cache_control = "max-age=1"
    cache = JwksCache(issuer_for(server, refresh_interval_s=300, min_refetch_interval_s=0), FakeClock())
    assert await cache.refresh()
    assert cache._next_delay() == 1.0  # min_refetch_interval_seconds 0 must not make the loop spin


async def test_failures_retry_sooner_with_backoff(server: JwksServer) -> None:
    cache = JwksCache(issuer_for(server, refresh_interval_s=300, min_refetch_interval_s=10), FakeClock())
    assert cache._next_delay() == 300
    server.down()
    await cache.refresh()
    assert cache._next_delay() == 10
    await cache.refresh()
    assert cache._next_delay() == 20
    for _ in range(10):
        await cache.refresh()
    assert cache._next_delay() == 300


def test_parse_jwks_skips_unusable_keys(key1: SigningKey, caplog: pytest.LogCaptureFixture) -> None:
    ec = generate_ec_key("ec")
    document = {
        "keys": [
            "not a key",
            {**public_jwk(key1), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            {"kty": "EC", "kid": "bad-curve", "crv": "P-0", "x": "AA", "y": "AA"},
            public_jwk(key1, include_alg=False),
            public_jwk(ec),
        ]
    }
    with caplog.at_level(logging.WARNING):
        keys = parse_jwks(document, ["RS256", "PS256", "ES256", "HS256"], "iss")
    assert "broken" in caplog.text
    assert "bad-curve" in caplog.text
    assert set(keys.by_kid) == {"k1", "ec"}
    assert keys.sole is None
    assert keys.size == 2
    rsa = keys.by_kid["k1"]
    assert rsa.for_alg("PS256").algorithm_name == "PS256"  # a JWK without alg fits each allowed RSA algorithm
    assert rsa.for_alg("RS256").algorithm_name == "RS256"
    assert rsa.for_alg("ES256").algorithm_name == "RS256"  # unfit: pyjwt will reject the mismatch


@pytest.mark.parametrize("document", [None, [], {"keys": "x"}, {"keys": []}, {"keys": [{"kty": "oct", "k": "x"}]}])
def test_parse_jwks_rejects_documents_without_usable_keys(document: object) -> None:
    with pytest.raises(JwksFetchError):
        parse_jwks(document, ["RS256"])


def test_key_without_kid_is_only_used_when_sole(key1: SigningKey) -> None:
    jwk = public_jwk(key1)
    del jwk["kid"]
    keys = parse_jwks({"keys": [jwk]}, ["RS256"])
    assert keys.by_kid == {}
    assert keys.sole is not None
    assert keys.size == 1


async def test_registry_reuses_caches_across_reloads(server: JwksServer) -> None:
    registry = JwksRegistry(FakeClock())
    first = registry.get_or_create(issuer_for(server, audiences=("a",)))
    assert registry.get_or_create(issuer_for(server, audiences=("b",), secret="x")) is first
    changed = registry.get_or_create(issuer_for(server, refresh_interval_s=60))
    assert changed is not first
    assert registry.caches() == [first, changed]
    await first.start()
    await registry.retain([changed])
    assert registry.caches() == [changed]
    assert first._refresher is None  # closed
    await changed.start()
    await registry.close()
    assert registry.caches() == []
    assert changed._refresher is None


async def test_an_issuer_behind_a_private_ca_is_trusted_through_its_ca_file(
    tmp_path: Path, key1: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCA(tmp_path)
    cert = ca.server()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert, cert.key)
    async with JwksServer([key1], tls=tls) as server:
        assert server.jwks_uri.startswith("https://")
        untrusted = JwksCache(issuer_for(server), FakeClock())
        with caplog.at_level(logging.WARNING):
            assert not await untrusted.refresh()
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        trusted = JwksCache(issuer_for(server, ca_file=str(ca.ca_file)), FakeClock())
        assert await trusted.refresh()
        assert trusted.key_for("k1") is not None


def test_a_ca_bundle_replaced_in_place_gives_a_new_cache(tmp_path: Path) -> None:
    """A Kubernetes secret is updated in place: the next reload must build a cache that trusts the new bundle."""
    TestCA(tmp_path)
    issuer = JwtIssuer(issuer="https://idp", jwks_uri="https://idp/jwks", ca_file=str(tmp_path / "ca.pem"))
    registry = JwksRegistry()
    first = registry.get_or_create(issuer)
    assert registry.get_or_create(issuer) is first
    (tmp_path / "ca.pem").write_bytes((tmp_path / "ca.pem").read_bytes() + b"\n")
    assert registry.get_or_create(issuer) is not first
