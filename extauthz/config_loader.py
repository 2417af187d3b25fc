"""Build the frozen ``ExtauthzConfig`` from one policy YAML file, strictly, with ``file:line`` on every error.

The YAML mirrors ``extauthz.config`` (durations are in seconds and say so in their names)::

    version: 1                                  # optional; only 1 is accepted
    identity:
      order: [jwt, introspection, api_key, spiffe]   # providers to try, first success wins; each at most once
      jwt:
        leeway_seconds: 30
        cache_size: 10000
        sources:                                # each exactly one of header / cookie / query
          - {header: authorization, prefix: "Bearer "}
          - {cookie: session}
          - {query: access_token}
        claims: {roles: [roles, realm_access.roles, groups], scopes: [scope, scp], tier: tier, subject: sub}
        issuers:
          - issuer: https://idp.example.com
            audiences: [api]                    # required, at least one
            jwks_uri: https://idp.example.com/jwks   # one of: jwks_uri, discovery: true, secret_env, secret
            algorithms: [RS256]                 # RS/PS/ES 256-512, EdDSA, HS256-512 (HS* only with a secret)
            refresh_interval_seconds: 300       # sooner when the key set's Cache-Control max-age says so
            min_refetch_interval_seconds: 10
            fetch_timeout_seconds: 2
            ca_file: idp-ca.pem                 # PEM bundle for its https server (default: system trust store)
      introspection:                            # OAuth2 token introspection (RFC 7662) for opaque tokens
        endpoint: https://idp.example.com/oauth2/introspect
        client_id: meshgate                     # HTTP Basic client authentication
        client_secret_env: INTROSPECTION_SECRET # or client_secret (prefer the environment)
        issuer: https://idp.example.com         # optional: the answer's iss must match
        audiences: [api]                        # optional: the answer's aud must name one
        sources: [...]                          # claims: {...}  leeway_seconds: 30  as for jwt
        timeout_seconds: 0.5
        cache_seconds: 60                       # an active answer, never past the token's exp
        negative_cache_seconds: 10              # an inactive one
        max_concurrent: 32                      # calls at once; more wait (8 per slot), then 503
        cache_size: 10000
        ca_file: idp-ca.pem                     # as for a jwt issuer
      api_key: {keys_file: keys.yaml, header: x-api-key, authorization_scheme: ApiKey}
      spiffe: {trust_domains: [cluster.local], from_xfcc: true}   # xfcc_skip_by: [spiffe://...] (see mtls.py)
    response:
      headers: {subject: x-auth-subject, kind: x-auth-kind, client: x-auth-client, roles: x-auth-roles,
                tier: x-auth-tier, issuer: x-auth-issuer, reason: x-meshgate-reason}
      strip_credentials: true
      realm: meshgate
    audit: {allow_sample_rate: 0.01}
    rules:
      - name: admin-only                        # required, unique
        effect: allow                           # allow | deny
        public: false                           # allow without identity (allow only, no identity block)
        match:                                  # every key given must hold; empty/absent matches anything
          hosts: ["api.example.com", "*.example.com"]
          paths: [/exact, /prefix/*, /users/*/profile]
          path_prefixes: [/admin/]
          methods: [GET, POST]
          headers: [{name: x-env, exact: prod}, {name: x-debug, present: false}, {name: ua, prefix: curl/}]
        identity:                               # present (even {}): needs an identity; all keys must hold
          kinds: [jwt, api_key, spiffe]
          issuers: [https://idp.example.com]
          subjects: ["user-*"]
          clients: [billing]
          principals: ["spiffe://cluster.local/ns/prod/sa/*"]
          roles_any: [admin]
          roles_all: [staff, verified]
          scopes_all: [orders:read]
          tiers: [gold]

``secret_env`` is read when the file is loaded and its value stored in ``JwtIssuer.secret``; secrets are never
echoed in errors. ``api_key.keys_file`` is made absolute against the policy file's directory without resolving
symlinks, so a Kubernetes ConfigMap's ``..data`` swap is followed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extauthz.config import (
    DEFAULT_TOKEN_SOURCES,
    METADATA_KEYS,
    ApiKeySettings,
    AuditSettings,
    ClaimMapping,
    ExtauthzConfig,
    HeaderMatch,
    IdentityMatch,
    IdentitySettings,
    IntrospectionSettings,
    JwtIssuer,
    JwtSettings,
    RequestMatch,
    ResponseSettings,
    Rule,
    SpiffeSettings,
    TokenSource,
)
from extauthz.identity.mtls import is_spiffe_id
from extauthz.model import IdentityKind
from extauthz.urls import http_url_problem
from meshgate.log import redact_url
from meshgate.yamlconf import ConfigError, Reader, load, loads

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ALGORITHMS = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# RFC 9110 token characters; a leading ':' admits Envoy's pseudo-headers (":authority") in rule matches.
_HEADER_NAME = re.compile(r":?[a-z0-9!#$%&'*+.^_`|~-]+")
_HOST = re.compile(r"(\*\.)?[a-z0-9_.:\[\]-]+|\*")
_KINDS = tuple(kind.value for kind in IdentityKind)
_IDENTITY_STRING_KEYS = (
    "issuers",
    "subjects",
    "clients",
    "principals",
    "roles_any",
    "roles_all",
    "scopes_all",
    "tiers",
)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> ExtauthzConfig:
    """Load and validate the policy file at ``path``; raise ``ConfigError`` (``file:line: message``)."""
    return _build(load(path), str(path), Path(os.path.abspath(path)).parent, environ)


def parse_config(
    text: str,
    source: str = "<policy>",
    *,
    base_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ExtauthzConfig:
    """Like ``load_config`` for YAML text; relative paths resolve against ``base_dir`` (default: the cwd)."""
    base = Path(os.path.abspath(base_dir if base_dir is not None else os.getcwd()))
    return _build(loads(text, source), source, base, environ)


def _build(data: Any, source: str, base_dir: Path, environ: Mapping[str, str] | None) -> ExtauthzConfig:
    if data is None:
        raise ConfigError(source, 0, "the policy file is empty")
    root = Reader(data, source, what="mapping at the top of the policy file")
    version = root.get("version", int, 1)
    if version != 1:
        raise root.error("version", f"only version 1 is supported, got {version}")
    env = os.environ if environ is None else environ
    identity_reader = root.child("identity")
    identity = _identity(identity_reader, base_dir, env) if identity_reader else IdentitySettings()
    response_reader = root.child("response")
    response = _response(response_reader) if response_reader else ResponseSettings()
    audit_reader = root.child("audit")
    audit = _audit(audit_reader) if audit_reader else AuditSettings()
    rules = _rules(root)
    root.done()
    return ExtauthzConfig(identity=identity, rules=rules, response=response, audit=audit, source=source)


# -- small helpers -------------------------------------------------------------------------------------------
def _items(r: Reader, key: str) -> list[tuple[str, int]]:
    """The strings under ``key`` with the line of each (the key's line for a single string)."""
    values = r.strings(key)
    raw = r.data.get(key)
    lines = getattr(raw, "item_lines", None) if isinstance(raw, list) else None
    if lines is None:
        lines = [r.line_of(key)] * len(values)
    return list(zip(values, lines, strict=True))


def _header_name(r: Reader, key: str, value: str, line: int | None = None) -> str:
    name = value.strip().lower()
    if not _HEADER_NAME.fullmatch(name):
        where = line if line is not None else r.line_of(key)
        raise ConfigError(r.source, where, f"{key}: {value!r} is not a valid header name")
    return name


def _header_option(r: Reader, key: str, default: str) -> str:
    value = r.get(key, str, default)
    return _header_name(r, key, value)


def _positive(r: Reader, key: str, default: float) -> float:
    value = r.number(key, default)
    if value <= 0:
        raise r.error(key, f"must be positive, got {value:g}")
    return value


def _unique(r: Reader, key: str, values: list[tuple[str, int]]) -> None:
    seen: set[str] = set()
    for value, line in values:
        if value in seen:
            raise ConfigError(r.source, line, f"{key}: {value!r} is listed twice")
        seen.add(value)


def _kinds(r: Reader, key: str) -> tuple[IdentityKind, ...]:
    kinds: list[IdentityKind] = []
    for value, line in _items(r, key):
        if value not in _KINDS:
            raise ConfigError(r.source, line, f"{key}: unknown identity kind {value!r}; expected one of {_KINDS}")
        kinds.append(IdentityKind(value))
    return tuple(kinds)


# -- identity ------------------------------------------------------------------------------------------------
def _identity(r: Reader, base_dir: Path, env: Mapping[str, str]) -> IdentitySettings:
    defaults = IdentitySettings()
    order = defaults.order
    if r.has("order"):
        items = _items(r, "order")
        _unique(r, "order", items)
        order = _kinds(r, "order")
        if not order:
            raise r.error("order", "must name at least one identity provider")
    jwt_reader = r.child("jwt")
    introspection_reader = r.child("introspection")
    api_key_reader = r.child("api_key")
    spiffe_reader = r.child("spiffe")
    settings = IdentitySettings(
        order=order,
        jwt=_jwt(jwt_reader, base_dir, env) if jwt_reader else defaults.jwt,
        introspection=(
            _introspection(introspection_reader, base_dir, env) if introspection_reader else defaults.introspection
        ),
        api_key=_api_key(api_key_reader, base_dir) if api_key_reader else defaults.api_key,
        spiffe=_spiffe(spiffe_reader) if spiffe_reader else defaults.spiffe,
    )
    r.done()
    return settings


def _jwt(r: Reader, base_dir: Path, env: Mapping[str, str]) -> JwtSettings:
    defaults = JwtSettings()
    leeway = r.number("leeway_seconds", defaults.leeway_s, minimum=0)
    cache_size = r.get("cache_size", int, defaults.cache_size)
    if cache_size < 0:
        raise r.error("cache_size", f"must be at least 0, got {cache_size}")
    sources = _token_sources(r)
    claims_reader = r.child("claims")
    claims = _claims(claims_reader) if claims_reader else defaults.claims
    issuers: list[JwtIssuer] = []
    seen: set[str] = set()
    for item in r.children("issuers"):
        issuer = _issuer(item, base_dir, env)
        if issuer.issuer in seen:
            raise item.error("issuer", f"issuer {issuer.issuer!r} is configured twice")
        seen.add(issuer.issuer)
        issuers.append(issuer)
    r.done()
    return JwtSettings(issuers=tuple(issuers), sources=sources, leeway_s=leeway, claims=claims, cache_size=cache_size)


def _token_sources(r: Reader) -> tuple[TokenSource, ...]:
    if not r.has("sources"):
        return DEFAULT_TOKEN_SOURCES
    sources = tuple(_token_source(item) for item in r.children("sources"))
    if not sources:
        raise r.error("sources", "must list at least one token source")
    return sources


def _introspection(r: Reader, base_dir: Path, env: Mapping[str, str]) -> IntrospectionSettings:
    defaults = IntrospectionSettings()
    endpoint = r.require("endpoint", str)
    if problem := http_url_problem(endpoint):
        raise r.error("endpoint", problem)
    if not endpoint.startswith("https://") and not _is_loopback_url(endpoint):
        raise r.error("endpoint", "must be https (it carries the token and the client secret), or on loopback")
    client_id = r.require("client_id", str)
    if not client_id:
        raise r.error("client_id", "must not be empty")
    secret = _secret_value(r, "client_secret")
    secret_env = r.get("client_secret_env", str, "")
    if bool(secret) == bool(secret_env):
        raise ConfigError(r.source, r.line, "introspection needs exactly one of client_secret_env, client_secret")
    if secret_env:
        secret = _from_env(r, "client_secret_env", env)
    audiences = r.strings("audiences")
    if not all(audiences):
        raise r.error("audiences", "must not hold an empty audience")
    claims_reader = r.child("claims")
    max_concurrent = r.get("max_concurrent", int, defaults.max_concurrent)
    if max_concurrent < 1:
        raise r.error("max_concurrent", f"must be at least 1, got {max_concurrent}")
    cache_size = r.get("cache_size", int, defaults.cache_size)
    if cache_size < 0:
        raise r.error("cache_size", f"must be at least 0, got {cache_size}")
    settings = IntrospectionSettings(
        endpoint=endpoint,
        client_id=client_id,
        client_secret=secret,
        client_secret_env=secret_env,
        issuer=r.get("issuer", str, ""),
        audiences=audiences,
        sources=_token_sources(r),
        claims=_claims(claims_reader) if claims_reader else defaults.claims,
        leeway_s=r.number("leeway_seconds", defaults.leeway_s, minimum=0),
        timeout_s=_positive(r, "timeout_seconds", defaults.timeout_s),
        cache_s=r.number("cache_seconds", defaults.cache_s, minimum=0),
        negative_cache_s=r.number("negative_cache_seconds", defaults.negative_cache_s, minimum=0),
        max_concurrent=max_concurrent,
        cache_size=cache_size,
        ca_file=_ca_file(r, base_dir),
    )
    r.done()
    return settings


def _token_source(r: Reader) -> TokenSource:
    header = r.get("header", str, "")
    prefix = r.get("prefix", str, "")
    cookie = r.get("cookie", str, "")
    query = r.get("query", str, "")
    r.done()
    given = [name for name, value in (("header", header), ("cookie", cookie), ("query", query)) if value]
    if len(given) != 1:
        raise ConfigError(r.source, r.line, "a token source needs exactly one of header, cookie, query")
    if prefix and not header:
        raise r.error("prefix", "only applies to a header source")
    if header:
        header = _header_name(r, "header", header)
    return TokenSource(header=header, prefix=prefix, cookie=cookie, query=query)


def _claims(r: Reader) -> ClaimMapping:
    defaults = ClaimMapping()
    claims = ClaimMapping(
        roles=r.strings("roles", defaults.roles),
        scopes=r.strings("scopes", defaults.scopes),
        tier=r.get("tier", str, defaults.tier),
        subject=r.get("subject", str, defaults.subject),
    )
    if not claims.subject:
        raise r.error("subject", "must name a claim")
    r.done()
    return claims


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _issuer(r: Reader, base_dir: Path, env: Mapping[str, str]) -> JwtIssuer:
    defaults = JwtIssuer(issuer="")
    issuer = r.require("issuer", str)
    if not issuer.strip():
        raise r.error("issuer", "must not be empty")
    audiences = r.strings("audiences")
    if not audiences or not all(audiences):
        raise ConfigError(r.source, r.line_of("audiences"), "audiences: list at least one non-empty audience")
    algorithms = _algorithms(r, defaults.algorithms)
    jwks_uri = r.get("jwks_uri", str, "")
    discovery = r.get("discovery", bool, False)
    secret = _secret_value(r, "secret")
    secret_env = r.get("secret_env", str, "")
    options = {"jwks_uri": jwks_uri, "discovery": discovery, "secret": secret, "secret_env": secret_env}
    given = [key for key, value in options.items() if value]
    if len(given) != 1:
        raise ConfigError(
            r.source,
            r.line,
            f"issuer {issuer!r} needs exactly one of jwks_uri, discovery: true, secret_env, secret"
            + (f" (got {', '.join(given)})" if given else ""),
        )
    hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(algorithms):
        raise r.error("algorithms", "an issuer cannot mix HS* with asymmetric algorithms")
    if hmac and not (secret or secret_env):
        raise r.error("algorithms", f"{hmac[0]} needs secret_env (or secret); a JWKS cannot supply HMAC keys")
    if not hmac and (secret or secret_env):
        key = "secret" if secret else "secret_env"
        raise r.error(key, "a shared secret only works with HS256/HS384/HS512 algorithms")
    if jwks_uri and (problem := http_url_problem(jwks_uri)):
        # The error reaches logs and /v1/reload: quoted redacted, and not at all with an "@" in it (a password
        # holding "?" or "/" hides its userinfo from any parser, redact_url's too).
        quoted = "" if "@" in jwks_uri else f", got {redact_url(jwks_uri)!r}"
        raise r.error("jwks_uri", f"{problem}{quoted}")
    if discovery and (problem := http_url_problem(issuer)):
        raise r.error("discovery", f"OIDC discovery needs an http(s) issuer URL: the issuer {problem}")
    if secret_env:
        secret = _from_env(r, "secret_env", env)
    result = JwtIssuer(
        issuer=issuer,
        audiences=audiences,
        jwks_uri=jwks_uri,
        discovery=discovery,
        algorithms=algorithms,
        secret=secret,
        secret_env=secret_env,
        refresh_interval_s=_positive(r, "refresh_interval_seconds", defaults.refresh_interval_s),
        min_refetch_interval_s=r.number("min_refetch_interval_seconds", defaults.min_refetch_interval_s, minimum=0),
        fetch_timeout_s=_positive(r, "fetch_timeout_seconds", defaults.fetch_timeout_s),
        ca_file=_ca_file(r, base_dir),
    )
    r.done()
    return result


def _ca_file(r: Reader, base_dir: Path) -> str:
    """``ca_file``, relative to the policy file's folder: a PEM bundle that must load now, not at the first fetch."""
    path = r.get("ca_file", str, "")
    if not path:
        return ""
    path = os.path.abspath(os.path.join(base_dir, path))
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as error:  # ValueError: a NUL in the path
        raise r.error("ca_file", f"cannot load {path!r}: {error}") from None
    return path


def _from_env(r: Reader, key: str, env: Mapping[str, str]) -> str:
    """The value of the environment variable that ``key`` names; never empty."""
    name = r.get(key, str, "")
    value = env.get(name, "")
    if not value:
        raise r.error(key, f"environment variable {name} is not set or empty")
    return value


def _secret_value(r: Reader, key: str) -> str:
    """A secret checked by hand: Reader's type errors quote the value, and a secret must never be echoed."""
    r.get(key, object, None)  # mark as used
    value = r.data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise r.error(key, "must be a non-empty string (value not shown)")
    return value


def _algorithms(r: Reader, default: tuple[str, ...]) -> tuple[str, ...]:
    if not r.has("algorithms"):
        r.strings("algorithms")
        return default
    items = _items(r, "algorithms")
    if not items:
        raise r.error("algorithms", "list at least one algorithm")
    for alg, line in items:
        if alg.lower() == "none":
            raise ConfigError(r.source, line, "algorithms: 'none' is never accepted (unsigned tokens)")
        if alg not in ALGORITHMS:
            allowed = ", ".join(sorted(ALGORITHMS))
            raise ConfigError(r.source, line, f"algorithms: unknown algorithm {alg!r}; expected one of {allowed}")
    _unique(r, "algorithms", items)
    return tuple(alg for alg, _ in items)


def _api_key(r: Reader, base_dir: Path) -> ApiKeySettings:
    defaults = ApiKeySettings()
    keys_file = r.get("keys_file", str, "")
    if keys_file:
        # abspath, not resolve(): keep symlinks so a ConfigMap ..data swap is seen by the next reload.
        keys_file = os.path.abspath(os.path.join(base_dir, keys_file))
    scheme = r.get("authorization_scheme", str, defaults.authorization_scheme)
    if scheme and (" " in scheme.strip() or scheme != scheme.strip()):
        raise r.error("authorization_scheme", f"must be one word, got {scheme!r}")
    settings = ApiKeySettings(
        keys_file=keys_file, header=_header_option(r, "header", defaults.header), authorization_scheme=scheme
    )
    r.done()
    return settings


def _spiffe(r: Reader) -> SpiffeSettings:
    domains = _items(r, "trust_domains")
    for domain, line in domains:
        if not domain or "/" in domain or ":" in domain or domain != domain.lower():
            raise ConfigError(r.source, line, f"trust_domains: {domain!r} is not a trust domain (e.g. cluster.local)")
    skip_by = _items(r, "xfcc_skip_by")
    for spiffe_id, line in skip_by:
        if not is_spiffe_id(spiffe_id):
            message = f"xfcc_skip_by: {spiffe_id!r} is not a SPIFFE ID (spiffe://<lower-case domain>/<path>)"
            raise ConfigError(r.source, line, message)
    settings = SpiffeSettings(
        trust_domains=tuple(domain for domain, _ in domains),
        from_xfcc=r.get("from_xfcc", bool, SpiffeSettings().from_xfcc),
        xfcc_skip_by=tuple(spiffe_id for spiffe_id, _ in skip_by),
    )
    r.done()
    return settings


# -- response and audit --------------------------------------------------------------------------------------
def _response(r: Reader) -> ResponseSettings:
    defaults = ResponseSettings()
    headers = r.child("headers")
    names: dict[str, str] = {}
    if headers is not None:
        for key in ("subject", "kind", "client", "roles", "tier", "issuer", "reason"):
            names[f"{key}_header"] = _header_option(headers, key, getattr(defaults, f"{key}_header"))
        headers.done()
    metadata_keys = defaults.metadata_keys
    if r.has("metadata"):
        listed = _items(r, "metadata")
        _unique(r, "metadata", listed)
        for value, line in listed:
            if value not in METADATA_KEYS:
                raise ConfigError(r.source, line, f"metadata: unknown key {value!r}; expected some of {METADATA_KEYS}")
        metadata_keys = tuple(value for value, _ in listed)
    settings = ResponseSettings(
        **names,
        strip_credentials=r.get("strip_credentials", bool, defaults.strip_credentials),
        realm=r.get("realm", str, defaults.realm),
        metadata_keys=metadata_keys,
    )
    r.done()
    return settings


def _audit(r: Reader) -> AuditSettings:
    rate = r.number("allow_sample_rate", AuditSettings().allow_sample_rate)
    if not 0.0 <= rate <= 1.0:
        raise r.error("allow_sample_rate", f"must be between 0 and 1, got {rate:g}")
    r.done()
    return AuditSettings(allow_sample_rate=rate)


# -- rules ---------------------------------------------------------------------------------------------------
def _rules(root: Reader) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for item in root.children("rules"):
        rule = _rule(item)
        if rule.name in seen:
            raise item.error("name", f"rule name {rule.name!r} is already used at {seen[rule.name]}")
        seen[rule.name] = rule.source
        rules.append(rule)
    return tuple(rules)


def _rule(r: Reader) -> Rule:
    name = r.require("name", str).strip()
    if not name:
        raise r.error("name", "must not be empty")
    effect = r.choice("effect", ("allow", "deny"), "allow")
    public = r.get("public", bool, False)
    match_reader = r.child("match")
    match = _request_match(match_reader) if match_reader else RequestMatch()
    identity = None
    if r.has("identity"):
        # `identity: {}` (or a bare `identity:`) means "any identity": the rule needs someone authenticated.
        identity_reader = r.child("identity")
        identity = _identity_match(identity_reader) if identity_reader else IdentityMatch()
    if public and effect != "allow":
        raise r.error("public", "only an allow rule can be public")
    if public and identity is not None:
        raise r.error("public", "a public rule needs no identity; remove its identity block")
    r.done()
    return Rule(name=name, effect=effect, public=public, match=match, identity=identity, source=f"{r.source}:{r.line}")


def _request_match(r: Reader) -> RequestMatch:
    hosts: list[str] = []
    for value, line in _items(r, "hosts"):
        host = value.strip().lower()
        if not _HOST.fullmatch(host) or host.count("*") > 1 or (host != "*" and ".." in host):
            raise ConfigError(r.source, line, f"hosts: {value!r} is not a host (a leading '*.' is allowed)")
        hosts.append(host)
    paths = _paths(r, "paths")
    prefixes = _paths(r, "path_prefixes")
    for prefix, line in prefixes:
        if "*" in prefix or "?" in prefix:
            raise ConfigError(r.source, line, f"path_prefixes: {prefix!r} has a wildcard; use paths for globs")
    methods: list[str] = []
    for value, line in _items(r, "methods"):
        method = value.strip().upper()
        if method not in HTTP_METHODS:
            raise ConfigError(
                r.source,
                line,
                f"methods: unknown HTTP method {value!r}; expected one of {sorted(HTTP_METHODS)}",
            )
        methods.append(method)
    headers = tuple(_header_match(item) for item in r.children("headers"))
    r.done()
    return RequestMatch(
        hosts=tuple(hosts),
        paths=tuple(path for path, _ in paths),
        path_prefixes=tuple(prefix for prefix, _ in prefixes),
        methods=tuple(methods),
        headers=headers,
    )


def _paths(r: Reader, key: str) -> list[tuple[str, int]]:
    items = _items(r, key)
    for value, line in items:
        if not value.startswith("/"):
            raise ConfigError(r.source, line, f"{key}: {value!r} must start with '/'")
    return items


def _optional_str(r: Reader, key: str) -> str | None:
    if r.data.get(key) is None:
        r.get(key, object, None)  # mark the key as known
        return None
    return r.get(key, str, "")


def _header_match(r: Reader) -> HeaderMatch:
    name = _header_name(r, "name", r.require("name", str))
    exact = _optional_str(r, "exact")
    prefix = _optional_str(r, "prefix")
    present = None if r.data.get("present") is None else r.get("present", bool, False)
    r.get("present", object, None)
    r.done()
    if sum(value is not None for value in (exact, prefix, present)) != 1:
        raise ConfigError(r.source, r.line, f"header {name!r}: give exactly one of exact, prefix, present")
    return HeaderMatch(name=name, exact=exact, prefix=prefix, present=present)


def _identity_match(r: Reader) -> IdentityMatch:
    match = IdentityMatch(
        kinds=_kinds(r, "kinds"),
        issuers=r.strings("issuers"),
        subjects=r.strings("subjects"),
        clients=r.strings("clients"),
        principals=r.strings("principals"),
        roles_any=r.strings("roles_any"),
        roles_all=r.strings("roles_all"),
        scopes_all=r.strings("scopes_all"),
        tiers=r.strings("tiers"),
    )
    for key in _IDENTITY_STRING_KEYS:
        for value, line in _items(r, key):
            if not value:
                raise ConfigError(r.source, line, f"{key}: empty string")
    r.done()
    return match
