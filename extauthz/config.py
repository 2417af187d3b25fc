"""Typed, frozen shape of the extauthz policy file (one YAML file).

``extauthz.config_loader`` builds these from YAML (strictly, with file:line on every error); the identity providers,
the policy compiler and the response builder consume them. Defaults here are the documented defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extauthz.model import IdentityKind


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a JWT may be found. Exactly one of header/cookie/query is set."""

    header: str = ""
    prefix: str = ""  # e.g. "Bearer " for the Authorization header (compared case-insensitively)
    cookie: str = ""
    query: str = ""


DEFAULT_TOKEN_SOURCES = (TokenSource(header="authorization", prefix="Bearer "),)


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""  # one of jwks_uri, discovery, secret_env/secret
    discovery: bool = False  # fetch <issuer>/.well-known/openid-configuration for jwks_uri
    algorithms: tuple[str, ...] = ("RS256",)
    secret: str = field(default="", repr=False)  # HS* only; prefer secret_env
    secret_env: str = ""
    refresh_interval_s: float = 300.0  # background JWKS refresh
    min_refetch_interval_s: float = 10.0  # unknown-kid refetch at most this often
    fetch_timeout_s: float = 2.0
    ca_file: str = ""  # PEM bundle to verify the issuer's https server (default: the system's trust store)


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Claim paths (dot-separated) that feed rules, headers and metadata."""

    roles: tuple[str, ...] = ("roles", "realm_access.roles", "groups")
    scopes: tuple[str, ...] = ("scope", "scp")  # a string is split on spaces, a list is taken as is
    tier: str = "tier"
    subject: str = "sub"


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuers: tuple[JwtIssuer, ...] = ()
    sources: tuple[TokenSource, ...] = DEFAULT_TOKEN_SOURCES
    leeway_s: float = 30.0
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    cache_size: int = 10_000  # verified-token cache entries


@dataclass(frozen=True, slots=True)
class IntrospectionSettings:
    """OAuth2 token introspection (RFC 7662) for opaque bearer tokens; not configured while ``endpoint`` is empty."""

    endpoint: str = ""  # https (plain http only to a loopback address: it carries the token and the secret)
    client_id: str = ""  # meshgate's own client, authenticated with HTTP Basic (client_secret_basic)
    client_secret: str = field(default="", repr=False)  # read from client_secret_env at load; never logged
    client_secret_env: str = ""
    issuer: str = ""  # when set, an answer's ``iss`` (if any) must equal it; the identity's issuer either way
    audiences: tuple[str, ...] = ()  # when set, an answer's ``aud`` must name one of them
    sources: tuple[TokenSource, ...] = DEFAULT_TOKEN_SOURCES
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    leeway_s: float = 30.0
    timeout_s: float = 0.5  # one call, connect to last byte, on the request path: under the deadline
    cache_s: float = 60.0  # an active answer is reused this long at most, never past the token's exp
    negative_cache_s: float = 10.0  # an inactive answer
    max_concurrent: int = 32  # calls at once; more wait (QUEUED_PER_SLOT each), past that 503
    cache_size: int = 10_000
    ca_file: str = ""  # PEM bundle to verify the endpoint's https server (default: the system's trust store)


@dataclass(frozen=True, slots=True)
class ApiKeySettings:
    keys_file: str = ""  # YAML file of clients and their hashed keys, resolved relative to the policy file
    header: str = "x-api-key"
    authorization_scheme: str = "ApiKey"  # also accept "Authorization: ApiKey <key>"; "" disables


@dataclass(frozen=True, slots=True)
class SpiffeSettings:
    trust_domains: tuple[str, ...] = ()  # empty = any trust domain
    # HTTP mode has no peer data: read the URI SAN that Envoy forwards in x-forwarded-client-cert.
    from_xfcc: bool = True
    # XFCC elements appended by these proxies (their own SPIFFE ID in ``By=``) are skipped: under Istio, extauthz's
    # own sidecar appends the hop from the Envoy that asked, after the element that names the real caller.
    xfcc_skip_by: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    order: tuple[IdentityKind, ...] = (
        IdentityKind.JWT,
        IdentityKind.INTROSPECTION,
        IdentityKind.API_KEY,
        IdentityKind.SPIFFE,
    )
    jwt: JwtSettings = field(default_factory=JwtSettings)
    introspection: IntrospectionSettings = field(default_factory=IntrospectionSettings)
    api_key: ApiKeySettings = field(default_factory=ApiKeySettings)
    spiffe: SpiffeSettings = field(default_factory=SpiffeSettings)


# Identity fields Envoy can get as dynamic metadata (strings), and those sent unless the policy lists others: what
# rate limits key on. Each one costs Envoy work per request, most in HTTP mode (one header -> metadata each).
METADATA_KEYS = ("sub", "client", "tier", "roles", "kind", "issuer", "principal")
DEFAULT_METADATA_KEYS = ("sub", "client", "tier", "roles")


@dataclass(frozen=True, slots=True)
class ResponseSettings:
    subject_header: str = "x-auth-subject"
    kind_header: str = "x-auth-kind"
    client_header: str = "x-auth-client"
    roles_header: str = "x-auth-roles"
    tier_header: str = "x-auth-tier"
    issuer_header: str = "x-auth-issuer"
    reason_header: str = "x-meshgate-reason"
    strip_credentials: bool = True
    realm: str = "meshgate"
    metadata_keys: tuple[str, ...] = DEFAULT_METADATA_KEYS


@dataclass(frozen=True, slots=True)
class AuditSettings:
    allow_sample_rate: float = 0.01  # every deny is logged; this share of allows


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-cased by the loader
    exact: str | None = None
    prefix: str | None = None
    present: bool | None = None


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """Request side of a rule. Empty tuples match anything. Paths: exact, ``/prefix/*`` or glob (``*``, ``?``)."""

    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class IdentityMatch:
    """Identity side of a rule. Every field that is set must hold; ``*`` globs allowed in principals/subjects."""

    kinds: tuple[IdentityKind, ...] = ()
    issuers: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    roles_any: tuple[str, ...] = ()
    roles_all: tuple[str, ...] = ()
    scopes_all: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    effect: str = "allow"  # "allow" | "deny"
    public: bool = False  # allow without any identity (effect allow only)
    match: RequestMatch = field(default_factory=RequestMatch)
    identity: IdentityMatch | None = None
    source: str = ""  # "file:line" for messages


@dataclass(frozen=True, slots=True)
class ExtauthzConfig:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    rules: tuple[Rule, ...] = ()
    response: ResponseSettings = field(default_factory=ResponseSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    source: str = ""  # path of the file it came from
