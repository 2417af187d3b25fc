"""Opaque OAuth2 bearer tokens, checked at the issuer's introspection endpoint (RFC 7662).

A token's first request raises ``RefreshNeeded``: the pipeline awaits the call (one per token however many requests
wait for it, at most ``max_concurrent`` tokens at once, each within ``timeout_seconds``) and then decides from the
cached answer. Answers are cached by the token's SHA-256: an active one for ``cache_seconds`` at most and never past
the token's ``exp``, an inactive one for ``negative_cache_seconds``. An endpoint that fails or does not answer in
time is not cached: the request is answered 503 (``introspection_unavailable``), never let through, and the next
request asks again.

meshgate authenticates itself with HTTP Basic (``client_secret_basic``, RFC 6749 2.3.1) and never follows a
redirect, which would carry its credentials and the token elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any
from urllib.parse import quote_plus, urlencode

from cachetools import TLRUCache
from prometheus_client import Counter

from extauthz.config import IntrospectionSettings
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.http_json import FetchError, fetch_json
from extauthz.identity.tokens import TokenFinder, check_times, found_in, map_claims, scalar, token_digest
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from meshgate.log import redact_url

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
MIN_REUSE_S = 1.0  # an answer serves the requests that waited for it, even with a cache time of 0

_CALLS = Counter(
    "meshgate_introspection_calls_total",
    "Token introspection calls by result (active, inactive, error; busy = refused past max_concurrent)",
    ["result"],
)
_LOOKUPS = Counter("meshgate_introspection_cache_total", "Introspected-token cache lookups", ["result"])
_HIT, _MISS = _LOOKUPS.labels("hit"), _LOOKUPS.labels("miss")
for _result in ("active", "inactive", "error", "busy"):
    _CALLS.labels(_result)


@dataclass(frozen=True, slots=True)
class _Answer:
    identity: Identity | None
    error: AuthenticationError | None
    until: float


class IntrospectionProvider:
    kind = IdentityKind.INTROSPECTION

    def __init__(self, settings: IntrospectionSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._tokens = TokenFinder(settings.sources)
        self.request_headers = self._tokens.request_headers
        self.reads_query = self._tokens.reads_query
        self._cache: TLRUCache[bytes, _Answer] = TLRUCache(
            maxsize=max(settings.cache_size, 1), ttu=lambda _key, answer, _now: answer.until, timer=clock
        )
        self._inflight: dict[bytes, asyncio.Task[None]] = {}
        credentials = f"{quote_plus(settings.client_id)}:{quote_plus(settings.client_secret)}"
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- request path ----------------------------------------------------------------------------------------
    def authenticate(self, inp: CheckInput) -> Identity | None:
        found = self._tokens.find(inp)
        if found is None:
            return None
        token, header = found
        digest = token_digest(token)
        answer = self._cache.get(digest)
        if answer is None:
            _MISS.inc()
            raise RefreshNeeded(
                partial(self._introspect, token, digest, header),
                status=503,
                reason=Reason.INTROSPECTION_UNAVAILABLE,
                message="token introspection did not answer",
            )
        _HIT.inc()
        if answer.error is not None:
            raise answer.error
        assert answer.identity is not None
        return found_in(answer.identity, header)

    # -- I/O -------------------------------------------------------------------------------------------------
    async def _introspect(self, token: str, digest: bytes, header: str) -> None:
        """Ask the endpoint about ``token`` (or join the call already asking); the answer lands in the cache."""
        task = self._inflight.get(digest)
        if task is None:
            if len(self._inflight) >= self.settings.max_concurrent:
                _CALLS.labels("busy").inc()
                return  # still not cached: the pipeline answers 503 now
            task = asyncio.get_running_loop().create_task(self._call(token, digest, header))
            self._inflight[digest] = task
            task.add_done_callback(lambda _done: self._inflight.pop(digest, None))
        # Shielded: one waiter giving up (its deadline) must not cancel the call the others wait for.
        await asyncio.shield(task)

    async def _call(self, token: str, digest: bytes, header: str) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.settings.max_concurrent, thread_name_prefix="introspection")
        loop = asyncio.get_running_loop()
        try:
            document = await loop.run_in_executor(self._executor, self._post, token)
            answer = self._answer(document, header)
        except FetchError as error:
            _CALLS.labels("error").inc()
            log.warning("token introspection failed: %s", error)
            return
        except Exception:
            _CALLS.labels("error").inc()
            log.exception("token introspection failed")
            return
        _CALLS.labels("active" if answer.identity is not None else "inactive").inc()
        self._cache[digest] = answer

    def _post(self, token: str) -> Any:
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        document, _ = fetch_json(
            self.settings.endpoint,
            timeout_s=self.settings.timeout_s,
            max_bytes=MAX_ANSWER_BYTES,
            data=body,
            headers=self._headers,
            follow_redirects=False,
        )
        return document

    def _answer(self, document: Any, header: str) -> _Answer:
        """What a token's introspection answer means for its next requests: kept at least ``MIN_REUSE_S``, so that
        the requests that waited for it find it."""
        if not isinstance(document, dict):
            raise FetchError(f"POST {redact_url(self.settings.endpoint)}: the answer is not a JSON object")
        now = self._clock()
        try:
            identity = self._identity(document, header, now)
        except AuthenticationError as error:
            return _Answer(None, error, now + max(self.settings.negative_cache_s, MIN_REUSE_S))
        return _Answer(identity, None, max(identity.expires_at, now + MIN_REUSE_S))

    def _identity(self, claims: Mapping[str, Any], header: str, now: float) -> Identity:
        settings = self.settings
        if claims.get("active") is not True:
            raise AuthenticationError(Reason.INACTIVE_TOKEN, "token is not active")
        issuer = claims.get("iss")
        if settings.issuer and issuer is not None and issuer != settings.issuer:
            raise AuthenticationError(Reason.INVALID_ISSUER, "token issuer is not trusted")
        if settings.audiences:
            audience = claims.get("aud")
            audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
            if not set(settings.audiences).intersection(a for a in audiences if isinstance(a, str)):
                raise AuthenticationError(Reason.INVALID_AUDIENCE, "token audience is not accepted")
        exp = check_times(claims, now, settings.leeway_s)
        mapped = map_claims(claims, settings.claims)
        client = scalar(claims.get("client_id"))
        subject = mapped.subject or client  # a client-credentials token names its client only
        if not subject:
            raise AuthenticationError(Reason.INVALID_TOKEN, "token has no subject")
        until = now + settings.cache_s
        return Identity(
            kind=IdentityKind.INTROSPECTION,
            subject=subject,
            issuer=settings.issuer or (issuer if isinstance(issuer, str) else ""),
            client=client,
            roles=mapped.roles,
            scopes=mapped.scopes,
            tier=mapped.tier,
            claims=MappingProxyType(dict(claims)),
            credential_header=header,
            expires_at=until if exp is None else min(until, exp),
        )
