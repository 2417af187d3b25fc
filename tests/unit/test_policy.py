"""Policy evaluation: a table of requests and identities against one policy, covering every branch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.scenarios import POLICY as BENCH_POLICY
from extauthz.config import HeaderMatch, IdentityMatch, RequestMatch, Rule
from extauthz.config_loader import load_config, parse_config
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from extauthz.policy import Policy, compile_policy, host_parts
from extauthz.policy_api import CompiledPolicy, Verdict

POLICY = """
rules:
  - name: deny-internal
    effect: deny
    match: {path_prefixes: [/internal/]}
  - name: deny-banned-user
    effect: deny
    identity: {subjects: ["banned-*"]}
  - name: deny-delete-by-bots
    effect: deny
    match:
      methods: [DELETE]
      headers: [{name: user-agent, prefix: "bot/"}]
  - name: health
    public: true
    match: {paths: [/healthz], methods: [GET, HEAD]}
  - name: docs
    public: true
    match: {paths: ["/docs/*"], hosts: ["*.example.com"]}
  - name: admin
    match: {path_prefixes: [/admin/]}
    identity: {roles_any: [admin, root]}
  - name: reports
    match: {paths: ["/reports/*/summary", "/r/??"], methods: [GET]}
    identity: {roles_all: [staff, verified], tiers: [gold]}
  - name: orders-read
    match: {paths: [/orders], hosts: [api.example.com, "api.example.com:8443"], methods: [GET]}
    identity: {scopes_all: ["orders:read"], issuers: [https://idp]}
  - name: partners
    match: {path_prefixes: [/partner/]}
    identity: {kinds: [api_key], clients: [acme]}
  - name: mesh
    match: {path_prefixes: [/mesh/]}
    identity: {principals: ["spiffe://cluster.local/ns/prod/sa/*", "spiffe://cluster.local/ns/ops/sa/admin"]}
  - name: canary
    match:
      paths: [/canary]
      headers: [{name: x-canary, exact: "1"}, {name: x-debug, present: false}]
    identity: {}
  - name: subject-exact
    match: {paths: [/me]}
    identity: {subjects: [alice, "svc-*"]}
"""

ALICE = Identity(
    kind=IdentityKind.JWT,
    subject="alice",
    issuer="https://idp",
    roles=frozenset({"staff", "verified"}),
    scopes=frozenset({"orders:read", "profile"}),
    tier="gold",
)
ADMIN = Identity(kind=IdentityKind.JWT, subject="root-user", roles=frozenset({"admin"}))
BANNED = Identity(kind=IdentityKind.JWT, subject="banned-bob", roles=frozenset({"admin"}))
ACME = Identity(kind=IdentityKind.API_KEY, subject="acme", client="acme")
ACME_AS_JWT = Identity(kind=IdentityKind.JWT, subject="acme", client="acme")
PROD_SA = Identity(kind=IdentityKind.SPIFFE, subject="x", principal="spiffe://cluster.local/ns/prod/sa/api")
OPS_ADMIN = Identity(kind=IdentityKind.SPIFFE, subject="x", principal="spiffe://cluster.local/ns/ops/sa/admin")
OPS_OTHER = Identity(kind=IdentityKind.SPIFFE, subject="x", principal="spiffe://cluster.local/ns/ops/sa/other")
SVC = Identity(kind=IdentityKind.SPIFFE, subject="svc-payments")

EXPIRED = AuthenticationError(Reason.TOKEN_EXPIRED, "token expired")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return compile_policy(parse_config(POLICY, "table.yaml").rules)


def req(path: str, method: str = "GET", host: str = "api.example.com", **headers: str) -> CheckInput:
    return CheckInput(method=method, host=host, path=path, headers={k.replace("_", "-"): v for k, v in headers.items()})


CASES: list[tuple[str, CheckInput, Identity | None, AuthenticationError | None, int, Reason, str]] = [
    # deny rules win over public and allow rules
    ("deny-prefix-anonymous", req("/internal/x"), None, None, 403, Reason.DENIED_BY_RULE, "deny-internal"),
    ("deny-prefix-admin", req("/internal/x"), ADMIN, None, 403, Reason.DENIED_BY_RULE, "deny-internal"),
    ("deny-wins-over-allow", req("/admin/users"), BANNED, None, 403, Reason.DENIED_BY_RULE, "deny-banned-user"),
    ("deny-identity-needs-identity", req("/admin/users"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    (
        "deny-header-and-method",
        req("/admin/x", "DELETE", user_agent="bot/1"),
        ADMIN,
        None,
        403,
        Reason.DENIED_BY_RULE,
        "deny-delete-by-bots",
    ),
    (
        "deny-header-lowercase-method",
        req("/admin/x", "delete", user_agent="bot/1"),
        ADMIN,
        None,
        403,
        Reason.DENIED_BY_RULE,
        "deny-delete-by-bots",
    ),
    ("deny-header-no-match", req("/admin/x", "DELETE", user_agent="curl"), ADMIN, None, 200, Reason.ALLOWED, "admin"),
    # a header sent twice arrives joined ("curl/8, bot/1"): a deny rule still sees each copy ...
    (
        "deny-header-repeated",
        req("/admin/x", "DELETE", user_agent="curl/8, bot/1"),
        ADMIN,
        None,
        403,
        Reason.DENIED_BY_RULE,
        "deny-delete-by-bots",
    ),
    # ... while an allow rule's header must be the whole value (more copies: no match, fail closed)
    ("allow-header-repeated", req("/canary", x_canary="1,1"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    # public rules need no identity, and ignore a rejected credential
    ("public", req("/healthz"), None, None, 200, Reason.PUBLIC, "health"),
    ("public-head", req("/healthz", "HEAD"), None, None, 200, Reason.PUBLIC, "health"),
    ("public-bad-token", req("/healthz"), None, EXPIRED, 200, Reason.PUBLIC, "health"),
    ("public-with-identity", req("/healthz"), ALICE, None, 200, Reason.PUBLIC, "health"),
    ("public-wrong-method", req("/healthz", "POST"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    ("public-host-wildcard", req("/docs/a/b", host="Docs.Example.COM"), None, None, 200, Reason.PUBLIC, "docs"),
    ("public-host-wildcard-port", req("/docs/a", host="docs.example.com:443"), None, None, 200, Reason.PUBLIC, "docs"),
    ("public-host-wildcard-deep", req("/docs/a", host="a.b.example.com"), None, None, 200, Reason.PUBLIC, "docs"),
    ("public-host-apex-no", req("/docs/a", host="example.com"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    ("public-host-other-no", req("/docs/a", host="example.org"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    ("public-glob-needs-slash", req("/docs"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    # 401 reasons without an identity
    ("missing", req("/orders"), None, None, 401, Reason.MISSING_CREDENTIAL, ""),
    ("rejected", req("/orders"), None, EXPIRED, 401, Reason.TOKEN_EXPIRED, ""),
    ("rejected-no-rule", req("/nowhere"), None, EXPIRED, 401, Reason.TOKEN_EXPIRED, ""),
    # a rejected credential, then the peer's SPIFFE ID (e.g. the gateway's under Istio): allowed only when that
    # identity is; else 401 for the credential, not 403 for the hop
    ("rejected-then-allowed", req("/mesh/x"), PROD_SA, EXPIRED, 200, Reason.ALLOWED, "mesh"),
    ("rejected-then-forbidden", req("/mesh/x"), OPS_OTHER, EXPIRED, 401, Reason.TOKEN_EXPIRED, ""),
    ("rejected-then-no-rule", req("/nowhere"), PROD_SA, EXPIRED, 401, Reason.TOKEN_EXPIRED, ""),
    ("rejected-then-denied", req("/internal/x"), PROD_SA, EXPIRED, 403, Reason.DENIED_BY_RULE, "deny-internal"),
    # ... but a caller that authenticated with a credential of its own is answered for that identity
    ("rejected-then-api-key", req("/admin/x"), ACME, EXPIRED, 403, Reason.FORBIDDEN, "admin"),
    ("rejected-then-jwt-no-rule", req("/nowhere"), ALICE, EXPIRED, 403, Reason.NO_MATCHING_RULE, ""),
    # allow rules: identity conditions
    ("roles-any", req("/admin/x"), ADMIN, None, 200, Reason.ALLOWED, "admin"),
    ("roles-any-missing", req("/admin/x"), ALICE, None, 403, Reason.FORBIDDEN, "admin"),
    ("roles-all-tier-glob", req("/reports/2024/summary"), ALICE, None, 200, Reason.ALLOWED, "reports"),
    ("glob-star-crosses-slash", req("/reports/2024/q1/summary"), ALICE, None, 200, Reason.ALLOWED, "reports"),
    ("glob-question-mark", req("/r/ab"), ALICE, None, 200, Reason.ALLOWED, "reports"),
    ("glob-question-mark-one-char", req("/r/abc"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("glob-no-match", req("/reports/2024/detail"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("roles-all-partial", req("/reports/x/summary"), ADMIN, None, 403, Reason.FORBIDDEN, "reports"),
    (
        "tier-wrong",
        req("/reports/x/summary"),
        Identity(kind=IdentityKind.JWT, subject="s", roles=frozenset({"staff", "verified"}), tier="free"),
        None,
        403,
        Reason.FORBIDDEN,
        "reports",
    ),
    ("scopes-issuer", req("/orders"), ALICE, None, 200, Reason.ALLOWED, "orders-read"),
    (
        "host-with-named-port",
        req("/orders", host="api.example.com:8443"),
        ALICE,
        None,
        200,
        Reason.ALLOWED,
        "orders-read",
    ),
    (
        "host-with-other-port",
        req("/orders", host="API.example.com:80"),
        ALICE,
        None,
        200,
        Reason.ALLOWED,
        "orders-read",
    ),
    ("host-wrong", req("/orders", host="evil.com"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    # a trailing dot or an empty port is the same host (Envoy routes them alike): rules match it as such
    ("host-trailing-dot", req("/orders", host="api.example.com."), ALICE, None, 200, Reason.ALLOWED, "orders-read"),
    ("host-dot-port", req("/orders", host="api.example.com.:8443"), ALICE, None, 200, Reason.ALLOWED, "orders-read"),
    ("host-empty-port", req("/docs/a", host="docs.example.com:"), None, None, 200, Reason.PUBLIC, "docs"),
    ("host-wildcard-dot", req("/docs/a", host="a.docs.example.com."), None, None, 200, Reason.PUBLIC, "docs"),
    ("host-ipv6", req("/orders", host="[::1]:8080"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("method-wrong", req("/orders", "POST"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("unknown-method", req("/orders", "PURGE"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
    (
        "issuer-wrong",
        req("/orders"),
        Identity(kind=IdentityKind.JWT, subject="a", issuer="https://other", scopes=frozenset({"orders:read"})),
        None,
        403,
        Reason.FORBIDDEN,
        "orders-read",
    ),
    ("scopes-missing", req("/orders"), ADMIN, None, 403, Reason.FORBIDDEN, "orders-read"),
    ("client-and-kind", req("/partner/a"), ACME, None, 200, Reason.ALLOWED, "partners"),
    ("kind-wrong", req("/partner/a"), ACME_AS_JWT, None, 403, Reason.FORBIDDEN, "partners"),
    (
        "client-wrong",
        req("/partner/a"),
        Identity(kind=IdentityKind.API_KEY, subject="x", client="globex"),
        None,
        403,
        Reason.FORBIDDEN,
        "partners",
    ),
    ("principal-glob", req("/mesh/a"), PROD_SA, None, 200, Reason.ALLOWED, "mesh"),
    ("principal-exact", req("/mesh/a"), OPS_ADMIN, None, 200, Reason.ALLOWED, "mesh"),
    ("principal-other", req("/mesh/a"), OPS_OTHER, None, 403, Reason.FORBIDDEN, "mesh"),
    ("principal-empty", req("/mesh/a"), ALICE, None, 403, Reason.FORBIDDEN, "mesh"),
    ("headers-exact-absent", req("/canary", x_canary="1"), ACME, None, 200, Reason.ALLOWED, "canary"),
    ("headers-exact-wrong", req("/canary", x_canary="2"), ACME, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("headers-exact-missing", req("/canary"), ACME, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("headers-not-absent", req("/canary", x_canary="1", x_debug="y"), ACME, None, 403, Reason.NO_MATCHING_RULE, ""),
    ("subject-exact", req("/me"), ALICE, None, 200, Reason.ALLOWED, "subject-exact"),
    ("subject-glob", req("/me"), SVC, None, 200, Reason.ALLOWED, "subject-exact"),
    ("subject-other", req("/me"), ADMIN, None, 403, Reason.FORBIDDEN, "subject-exact"),
    ("no-rule", req("/elsewhere"), ALICE, None, 403, Reason.NO_MATCHING_RULE, ""),
]


@pytest.mark.parametrize(
    ("inp", "identity", "error", "status", "reason", "rule"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_evaluation_table(
    policy: Policy,
    inp: CheckInput,
    identity: Identity | None,
    error: AuthenticationError | None,
    status: int,
    reason: Reason,
    rule: str,
) -> None:
    verdict = policy.evaluate(inp, identity, error)
    assert (verdict.status, verdict.reason, verdict.rule) == (status, reason, rule)
    assert verdict.allowed is (status == 200)
    assert verdict.message or verdict.allowed


def test_messages_are_safe_and_stable(policy: Policy) -> None:
    assert policy.evaluate(req("/orders"), None, None).message == "authentication required"
    assert policy.evaluate(req("/orders"), None, EXPIRED).message == "token expired"
    assert policy.evaluate(req("/internal/"), None, None).message == "request denied by policy"
    assert policy.evaluate(req("/nope"), ALICE, None).message == "no policy rule allows this request"
    forbidden = policy.evaluate(req("/admin/x"), ALICE, None)
    assert forbidden.message == "access to this resource is not allowed for this identity"


def test_first_allow_rule_wins_in_file_order() -> None:
    rules = (
        Rule(name="one", match=RequestMatch(path_prefixes=("/a",))),
        Rule(name="two", match=RequestMatch(path_prefixes=("/a",))),
    )
    assert compile_policy(rules).evaluate(req("/a"), ALICE, None) == Verdict(True, 200, Reason.ALLOWED, rule="one")


def test_allow_rule_without_identity_block_needs_some_identity() -> None:
    policy = compile_policy((Rule(name="any"),))
    assert policy.evaluate(req("/x"), ADMIN, None).allowed
    assert policy.evaluate(req("/x"), None, None).status == 401


def test_empty_policy_denies_everything() -> None:
    policy = compile_policy(())
    assert policy.evaluate(req("/"), ALICE, None).reason is Reason.NO_MATCHING_RULE
    assert policy.evaluate(req("/"), None, None).reason is Reason.MISSING_CREDENTIAL


def test_rules_built_directly_are_normalized() -> None:
    rule = Rule(
        name="r",
        match=RequestMatch(
            hosts=("API.Example.com",), methods=("get",), headers=(HeaderMatch(name="X-Env", exact="p"),)
        ),
        identity=IdentityMatch(kinds=(IdentityKind.JWT,)),
    )
    policy = compile_policy((rule,))
    assert policy.evaluate(req("/", host="api.example.com", x_env="p"), ALICE, None).allowed
    assert policy.rules == (rule,)


def test_any_host_and_whole_path_glob() -> None:
    rule = Rule(name="r", public=True, match=RequestMatch(hosts=("*",), paths=("*",)))
    policy = compile_policy((rule,))
    assert policy.evaluate(req("/anything", host=""), None, None).reason is Reason.PUBLIC


def test_deny_glob_is_not_dodged_by_newlines() -> None:
    rule = Rule(name="d", effect="deny", match=RequestMatch(paths=("/a/*/b",)))
    assert compile_policy((rule,)).evaluate(req("/a/x\ny/b"), ALICE, None).reason is Reason.DENIED_BY_RULE


def test_bad_effect_is_rejected_at_compile_time() -> None:
    with pytest.raises(ValueError, match="effect"):
        compile_policy((Rule(name="x", effect="permit"),))


def test_policy_satisfies_the_protocol() -> None:
    compiled: CompiledPolicy = compile_policy(())
    assert isinstance(compiled, Policy)


def test_bench_policy_admits_the_bench_request() -> None:
    policy = compile_policy(load_config(BENCH_POLICY).rules)
    user = Identity(kind=IdentityKind.JWT, subject="u1", roles=frozenset({"user"}), scopes=frozenset({"items:read"}))
    verdict = policy.evaluate(req("/api/v1/items/42", host="bench.local"), user, None)
    assert verdict == Verdict(True, 200, Reason.ALLOWED, rule="items-read")
    assert policy.evaluate(req("/debug/x"), user, None).reason is Reason.DENIED_BY_RULE
    assert policy.evaluate(req("/healthz"), None, None).reason is Reason.PUBLIC
    mesh = Identity(kind=IdentityKind.SPIFFE, subject="s", principal="spiffe://cluster.local/ns/shop/sa/backend")
    assert policy.evaluate(req("/api/v2/x", "POST"), mesh, None).rule == "mesh-callers"


def test_exact_only_identity_values_and_bare_header_condition() -> None:
    rule = Rule(
        name="r",
        match=RequestMatch(headers=(HeaderMatch(name="x-tenant"),)),
        identity=IdentityMatch(subjects=("alice",), principals=("spiffe://td/a",)),
    )
    policy = compile_policy((rule,))
    alice = Identity(kind=IdentityKind.SPIFFE, subject="alice", principal="spiffe://td/a")
    assert policy.evaluate(req("/", x_tenant="t"), alice, None).allowed
    assert policy.evaluate(req("/"), alice, None).reason is Reason.NO_MATCHING_RULE
    assert policy.evaluate(req("/", x_tenant="t"), ALICE, None).reason is Reason.FORBIDDEN


@pytest.mark.parametrize(
    ("host", "parts"),
    [
        ("Admin.Example.com", ("admin.example.com", "admin.example.com")),
        ("admin.example.com.", ("admin.example.com", "admin.example.com")),
        ("admin.example.com:", ("admin.example.com", "admin.example.com")),
        ("admin.example.com.:443", ("admin.example.com:443", "admin.example.com")),
        ("[::1]:8443", ("[::1]:8443", "[::1]")),
        ("[::1]:", ("[::1]", "[::1]")),
        ("[::1", ("[::1", "[::1")),
        ("host:abc", ("host:abc", "host:abc")),
        ("", ("", "")),
    ],
)
def test_host_parts(host: str, parts: tuple[str, str]) -> None:
    assert host_parts(host) == parts


# -- without_identity: never a verdict that an identity could change ---------------------------------------------
_PATHS = ("/a", "/a/b", "/docs/x", "/admin/y")
_IDENTITIES: tuple[Identity | None, ...] = (
    None,
    Identity(kind=IdentityKind.JWT, subject="alice", roles=frozenset({"admin"}), tier="gold"),
    Identity(kind=IdentityKind.API_KEY, subject="bob", client="billing"),
    Identity(kind=IdentityKind.SPIFFE, subject="spiffe://td/ns/a/sa/b", principal="spiffe://td/ns/a/sa/b"),
)
_ERRORS = (None, AuthenticationError(Reason.INVALID_TOKEN, "bad"))


@st.composite
def _rules(draw: st.DrawFn) -> tuple[Rule, ...]:
    rules = []
    for index in range(draw(st.integers(0, 5))):
        effect = draw(st.sampled_from(("allow", "deny")))
        public = effect == "allow" and draw(st.booleans())
        match = RequestMatch(
            path_prefixes=tuple(draw(st.lists(st.sampled_from(("/a", "/docs", "/admin")), max_size=2))),
            methods=tuple(draw(st.lists(st.sampled_from(("GET", "POST")), max_size=1))),
            headers=tuple(draw(st.lists(st.just(HeaderMatch(name="x-env", exact="prod")), max_size=1))),
        )
        identity = (
            None
            if public
            else draw(
                st.one_of(
                    st.none(),
                    st.just(IdentityMatch()),
                    st.just(IdentityMatch(roles_any=("admin",))),
                    st.just(IdentityMatch(kinds=(IdentityKind.API_KEY,))),
                    st.just(IdentityMatch(tiers=("gold",))),
                )
            )
        )
        rules.append(Rule(name=f"r{index}", effect=effect, public=public, match=match, identity=identity))
    return tuple(rules)


@given(
    rules=_rules(),
    path=st.sampled_from(_PATHS),
    method=st.sampled_from(("GET", "POST", "PUT")),
    env=st.sampled_from((None, "prod", "dev")),
)
def test_a_verdict_without_identity_is_the_verdict_for_every_identity(
    rules: tuple[Rule, ...], path: str, method: str, env: str | None
) -> None:
    """What the pipeline answers without identity I/O (Policy.without_identity) is what evaluate answers for any
    caller, rejected credential or none: no identity could have changed it."""
    policy = compile_policy(rules)
    headers = {} if env is None else {"x-env": env}
    inp = CheckInput(method=method, host="h", path=path, headers=headers)
    verdict = policy.without_identity(inp)
    if verdict is None:
        return
    for identity in _IDENTITIES:
        for error in _ERRORS:
            assert policy.evaluate(inp, identity, error) == verdict, (identity, error)
