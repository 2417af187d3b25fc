"""ratelimit's /v1 routes: /v1/config is /rlconfig typed, /v1/should-rate-limit is /json's handler with 200 verdicts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from meshgate.admin import build_admin_app
from meshgate.runtime import Readiness
from ratelimit.admin import MAX_BODY, build_router
from ratelimit.admin_api import build_v1_router
from ratelimit.app import RateLimitApp
from ratelimit.backends.memory import MemoryBackend

CONFIG = """\
domain: shop
on_backend_error: deny
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per_user}
    descriptors:
      - key: plan
        value: gold
        rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 20}
  - key: free
    rate_limit: {unlimited: true}
"""
REQUEST = {"domain": "shop", "descriptors": [{"entries": [{"key": "user", "value": "ann"}]}]}


def build(get_service: Any, config_dict: Any, *, allow_remote: bool = False) -> FastAPI:
    routers = [
        build_router(get_service, config_dict),
        build_v1_router(get_service, config_dict, allow_remote=allow_remote),
    ]
    return build_admin_app(Readiness(), {"service": "ratelimit"}, routers)


def client(app: FastAPI, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 5000)), base_url="http://admin")


@pytest.fixture
async def rl(tmp_path: Path) -> AsyncIterator[tuple[RateLimitApp, FastAPI]]:
    (tmp_path / "shop.yaml").write_text(CONFIG)
    app = RateLimitApp(tmp_path, MemoryBackend())
    await app.start()
    try:
        yield app, build(app.get_service, lambda: app.config().to_dict())
    finally:
        await app.close()


async def test_v1_config_is_what_rlconfig_serves(rl: tuple[RateLimitApp, FastAPI]) -> None:
    service, app = rl
    async with client(app) as http:
        v1 = await http.get("/v1/config")
        legacy = await http.get("/rlconfig")
    assert v1.status_code == legacy.status_code == 200
    assert v1.json() == legacy.json() == json.loads(json.dumps(service.config().to_dict()))
    shop = v1.json()["domains"]["shop"]
    assert shop["on_backend_error"] == "deny"
    gold = shop["descriptors"][0]["descriptors"][0]["rule"]["limits"][0]
    assert (gold["algorithm"], gold["burst"]) == ("token_bucket", 20)


async def test_should_rate_limit_shares_the_json_handler_and_answers_200(rl: tuple[RateLimitApp, FastAPI]) -> None:
    _, app = rl
    async with client(app) as http:
        first = await http.post("/v1/should-rate-limit", json=REQUEST)
        second = await http.post("/json", json=REQUEST)  # the same counter: the same service behind both
        third = await http.post("/v1/should-rate-limit", json=REQUEST)
        legacy = await http.post("/json", json=REQUEST)
    assert first.status_code == 200 and first.json()["overallCode"] == "OK"
    assert first.json()["statuses"][0]["currentLimit"] == {"requestsPerUnit": 2, "unit": "MINUTE", "name": "per_user"}
    assert second.status_code == 200
    assert third.status_code == 200 and third.json()["overallCode"] == "OVER_LIMIT"
    assert third.json()["statuses"][0]["code"] == "OVER_LIMIT"
    assert legacy.status_code == 429  # /json keeps envoyproxy's status


async def test_should_rate_limit_errors(rl: tuple[RateLimitApp, FastAPI]) -> None:
    _, app = rl
    async with client(app) as http:
        broken = await http.post("/v1/should-rate-limit", content=b"{")
        invalid = await http.post("/v1/should-rate-limit", json={"domain": "", "descriptors": []})
        unit = await http.post(
            "/v1/should-rate-limit",
            json={
                "domain": "shop",
                "descriptors": [{"entries": [{"key": "user"}], "limit": {"requests_per_unit": 1, "unit": "fortnight"}}],
            },
        )
        huge = await http.post("/v1/should-rate-limit", content=b" " * (MAX_BODY + 1))
        legacy_huge = await http.post("/json", content=b" " * (MAX_BODY + 1))
        legacy_invalid = await http.post("/json", json={"domain": ""})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
    assert invalid.status_code == 400
    locations = {tuple(detail["loc"]) for detail in invalid.json()["error"]["details"]}
    assert {("domain",), ("descriptors",)} <= locations
    assert unit.status_code == 400 and "fortnight" in unit.json()["error"]["message"]
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    # /json keeps its own shape and its 400
    assert legacy_huge.status_code == 400 and legacy_huge.json()["error"].startswith("request body too large")
    assert legacy_invalid.status_code == 400 and isinstance(legacy_invalid.json()["error"], str)


class _Down:
    async def should_rate_limit(self, _request: object) -> object:
        raise ConnectionError("redis is gone")


async def test_should_rate_limit_backend_down_is_503() -> None:
    app = build(lambda: _Down(), dict)
    async with client(app) as http:
        answer = await http.post("/v1/should-rate-limit", json=REQUEST)
    assert answer.status_code == 503
    assert answer.json() == {"error": {"code": "backend_unavailable", "message": "rate limit backend unavailable"}}


async def test_v1_routes_refuse_remote_clients_unless_allowed(rl: tuple[RateLimitApp, FastAPI]) -> None:
    service, app = rl
    async with client(app, "10.3.3.3") as http:
        config = await http.get("/v1/config")
        spent = await http.post("/v1/should-rate-limit", json=REQUEST)
    assert config.status_code == spent.status_code == 403
    assert "admin_allow_remote" in spent.json()["error"]["message"]
    opened = build(service.get_service, lambda: service.config().to_dict(), allow_remote=True)
    async with client(opened, "10.3.3.3") as http:
        assert (await http.get("/v1/config")).status_code == 200
        assert (await http.post("/v1/should-rate-limit", json=REQUEST)).json()["overallCode"] == "OK"


async def test_openapi_lists_the_ratelimit_v1_routes(rl: tuple[RateLimitApp, FastAPI]) -> None:
    _, app = rl
    async with client(app) as http:
        schema = (await http.get("/openapi.json")).json()
    config = schema["paths"]["/v1/config"]["get"]
    check = schema["paths"]["/v1/should-rate-limit"]["post"]
    assert config["summary"] and check["summary"]
    ok = "application/json"
    assert config["responses"]["200"]["content"][ok]["schema"] == {"$ref": "#/components/schemas/RateLimitConfigOut"}
    assert check["responses"]["200"]["content"][ok]["schema"] == {"$ref": "#/components/schemas/ShouldRateLimitOut"}
    assert {"400", "403", "413", "503"} <= set(check["responses"])
    assert "domain" in check["requestBody"]["content"][ok]["schema"]["properties"]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [ref for key, value in node.items() for ref in ([value] if key == "$ref" else _refs(value))]
    return [ref for item in node for ref in _refs(item)] if isinstance(node, list) else []


async def test_every_ref_in_the_openapi_document_resolves(rl: tuple[RateLimitApp, FastAPI]) -> None:
    # Request bodies read by hand carry pydantic's schema; its "#/$defs/..." would point nowhere in the document.
    _, app = rl
    async with client(app) as http:
        schema = (await http.get("/openapi.json")).json()
    refs = _refs(schema)
    assert refs
    for ref in refs:
        node = schema
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
    body = schema["paths"]["/json"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["descriptors"]["items"]["properties"]["entries"]["items"]["properties"]["key"]


def test_a_recursive_models_schema_is_refused() -> None:
    from pydantic import BaseModel

    from meshgate.admin_api import json_request_body

    class Tree(BaseModel):
        children: list[Tree] = []

    with pytest.raises(ValueError, match="recursive"):
        json_request_body(Tree)
