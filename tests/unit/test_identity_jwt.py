"""JWT verification with real keys and a real JWKS server on loopback; time comes from injected clocks."""

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from extauthz.config import ClaimMapping, JwtIssuer, JwtSettings, TokenSource
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.jwks import JwksRegistry
from extauthz.identity.jwt import JwtProvider
from extauthz.identity.tokens import claim_at
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import (
    SigningKey,
    generate_ec_key,
    generate_ed25519_key,
    generate_rsa_key,
    mint_hs_with_public_key,
    mint_token,
    mint_unsigned_token,
    public_jwk,
    tamper_claims,
    tamper_signature,
)

NOW = 1_700_000_000.0
AUD = "api://orders"
SECRET = "hs-secret-that-is-long-enough-for-hs256!"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return generate_rsa_key("rsa-1")


@pytest.fixture(scope="module")
def rsa2() -> SigningKey:
    return generate_rsa_key("rsa-2")


@pytest.fixture(scope="module")
def ec() -> SigningKey:
    return generate_ec_key("ec-1")


@pytest.fixture(scope="module")
def ed() -> SigningKey:
    return generate_ed25519_key("ed-1")


@pytest.fixture
async def server(rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> AsyncIterator[JwksServer]:
    # The RSA key is published without "alg", as many IdPs do: it must still verify RS256 and PS256.
    async with JwksServer([public_jwk(rsa, include_alg=False), ec, ed]) as running:
        yield running


class Env:
    def __init__(self, server: JwksServer) -> None:
        self.server = server
        self.wall = FakeClock(NOW)
        self.mono = FakeClock(100.0)
        self.registry = JwksRegistry(self.mono)

    def issuer(self, **overrides: Any) -> JwtIssuer:
        fields: dict[str, Any] = {
            "issuer": self.server.issuer,
            "jwks_uri": self.server.jwks_uri,
            "audiences": (AUD,),
            "algorithms": ("RS256", "PS256", "ES256", "EdDSA"),
        }
        fields.update(overrides)
        return JwtIssuer(**fields)

    async def provider(self, *issuers: JwtIssuer, **settings: Any) -> JwtProvider:
        provider = JwtProvider(
            JwtSettings(issuers=issuers or (self.issuer(),), **settings), self.registry, clock=self.wall
        )
        await provider.start()
        return provider

    def claims(self, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": self.server.issuer,
            "sub": "alice",
            "aud": AUD,
            "iat": int(NOW),
            "exp": int(NOW) + 600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
async def env(server: JwksServer) -> AsyncIterator[Env]:
    environment = Env(server)
    yield environment
    await environment.registry.close()


def bearer(token: str, **headers: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/", headers={"authorization": f"Bearer {token}", **headers})


def reason_of(provider: JwtProvider, inp: CheckInput) -> Reason:
    with pytest.raises(AuthenticationError) as caught:
        provider.authenticate(inp)
    return caught.value.reason


async def authenticate(provider: JwtProvider, inp: CheckInput) -> Identity | None:
    """What the pipeline does: one refresh when asked, then ask again."""
    try:
        return provider.authenticate(inp)
    except RefreshNeeded as needed:
        await needed.refresh()
        return provider.authenticate(inp)


def cache_count(result: str) -> float:
    return REGISTRY.get_sample_value("meshgate_token_cache_total", {"result": result}) or 0.0


# -- happy paths ----------------------------------------------------------------------------------------------
async def test_valid_token_maps_claims(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider()
    claims = env.claims(
        realm_access={"roles": ["admin", 7, ""]},
        roles="viewer",
        groups=["ops"],
        scope="read write",
        scp=["extra"],
        tier="gold",
    )
    identity = provider.authenticate(bearer(mint_token(rsa, rsa.kid, claims)))
    assert identity is not None
    assert identity.kind is IdentityKind.JWT
    assert identity.subject == "alice"
    assert identity.issuer == env.server.issuer
    assert identity.roles == {"admin", "viewer", "ops"}
    assert identity.scopes == {"read", "write", "extra"}
    assert identity.tier == "gold"
    assert identity.claims["sub"] == "alice"
    assert identity.credential_header == "authorization"


@pytest.mark.parametrize("which", ["rsa-ps256", "ec", "ed"])
async def test_other_algorithms(env: Env, which: str, rsa: SigningKey, ec: SigningKey, ed: SigningKey) -> None:
    provider = await env.provider()
    key, alg = {"rsa-ps256": (rsa, "PS256"), "ec": (ec, "ES256"), "ed": (ed, "EdDSA")}[which]
    identity = provider.authenticate(bearer(mint_token(key, key.kid, env.claims(), alg=alg)))
    assert identity is not None
    assert identity.subject == "alice"


async def test_custom_claim_mapping_and_numeric_subject(env: Env, rsa: SigningKey) -> None:
    mapping = ClaimMapping(roles=("app.perms",), scopes=(), tier="", subject="uid")
    provider = await env.provider(claims=mapping)
    token = mint_token(rsa, rsa.kid, env.claims(uid=42, app={"perms": "root"}, tier="gold"))
    identity = provider.authenticate(bearer(token))
    assert identity is not None
    assert (identity.subject, identity.roles, identity.tier, identity.scopes) == (
        "42",
        frozenset({"root"}),
        "",
        frozenset(),
    )


def test_claim_at() -> None:
    assert claim_at({"a": {"b": {"c": 1}}}, "a.b.c") == 1
    assert claim_at({"a": [1]}, "a.b") is None
    assert claim_at({}, "x") is None


async def test_no_audience_configured_accepts_any_aud(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(env.issuer(audiences=()))
    assert provider.authenticate(bearer(mint_token(rsa, rsa.kid, env.claims(aud="other")))) is not None


async def test_several_issuers_chosen_by_iss(env: Env, rsa: SigningKey) -> None:
    other = JwtIssuer(issuer="https://hs.example", algorithms=("HS256",), secret=SECRET)
    provider = await env.provider(env.issuer(), other)
    hs_token = mint_token(SECRET, None, env.claims(iss="https://hs.example", aud=None), alg="HS256")
    assert provider.authenticate(bearer(hs_token)).issuer == "https://hs.example"  # type: ignore[union-attr]
    assert provider.authenticate(bearer(mint_token(rsa, rsa.kid, env.claims()))) is not None
    assert len(provider.caches) == 1


async def test_hs_secret_from_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_TEST_SECRET", SECRET)
    issuer = JwtIssuer(issuer="https://hs.example", algorithms=("HS256",), secret_env="MESHGATE_TEST_SECRET")
    provider = await env.provider(issuer)
    token = mint_token(SECRET, None, env.claims(iss="https://hs.example", aud=None), alg="HS256")
    assert provider.authenticate(bearer(token)) is not None
    wrong = mint_token(SECRET + "x", None, env.claims(iss="https://hs.example", aud=None), alg="HS256")
    assert reason_of(provider, bearer(wrong)) is Reason.INVALID_TOKEN


async def test_discovery_issuer(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(env.issuer(jwks_uri="", discovery=True))
    assert provider.authenticate(bearer(mint_token(rsa, rsa.kid, env.claims()))) is not None
    assert env.server.discovery_fetches == 1


# -- token sources --------------------------------------------------------------------------------------------
async def test_token_sources(env: Env, rsa: SigningKey) -> None:
    sources = (
        TokenSource(header="authorization", prefix="Bearer "),
        TokenSource(header="X-Token"),
        TokenSource(cookie="session"),
        TokenSource(query="access_token"),
    )
    provider = await env.provider(sources=sources)
    token = mint_token(rsa, rsa.kid, env.claims())

    def inp(headers: dict[str, str], query: str = "") -> CheckInput:
        return CheckInput(method="GET", host="h", path="/", query=query, headers=headers)

    identity = provider.authenticate(inp({"authorization": f"bEaReR {token}"}))
    assert identity is not None
    assert identity.credential_header == "authorization"
    # A different scheme is not ours: fall through to the next source.
    identity = provider.authenticate(inp({"authorization": "Basic abc", "x-token": token}))
    assert identity is not None
    assert identity.credential_header == "x-token"
    identity = provider.authenticate(inp({"cookie": f'a=b; session="{token}"; c=d'}))
    assert identity is not None
    assert identity.credential_header == ""
    assert provider.authenticate(inp({}, query=f"x=1&access_token={token}")) is not None
    assert provider.authenticate(inp({"cookie": "a=b; broken"}, query="x=1&flag")) is None
    assert provider.authenticate(inp({"authorization": "Basic abc"})) is None
    assert reason_of(provider, inp({"authorization": "Bearer   "})) is Reason.INVALID_TOKEN


# -- rejections -----------------------------------------------------------------------------------------------
async def test_expiry_with_leeway(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(leeway_s=30)
    within = mint_token(rsa, rsa.kid, env.claims(exp=int(NOW) - 20))
    beyond = mint_token(rsa, rsa.kid, env.claims(exp=int(NOW) - 31))
    assert provider.authenticate(bearer(within)) is not None
    assert reason_of(provider, bearer(beyond)) is Reason.TOKEN_EXPIRED


async def test_not_yet_valid_with_leeway(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(leeway_s=30)
    assert provider.authenticate(bearer(mint_token(rsa, rsa.kid, env.claims(nbf=int(NOW) + 20)))) is not None
    nbf = mint_token(rsa, rsa.kid, env.claims(nbf=int(NOW) + 31))
    iat = mint_token(rsa, rsa.kid, env.claims(iat=int(NOW) + 31))
    assert reason_of(provider, bearer(nbf)) is Reason.TOKEN_NOT_YET_VALID
    assert reason_of(provider, bearer(iat)) is Reason.TOKEN_NOT_YET_VALID
    env.wall.now += 60
    assert provider.authenticate(bearer(nbf)) is not None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": "api://other"}, Reason.INVALID_AUDIENCE),
        ({"aud": None}, Reason.INVALID_AUDIENCE),
        ({"iss": "https://evil.example"}, Reason.INVALID_ISSUER),
        ({"iss": None}, Reason.INVALID_ISSUER),
        ({"exp": None}, Reason.INVALID_TOKEN),
        ({"exp": "soon"}, Reason.INVALID_TOKEN),
        ({"exp": True}, Reason.INVALID_TOKEN),
        ({"exp": 10**400}, Reason.INVALID_TOKEN),
        ({"nbf": "x"}, Reason.INVALID_TOKEN),
        ({"sub": None}, Reason.INVALID_TOKEN),
        ({"sub": ["a"]}, Reason.INVALID_TOKEN),
    ],
)
async def test_claim_problems(env: Env, rsa: SigningKey, overrides: dict[str, Any], reason: Reason) -> None:
    provider = await env.provider()
    token = mint_token(rsa, rsa.kid, env.claims(**overrides))
    assert reason_of(provider, bearer(token)) is reason


async def test_attacks_and_garbage(env: Env, rsa: SigningKey, ec: SigningKey) -> None:
    provider = await env.provider()
    good = mint_token(rsa, rsa.kid, env.claims())
    claims = env.claims()
    cases = {
        "alg none": mint_unsigned_token(claims, kid=rsa.kid),
        "alg NONE": mint_unsigned_token(claims, kid=rsa.kid, alg="NONE"),
        "HS256 with the RS public key": mint_hs_with_public_key(rsa, claims),
        "bad signature": tamper_signature(good),
        "forged claims": tamper_claims(good, sub="mallory"),
        "alg not allowed": mint_token(rsa, rsa.kid, claims, alg="RS512"),
        "alg of another key type": mint_token(ec, rsa.kid, claims, alg="ES256"),
        "kid not a string": f"{_seg({'alg': 'RS256', 'kid': 7})}.{_seg(claims)}.c2ln",
        "two parts": "abc.def",
        "not base64": "@@@.@@@.@@@",
        "not json": "YWJj.YWJj.YWJj",
        "json but not objects": "WzFd.WzFd.",
        "no alg": f"{_seg({'kid': rsa.kid})}.{_seg(claims)}.",
        "too large": "a" * (17 * 1024),
    }
    for name, token in cases.items():
        assert reason_of(provider, bearer(token)) is Reason.INVALID_TOKEN, name
    numeric_iss = f"{_seg({'alg': 'RS256', 'kid': rsa.kid})}.{_seg({**claims, 'iss': 5})}.c2ln"
    assert reason_of(provider, bearer(numeric_iss)) is Reason.INVALID_ISSUER


def _seg(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def test_hs_token_for_an_rs_issuer_even_with_hs_in_its_list(env: Env, rsa: SigningKey) -> None:
    # HS256 is listed, but the issuer has no secret: never verify HS with anything else.
    provider = await env.provider(env.issuer(algorithms=("RS256", "HS256")))
    assert reason_of(provider, bearer(mint_hs_with_public_key(rsa, env.claims()))) is Reason.INVALID_TOKEN


# -- keys: rotation, outages, rate limits ---------------------------------------------------------------------
async def test_rotation_to_a_new_kid_after_refetch(env: Env, rsa: SigningKey, rsa2: SigningKey) -> None:
    provider = await env.provider()
    env.server.rotate([rsa, rsa2])
    token = mint_token(rsa2, rsa2.kid, env.claims())
    # The keys were fetched just now: an unknown kid is refused without another fetch.
    assert reason_of(provider, bearer(token)) is Reason.UNKNOWN_KEY
    env.mono.now += 10
    with pytest.raises(RefreshNeeded):
        provider.authenticate(bearer(token))
    identity = await authenticate(provider, bearer(token))
    assert identity is not None
    assert env.server.jwks_fetches == 2
    # A kid that still is unknown after the refetch: refused, no further fetch.
    stray = mint_token(rsa2, "ghost", env.claims())
    assert reason_of(provider, bearer(stray)) is Reason.UNKNOWN_KEY
    assert env.server.jwks_fetches == 2


async def test_concurrent_unknown_kids_cause_one_fetch(env: Env, rsa2: SigningKey) -> None:
    provider = await env.provider()
    env.server.rotate([rsa2])
    env.mono.now += 10
    env.server.delay_s = 0.05
    tokens = [mint_token(rsa2, rsa2.kid, env.claims(sub=f"user-{i}")) for i in range(10)]
    identities = await asyncio.gather(*(authenticate(provider, bearer(t)) for t in tokens))
    assert all(identity is not None for identity in identities)
    assert env.server.jwks_fetches == 2  # start + one shared refetch


async def test_issuer_down_keeps_accepting_known_keys(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider()
    env.server.down()
    env.mono.now += 60
    await provider.caches[0].refresh()  # fails, keeps keys
    token = mint_token(rsa, rsa.kid, env.claims(sub="bob"))
    assert (await authenticate(provider, bearer(token))).subject == "bob"  # type: ignore[union-attr]


async def test_provider_owns_its_registry_when_not_given_one(server: JwksServer, rsa: SigningKey) -> None:
    issuer = JwtIssuer(issuer=server.issuer, jwks_uri=server.jwks_uri)
    provider = JwtProvider(JwtSettings(issuers=(issuer,)), clock=FakeClock(NOW))
    await provider.start()
    claims = {"iss": server.issuer, "sub": "a", "exp": int(NOW) + 60}
    assert provider.authenticate(bearer(mint_token(rsa, rsa.kid, claims))) is not None
    cache = provider.caches[0]
    await provider.close()
    assert cache._refresher is None


async def test_shared_registry_is_not_closed_by_the_provider(env: Env) -> None:
    provider = await env.provider()
    await provider.close()
    assert provider.caches[0]._refresher is not None


# -- verified-token cache -------------------------------------------------------------------------------------
async def test_cache_hit_skips_verification(env: Env, rsa: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = await env.provider()
    calls = []
    real_decode = pyjwt.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(pyjwt, "decode", spy)  # the module jwt.py calls
    token = mint_token(rsa, rsa.kid, env.claims())
    hits, misses = cache_count("hit"), cache_count("miss")
    first = provider.authenticate(bearer(token))
    second = provider.authenticate(bearer(token))
    assert first is second
    assert len(calls) == 1
    assert (cache_count("hit") - hits, cache_count("miss") - misses) == (1, 1)


async def test_a_key_rotated_out_of_the_jwks_stops_its_cached_tokens(
    env: Env, rsa: SigningKey, rsa2: SigningKey
) -> None:
    """A token verified once is cached until its exp, but only while the issuer still serves the key that signed
    it: after a refresh without that key it is refused like any token of an unknown key."""
    provider = await env.provider()
    token = mint_token(rsa, rsa.kid, env.claims(exp=int(NOW) + 365 * 86400))
    assert provider.authenticate(bearer(token)) is not None  # verified and cached
    assert provider.authenticate(bearer(token)) is not None  # from the cache
    env.server.rotate([rsa2])
    (keys,) = provider.caches
    assert await keys.refresh()
    assert reason_of(provider, bearer(token)) is Reason.UNKNOWN_KEY
    env.server.rotate([rsa, rsa2])  # the same key served again after a refresh: accepted again
    assert await keys.refresh()
    assert provider.authenticate(bearer(token)) is not None


async def test_cache_entry_gone_at_exp(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(leeway_s=0)
    token = mint_token(rsa, rsa.kid, env.claims(exp=int(NOW) + 60))
    assert provider.authenticate(bearer(token)) is not None
    env.wall.now = NOW + 59
    assert provider.authenticate(bearer(token)) is not None
    env.wall.now = NOW + 60
    assert reason_of(provider, bearer(token)) is Reason.TOKEN_EXPIRED


async def test_token_within_leeway_after_exp_is_not_cached(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(leeway_s=30)
    token = mint_token(rsa, rsa.kid, env.claims(exp=int(NOW) - 5))
    misses = cache_count("miss")
    assert provider.authenticate(bearer(token)) is not None
    assert provider.authenticate(bearer(token)) is not None
    assert cache_count("miss") - misses == 2


async def test_cache_is_bounded(env: Env, rsa: SigningKey) -> None:
    provider = await env.provider(cache_size=2)
    tokens = [mint_token(rsa, rsa.kid, env.claims(sub=f"u{i}")) for i in range(3)]
    for token in tokens:
        provider.authenticate(bearer(token))
    assert len(provider._cache) == 2


# -- fuzz: anything in, only None / Identity / AuthenticationError out ----------------------------------------
@pytest.fixture(scope="module")
def fuzz_provider(rsa: SigningKey) -> Iterator[tuple[JwtProvider, str]]:
    with JwksServer([rsa]) as running:
        issuer = JwtIssuer(issuer=running.issuer, jwks_uri=running.jwks_uri, algorithms=("RS256", "ES256"))
        sources = (
            TokenSource(header="authorization", prefix="Bearer "),
            TokenSource(cookie="t"),
            TokenSource(query="t"),
        )
        provider = JwtProvider(
            JwtSettings(issuers=(issuer,), sources=sources),
            JwksRegistry(FakeClock(0.0)),  # frozen clock: no refetch ever allowed after the first fetch
            clock=FakeClock(NOW),
        )
        asyncio.run(provider.caches[0].refresh())
        yield provider, running.issuer


def _outcome(provider: JwtProvider, inp: CheckInput) -> None:
    try:
        result: object = provider.authenticate(inp)
    except AuthenticationError as error:
        result = error.reason
    assert result is None or isinstance(result, Identity | Reason)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(value=st.text(max_size=300), query=st.text(max_size=100))
def test_fuzz_raw_strings(fuzz_provider: tuple[JwtProvider, str], value: str, query: str) -> None:
    provider, _ = fuzz_provider
    for headers in ({"authorization": value}, {"authorization": "Bearer " + value}, {"cookie": "t=" + value}):
        _outcome(provider, CheckInput(method="GET", host="h", path="/", headers=headers, query=query))
    _outcome(provider, CheckInput(method="GET", host="h", path="/", query="t=" + value))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), json_values, max_size=4),
    claims=st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "roles", "scope", "tier"]), json_values, max_size=6
    ),
    signature=st.binary(max_size=64),
)
def test_fuzz_structured_tokens(
    fuzz_provider: tuple[JwtProvider, str], header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    provider, issuer = fuzz_provider
    claims["iss"] = issuer  # get past issuer selection into the deeper checks
    try:
        head, body = _seg(header), _seg(claims)
    except (ValueError, TypeError):
        return  # not representable as JSON (NaN is, in Python; non-str keys are not generated)
    sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    _outcome(provider, bearer(f"{head}.{body}.{sig}"))
