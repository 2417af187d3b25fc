"""Opaque OAuth2 bearer tokens, checked at the issuer's introspection endpoint (RFC 7662).

A token's first request raises ``RefreshNeeded``: the pipeline awaits the call (one per token however many requests
wait for it; at most ``max_concurrent`` calls at once, the next ones queued, each within ``timeout_seconds`` from
start to end) and then decides from its answer. Answers are cached by the token's SHA-256: an active one for
``cache_seconds`` at most and never past the token's ``exp``, an inactive one for ``negative_cache_seconds``. An
endpoint that fails or does not answer in time is not cached: the request is answered 503
(``introspection_unavailable``), never let through, and the next request asks again.

Only access tokens pass: an answer that says the token is a refresh, offline or ID token (Ory Hydra's
``token_use``, Keycloak's ``typ``, ``token_type``) is refused, so a leaked refresh token is no API credential. Tokens
that a configured JWT issuer owns are left to the JWT provider (``skip``): a JWT it refused is not asked about.

The cache, the queue and the pooled HTTP client live in an ``IntrospectionState`` that outlives policy reloads
(``IntrospectionRegistry``), so a reload neither forgets the tokens already checked nor re-asks about all of them.
meshgate authenticates with HTTP Basic (``client_secret_basic``, RFC 6749 2.3.1) and never follows a redirect,
which would carry its credentials and the token elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
from cachetools import TLRUCache
from prometheus_client import Counter

from extauthz.config import IntrospectionSettings
from extauthz.identity.base import RefreshNeeded
from extauthz.identity.shared import SharedByKey
from extauthz.identity.tokens import TokenFinder, check_times, found_in, map_claims, scalar, token_digest
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from meshgate.log import redact_url
from meshgate.reload import file_state

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
MIN_REUSE_S = 1.0  # an answer stays at least this long, so the requests that waited for it find it
QUEUED_PER_SLOT = 8  # calls that may wait for a free slot, per slot; past that a new token is answered 503 at once
# What an answer may call a token that is not an access token (compared in lower case).
NOT_ACCESS_TOKENS = frozenset({"refresh", "refresh_token", "offline", "id", "id_token", "logout"})

_CALLS = Counter(
    "meshgate_introspection_calls_total",
    "Token introspection calls by result (active, inactive, error; busy = refused, too many waiting)",
    ["result"],
)
_LOOKUPS = Counter("meshgate_introspection_cache_total", "Introspected-token cache lookups", ["result"])
_HIT, _MISS = _LOOKUPS.labels("hit"), _LOOKUPS.labels("miss")
for _result in ("active", "inactive", "error", "busy"):
    _CALLS.labels(_result)


class IntrospectionError(Exception):
    """A call failed or its answer is unusable; the message is safe to log (no token, no secret)."""


@dataclass(frozen=True, slots=True)
class _Answer:
    """An active token's identity, or why the token is refused: a reason and message, not an exception, since
    raising one cached instance again and again chains its tracebacks (and the frames they hold) without end."""

    identity: Identity | None
    refusal: tuple[Reason, str] | None
    until: float


class IntrospectionState:
    """What outlives a policy reload for one introspection setting: answers, calls in flight, the HTTP client."""

    def __init__(self, settings: IntrospectionSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        # At least one answer per call that may be in flight, so an answer is there when its waiters look.
        self.cache: TLRUCache[bytes, _Answer] = TLRUCache(
            maxsize=max(settings.cache_size, settings.max_concurrent),
            ttu=lambda _key, answer, _now: answer.until,
            timer=clock,
        )
        self.inflight: dict[bytes, asyncio.Task[_Answer | None]] = {}
        self.queued = 0  # calls started and not finished (running or waiting for a slot)
        self._slots: asyncio.Semaphore | None = None
        self._client: httpx.AsyncClient | None = None
        credentials = f"{quote_plus(settings.client_id)}:{quote_plus(settings.client_secret)}"
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "meshgate",
        }

    async def close(self) -> None:
        for task in list(self.inflight.values()):
            task.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def post(self, token: str) -> Any:
        """The endpoint's JSON answer about ``token``, within ``timeout_seconds`` from start to end."""
        settings = self.settings
        if self._slots is None:
            self._slots = asyncio.Semaphore(settings.max_concurrent)
        if self._client is None:
            limits = httpx.Limits(max_connections=settings.max_concurrent, max_keepalive_connections=8)
            # The system's trust store (SSL_CERT_FILE honoured) unless the policy names a CA bundle, as for JWKS.
            tls = ssl.create_default_context(cafile=settings.ca_file or None)
            self._client = httpx.AsyncClient(limits=limits, verify=tls, trust_env=False)
        client = self._client
        what = f"POST {redact_url(settings.endpoint)}"
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        async with self._slots:
            try:
                async with asyncio.timeout(settings.timeout_s):
                    async with client.stream("POST", settings.endpoint, content=body, headers=self._headers) as answer:
                        if answer.status_code != 200:
                            raise IntrospectionError(f"{what}: HTTP {answer.status_code}")
                        chunks: list[bytes] = []
                        size = 0
                        async for chunk in answer.aiter_raw():
                            size += len(chunk)
                            if size > MAX_ANSWER_BYTES:
                                raise IntrospectionError(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
                            chunks.append(chunk)
            except TimeoutError:
                raise IntrospectionError(f"{what}: no answer within {settings.timeout_s} s") from None
            except httpx.HTTPError as error:
                raise IntrospectionError(f"{what}: {type(error).__name__}: {error}") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise IntrospectionError(f"{what}: not JSON: {error}") from None


class IntrospectionRegistry:
    """Introspection states shared across policy reloads, one per distinct setting."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: SharedByKey[IntrospectionState] = SharedByKey()

    def get_or_create(self, settings: IntrospectionSettings) -> IntrospectionState:
        # A CA bundle replaced in place (a Kubernetes secret) makes a new state: its client trusts the new bundle.
        key = (settings, file_state(settings.ca_file) if settings.ca_file else None)
        return self._states.get_or_create(key, lambda: IntrospectionState(settings, self._clock))

    async def retain(self, used: Iterable[IntrospectionState]) -> None:
        """Close and forget every state not in ``used`` (after a reload swapped in a new policy)."""
        await self._states.retain(used)

    async def close(self) -> None:
        await self._states.close()


class IntrospectionProvider:
    kind = IdentityKind.INTROSPECTION

    def __init__(
        self,
        settings: IntrospectionSettings,
        state: IntrospectionState | None = None,
        *,
        skip: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # Without a shared state the provider owns its own and closes it itself.
        self._owns_state = state is None
        self.state = state or IntrospectionState(settings, clock)
        self._skip = skip
        self._tokens = TokenFinder(settings.sources)
        self.request_headers = self._tokens.request_headers
        self.reads_query = self._tokens.reads_query

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._owns_state:
            await self.state.close()

    # -- request path ----------------------------------------------------------------------------------------
    def authenticate(self, inp: CheckInput) -> Identity | None:
        found = self._tokens.find(inp)
        if found is None:
            return None
        token, header = found
        if self._skip is not None and self._skip(token):
            return None  # a configured JWT issuer's token: the JWT provider's verdict stands
        digest = token_digest(token)
        answer = self.state.cache.get(digest)
        if answer is None:
            _MISS.inc()
            raise RefreshNeeded(
                partial(self._introspect, token, digest, header),
                status=503,
                reason=Reason.INTROSPECTION_UNAVAILABLE,
                message="token introspection did not answer",
                credential_header=header,
            )
        _HIT.inc()
        if answer.refusal is not None:
            raise AuthenticationError(*answer.refusal, credential_header=header)
        assert answer.identity is not None
        return found_in(answer.identity, header)

    # -- I/O -------------------------------------------------------------------------------------------------
    async def _introspect(self, token: str, digest: bytes, header: str) -> None:
        """Ask the endpoint about ``token`` (or join the call already asking), then make sure its answer is in the
        cache when the pipeline looks again (right after this returns, with no await between)."""
        state = self.state
        task = state.inflight.get(digest)
        if task is None:
            if state.queued >= state.settings.max_concurrent * QUEUED_PER_SLOT:
                _CALLS.labels("busy").inc()
                return  # still not cached: the pipeline answers 503 now
            task = asyncio.get_running_loop().create_task(self._call(token, header))
            state.inflight[digest] = task
            state.queued += 1
            task.add_done_callback(partial(self._call_done, digest))
        # Shielded: one waiter giving up (its deadline) must not cancel the call the others wait for.
        answer = await asyncio.shield(task)
        if answer is not None:
            state.cache[digest] = answer  # again: other answers may have pushed it out meanwhile

    def _call_done(self, digest: bytes, task: asyncio.Task[_Answer | None]) -> None:
        state = self.state
        state.queued -= 1
        if state.inflight.get(digest) is task:
            del state.inflight[digest]
        if not task.cancelled() and task.exception() is None and (answer := task.result()) is not None:
            state.cache[digest] = answer

    async def _call(self, token: str, header: str) -> _Answer | None:
        try:
            answer = self._answer(await self.state.post(token), header)
        except IntrospectionError as error:
            _CALLS.labels("error").inc()
            log.warning("token introspection failed: %s", error)
            return None
        except Exception:
            _CALLS.labels("error").inc()
            log.exception("token introspection failed")
            return None
        _CALLS.labels("active" if answer.identity is not None else "inactive").inc()
        return answer

    def _answer(self, document: Any, header: str) -> _Answer:
        """What a token's introspection answer means for its next requests."""
        if not isinstance(document, dict):
            raise IntrospectionError(f"POST {redact_url(self.settings.endpoint)}: the answer is not a JSON object")
        now = self.state.clock()
        try:
            identity = self._identity(document, header, now)
        except AuthenticationError as error:
            return _Answer(None, (error.reason, error.message), now + max(self.settings.negative_cache_s, MIN_REUSE_S))
        return _Answer(identity, None, max(identity.expires_at, now + MIN_REUSE_S))

    def _identity(self, claims: Mapping[str, Any], header: str, now: float) -> Identity:
        settings = self.settings
        if claims.get("active") is not True:
            raise AuthenticationError(Reason.INACTIVE_TOKEN, "token is not active")
        if not _is_access_token(claims):
            raise AuthenticationError(Reason.INVALID_TOKEN, "not an access token")
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


def _is_access_token(claims: Mapping[str, Any]) -> bool:
    """False when the answer says the token is something else (refresh, offline, ID token)."""
    token_use = claims.get("token_use")  # Ory Hydra, AWS Cognito
    if token_use is not None and token_use not in ("access_token", "access"):
        return False
    for name in ("typ", "token_type"):  # Keycloak: typ Bearer / Refresh / Offline / ID
        value = claims.get(name)
        if value is not None and (not isinstance(value, str) or value.lower() in NOT_ACCESS_TOKENS):
            return False
    return True
