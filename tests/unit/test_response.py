import json

from extauthz import response
from extauthz.config import ResponseSettings
from extauthz.model import CheckInput, Identity, IdentityKind, Reason

SETTINGS = ResponseSettings()
INP = CheckInput(method="GET", host="api", path="/x", request_id="rid-1")


def test_allow_overwrites_identity_headers_and_strips_the_credential() -> None:
    identity = Identity(
        kind=IdentityKind.JWT,
        subject="alice",
        issuer="https://issuer",
        roles=frozenset({"writer", "reader"}),
        tier="gold",
        credential_header="authorization",
    )
    decision = response.allow(identity, "readers", Reason.ALLOWED, SETTINGS)
    assert decision.allowed and decision.status == 200 and decision.rule == "readers"
    assert dict(decision.headers_to_set) == {
        "x-auth-subject": "alice",
        "x-auth-kind": "jwt",
        "x-auth-roles": "reader,writer",
        "x-auth-tier": "gold",
        "x-auth-issuer": "https://issuer",
    }
    # Empty values are removed rather than left to a client's forged header; the token never goes upstream.
    assert decision.headers_to_remove == ("x-auth-client", "authorization")
    # By default, what rate limits key on; the empty client is left out
    assert decision.metadata == {"sub": "alice", "tier": "gold", "roles": "reader,writer"}


def test_claims_cannot_split_a_header_or_smuggle_a_role_in_either_transport() -> None:
    """The decision feeds the gRPC answer as is (HTTP mode cleans again): control characters are dropped, and a
    role holding a comma, which a splitting upstream would read as several, is left out."""
    identity = Identity(
        kind=IdentityKind.JWT,
        subject="alice\r\nx-auth-roles: admin",
        roles=frozenset({"dev,admin", "ops"}),
        tier="gold\x00",
    )
    decision = response.allow(identity, "r", Reason.ALLOWED, SETTINGS)
    headers = dict(decision.headers_to_set)
    assert headers["x-auth-subject"] == "alicex-auth-roles: admin"
    assert headers["x-auth-roles"] == "ops"
    assert headers["x-auth-tier"] == "gold"
    assert decision.metadata == {"sub": "alicex-auth-roles: admin", "tier": "gold", "roles": "ops"}
    only_bad = Identity(kind=IdentityKind.JWT, subject="bob", roles=frozenset({"a,b"}))
    assert "x-auth-roles" in response.allow(only_bad, "r", Reason.ALLOWED, SETTINGS).headers_to_remove


def test_metadata_carries_the_listed_keys_only_in_their_order() -> None:
    identity = Identity(
        kind=IdentityKind.SPIFFE,
        subject="spiffe://td/ns/a/sa/b",
        principal="spiffe://td/ns/a/sa/b",
        issuer="",
        roles=frozenset({"x"}),
    )
    every = ResponseSettings(metadata_keys=("principal", "kind", "issuer", "sub", "client", "tier", "roles"))
    decision = response.allow(identity, "r", Reason.ALLOWED, every)
    assert list(decision.metadata.items()) == [
        ("principal", "spiffe://td/ns/a/sa/b"),
        ("kind", "spiffe"),
        ("sub", "spiffe://td/ns/a/sa/b"),
        ("roles", "x"),
    ]  # issuer, client and tier are empty: never sent as empty strings
    assert response.allow(identity, "r", Reason.ALLOWED, ResponseSettings(metadata_keys=())).metadata == {}


def test_anonymous_allow_removes_every_identity_header() -> None:
    decision = response.allow(None, "health", Reason.PUBLIC, SETTINGS)
    assert decision.headers_to_set == ()
    assert set(decision.headers_to_remove) == set(response.identity_header_names(SETTINGS))
    assert decision.metadata == {}


def test_keeping_credentials_when_configured() -> None:
    identity = Identity(kind=IdentityKind.API_KEY, subject="svc", client="svc", credential_header="x-api-key")
    keep = ResponseSettings(strip_credentials=False)
    decision = response.allow(identity, "r", Reason.ALLOWED, keep)
    assert "x-api-key" not in decision.headers_to_remove


def test_deny_401_has_rfc6750_challenge_and_json_body() -> None:
    decision = response.deny(INP, 401, Reason.TOKEN_EXPIRED, 'token "expired"\n', SETTINGS)
    headers = dict(decision.response_headers)
    assert headers["www-authenticate"] == (
        'Bearer realm="meshgate", error="invalid_token", error_description="token expired"'
    )
    assert headers["x-meshgate-reason"] == "token_expired"
    assert headers["content-type"] == "application/json"
    body = json.loads(decision.body)
    assert body == {"error": {"code": "token_expired", "message": 'token "expired"\n', "request_id": "rid-1"}}


def test_missing_credential_challenge_has_no_error_code() -> None:
    decision = response.deny(INP, 401, Reason.MISSING_CREDENTIAL, "authentication required", SETTINGS)
    assert dict(decision.response_headers)["www-authenticate"] == 'Bearer realm="meshgate"'


def test_403_has_no_challenge() -> None:
    decision = response.deny(INP, 403, Reason.FORBIDDEN, "no", SETTINGS, rule="r")
    assert "www-authenticate" not in dict(decision.response_headers)
    assert not decision.allowed and decision.status == 403 and decision.rule == "r"
