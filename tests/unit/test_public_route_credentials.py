"""A public route lets a request in whatever credential it carries: which credentials reach the upstream.

meshgate strips what was its own to check and it refused (a configured issuer's token, an API key in its header,
an empty or oversized bearer token), each of them; a token it does not know (not a JWT, another issuer's) may be the
upstream's own and passes on. Through the real JWT and API-key providers, a real JWKS server and a keys file.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extauthz.app import build_pipeline
from extauthz.identity.apikey import hash_api_key
from extauthz.identity.jwks import JwksRegistry
from extauthz.model import CheckInput, Reason
from extauthz.pipeline import Pipeline
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import SigningKey, generate_rsa_key, mint_token

POLICY = """\
version: 1
identity:
  order: [jwt, api_key]
  jwt:
    issuers: [{{issuer: {issuer}, audiences: [api], jwks_uri: {jwks}}}]
  api_key: {{keys_file: keys.yaml}}
rules:
  - {{name: open, public: true, match: {{path_prefixes: [/pub]}}}}
"""
KEY = "mgk_public_route_test_0123456789abcdef"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[Pipeline, JwksServer, SigningKey]]:
    key = generate_rsa_key("k1")
    async with JwksServer([key]) as server:
        (tmp_path / "keys.yaml").write_text(
            f"clients:\n  - client: c\n    keys:\n      - {{id: k, sha256: {hash_api_key(KEY)}, revoked: true}}\n"
        )
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(issuer=server.issuer, jwks=server.jwks_uri))
        registry = JwksRegistry()
        pipeline = build_pipeline(policy, registry)
        await pipeline.start()
        await registry.caches()[0].refresh()
        yield pipeline, server, key
        await pipeline.close()
        await registry.close()


def token(key: SigningKey, issuer: str, **claims: object) -> str:
    now = int(time.time())
    return mint_token(key, key.kid, {"iss": issuer, "aud": "api", "sub": "s", "exp": now + 600, **claims})


async def removed(pipeline: Pipeline, headers: dict[str, str]) -> tuple[str, ...]:
    decision = await pipeline.check(CheckInput(method="GET", host="h", path="/pub/x", headers=headers))
    assert (decision.status, decision.reason) == (200, Reason.PUBLIC)
    return decision.headers_to_remove


async def test_refused_credentials_that_were_meshgates_are_stripped_each(
    stack: tuple[Pipeline, JwksServer, SigningKey],
) -> None:
    pipeline, server, key = stack
    expired = token(key, server.issuer, exp=int(time.time()) - 3600)
    assert "authorization" in await removed(pipeline, {"authorization": f"Bearer {expired}"})
    both = await removed(pipeline, {"authorization": f"Bearer {expired}", "x-api-key": KEY})
    assert {"authorization", "x-api-key"} <= set(both)
    assert "authorization" in await removed(pipeline, {"authorization": "Bearer "})  # empty
    assert "authorization" in await removed(pipeline, {"authorization": "Bearer " + "x" * 20_000})  # oversized


async def test_tokens_meshgate_does_not_know_pass_on(stack: tuple[Pipeline, JwksServer, SigningKey]) -> None:
    pipeline, _, key = stack
    others = token(key, "https://another-issuer.example")
    assert "authorization" not in await removed(pipeline, {"authorization": f"Bearer {others}"})
    assert "authorization" not in await removed(pipeline, {"authorization": "Bearer opaque-session-of-the-upstream"})
    assert "authorization" not in await removed(pipeline, {"authorization": "Basic dXNlcjpwdw=="})
