"""The /v1 admin API through real `python -m meshgate serve` processes on loopback ports: status, reload (good and
bad), policy, dry-run checks against what the HTTP ext_authz port really enforces, and ratelimit's routes."""

from __future__ import annotations

import http.client
import json
import os
import re
from pathlib import Path
from typing import Any

from meshgate.devservers.service import ServiceProcess
from tests.unit.test_extauthz_admin_api import POLICY, SECRETS, token, write_policy

# No background polling: each reload in these tests is the one POST /v1/reload makes.
ENV = {**os.environ, "MESHGATE_RELOAD_INTERVAL_S": "3600"}


def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers={"content-type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        raw = reply.read()
    finally:
        connection.close()
    try:
        return reply.status, json.loads(raw)
    except ValueError:
        return reply.status, raw


def enforced(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    """What the HTTP ext_authz port answers for GET ``path``: the policy really served."""
    return call(port, "GET", path, headers=headers)[0]


def test_extauthz_v1_status_reload_policy_and_check(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    bearer = {"authorization": f"Bearer {token(roles=['orders.read'])}"}
    with ServiceProcess(["extauthz", "--config", str(path)], env=ENV) as svc:
        admin, authz = svc.ports["admin_port"], svc.ports["http_port"]
        status, body = call(admin, "GET", "/v1/status")
        assert status == 200
        assert (body["service"], body["config"]["generation"], body["config"]["paths"]) == (
            "extauthz",
            1,
            [str(path), str(tmp_path / "keys.yaml")],
        )
        first_digest = body["config"]["digest"]

        status, policy = call(admin, "GET", "/v1/policy")
        assert status == 200 and [rule["name"] for rule in policy["rules"]] == [
            "block-debug",
            "health",
            "orders",
            "partners",
        ]
        text = json.dumps(policy)
        assert not [secret for secret in SECRETS if secret in text]

        # Dry runs agree with what the HTTP port enforces.
        for headers, expected in ((bearer, 200), ({}, 401)):
            status, check = call(admin, "POST", "/v1/check", {"path": "/orders", "headers": headers})
            assert status == 200 and check["status"] == expected
            assert enforced(authz, "/orders", headers) == expected
        status, check = call(admin, "POST", "/v1/check", {"path": "/debug/x", "headers": bearer})
        assert (check["status"], check["reason"]) == (403, "denied_by_rule")
        assert enforced(authz, "/debug/x", bearer) == 403

        # A bad policy: 422 with file:line; generation 1 and its rules keep serving.
        path.write_text(POLICY.replace("effect: deny", "effect: maybe"))
        status, failed = call(admin, "POST", "/v1/reload")
        assert status == 422
        assert failed["error"]["code"] == "invalid_config"
        assert re.match(rf"{re.escape(str(path))}:\d+: ", failed["error"]["message"]), failed
        assert failed["config"]["generation"] == 1
        status, body = call(admin, "GET", "/v1/status")
        assert body["config"]["generation"] == 1 and body["config"]["digest"] == first_digest
        assert body["config"]["last_reload"]["ok"] is False
        assert body["config"]["last_reload"]["error"] == failed["error"]["message"]
        assert enforced(authz, "/debug/x", bearer) == 403  # the old deny rule still holds
        assert enforced(authz, "/orders") == 401

        # A good one: /orders turns public; generation 2.
        path.write_text(POLICY.replace("paths: [/healthz]", "paths: [/healthz, /orders]"))
        status, reloaded = call(admin, "POST", "/v1/reload")
        assert status == 200
        assert (reloaded["changed"], reloaded["config"]["generation"]) == (True, 2)
        assert reloaded["config"]["digest"] != first_digest
        assert reloaded["config"]["last_reload"]["ok"] is True
        assert enforced(authz, "/orders") == 200
        status, check = call(admin, "POST", "/v1/check", {"path": "/orders"})
        assert (check["allowed"], check["reason"], check["rule"]) == (True, "public", "health")

        status, schema = call(admin, "GET", "/openapi.json")
        assert {"/v1/status", "/v1/reload", "/v1/policy", "/v1/check"} <= set(schema["paths"])


RATELIMIT = "domain: shop\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 1}\n"
REQUEST = {"domain": "shop", "descriptors": [{"entries": [{"key": "user", "value": "bo"}]}]}


def test_ratelimit_v1_status_config_should_rate_limit_and_reload(tmp_path: Path) -> None:
    config = tmp_path / "shop.yaml"
    config.write_text(RATELIMIT)
    with ServiceProcess(["ratelimit", "--config", str(tmp_path)], env=ENV) as svc:
        admin = svc.ports["admin_port"]
        status, body = call(admin, "GET", "/v1/status")
        assert status == 200
        assert (body["service"], body["ready"], body["config"]["generation"]) == ("ratelimit", True, 1)
        assert body["checks"] == {"config": True, "backend": True}

        status, served = call(admin, "GET", "/v1/config")
        assert status == 200 and served == call(admin, "GET", "/rlconfig")[1]
        assert served["domains"]["shop"]["descriptors"][0]["key"] == "user"

        status, first = call(admin, "POST", "/v1/should-rate-limit", REQUEST)
        assert (status, first["overallCode"], first["statuses"][0]["code"]) == (200, "OK", "OK")
        status, over = call(admin, "POST", "/v1/should-rate-limit", REQUEST)
        assert (status, over["overallCode"]) == (200, "OVER_LIMIT")

        config.write_text(RATELIMIT + "    nope: 1\n")
        status, failed = call(admin, "POST", "/v1/reload")
        assert status == 422 and failed["error"]["message"].startswith(f"{config}:5: ")
        assert failed["config"]["generation"] == 1
        assert call(admin, "POST", "/v1/should-rate-limit", REQUEST)[1]["overallCode"] == "OVER_LIMIT"

        config.write_text(RATELIMIT.replace("requests_per_unit: 1", "requests_per_unit: 100"))
        status, reloaded = call(admin, "POST", "/v1/reload")
        assert (status, reloaded["changed"], reloaded["config"]["generation"]) == (200, True, 2)
        status, answer = call(admin, "POST", "/v1/should-rate-limit", REQUEST)
        assert answer["overallCode"] == "OK" and answer["statuses"][0]["currentLimit"]["requestsPerUnit"] == 100
