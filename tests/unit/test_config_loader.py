"""The policy file loader: every fixture under fixtures/policies/invalid names its error and the line it is on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.scenarios import POLICY as BENCH_POLICY
from extauthz.config import (
    DEFAULT_TOKEN_SOURCES,
    ApiKeySettings,
    AuditSettings,
    ClaimMapping,
    HeaderMatch,
    IdentityMatch,
    ResponseSettings,
    TokenSource,
)
from extauthz.config_loader import load_config, parse_config
from extauthz.model import IdentityKind
from meshgate.yamlconf import ConfigError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policies"
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))


def _expectation(path: Path) -> tuple[int, str]:
    lines = path.read_text().splitlines()
    message = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("# error:"))
    line = next(number for number, text in enumerate(lines, 1) if "# <-- error" in text)
    return line, message


@pytest.mark.parametrize("path", INVALID, ids=[path.stem for path in INVALID])
def test_invalid_fixture_names_file_line_and_reason(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_TEST_SECRET", "s" * 32)
    monkeypatch.delenv("MESHGATE_TEST_UNSET_SECRET", raising=False)
    line, message = _expectation(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.line == line, str(caught.value)
    assert message in caught.value.message
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_there_are_many_invalid_fixtures() -> None:
    assert len(INVALID) >= 40


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("secret_not_string", "123456789"),
        ("introspection_secret_not_string", "987654321"),
        ("introspection_two_secrets", "another-secret-value"),
    ],
)
def test_secret_value_is_never_echoed(name: str, secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_TEST_SECRET", "s" * 32)
    with pytest.raises(ConfigError) as caught:
        load_config(FIXTURES / "invalid" / f"{name}.yaml")
    assert secret not in str(caught.value)


def test_introspection_settings_and_defaults() -> None:
    text = """
identity:
  order: [introspection]
  introspection:
    endpoint: https://idp.example.com/oauth2/introspect
    client_id: meshgate
    client_secret_env: INTROSPECT
    issuer: https://idp.example.com
    audiences: [orders-api]
    sources: [{header: x-token}]
    claims: {roles: [groups]}
    cache_seconds: 0
    timeout_seconds: 0.25
"""
    config = parse_config(text, environ={"INTROSPECT": "pw"})
    settings = config.identity.introspection
    assert config.identity.order == (IdentityKind.INTROSPECTION,)
    assert (settings.client_id, settings.client_secret, settings.client_secret_env) == ("meshgate", "pw", "INTROSPECT")
    assert (settings.issuer, settings.audiences) == ("https://idp.example.com", ("orders-api",))
    assert settings.sources == (TokenSource(header="x-token"),)
    assert settings.claims.roles == ("groups",)
    assert (settings.cache_s, settings.timeout_s, settings.negative_cache_s) == (0, 0.25, 10.0)
    assert (settings.max_concurrent, settings.cache_size, settings.leeway_s) == (32, 10_000, 30.0)
    assert parse_config("version: 1\n").identity.introspection.endpoint == ""


def test_ca_files_are_taken_from_the_policy_folder(tmp_path: Path) -> None:
    from tests.support.pki import TestCA

    TestCA(tmp_path)  # writes ca.pem
    text = """
identity:
  jwt:
    issuers: [{issuer: https://idp, audiences: [a], jwks_uri: https://idp/jwks, ca_file: ca.pem}]
  introspection: {endpoint: https://idp/introspect, client_id: c, client_secret: s, ca_file: ca.pem}
"""
    identity = parse_config(text, base_dir=tmp_path).identity
    assert identity.jwt.issuers[0].ca_file == identity.introspection.ca_file == str(tmp_path / "ca.pem")


def test_example_policy_loads() -> None:
    config = load_config(FIXTURES / "example.yaml")
    assert config.source == str(FIXTURES / "example.yaml")
    identity = config.identity
    assert identity.order == (IdentityKind.JWT, IdentityKind.API_KEY, IdentityKind.SPIFFE)
    assert identity.jwt.sources == (
        TokenSource(header="authorization", prefix="Bearer "),
        TokenSource(cookie="session"),
    )
    assert identity.jwt.claims.tier == "plan"
    main, partners = identity.jwt.issuers
    assert main.discovery and main.algorithms == ("RS256", "ES256") and main.audiences == ("orders-api", "account")
    assert partners.jwks_uri.endswith("jwks.json") and partners.algorithms == ("PS256", "EdDSA")
    assert partners.refresh_interval_s == 300.0 and partners.fetch_timeout_s == 2.0
    assert identity.api_key.keys_file == str(FIXTURES / "api-keys.yaml")
    assert identity.spiffe.trust_domains == ("cluster.local",)
    assert config.response.realm == "example"
    assert config.audit.allow_sample_rate == 0.05
    names = [rule.name for rule in config.rules]
    assert names[:3] == ["block-internal-from-outside", "health-and-docs", "admins"]
    block = config.rules[0]
    assert block.effect == "deny" and block.identity is None
    assert block.match.headers == (HeaderMatch(name="x-envoy-internal", present=False),)
    text = (FIXTURES / "example.yaml").read_text().splitlines()
    line = next(n for n, t in enumerate(text, 1) if "name: block-internal-from-outside" in t)
    assert block.source == f"{FIXTURES / 'example.yaml'}:{line}"
    assert config.rules[1].public and config.rules[1].match.methods == ("GET", "HEAD")
    mesh = config.rules[-1]
    assert mesh.identity == IdentityMatch(
        kinds=(IdentityKind.SPIFFE,), principals=("spiffe://cluster.local/ns/billing/sa/*",)
    )


def test_bench_policy_has_twenty_rules() -> None:
    config = load_config(BENCH_POLICY)
    assert len(config.rules) == 20
    assert config.rules[17].identity == IdentityMatch()  # `identity: {}` = any identity


def test_defaults_for_an_almost_empty_file() -> None:
    config = parse_config("rules: []\n", "inline.yaml")
    assert config.rules == ()
    assert config.response == ResponseSettings()
    assert config.audit == AuditSettings()
    assert config.identity.jwt.sources == DEFAULT_TOKEN_SOURCES
    assert config.identity.jwt.claims == ClaimMapping()
    assert config.identity.api_key == ApiKeySettings()
    assert config.source == "inline.yaml"


def test_empty_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_config("", "empty.yaml")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"inline:1: expected a mapping"):
        parse_config("- a\n", "inline")


def test_secret_env_is_read_at_load() -> None:
    text = """
identity:
  jwt:
    issuers:
      - issuer: internal
        audiences: [svc]
        secret_env: HS_KEY
        algorithms: [HS256, HS512]
"""
    config = parse_config(text, environ={"HS_KEY": "k" * 40})
    issuer = config.identity.jwt.issuers[0]
    assert issuer.secret == "k" * 40 and issuer.secret_env == "HS_KEY"
    assert issuer.algorithms == ("HS256", "HS512")


def test_inline_secret_is_accepted_for_hs() -> None:
    text = """
identity:
  jwt:
    issuers: [{issuer: internal, audiences: svc, secret: "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr", algorithms: HS384}]
"""
    issuer = parse_config(text).identity.jwt.issuers[0]
    assert issuer.secret.startswith("s3cr3t") and issuer.secret_env == "" and issuer.audiences == ("svc",)


def test_normalization_of_names_methods_hosts(tmp_path: Path) -> None:
    text = """
identity:
  order: [api_key]
  api_key: {keys_file: keys/clients.yaml, header: X-API-Key, authorization_scheme: ""}
  spiffe: {from_xfcc: false, xfcc_skip_by: [spiffe://cluster.local/ns/meshgate/sa/extauthz]}
  jwt: {sources: [{header: X-Token}, {query: access_token}], leeway_seconds: 5, cache_size: 0}
response:
  headers: {subject: X-User, reason: X-Why}
  strip_credentials: false
  metadata: [tier, sub, principal]
rules:
  - name: " a "
    match:
      hosts: [API.Example.com, "*.Example.org", "*"]
      methods: [get, Post]
      headers:
        - {name: X-Env, exact: prod}
        - {name: X-Tag, prefix: v1}
    identity:
      kinds: api_key
      clients: [acme]
  - name: b
    identity:
"""
    config = parse_config(text, "p.yaml", base_dir=tmp_path)
    assert config.identity.order == (IdentityKind.API_KEY,)
    assert config.identity.api_key.keys_file == str(tmp_path / "keys" / "clients.yaml")
    assert config.identity.api_key.header == "x-api-key"
    assert config.identity.api_key.authorization_scheme == ""
    assert not config.identity.spiffe.from_xfcc
    assert config.identity.spiffe.xfcc_skip_by == ("spiffe://cluster.local/ns/meshgate/sa/extauthz",)
    assert config.identity.jwt.sources == (TokenSource(header="x-token"), TokenSource(query="access_token"))
    assert config.identity.jwt.leeway_s == 5.0 and config.identity.jwt.cache_size == 0
    assert config.response.subject_header == "x-user" and config.response.reason_header == "x-why"
    assert config.response.kind_header == "x-auth-kind" and not config.response.strip_credentials
    assert config.response.metadata_keys == ("tier", "sub", "principal")
    assert parse_config("response: {metadata: []}\n").response.metadata_keys == ()
    assert parse_config("response: {metadata: kind}\n").response.metadata_keys == ("kind",)
    assert parse_config("response: {realm: r}\n").response.metadata_keys == ("sub", "client", "tier", "roles")
    rule = config.rules[0]
    assert rule.name == "a" and rule.source == "p.yaml:12"
    assert rule.match.hosts == ("api.example.com", "*.example.org", "*")
    assert rule.match.methods == ("GET", "POST")
    assert rule.match.headers == (HeaderMatch(name="x-env", exact="prod"), HeaderMatch(name="x-tag", prefix="v1"))
    assert rule.identity == IdentityMatch(kinds=(IdentityKind.API_KEY,), clients=("acme",))
    assert config.rules[1].identity == IdentityMatch()


def test_keys_file_keeps_symlinks_and_follows_the_policy_dir(tmp_path: Path) -> None:
    real = tmp_path / "..2024_a"
    real.mkdir()
    (real / "policy.yaml").write_text("identity: {api_key: {keys_file: keys.yaml}}\n")
    os.symlink("..2024_a", tmp_path / "..data")
    os.symlink("..data/policy.yaml", tmp_path / "policy.yaml")
    config = load_config(tmp_path / "policy.yaml")
    assert config.identity.api_key.keys_file == str(tmp_path / "keys.yaml")


def test_absolute_keys_file_is_kept(tmp_path: Path) -> None:
    config = parse_config("identity: {api_key: {keys_file: /etc/meshgate/keys.yaml}}\n", base_dir=tmp_path)
    assert config.identity.api_key.keys_file == "/etc/meshgate/keys.yaml"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("identity: {order: []}\n", 1, "at least one identity provider"),
        ("identity:\n  jwt:\n    sources: []\n", 3, "at least one token source"),
        ("identity:\n  jwt:\n    cache_size: -1\n", 3, "must be at least 0"),
        ("identity:\n  jwt:\n    claims: {subject: ''}\n", 3, "must name a claim"),
        ("identity:\n  api_key: {authorization_scheme: 'Api Key'}\n", 2, "must be one word"),
        ("identity:\n  jwt:\n    issuers:\n      - {issuer: ' ', audiences: a, discovery: true}\n", 4, "empty"),
        (
            "identity:\n  jwt:\n    issuers:\n      - {issuer: i, audiences: a, secret: s, algorithms: []}\n",
            4,
            "at least one algorithm",
        ),
        (
            "identity:\n  jwt:\n    issuers:\n    - {issuer: i, audiences: a, secret: s, algorithms: [HS256, HS256]}\n",
            4,
            "listed twice",
        ),
        ("rules:\n  - name: a\n    match: {paths: ['/a?']}\n  - {name: b, identity: {subjects: ['']}}\n", 4, "empty"),
    ],
)
def test_more_invalid_values(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "inline.yaml")
    assert caught.value.line == line
    assert message in caught.value.message


def test_load_config_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "name",
    [
        "jwks_uri_with_credentials",
        "introspection_endpoint_with_credentials",
        "jwks_uri_bad_port",
        "jwks_uri_password_with_question_mark",
    ],
)
def test_a_url_with_credentials_is_refused_without_quoting_them(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_TEST_SECRET", "s" * 32)
    with pytest.raises(ConfigError) as caught:
        load_config(FIXTURES / "invalid" / f"{name}.yaml")
    assert "hunter2" not in str(caught.value) and "ter2" not in str(caught.value)
