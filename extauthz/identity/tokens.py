"""What every bearer-token provider shares: finding the token in a request and mapping its claims.

JWTs (``jwt.py``) and opaque tokens checked by OAuth2 introspection (``introspection.py``) are found the same way
(configured headers, cookies, query parameters) and their claims feed the same identity fields.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote_plus

from extauthz.config import ClaimMapping, TokenSource
from extauthz.model import AuthenticationError, CheckInput, Identity, Reason

MAX_TOKEN_BYTES = 16 * 1024


class TokenFinder:
    """Finds a bearer token in the first configured source that has one."""

    def __init__(self, sources: Iterable[TokenSource]) -> None:
        self._sources = tuple(
            TokenSource(header=s.header.lower(), prefix=s.prefix.lower(), cookie=s.cookie, query=s.query)
            for s in sources
        )
        # What the pipeline's decision cache keys on for this provider.
        self.request_headers = frozenset(
            {source.header for source in self._sources if source.header}
            | ({"cookie"} if any(source.cookie for source in self._sources) else set())
        )
        self.reads_query = any(source.query for source in self._sources)

    def find(self, inp: CheckInput) -> tuple[str, str] | None:
        """(token, header it came from or "") from the first configured source that has one; an empty or oversized
        token is refused here, before anyone hashes, parses or sends it."""
        found = self._find(inp)
        if found is not None:
            token, header = found
            if not token:
                raise AuthenticationError(Reason.INVALID_TOKEN, "empty bearer token", credential_header=header)
            if len(token) > MAX_TOKEN_BYTES:
                raise AuthenticationError(Reason.INVALID_TOKEN, "token too large", credential_header=header)
        return found

    def _find(self, inp: CheckInput) -> tuple[str, str] | None:
        headers = inp.headers
        for source in self._sources:
            if source.header:
                value = headers.get(source.header)
                if value is None:
                    continue
                if source.prefix:
                    if value[: len(source.prefix)].lower() != source.prefix:
                        continue  # another scheme (Basic, ApiKey): not ours
                    value = value[len(source.prefix) :]
                return value.strip(), source.header
            if source.cookie:
                token = _cookie(headers.get("cookie", ""), source.cookie)
                if token is not None:
                    return token, ""
            elif source.query:
                token = _query_param(inp.query, source.query)
                if token is not None:
                    return token, ""
        return None


def found_in(identity: Identity, header: str) -> Identity:
    """A cached identity for a token found in ``header`` this time (another source): the header to strip is this one."""
    return identity if identity.credential_header == header else replace(identity, credential_header=header)


def token_digest(token: str) -> bytes:
    """The key a token is cached under: its SHA-256, so no cache holds the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class MappedClaims:
    subject: str
    roles: frozenset[str]
    scopes: frozenset[str]
    tier: str


def map_claims(claims: Mapping[str, Any], mapping: ClaimMapping) -> MappedClaims:
    """The identity fields that ``mapping``'s claim paths name (roles and scopes merged over all their paths)."""
    roles: set[str] = set()
    for path in mapping.roles:
        roles.update(_strings(claim_at(claims, path), split=False))
    scopes: set[str] = set()
    for path in mapping.scopes:
        scopes.update(_strings(claim_at(claims, path), split=True))
    return MappedClaims(
        subject=scalar(claim_at(claims, mapping.subject)),
        roles=frozenset(roles),
        scopes=frozenset(scopes),
        tier=scalar(claim_at(claims, mapping.tier)) if mapping.tier else "",
    )


def check_times(claims: Mapping[str, Any], now: float, leeway: float) -> float | None:
    """Check ``exp``, ``nbf`` and ``iat`` against ``now`` within ``leeway`` seconds; the ``exp`` (None if absent)."""
    exp = _number(claims, "exp")
    if exp is not None and exp <= now - leeway:
        raise AuthenticationError(Reason.TOKEN_EXPIRED, "token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise AuthenticationError(Reason.TOKEN_NOT_YET_VALID, "token is not valid yet")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise AuthenticationError(Reason.TOKEN_NOT_YET_VALID, "token was issued in the future")
    return exp


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise AuthenticationError(Reason.INVALID_TOKEN, f"token claim {name!r} must be a number")


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dot-separated claim path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def scalar(value: Any) -> str:
    """A claim as a string: strings as they are, integers in decimal, anything else empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _strings(value: Any, *, split: bool) -> list[str]:
    if isinstance(value, str):
        return value.split() if split else [value] if value else []
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str) and item]
    return []


def _cookie(cookie_header: str, name: str) -> str | None:
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def _query_param(query: str, name: str) -> str | None:
    for part in query.lstrip("?").split("&"):
        key, sep, value = part.partition("=")
        if sep and unquote_plus(key) == name:
            return unquote_plus(value)
    return None
