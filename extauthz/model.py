"""Plain data that the decision pipeline works on; knows nothing of protobuf or HTTP.

Both transports (gRPC ``Authorization/Check`` and Envoy's HTTP ext_authz mode) translate their request into a
``CheckInput`` and turn the ``Decision`` back into their own answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

EMPTY_CLAIMS: Mapping[str, Any] = MappingProxyType({})


class IdentityKind(StrEnum):
    JWT = "jwt"
    INTROSPECTION = "introspection"  # an opaque OAuth2 token, checked at the issuer (RFC 7662)
    API_KEY = "api_key"
    SPIFFE = "spiffe"


class Reason(StrEnum):
    """Stable reason codes: in the JSON body, the ``x-meshgate-reason`` header, audit logs and metric labels."""

    ALLOWED = "allowed"
    PUBLIC = "public"
    MISSING_CREDENTIAL = "missing_credential"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    INVALID_ISSUER = "invalid_issuer"
    INVALID_AUDIENCE = "invalid_audience"
    UNKNOWN_KEY = "unknown_key"
    INACTIVE_TOKEN = "inactive_token"  # the introspection endpoint says the token is not active
    INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
    INVALID_API_KEY = "invalid_api_key"
    API_KEY_EXPIRED = "api_key_expired"
    API_KEY_REVOKED = "api_key_revoked"
    INVALID_PRINCIPAL = "invalid_principal"
    FORBIDDEN = "forbidden"
    DENIED_BY_RULE = "denied_by_rule"
    NO_MATCHING_RULE = "no_matching_rule"
    INTERNAL_ERROR = "internal_error"
    TIMEOUT = "timeout"


@dataclass(slots=True)  # not frozen: built on every request, and frozen construction costs twice as much
class CheckInput:
    """One request to authorize (treat as read-only). Header names are lower-case; ``path`` has no query string."""

    method: str
    host: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # SPIFFE ID of the calling workload: Envoy's ``source.principal`` (gRPC) or the URI of
    # ``x-forwarded-client-cert`` (HTTP mode). Empty when the caller presented no certificate.
    source_principal: str = ""
    request_id: str = ""
    context_extensions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as established by the first identity provider that succeeded."""

    kind: IdentityKind
    subject: str
    issuer: str = ""
    client: str = ""
    principal: str = ""
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    tier: str = ""
    claims: Mapping[str, Any] = field(default_factory=lambda: EMPTY_CLAIMS)
    # Header that carried the credential, so the response can strip it before the upstream sees it.
    credential_header: str = ""
    # Epoch seconds after which this identity must be established again (token exp, API-key expiry).
    expires_at: float = math.inf


@dataclass(frozen=True, slots=True)
class Decision:
    """What to tell Envoy. ``status`` is the HTTP status for a denial (401/403/...), 200 when allowed."""

    allowed: bool
    status: int
    reason: Reason
    message: str = ""
    identity: Identity | None = None
    rule: str = ""
    request_id: str = ""
    # Set or overwrite these upstream request headers (allow only).
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    # Headers on the response to the client (deny: WWW-Authenticate, content-type, reason header).
    response_headers: tuple[tuple[str, str], ...] = ()
    # String-valued dynamic metadata for the rate-limit filter (allow only).
    metadata: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    # False for an answer given while the caller's identity was still being looked up (a public route): the next
    # request is decided afresh, with the identity by then.
    reusable: bool = True


class AuthenticationError(Exception):
    """A credential was present but is not acceptable. Its message is safe to show to the client."""

    def __init__(self, reason: Reason, message: str, *, foreign: bool = False, credential_header: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # The header that carried the refused credential, so an anonymous allow (a public route) still strips it.
        self.credential_header = credential_header
        # Not this provider's kind of credential at all (an opaque token is no JWT): when another provider also
        # refuses it, that provider's reason is the one to report.
        self.foreign = foreign
