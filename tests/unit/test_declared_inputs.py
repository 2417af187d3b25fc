"""Every real provider and the policy declare what they read: the pipeline's decision cache keys on exactly that."""

from extauthz.config import (
    ApiKeySettings,
    HeaderMatch,
    JwtIssuer,
    JwtSettings,
    RequestMatch,
    Rule,
    SpiffeSettings,
    TokenSource,
)
from extauthz.identity.apikey import ApiKeyProvider, ApiKeyStore
from extauthz.identity.jwt import JwtProvider
from extauthz.identity.mtls import SpiffeProvider
from extauthz.policy import compile_policy


def test_jwt_provider_declares_its_token_sources() -> None:
    issuer = JwtIssuer(issuer="https://i", audiences=("a",), jwks_uri="https://i/jwks")
    sources = (TokenSource(header="Authorization", prefix="Bearer "), TokenSource(cookie="session"))
    provider = JwtProvider(JwtSettings(issuers=(issuer,), sources=sources))
    assert provider.request_headers == {"authorization", "cookie"}
    assert provider.reads_query is False
    with_query = JwtProvider(JwtSettings(issuers=(issuer,), sources=(TokenSource(query="access_token"),)))
    assert with_query.reads_query is True


def test_api_key_and_spiffe_providers_declare_their_headers() -> None:
    assert ApiKeyProvider(ApiKeySettings(), ApiKeyStore()).request_headers == {"x-api-key", "authorization"}
    no_scheme = ApiKeyProvider(ApiKeySettings(authorization_scheme=""), ApiKeyStore())
    assert no_scheme.request_headers == {"x-api-key"}
    assert SpiffeProvider(SpiffeSettings()).request_headers == {"x-forwarded-client-cert"}
    assert SpiffeProvider(SpiffeSettings(from_xfcc=False)).request_headers == frozenset()


def test_policy_declares_the_headers_its_rules_match() -> None:
    rules = (
        Rule(name="a", match=RequestMatch(headers=(HeaderMatch(name="x-tenant", exact="t"),))),
        Rule(name="b", match=RequestMatch(headers=(HeaderMatch(name=":authority", present=True),))),
        Rule(name="c"),
    )
    assert compile_policy(rules).header_names == {"x-tenant", ":authority"}
