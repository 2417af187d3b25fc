"""What a pipeline enforces, for people: rules with a readable summary of what they match, and the identity
providers. Secrets never appear: no HMAC secret, no client secret, no API-key digest (a key's id and expiry only);
URLs lose their userinfo password and credential-looking query values (``meshgate.log.redact_url``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from extauthz.config import HeaderMatch, IdentityMatch, RequestMatch, Rule, TokenSource
from extauthz.identity.apikey import ApiKeyEntry, ApiKeyProvider
from extauthz.identity.introspection import IntrospectionProvider
from extauthz.identity.jwt import JwtProvider
from extauthz.identity.mtls import SpiffeProvider
from extauthz.pipeline import Pipeline
from meshgate.log import URL_MASK, is_secret_header, redact_url


class RuleOut(BaseModel):
    name: str
    effect: Literal["allow", "deny"]
    public: bool
    matches: str = Field(description="the requests it applies to")
    identity: str = Field(description="who it applies to")
    source: str = Field(description="file:line")


class JwtIssuerOut(BaseModel):
    issuer: str
    audiences: list[str]
    keys_from: Literal["jwks_uri", "discovery", "shared_secret"]
    jwks_uri: str | None = None
    algorithms: list[str]
    ca_file: str | None = None


class JwtOut(BaseModel):
    kind: Literal["jwt"] = "jwt"
    token_sources: list[str]
    issuers: list[JwtIssuerOut]


class IntrospectionOut(BaseModel):
    kind: Literal["introspection"] = "introspection"
    endpoint: str
    client_id: str
    issuer: str | None = None
    audiences: list[str]
    token_sources: list[str]


class ApiKeyOut(BaseModel):
    id: str
    state: Literal["active", "expired", "revoked"]
    expires: datetime | None = None


class ApiKeyClientOut(BaseModel):
    client: str
    tier: str
    roles: list[str]
    active_keys: int
    keys: list[ApiKeyOut]


class ApiKeysOut(BaseModel):
    kind: Literal["api_key"] = "api_key"
    header: str
    authorization_scheme: str | None = None
    keys_file: str
    clients: list[ApiKeyClientOut]


class SpiffeOut(BaseModel):
    kind: Literal["spiffe"] = "spiffe"
    trust_domains: list[str] = Field(description="empty: any")
    from_xfcc: bool


ProviderOut = Annotated[JwtOut | IntrospectionOut | ApiKeysOut | SpiffeOut, Field(discriminator="kind")]


class PolicyOut(BaseModel):
    source: str
    identity_providers: list[ProviderOut] = Field(description="tried in this order; the first that authenticates")
    rules: list[RuleOut] = Field(description="deny rules win over allow rules; no match means deny")


# -- rules -----------------------------------------------------------------------------------------------------
def _any_of(label: str, values: Iterable[str]) -> str | None:
    listed = list(values)
    return f"{label} {', '.join(listed)}" if listed else None


def _header(match: HeaderMatch) -> str:
    if match.present is not None:
        return f"{match.name} {'present' if match.present else 'absent'}"
    secret = is_secret_header(match.name)  # a rule may match a shared token's value: never shown
    if match.exact is not None:
        return f"{match.name} = {URL_MASK if secret else repr(match.exact)}"
    return f"{match.name} starts with {URL_MASK if secret else repr(match.prefix)}"


def describe_request(match: RequestMatch) -> str:
    paths = [*match.paths, *(f"{prefix}…" for prefix in match.path_prefixes)]
    parts = [
        _any_of("methods", match.methods),
        _any_of("hosts", match.hosts),
        _any_of("paths", paths),
        _any_of("headers", (_header(header) for header in match.headers)),
    ]
    text = "; ".join(part for part in parts if part)
    return text or "every request"


def describe_identity(rule: Rule) -> str:
    if rule.public:
        return "anyone, without credentials"
    match: IdentityMatch | None = rule.identity
    if match is None:
        return "everybody" if rule.effect == "deny" else "any authenticated identity"
    parts = [
        _any_of("kinds", (kind.value for kind in match.kinds)),
        _any_of("issuers", match.issuers),
        _any_of("subjects", match.subjects),
        _any_of("clients", match.clients),
        _any_of("principals", match.principals),
        _any_of("any role of", match.roles_any),
        _any_of("all roles of", match.roles_all),
        _any_of("all scopes of", match.scopes_all),
        _any_of("tiers", match.tiers),
    ]
    return "; ".join(part for part in parts if part) or "any authenticated identity"


def _rule(rule: Rule) -> RuleOut:
    effect: Literal["allow", "deny"] = "deny" if rule.effect == "deny" else "allow"
    return RuleOut(
        name=rule.name,
        effect=effect,
        public=rule.public,
        matches=describe_request(rule.match),
        identity=describe_identity(rule),
        source=rule.source,
    )


# -- identity providers ----------------------------------------------------------------------------------------
def _sources(sources: Iterable[TokenSource]) -> list[str]:
    out = []
    for source in sources:
        if source.header:
            out.append(f"header {source.header}" + (f" ({source.prefix.strip()})" if source.prefix else ""))
        elif source.cookie:
            out.append(f"cookie {source.cookie}")
        else:
            out.append(f"query {source.query}")
    return out


def _jwt(provider: JwtProvider) -> JwtOut:
    issuers = []
    for issuer in provider.settings.issuers:
        keys_from: Literal["jwks_uri", "discovery", "shared_secret"] = (
            "jwks_uri" if issuer.jwks_uri else "discovery" if issuer.discovery else "shared_secret"
        )
        issuers.append(
            JwtIssuerOut(
                issuer=issuer.issuer,
                audiences=list(issuer.audiences),
                keys_from=keys_from,
                jwks_uri=redact_url(issuer.jwks_uri) if issuer.jwks_uri else None,
                algorithms=list(issuer.algorithms),
                ca_file=issuer.ca_file or None,
            )
        )
    return JwtOut(token_sources=_sources(provider.settings.sources), issuers=issuers)


def _introspection(provider: IntrospectionProvider) -> IntrospectionOut:
    settings = provider.settings
    return IntrospectionOut(
        endpoint=redact_url(settings.endpoint),
        client_id=settings.client_id,
        issuer=settings.issuer or None,
        audiences=list(settings.audiences),
        token_sources=_sources(settings.sources),
    )


def _key(entry: ApiKeyEntry, now: float) -> ApiKeyOut:
    expired = entry.expires is not None and entry.expires <= now
    return ApiKeyOut(
        id=entry.key_id,
        state="revoked" if entry.revoked else "expired" if expired else "active",
        expires=None if entry.expires is None else datetime.fromtimestamp(entry.expires, UTC),
    )


def _api_keys(provider: ApiKeyProvider, now: float) -> ApiKeysOut:
    clients: dict[str, ApiKeyClientOut] = {}
    for entry in provider.store:
        client = clients.get(entry.client)
        if client is None:
            client = clients[entry.client] = ApiKeyClientOut(
                client=entry.client, tier=entry.tier, roles=sorted(entry.roles), active_keys=0, keys=[]
            )
        key = _key(entry, now)
        client.keys.append(key)
        client.active_keys += key.state == "active"
    settings = provider.settings
    return ApiKeysOut(
        header=settings.header,
        authorization_scheme=settings.authorization_scheme or None,
        keys_file=settings.keys_file,
        clients=sorted(clients.values(), key=lambda client: client.client),
    )


def summarize(pipeline: Pipeline, source: str, *, now: float | None = None) -> PolicyOut:
    """``pipeline``'s policy; ``now`` (epoch seconds) decides which API keys have expired."""
    moment = time.time() if now is None else now
    providers: list[ProviderOut] = []
    for provider in pipeline.providers:
        if isinstance(provider, JwtProvider):
            providers.append(_jwt(provider))
        elif isinstance(provider, IntrospectionProvider):
            providers.append(_introspection(provider))
        elif isinstance(provider, ApiKeyProvider):
            providers.append(_api_keys(provider, moment))
        elif isinstance(provider, SpiffeProvider):
            settings = provider.settings
            providers.append(SpiffeOut(trust_domains=list(settings.trust_domains), from_xfcc=settings.from_xfcc))
    rules: Iterable[Rule] = getattr(pipeline.policy, "rules", ())  # a CompiledPolicy need not keep them; Policy does
    return PolicyOut(source=source, identity_providers=providers, rules=[_rule(rule) for rule in rules])
