"""The bench's JWT issuer: an in-process JWKS server (background thread) with one RSA key, the bench policy rendered
with its address, and one RS256 token minted per run.

Real clients reuse their token until it expires, so every request of a run carries the same token: after the first
request the service answers from its verified-token cache, which is part of what the bench measures.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bench.scenarios import POLICY, POLICY_ISSUER, REQUEST_PATH
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import generate_rsa_key, mint_token

TOKEN_TTL_S = 4 * 3600  # longer than any bench run
_PLACEHOLDER = re.compile(rf"((?:issuer|jwks_uri): ){re.escape(POLICY_ISSUER)}")


class BenchIssuer:
    """``with BenchIssuer() as issuer: issuer.policy, issuer.headers()``."""

    def __init__(self, policy: Path = POLICY) -> None:
        self._template = policy
        self._key = generate_rsa_key("bench-rsa")
        self._server = JwksServer([self._key])
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.policy = Path()
        self.token = ""

    def __enter__(self) -> BenchIssuer:
        self._server.__enter__()
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="meshgate-bench-policy-")
            self.policy = Path(self._tmp.name) / self._template.name
            self.policy.write_text(render_policy(self._template.read_text(), self._server.issuer))
            now = int(time.time())
            claims = {
                "iss": self._server.issuer,
                "aud": "bench",
                "sub": "bench-user",
                "roles": ["user"],
                "scope": "items:read",
                "iat": now,
                "exp": now + TOKEN_TTL_S,
            }
            self.token = mint_token(self._key, self._key.kid, claims)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def http_allow_answer(self) -> Path:
        """A file holding the bytes extauthz's HTTP mode answers the bench request with (its allow: identity
        headers, headers to remove, metadata headers), decided once by the real pipeline with this token."""
        assert self._tmp is not None, "inside `with BenchIssuer()` only"
        path = Path(self._tmp.name) / "http-allow-answer"
        if not path.exists():
            path.write_bytes(asyncio.run(_http_allow_answer(self.policy, self.headers())))
        return path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.__exit__(exc_type, exc, tb)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


async def _http_allow_answer(policy: Path, headers: dict[str, str]) -> bytes:
    from extauthz.app import build_pipeline
    from extauthz.http_adapter import encode_decision
    from extauthz.identity.jwks import JwksRegistry
    from extauthz.model import CheckInput
    from extauthz.pipeline import NullObserver

    registry = JwksRegistry()
    pipeline = build_pipeline(policy, registry, observer=NullObserver())
    await pipeline.start()
    try:
        decision = await pipeline.check(CheckInput(method="GET", host="bench", path=REQUEST_PATH, headers=headers))
    finally:
        await pipeline.close()
        await registry.close()
    if not decision.allowed:
        raise RuntimeError(f"the bench request is denied: {decision.reason.value} {decision.message}")
    return encode_decision(decision)


def render_policy(text: str, issuer: str) -> str:
    """The bench policy with the placeholder issuer (and the jwks_uri under it) pointing at ``issuer``."""
    rendered, count = _PLACEHOLDER.subn(lambda m: m[1] + issuer, text)
    if count != 2:
        raise ValueError(f"bench policy: expected `issuer:` and `jwks_uri:` with the placeholder {POLICY_ISSUER}")
    return rendered
