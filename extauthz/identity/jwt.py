"""JWT bearer tokens: find the token, pick the issuer by ``iss``, verify with that issuer's keys, map the claims.

Verified tokens are cached by their SHA-256 (never past ``exp``), so the common case costs a hash and a dict lookup
instead of a ~100 µs signature check. Time checks (``exp``, ``nbf``, ``iat``) use the injected clock, so tests and
the token cache agree on what "now" is.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from cachetools import TLRUCache
from prometheus_client import Counter

from extauthz.config import JwtIssuer, JwtSettings
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.jwks import JwksCache, JwksRegistry
from extauthz.identity.tokens import TokenFinder, check_times, found_in, map_claims, token_digest
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason

_TOKEN_CACHE = Counter("meshgate_token_cache_total", "Verified-token cache lookups", ["result"])
_CACHE_HIT = _TOKEN_CACHE.labels("hit")
_CACHE_MISS = _TOKEN_CACHE.labels("miss")

_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA", "Ed25519"}
)
_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})


def _invalid(message: str) -> AuthenticationError:
    return AuthenticationError(Reason.INVALID_TOKEN, message)


@dataclass(frozen=True, slots=True)
class _Issuer:
    """One configured issuer, precompiled: its allowed algorithms split by kind, its key cache or secret."""

    config: JwtIssuer
    asymmetric: frozenset[str]
    symmetric: frozenset[str]
    secret: bytes
    keys: JwksCache | None


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    exp: float
    # The JWKS key that verified it (None for a shared secret): a hit is only good while the issuer still serves
    # that very key, so a key rotated out of the JWKS stops its tokens at the next refresh, not at their exp.
    keys: JwksCache | None = None
    kid: str | None = None
    alg: str = ""
    key: Any = None

    def key_still_served(self) -> bool:
        return self.keys is None or self.keys.key_for(self.kid, self.alg) is self.key


def _b64json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


class JwtProvider:
    kind = IdentityKind.JWT

    def __init__(
        self,
        settings: JwtSettings,
        registry: JwksRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        # Without a shared registry the provider owns its caches and closes them itself.
        self._owns_registry = registry is None
        self._registry = registry or JwksRegistry()
        self._issuers: dict[str, _Issuer] = {}
        for issuer in settings.issuers:
            secret = issuer.secret or (os.environ.get(issuer.secret_env, "") if issuer.secret_env else "")
            uses_keys = bool(issuer.jwks_uri or issuer.discovery)
            self._issuers[issuer.issuer] = _Issuer(
                config=issuer,
                asymmetric=frozenset(a for a in issuer.algorithms if a in _ASYMMETRIC) if uses_keys else frozenset(),
                # HS* only with a secret: otherwise a public key could end up used as an HMAC secret.
                symmetric=frozenset(a for a in issuer.algorithms if a in _SYMMETRIC) if secret else frozenset(),
                secret=secret.encode(),
                keys=self._registry.get_or_create(issuer) if uses_keys else None,
            )
        self._tokens = TokenFinder(settings.sources)
        self.request_headers = self._tokens.request_headers
        self.reads_query = self._tokens.reads_query
        self._leeway = float(settings.leeway_s)
        self._cache: TLRUCache[bytes, _Cached] = TLRUCache(
            maxsize=max(settings.cache_size, 1), ttu=lambda _key, value, _now: value.exp, timer=clock
        )

    @property
    def caches(self) -> list[JwksCache]:
        """The key caches this provider uses (for ``JwksRegistry.retain`` after a reload)."""
        return [issuer.keys for issuer in self._issuers.values() if issuer.keys is not None]

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for cache in self.caches:
            await cache.start()

    async def close(self) -> None:
        if self._owns_registry:
            await self._registry.close()

    # -- request path ----------------------------------------------------------------------------------------
    def owns(self, token: str) -> bool:
        """Whether ``token`` is a JWT that names one of this provider's issuers (unverified): its verdict is final."""
        try:
            return _peek(token)[1].get("iss") in self._issuers
        except (AuthenticationError, TypeError):  # not a JWT; an unhashable iss
            return False

    def authenticate(self, inp: CheckInput) -> Identity | None:
        found = self._tokens.find(inp)
        if found is None:
            return None
        token, header = found
        digest = token_digest(token)
        cached = self._cache.get(digest)
        if cached is not None and cached.key_still_served():
            _CACHE_HIT.inc()
            return found_in(cached.identity, header)
        _CACHE_MISS.inc()
        try:
            claims, exp, verified_by = self._verify(token)
            identity = self._identity(claims, header)
        except RefreshNeeded as needed:
            needed.credential_header = header
            raise
        except AuthenticationError as refused:
            # A configured issuer's token is meshgate's: stripped even when a public route lets the request in. A
            # token it does not know (not a JWT, another issuer's) may be the upstream's own: it passes on.
            if not refused.foreign and refused.reason is not Reason.INVALID_ISSUER:
                refused.credential_header = header
            raise
        self._cache[digest] = _Cached(identity, exp, *verified_by)
        return identity

    def _verify(self, token: str) -> tuple[dict[str, Any], float, tuple[JwksCache | None, str | None, str, Any]]:
        """The token's claims and exp, and what verified it (JWKS cache, kid, alg, key; all None for a secret)."""
        header, unverified = _peek(token)
        alg = header.get("alg")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthenticationError(Reason.INVALID_ISSUER, "token has no issuer")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise AuthenticationError(Reason.INVALID_ISSUER, "token issuer is not trusted")
        if not isinstance(alg, str):
            raise _invalid("token has no algorithm")
        key: Any
        verified_by: tuple[JwksCache | None, str | None, str, Any] = (None, None, "", None)
        if alg in issuer.asymmetric and issuer.keys is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise _invalid("malformed key id")
            key = issuer.keys.key_for(kid, alg)
            if key is None:
                if issuer.keys.can_refetch():
                    raise RefreshNeeded(issuer.keys.refetch_for_unknown_kid)
                raise AuthenticationError(Reason.UNKNOWN_KEY, "token signed with an unknown key")
            verified_by = (issuer.keys, kid, alg, key)
        elif alg in issuer.symmetric:
            key = issuer.secret
        else:
            raise _invalid("token algorithm not allowed")
        config = issuer.config
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(config.audiences) or None,
                issuer=config.issuer,
                # Time claims (and the required exp) are checked below against the injected clock.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(config.audiences),
                },
            )
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError):  # only "aud" is required by pyjwt
            raise AuthenticationError(Reason.INVALID_AUDIENCE, "token audience is not accepted") from None
        except jwt.InvalidSignatureError:
            raise _invalid("token signature is invalid") from None
        except Exception:  # any other pyjwt or key error: the token is not acceptable, never a crash
            raise _invalid("token is malformed or not verifiable") from None
        return claims, self._check_times(claims), verified_by

    def _check_times(self, claims: Mapping[str, Any]) -> float:
        exp = check_times(claims, self._clock(), self._leeway)
        if exp is None:
            raise _invalid("token lacks the 'exp' claim")
        return exp

    def _identity(self, claims: dict[str, Any], header: str) -> Identity:
        mapped = map_claims(claims, self.settings.claims)
        if not mapped.subject:
            raise _invalid("token has no subject")
        return Identity(
            kind=IdentityKind.JWT,
            subject=mapped.subject,
            issuer=claims["iss"],
            roles=mapped.roles,
            scopes=mapped.scopes,
            tier=mapped.tier,
            claims=MappingProxyType(claims),
            credential_header=header,
            expires_at=float(claims["exp"]),
        )


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, unverified: only to choose the issuer and key. Garbage becomes INVALID_TOKEN."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationError(Reason.INVALID_TOKEN, "malformed token", foreign=True)
    try:
        header, claims = _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        raise _invalid("malformed token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _invalid("malformed token")
    return header, claims
