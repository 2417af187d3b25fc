"""Compile policy rules once into flat matchers; ``Policy.evaluate`` then only does set lookups and prefix tests.

Evaluation order (identity was already established by the pipeline):

1. deny rules whose request match holds, and whose identity block (if any) holds: 403 ``denied_by_rule``
   (a deny rule with an identity block needs an identity to match; one without it denies everybody);
2. public allow rules whose request match holds: allowed, ``public``;
3. no identity: 401 with the rejected credential's reason and message, else ``missing_credential``;
4. allow rules whose request and identity match hold (no identity block = any identity): allowed, ``allowed``;
5. otherwise, when the identity is the peer's SPIFFE ID and the request also presented a credential that was
   rejected (e.g. the Istio gateway's ID on a request carrying an expired token): 401 with that credential's
   reason, so the client learns to renew it rather than that the hop is forbidden. A caller who authenticated
   with a credential of its own is answered for that identity (403), whatever else it sent;
6. otherwise 403: ``forbidden`` when an allow rule matched the request but not the identity (its name is the
   verdict's rule, for the audit log), ``no_matching_rule`` when none matched the request.

Within a kind, rules are tried in file order. Matching semantics:

- hosts: case-insensitive; ``*.example.com`` matches any subdomain (not the apex); ``*`` matches any host; a
  request's ``:port`` is ignored unless the rule names a port.
- paths: exact, or a glob where ``*`` matches any run of characters (``/`` included, as in Istio) and ``?`` one
  character; ``/api/*`` is therefore "everything below /api/". path_prefixes: plain ``str.startswith``.
  ``paths`` and ``path_prefixes`` together form one condition (any entry may match). Paths are compared as
  given: have Envoy normalize them (``normalize_path``, ``merge_slashes``) so ``/a/../admin`` cannot dodge a rule.
- methods: case-insensitive. headers: all listed conditions must hold.
- subjects and principals: exact, or a glob where ``*`` matches any run of characters.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

from extauthz.config import HeaderMatch, IdentityMatch, RequestMatch, Rule
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from extauthz.policy_api import Verdict

MISSING_CREDENTIAL_MESSAGE = "authentication required"
FORBIDDEN_MESSAGE = "access to this resource is not allowed for this identity"
NO_MATCHING_RULE_MESSAGE = "no policy rule allows this request"
DENIED_MESSAGE = "request denied by policy"

_MISSING = Verdict(False, 401, Reason.MISSING_CREDENTIAL, message=MISSING_CREDENTIAL_MESSAGE)
_NO_MATCH = Verdict(False, 403, Reason.NO_MATCHING_RULE, message=NO_MATCHING_RULE_MESSAGE)


def _glob_regex(patterns: Iterable[str], *, single_char: bool) -> re.Pattern[str] | None:
    """One alternation for all globs; DOTALL so odd characters in a path cannot make a deny rule miss."""
    parts = []
    for pattern in patterns:
        body = re.escape(pattern).replace(r"\*", ".*")
        if single_char:
            body = body.replace(r"\?", ".")
        parts.append(f"(?:{body})")
    return re.compile("|".join(parts), re.DOTALL) if parts else None


def _split_globs(values: Iterable[str], wildcards: str) -> tuple[frozenset[str], list[str]]:
    exact = frozenset(value for value in values if not any(ch in value for ch in wildcards))
    globs = [value for value in values if any(ch in value for ch in wildcards)]
    return exact, globs


def host_parts(host: str) -> tuple[str, str]:
    """(host with its port, host without it), lower-case, without a trailing dot or an empty port: Envoy and most
    upstreams treat ``admin.example.com.`` and ``admin.example.com:`` as ``admin.example.com``, so rules must too."""
    host = host.lower()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        if end == -1:
            return host, host
        bare, rest = host[: end + 1], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") and rest[1:].isdigit() else ""
    else:
        name, sep, port = host.rpartition(":")
        if sep and ":" not in name and (port.isdigit() or not port):
            bare = name
        else:
            bare, port = host, ""
        bare = bare.rstrip(".")
    return (f"{bare}:{port}" if port else bare), bare


# Predicates are closures that test only what a rule names: the request path calls one function per rule
# side, with no attribute lookups or "is this condition set?" branches.
RequestPredicate = Callable[[CheckInput, str, str], bool]  # (request, lower-case host, host without port)
IdentityPredicate = Callable[[Identity], bool]


def _always(*_: object) -> bool:
    return True


def _all_of(checks: list[Callable[..., bool]]) -> Callable[..., bool]:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda *args: first(*args) and second(*args)
    every = tuple(checks)

    def holds(*args: object) -> bool:
        for check in every:  # noqa: SIM110 - a plain loop: no generator per call
            if not check(*args):
                return False
        return True

    return holds


def _header_predicate(match: HeaderMatch, *, any_copy: bool) -> RequestPredicate:
    """``any_copy`` (deny rules): a header sent several times arrives joined with commas (``1,1``), and a deny
    rule must still see its copies; an allow rule keeps matching the whole value (more copies: no match)."""
    name, exact, prefix, present = match.name.lower(), match.exact, match.prefix, match.present
    if present is not None:
        return lambda inp, _h, _b: (name in inp.headers) is present
    if exact is not None:
        if any_copy:
            is_exact: Callable[[str], bool] = exact.__eq__  # built once, not per request
            return lambda inp, _h, _b: _copies(inp, name, is_exact)
        return lambda inp, _h, _b: inp.headers.get(name) == exact
    if prefix is not None:
        if any_copy:
            has_prefix: Callable[[str], bool] = operator.methodcaller("startswith", prefix)
            return lambda inp, _h, _b: _copies(inp, name, has_prefix)
        return lambda inp, _h, _b: inp.headers.get(name, "").startswith(prefix) and name in inp.headers
    return lambda inp, _h, _b: name in inp.headers  # no condition given: the header must be present


def _copies(inp: CheckInput, name: str, test: Callable[[str], bool]) -> bool:
    """Does the header's whole value, or any of its comma-separated copies, pass ``test``?"""
    value = inp.headers.get(name)
    if value is None:
        return False
    return test(value) or ("," in value and any(test(copy.strip()) for copy in value.split(",")))


def _host_predicate(hosts: list[str]) -> RequestPredicate | None:
    if not hosts or "*" in hosts:
        return None
    exact = frozenset(host for host in hosts if not host.startswith("*."))
    suffixes = tuple(host[1:] for host in hosts if host.startswith("*."))  # "*.example.com" -> ".example.com"
    if not suffixes:
        return lambda _i, host, bare: host in exact or bare in exact
    return lambda _i, host, bare: host in exact or bare in exact or bare.endswith(suffixes)


def _path_predicate(match: RequestMatch) -> RequestPredicate | None:
    if not (match.paths or match.path_prefixes):
        return None
    exact, globs = _split_globs(match.paths, "*?")
    prefixes = list(match.path_prefixes)
    rest = []
    for glob in globs:
        head = glob[:-1]
        if glob.endswith("*") and "*" not in head and "?" not in head:
            prefixes.append(head)  # "/api/*" is a prefix test, no regex needed
        else:
            rest.append(glob)
    starts = tuple(prefixes)
    regex = _glob_regex(rest, single_char=True)
    if regex is None:
        if not starts:
            return lambda inp, _h, _b: inp.path in exact
        if not exact:
            return lambda inp, _h, _b: inp.path.startswith(starts)
        return lambda inp, _h, _b: inp.path in exact or inp.path.startswith(starts)
    full = regex.fullmatch
    return lambda inp, _h, _b: inp.path in exact or inp.path.startswith(starts) or full(inp.path) is not None


def _request_predicate(match: RequestMatch, *, deny: bool) -> tuple[RequestPredicate, bool]:
    """The request side of one rule minus the method (rules are indexed by method); also "does it read host"."""
    host = _host_predicate([host.lower() for host in match.hosts])
    path = _path_predicate(match)
    checks = [check for check in (host, path) if check is not None]
    checks.extend(_header_predicate(header, any_copy=deny) for header in match.headers)
    return _all_of(checks), host is not None


def _glob_predicate(values: tuple[str, ...], read: Callable[[Identity], str]) -> IdentityPredicate | None:
    if not values:
        return None
    exact, globs = _split_globs(values, "*")
    regex = _glob_regex(globs, single_char=False)
    if regex is None:
        return lambda identity: read(identity) in exact
    full = regex.fullmatch

    def holds(identity: Identity) -> bool:
        value = read(identity)
        return value in exact or (bool(value) and full(value) is not None)

    return holds


def _identity_predicate(match: IdentityMatch) -> IdentityPredicate:
    checks: list[Callable[..., bool]] = []
    kinds = frozenset(IdentityKind(kind) for kind in match.kinds)
    issuers, clients, tiers = frozenset(match.issuers), frozenset(match.clients), frozenset(match.tiers)
    roles_any, roles_all = frozenset(match.roles_any), frozenset(match.roles_all)
    scopes_all = frozenset(match.scopes_all)
    if kinds:
        checks.append(lambda identity: identity.kind in kinds)
    if issuers:
        checks.append(lambda identity: identity.issuer in issuers)
    if clients:
        checks.append(lambda identity: identity.client in clients)
    if tiers:
        checks.append(lambda identity: identity.tier in tiers)
    if roles_any:
        checks.append(lambda identity: not roles_any.isdisjoint(identity.roles))
    if roles_all:
        checks.append(lambda identity: roles_all <= identity.roles)
    if scopes_all:
        checks.append(lambda identity: scopes_all <= identity.scopes)
    for glob in (
        _glob_predicate(match.subjects, lambda identity: identity.subject),
        _glob_predicate(match.principals, lambda identity: identity.principal),
    ):
        if glob is not None:
            checks.append(glob)
    return _all_of(checks)


class _CompiledRule:
    __slots__ = ("forbidden", "identity", "methods", "name", "request", "uses_host", "verdict")

    def __init__(self, rule: Rule) -> None:
        if rule.effect not in ("allow", "deny"):
            raise ValueError(f"rule {rule.name!r}: effect must be allow or deny, got {rule.effect!r}")
        self.name = rule.name
        self.methods = frozenset(method.upper() for method in rule.match.methods)
        self.request, self.uses_host = _request_predicate(rule.match, deny=rule.effect == "deny")
        self.identity = _identity_predicate(rule.identity) if rule.identity is not None else None
        if rule.effect == "deny":
            self.verdict = Verdict(False, 403, Reason.DENIED_BY_RULE, rule=rule.name, message=DENIED_MESSAGE)
        elif rule.public:
            self.verdict = Verdict(True, 200, Reason.PUBLIC, rule=rule.name)
        else:
            self.verdict = Verdict(True, 200, Reason.ALLOWED, rule=rule.name)
        self.forbidden = Verdict(False, 403, Reason.FORBIDDEN, rule=rule.name, message=FORBIDDEN_MESSAGE)


# What evaluate() unpacks per rule: (request predicate, identity predicate or None, verdict, 403 verdict).
_Entry = tuple[RequestPredicate, IdentityPredicate | None, Verdict, Verdict]
_Bucket = tuple[tuple[_Entry, ...], tuple[_Entry, ...], tuple[_Entry, ...]]


def _bucket(rules: Iterable[_CompiledRule], method: str | None) -> _Bucket:
    """(deny, public, allow) rules that can apply to ``method`` (None: a method no rule names)."""
    applicable = [rule for rule in rules if not rule.methods or (method is not None and method in rule.methods)]

    def of(reason: Reason) -> tuple[_Entry, ...]:
        return tuple(
            (rule.request, rule.identity, rule.verdict, rule.forbidden)
            for rule in applicable
            if rule.verdict.reason is reason
        )

    return of(Reason.DENIED_BY_RULE), of(Reason.PUBLIC), of(Reason.ALLOWED)


class Policy:
    """A compiled, immutable policy (implements ``extauthz.policy_api.CompiledPolicy``)."""

    __slots__ = ("_by_method", "_fallback", "_uses_host", "header_names", "rules")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        # The request headers any rule reads (besides method, host and path): part of the decision cache's key.
        self.header_names = frozenset(header.name for rule in rules for header in rule.match.headers)
        compiled = [_CompiledRule(rule) for rule in rules]
        methods = {method for rule in compiled for method in rule.methods}
        self._by_method = {method: _bucket(compiled, method) for method in methods}
        self._fallback = _bucket(compiled, None)
        self._uses_host = any(rule.uses_host for rule in compiled)

    def _bucket(self, inp: CheckInput) -> tuple[_Bucket, str, str]:
        method = inp.method
        bucket = self._by_method.get(method)
        if bucket is None:
            bucket = self._by_method.get(method.upper(), self._fallback)
        host = bare = ""
        if self._uses_host:
            host, bare = host_parts(inp.host)
        return bucket, host, bare

    def without_identity(self, inp: CheckInput) -> Verdict | None:
        """The verdict when no identity can change it: a deny rule that needs none matches, or a public rule does
        and no deny rule that needs an identity might. None when the verdict depends on who calls."""
        (deny, public, _), host, bare = self._bucket(inp)
        for request, requires, verdict, _ in deny:
            if request(inp, host, bare):
                return verdict if requires is None else None
        for request, _, verdict, _ in public:
            if request(inp, host, bare):
                return verdict
        return None

    def evaluate(self, inp: CheckInput, identity: Identity | None, auth_error: AuthenticationError | None) -> Verdict:
        (deny, public, allow), host, bare = self._bucket(inp)
        for request, requires, verdict, _ in deny:
            if request(inp, host, bare) and (requires is None or (identity is not None and requires(identity))):
                return verdict
        for request, _, verdict, _ in public:
            if request(inp, host, bare):
                return verdict
        if identity is None:
            return _MISSING if auth_error is None else _rejected(auth_error)
        refused: Verdict | None = None
        for request, requires, verdict, forbidden in allow:
            if request(inp, host, bare):
                if requires is None or requires(identity):
                    return verdict
                refused = refused or forbidden
        if auth_error is not None and identity.kind is IdentityKind.SPIFFE:
            return _rejected(auth_error)
        return refused or _NO_MATCH


def _rejected(error: AuthenticationError) -> Verdict:
    """401 for a presented credential that failed, with its reason and message."""
    return Verdict(False, 401, error.reason, message=error.message)


def compile_policy(config_rules: tuple[Rule, ...]) -> Policy:
    """Precompile ``config_rules`` (as built by ``extauthz.config_loader``); raises ValueError on a bad kind."""
    return Policy(tuple(config_rules))
