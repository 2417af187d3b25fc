"""extauthz's /v1/policy and /v1/check over the real ExtauthzService, called as an ASGI app (client address chosen)."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from extauthz.admin_api import MAX_CHECK_BODY, CheckIn, build_v1_router
from extauthz.app import ExtauthzService
from extauthz.identity.apikey import hash_api_key
from meshgate.admin import build_admin_app
from meshgate.admin_api import v1_router
from meshgate.log import AUDIT_LOGGER
from meshgate.runtime import Readiness

HMAC_SECRET = "hmac-secret-value-that-must-never-leak-0123456789"
JWKS_QUERY_KEY = "jwks-query-key-never-leaks"
INTROSPECTION_SECRET = "introspection-secret-never-leaks"
KEYS = {
    "acme-live": "mgk_live_acme_key_0123456789abcdef",
    "acme-old": "mgk_old_acme_key_0123456789abcdef",
    "acme-gone": "mgk_gone_acme_key_0123456789abcdef",
    "other-1": "mgk_other_key_0123456789abcdefgh",
}
SECRETS = [HMAC_SECRET, JWKS_QUERY_KEY, INTROSPECTION_SECRET, *KEYS.values()]
SECRETS += [hash_api_key(key) for key in KEYS.values()]

POLICY = f"""\
version: 1
identity:
  order: [jwt, api_key, introspection, spiffe]
  jwt:
    issuers:
      - issuer: https://hs.test
        audiences: [orders]
        secret: {HMAC_SECRET}
        algorithms: [HS256]
      - issuer: https://rs.test
        audiences: [partners]
        jwks_uri: https://127.0.0.1:9/jwks.json?api_key={JWKS_QUERY_KEY}
        algorithms: [RS256]
  introspection:
    endpoint: http://127.0.0.1:9/introspect
    client_id: meshgate
    client_secret: {INTROSPECTION_SECRET}
  api_key:
    keys_file: keys.yaml
  spiffe:
    trust_domains: [cluster.local]
rules:
  - name: block-debug
    effect: deny
    match: {{path_prefixes: [/debug/]}}
  - name: health
    public: true
    match: {{methods: [GET], paths: [/healthz]}}
  - name: orders
    match: {{paths: [/orders, /orders/*]}}
    identity: {{roles_any: [orders.read]}}
  - name: partners
    match: {{hosts: [api.example.com], headers: [{{name: x-partner, present: true}}]}}
    identity: {{kinds: [api_key], clients: [acme]}}
"""


def keys_file() -> str:
    digest = {key_id: hash_api_key(key) for key_id, key in KEYS.items()}
    return f"""\
clients:
  - client: acme
    tier: gold
    roles: [orders.read]
    keys:
      - {{id: acme-live, sha256: {digest["acme-live"]}, expires: "2999-01-01T00:00:00Z"}}
      - {{id: acme-old, sha256: {digest["acme-old"]}, expires: "2020-01-01T00:00:00Z"}}
      - {{id: acme-gone, sha256: {digest["acme-gone"]}, revoked: true}}
  - client: other
    keys:
      - {{id: other-1, sha256: {digest["other-1"]}}}
"""


def write_policy(folder: Path, policy: str = POLICY) -> Path:
    (folder / "keys.yaml").write_text(keys_file())
    path = folder / "policy.yaml"
    path.write_text(policy)
    return path


def token(**claims: Any) -> str:
    body = {"iss": "https://hs.test", "aud": "orders", "sub": "ann", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, HMAC_SECRET, algorithm="HS256")


@dataclass
class Served:
    service: ExtauthzService
    app: FastAPI
    path: Path


def build(service: ExtauthzService, path: Path, *, allow_remote: bool = False) -> FastAPI:
    readiness = Readiness()
    info = {"name": "meshgate", "version": "0", "service": "extauthz"}
    routers = [
        v1_router(info, readiness, service.watcher, allow_remote=allow_remote),
        build_v1_router(service.pipeline, path, allow_remote=allow_remote),
    ]
    return build_admin_app(readiness, info, routers)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    path = write_policy(tmp_path)
    service = ExtauthzService(path, deadline_s=1.0, reload_interval_s=60)
    await service.start()
    try:
        yield Served(service, build(service, path), path)
    finally:
        await service.close()


def client(app: FastAPI, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 5000)), base_url="http://admin")


async def dry_run(app: FastAPI, body: Any) -> tuple[int, Any]:
    async with client(app) as http:
        answer = await http.post("/v1/check", json=body)
    return answer.status_code, answer.json()


# -- /v1/policy ------------------------------------------------------------------------------------------------


async def test_policy_summary(served: Served) -> None:
    async with client(served.app) as http:
        answer = await http.get("/v1/policy")
    assert answer.status_code == 200
    policy = answer.json()
    assert policy["source"] == str(served.path)
    assert [provider["kind"] for provider in policy["identity_providers"]] == [
        "jwt",
        "api_key",
        "introspection",
        "spiffe",
    ]
    jwt_provider, api_keys, introspection, spiffe = policy["identity_providers"]
    hs, rs = jwt_provider["issuers"]
    assert (hs["issuer"], hs["audiences"], hs["keys_from"], hs["algorithms"]) == (
        "https://hs.test",
        ["orders"],
        "shared_secret",
        ["HS256"],
    )
    assert rs["keys_from"] == "jwks_uri"
    assert rs["jwks_uri"] == "https://127.0.0.1:9/jwks.json?api_key=***"
    assert jwt_provider["token_sources"] == ["header authorization (Bearer)"]
    acme, other = api_keys["clients"]
    assert (acme["client"], acme["tier"], acme["roles"], acme["active_keys"]) == ("acme", "gold", ["orders.read"], 1)
    states = {key["id"]: (key["state"], key["expires"]) for key in acme["keys"]}
    assert states == {
        "acme-live": ("active", "2999-01-01T00:00:00Z"),
        "acme-old": ("expired", "2020-01-01T00:00:00Z"),
        "acme-gone": ("revoked", None),
    }
    assert (other["client"], other["active_keys"]) == ("other", 1)
    assert (introspection["endpoint"], introspection["client_id"]) == ("http://127.0.0.1:9/introspect", "meshgate")
    assert spiffe == {"kind": "spiffe", "trust_domains": ["cluster.local"], "from_xfcc": True}
    rules = {rule["name"]: rule for rule in policy["rules"]}
    assert list(rules) == ["block-debug", "health", "orders", "partners"]
    assert rules["block-debug"] | {"source": ""} == {
        "name": "block-debug",
        "effect": "deny",
        "public": False,
        "matches": "paths /debug/…",
        "identity": "everybody",
        "source": "",
    }
    line = POLICY.splitlines().index("  - name: block-debug") + 1
    assert rules["block-debug"]["source"] == f"{served.path}:{line}"
    assert rules["health"]["identity"] == "anyone, without credentials" and rules["health"]["public"] is True
    assert rules["health"]["matches"] == "methods GET; paths /healthz"
    assert rules["orders"]["identity"] == "any role of orders.read"
    assert rules["partners"]["matches"] == "hosts api.example.com; headers x-partner present"
    assert rules["partners"]["identity"] == "kinds api_key; clients acme"


async def test_no_secret_appears_in_any_answer(served: Served) -> None:
    async with client(served.app) as http:
        texts = [(await http.get(path)).text for path in ("/v1/policy", "/v1/status", "/openapi.json")]
        for key in KEYS.values():
            texts.append((await http.post("/v1/check", json={"path": "/orders", "headers": {"x-api-key": key}})).text)
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# -- /v1/check -------------------------------------------------------------------------------------------------


async def test_check_allows_a_jwt_and_tells_what_envoy_would_get(served: Served) -> None:
    bearer = token(roles=["orders.read"], tier="gold")
    status, body = await dry_run(
        served.app,
        {
            "method": "get",
            "host": "api.example.com",
            "path": "/orders/7?page=2",
            "headers": {"Authorization": f"Bearer {bearer}"},
        },
    )
    assert status == 200
    assert (body["dry_run"], body["allowed"], body["status"], body["reason"], body["rule"]) == (
        True,
        True,
        200,
        "allowed",
        "orders",
    )
    identity = body["identity"]
    assert (identity["kind"], identity["subject"], identity["issuer"], identity["roles"], identity["tier"]) == (
        "jwt",
        "ann",
        "https://hs.test",
        ["orders.read"],
        "gold",
    )
    assert identity["credential_header"] == "authorization"
    envoy = body["envoy"]
    assert {"name": "x-auth-subject", "value": "ann"} in envoy["headers_to_set"]
    assert "authorization" in envoy["headers_to_remove"]
    assert envoy["dynamic_metadata"]["envoy.filters.http.ext_authz"]["sub"] == "ann"
    assert envoy["denied_status"] is None
    assert bearer not in json.dumps(body)


async def test_check_denials(served: Served) -> None:
    missing = await dry_run(served.app, {"path": "/orders"})
    assert missing[0] == 200
    assert (missing[1]["allowed"], missing[1]["status"], missing[1]["reason"]) == (False, 401, "missing_credential")
    assert missing[1]["envoy"]["denied_status"] == 401
    assert any(header["name"] == "www-authenticate" for header in missing[1]["envoy"]["denied_headers"])

    forged = token() + "x"
    bad = await dry_run(served.app, {"path": "/orders", "headers": {"authorization": f"Bearer {forged}"}})
    assert (bad[1]["status"], bad[1]["reason"]) == (401, "invalid_token")
    assert forged not in json.dumps(bad[1]) and forged[-20:] not in json.dumps(bad[1])

    expired_key = await dry_run(served.app, {"path": "/orders", "headers": {"x-api-key": KEYS["acme-old"]}})
    assert (expired_key[1]["status"], expired_key[1]["reason"]) == (401, "api_key_expired")

    forbidden = await dry_run(
        served.app,
        {"host": "api.example.com", "path": "/x", "headers": {"x-api-key": KEYS["other-1"], "x-partner": "1"}},
    )
    assert (forbidden[1]["status"], forbidden[1]["reason"], forbidden[1]["rule"]) == (403, "forbidden", "partners")
    assert forbidden[1]["identity"]["client"] == "other"

    denied = await dry_run(
        served.app, {"path": "/debug/x", "headers": {"authorization": f"Bearer {token(roles=['orders.read'])}"}}
    )
    assert (denied[1]["status"], denied[1]["reason"], denied[1]["rule"]) == (403, "denied_by_rule", "block-debug")

    public = await dry_run(served.app, {"path": "/healthz"})
    assert (public[1]["allowed"], public[1]["reason"], public[1]["identity"]) == (True, "public", None)


async def test_check_joins_repeated_headers_as_envoy_does(served: Served) -> None:
    status, body = await dry_run(
        served.app,
        {"host": "api.example.com", "path": "/x", "headers": {"X-Api-Key": KEYS["acme-live"], "x-partner": ["a", "b"]}},
    )
    assert (status, body["allowed"], body["rule"], body["identity"]["client"]) == (200, True, "partners", "acme")


def decisions_total() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "meshgate_extauthz_decisions"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_a_dry_run_is_neither_counted_nor_audited(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    before = decisions_total()
    status, body = await dry_run(served.app, {"path": "/dry-run-only"})
    assert status == 200 and body["reason"] == "missing_credential"  # a deny: a real one is always audited
    assert decisions_total() == before
    assert not [record for record in caplog.records if record.name == AUDIT_LOGGER]
    # The pipeline being served does count and audit the same request: the two checks above can fail.
    await served.service.pipeline().check(CheckIn(path="/dry-run-only").to_input())
    assert decisions_total() == before + 1
    assert [record for record in caplog.records if record.name == AUDIT_LOGGER]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{", "body"),
        (b"[]", "body"),
        (json.dumps({"path": "orders"}).encode(), "path"),
        (json.dumps({"path": "/x", "headers": {"a": 1}}).encode(), "headers.a"),
        (json.dumps({"path": "/x", "headers": {"": "v"}}).encode(), "headers"),
        (json.dumps({"path": "/x", "extra": True}).encode(), "extra"),
        (json.dumps({"method": ""}).encode(), "method"),
    ],
)
async def test_check_rejects_bad_input_with_a_clear_message(served: Served, body: bytes, where: str) -> None:
    async with client(served.app) as http:
        answer = await http.post("/v1/check", content=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(where)


async def test_check_refuses_a_body_over_64_kib_and_never_echoes_input(served: Served) -> None:
    secret_value = "credential-in-a-bad-request"
    async with client(served.app) as http:
        huge = await http.post("/v1/check", content=b"{" + b" " * MAX_CHECK_BODY + b"}")
        bad = await http.post("/v1/check", json={"path": "/x", "headers": {"authorization": [secret_value, 3]}})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert bad.status_code == 400 and secret_value not in bad.text


async def test_check_survives_random_bodies(served: Served) -> None:
    rng = random.Random(20261208)
    pieces: list[Any] = [
        "",
        "/",
        "GET",
        "Bearer x",
        None,
        0,
        -1,
        1.5,
        True,
        [],
        {},
        ["a", 1],
        {"a": {"b": []}},
        "\x00",
        "é",
    ]

    def value(depth: int = 0) -> Any:
        if depth < 3 and rng.random() < 0.3:
            return {
                rng.choice(["method", "host", "path", "headers", "x", "authorization"]): value(depth + 1)
                for _ in range(3)
            }
        return rng.choice(pieces)

    bodies: list[bytes] = [rng.randbytes(rng.randrange(0, 200)) for _ in range(100)]
    bodies += [json.dumps(value()).encode() for _ in range(150)]
    fields = ["method", "host", "path", "headers", "source_principal", "context_extensions"]
    for _ in range(150):
        body = {field: value(1) for field in rng.sample(fields, rng.randrange(1, len(fields)))}
        if rng.random() < 0.5:
            body["path"] = "/" + "".join(rng.choice("ab/?*%\x00é") for _ in range(rng.randrange(0, 12)))
            body["headers"] = {
                rng.choice(["authorization", "X-Api-Key", "x-partner"]): rng.choice(
                    ["Bearer " + token(), "Bearer ", "ApiKey x", KEYS["acme-live"], ["1", "2"]]
                )
            }
            body["method"] = rng.choice(["GET", "post", "BREW"])
        bodies.append(json.dumps(body).encode())
    async with client(served.app) as http:
        for body in bodies:
            answer = await http.post("/v1/check", content=body)
            assert answer.status_code in (200, 400), (body, answer.text)
            payload = answer.json()
            assert (
                ("allowed" in payload) if answer.status_code == 200 else payload["error"]["code"] == "invalid_request"
            )


# -- access and schema -----------------------------------------------------------------------------------------


async def test_policy_and_check_refuse_remote_clients_unless_allowed(served: Served) -> None:
    async with client(served.app, "10.9.8.7") as http:
        policy = await http.get("/v1/policy")
        check = await http.post("/v1/check", json={"path": "/healthz"})
        status = await http.get("/v1/status")
    assert policy.status_code == check.status_code == 403
    assert policy.json()["error"]["code"] == "forbidden" and "admin_allow_remote" in check.json()["error"]["message"]
    assert status.status_code == 200
    opened = build(served.service, served.path, allow_remote=True)
    async with client(opened, "10.9.8.7") as http:
        assert (await http.get("/v1/policy")).status_code == 200
        assert (await http.post("/v1/check", json={"path": "/healthz"})).json()["allowed"] is True


async def test_openapi_lists_every_v1_route(served: Served) -> None:
    async with client(served.app) as http:
        schema = (await http.get("/openapi.json")).json()
    ok = "application/json"
    expected = {
        ("/v1/status", "get"): "StatusOut",
        ("/v1/reload", "post"): "ReloadOut",
        ("/v1/policy", "get"): "PolicyOut",
        ("/v1/check", "post"): "CheckOut",
    }
    for (path, method), model in expected.items():
        operation = schema["paths"][path][method]
        assert operation["summary"]
        assert operation["responses"]["200"]["content"][ok]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    check = schema["paths"]["/v1/check"]["post"]
    assert {"400", "403", "413"} <= set(check["responses"])
    assert "headers" in check["requestBody"]["content"][ok]["schema"]["properties"]


async def test_check_answers_signed_claims_json_cannot_hold_as_they_are_forwarded(served: Served) -> None:
    # A lone surrogate in a signed sub (JSON's "\ud800") and an exp past year 9999: allowed by the pipeline, so the
    # dry run must answer too (it answered 500), with the subject as the headers carry it.
    bearer = token(sub="ann\ud800", roles=["orders.read"], exp=10**12)
    status, body = await dry_run(served.app, {"path": "/orders/7", "headers": {"authorization": f"Bearer {bearer}"}})
    assert status == 200 and body["allowed"] is True
    assert body["identity"]["subject"] == "ann" and body["identity"]["expires_at"] is None
    assert {"name": "x-auth-subject", "value": "ann"} in body["envoy"]["headers_to_set"]


def test_policy_summary_never_shows_a_secret_headers_value() -> None:
    from extauthz.config import HeaderMatch, RequestMatch
    from extauthz.policy_summary import describe_request

    match = RequestMatch(
        headers=(
            HeaderMatch(name="x-internal-token", exact="S3CR3T-SHARED-TOKEN"),
            HeaderMatch(name="authorization", prefix="Basic YWRtaW46aHVudGVyMg"),
            HeaderMatch(name="x-partner", exact="acme"),
        )
    )
    text = describe_request(match)
    assert "S3CR3T" not in text and "YWRtaW4" not in text
    assert "x-internal-token = ***" in text and "authorization starts with ***" in text
    assert "x-partner = 'acme'" in text
