"""Identity-aware quotas end to end: Envoy -> ext_authz (meshgate extauthz) -> ratelimit (meshgate ratelimit).

envoy/extauthz-ratelimit.yaml turns ext_authz's dynamic metadata (tier, sub) into the ratelimit descriptor
(tier, sub), defaulting both to ``anonymous`` on public routes. tests/fixtures/ratelimit/e2e/quotas.yaml: anonymous
4/min (shared), tier=free 6/min per subject, tier=premium unlimited (the issue's 10 / 100 / unlimited, scaled down).
Tokens come from a real local JWKS issuer; the ``plan`` claim maps to the tier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshgate.devservers.echo import EchoThread
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.service import ServiceProcess
from meshgate.devservers.signing import SigningKey, generate_rsa_key, mint_token
from meshgate.envoy import EnvoyProcess, render
from tests.support.http import get

pytestmark = pytest.mark.e2e

QUOTAS = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit" / "e2e" / "quotas.yaml"
AUDIENCE = "quota-api"
ANONYMOUS, FREE = 4, 6  # per minute (quotas.yaml)

POLICY = """\
version: 1
identity:
  order: [jwt]
  jwt:
    issuers:
      - issuer: {issuer}
        audiences: [{audience}]
        jwks_uri: {jwks_uri}
        algorithms: [RS256]
    claims:
      tier: plan
rules:
  - name: public
    public: true
    match: {{path_prefixes: [/public/]}}
  - name: api
    match: {{path_prefixes: [/api/]}}
"""


@dataclass
class Stack:
    key: SigningKey
    jwks: JwksServer
    port: int

    def token(self, sub: str, plan: str | None) -> dict[str, str]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.jwks.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}
        if plan is not None:
            claims["plan"] = plan
        return {"authorization": f"Bearer {mint_token(self.key, self.key.kid, claims, alg=self.key.alg)}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("identity-quotas")
    key = generate_rsa_key("quota-key")
    with JwksServer([key]) as jwks, EchoThread() as upstream:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(issuer=jwks.issuer, audience=AUDIENCE, jwks_uri=jwks.jwks_uri))
        env = {**os.environ, "MESHGATE_RATELIMIT_HEADERS": "draft"}
        drain = ["--drain-seconds", "0.1"]
        with (
            ServiceProcess(["extauthz", "--config", str(policy), "--http-port", "-1", *drain]) as authz,
            ServiceProcess(["ratelimit", "--config", str(QUOTAS), *drain], env=env) as ratelimit,
        ):
            config = render(
                "extauthz-ratelimit.yaml",
                listen_port=0,
                upstream_port=upstream.port,
                authz_port=authz.ports["grpc_port"],
                ratelimit_port=ratelimit.ports["grpc_port"],
                domain="quotas",
            )
            with EnvoyProcess().start(config) as envoy:
                yield Stack(key, jwks, envoy.listener_port())


@pytest.fixture(autouse=True)
def _clear_of_minute_boundary() -> None:
    """The quotas count per (epoch-aligned) minute: never start a test in the last 3 s of one."""
    left = 60 - time.time() % 60
    if left < 3:
        time.sleep(left + 0.05)


def _statuses(port: int, path: str, headers: dict[str, str], count: int) -> list[int]:
    return [get(port, path, headers)[0] for _ in range(count)]


def test_anonymous_callers_share_one_small_quota(stack: Stack) -> None:
    assert _statuses(stack.port, "/public/news", {}, ANONYMOUS + 2) == [200] * ANONYMOUS + [429] * 2
    status, headers, _ = get(stack.port, "/public/other", {"x-forwarded-for": "198.51.100.7"})
    assert status == 429  # the quota is shared by every anonymous caller, whatever the path
    assert '"anonymous";r=0;' in headers["ratelimit"]
    assert '"anonymous";q=4;w=60' in headers["ratelimit-policy"]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining"] == "0"


def test_free_tier_is_per_subject(stack: Stack) -> None:
    alice, bob = stack.token("alice", "free"), stack.token("bob", "free")
    assert _statuses(stack.port, "/api/orders", alice, FREE + 1) == [200] * FREE + [429]
    status, headers, _ = get(stack.port, "/api/orders", alice)
    assert status == 429
    assert '"free";r=0;' in headers["ratelimit"] and "retry-after" in headers
    # A fresh token for the same subject draws on the same quota; another subject has its own.
    assert get(stack.port, "/api/orders", stack.token("alice", "free"))[0] == 429
    assert _statuses(stack.port, "/api/orders", bob, FREE + 1) == [200] * FREE + [429]


def test_premium_is_unlimited(stack: Stack) -> None:
    carol = stack.token("carol", "premium")
    calls = FREE * 3
    replies = [get(stack.port, "/api/orders", carol) for _ in range(calls)]
    assert [status for status, _, _ in replies] == [200] * calls
    assert "ratelimit" not in replies[-1][1]  # an unlimited rule reports no limit


def test_a_token_without_a_tier_gets_the_anonymous_quota(stack: Stack) -> None:
    """No plan claim: the tier falls back to ``anonymous`` (the metadata action's default) with the real subject,
    so the caller gets the anonymous limit, counted for that subject: never a bypass into an unlimited tier."""
    dave = stack.token("dave", None)
    assert _statuses(stack.port, "/api/orders", dave, ANONYMOUS + 1) == [200] * ANONYMOUS + [429]


def test_unauthenticated_api_calls_never_reach_the_quota(stack: Stack) -> None:
    """ext_authz runs first: a 401 is not counted against anyone's quota."""
    erin = stack.token("erin", "free")
    for _ in range(FREE + 2):
        assert get(stack.port, "/api/orders", {"authorization": "Bearer nope"})[0] == 401
    assert _statuses(stack.port, "/api/orders", erin, FREE) == [200] * FREE
