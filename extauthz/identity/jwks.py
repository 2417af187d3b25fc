"""Signing keys of JWT issuers: fetched, cached, refreshed in the background, refetched on an unknown ``kid``.

The request path only calls ``JwksCache.key_for`` (a dict lookup). All I/O happens in ``start()``, the background
refresh task and ``refetch_for_unknown_kid`` (single-flight, rate limited). A failed fetch keeps the last good keys,
so a short outage of the issuer does not reject tokens signed with keys we already know.

``JwksRegistry`` outlives policy reloads: an unchanged issuer gets the same cache back, keys and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from prometheus_client import Counter, Gauge

from extauthz.config import JwtIssuer
from extauthz.identity.base import WITHDRAWALS
from extauthz.identity.shared import SharedByKey
from extauthz.urls import http_url_problem
from meshgate.log import redact_url
from meshgate.reload import file_state

log = logging.getLogger(__name__)

_FETCHES = Counter(
    "meshgate_jwks_fetches_total",
    "JWKS fetches per configured issuer; result=error counts failures (last good keys kept)",
    ["issuer", "result"],
)
_KEYS = Gauge("meshgate_jwks_keys", "Usable signing keys held per configured issuer", ["issuer"])

MAX_DOCUMENT_BYTES = 1024 * 1024
_SYMMETRIC_PREFIX = "HS"


class JwksFetchError(Exception):
    """Fetching or parsing a key set failed; the message is safe to log."""


@dataclass(slots=True)
class _Key:
    """One JWK, with a PyJWK per algorithm it may verify (a JWK without ``alg`` fits several, e.g. RS256/PS256)."""

    default: jwt.PyJWK
    by_alg: dict[str, jwt.PyJWK] = field(default_factory=dict)
    source: str = ""  # the JWK as canonical JSON: the same key in the next fetch is this very object again

    def for_alg(self, alg: str) -> jwt.PyJWK:
        # Unfit algorithm: hand back the default key and let pyjwt reject the mismatch as an invalid token.
        return self.by_alg.get(alg, self.default)


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: Mapping[str, _Key]
    sole: _Key | None  # the only key, for tokens without a kid

    @property
    def size(self) -> int:
        return len(self.by_kid) if self.sole is None else max(len(self.by_kid), 1)

    def keeping(self, old: _KeySet) -> _KeySet:
        """This set with every key that ``old`` held unchanged replaced by ``old``'s object for it, so that what
        was verified with it (the token cache checks keys by identity) stays good across refreshes."""
        known = {key.source: key for key in (*old.by_kid.values(), *([old.sole] if old.sole else []))}
        by_kid = {kid: known.get(key.source, key) for kid, key in self.by_kid.items()}
        sole = known.get(self.sole.source, self.sole) if self.sole is not None else None
        return _KeySet(by_kid, sole)

    def withdraws_from(self, old: _KeySet) -> bool:
        """Whether a token that ``old`` verified may find no key, or another key, here."""
        if old.sole is not None and self.sole is not old.sole:
            return True
        return any(self.by_kid.get(kid) is not key for kid, key in old.by_kid.items())


_EMPTY = _KeySet({}, None)


def parse_jwks(document: Any, algorithms: Iterable[str], issuer: str = "") -> _KeySet:
    """Usable signing keys of a JWKS document; keys pyjwt cannot use are skipped with a warning."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchError('JWKS document is not an object with a "keys" list')
    asymmetric = [alg for alg in algorithms if not alg.startswith(_SYMMETRIC_PREFIX)]
    by_kid: dict[str, _Key] = {}
    all_keys: list[_Key] = []
    for raw in document["keys"]:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig" or raw.get("kty") == "oct":
            continue
        kid = raw.get("kid")
        try:
            key = _Key(jwt.PyJWK(raw), source=json.dumps(raw, sort_keys=True))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as error:
            log.warning("skipping unusable JWKS key kid=%r of issuer %s: %s", kid, issuer, error)
            continue
        if "alg" not in raw:
            for alg in asymmetric:
                with contextlib.suppress(jwt.PyJWTError, ValueError, TypeError, KeyError):
                    key.by_alg[alg] = jwt.PyJWK(raw, algorithm=alg)
        all_keys.append(key)
        if isinstance(kid, str):
            by_kid.setdefault(kid, key)
    if not all_keys:
        raise JwksFetchError("JWKS document holds no usable signing keys")
    return _KeySet(by_kid, all_keys[0] if len(all_keys) == 1 else None)


def _http_get_json(url: str, timeout_s: float, tls: ssl.SSLContext | None = None) -> tuple[Any, float | None]:
    """The JSON document at ``url`` and its ``Cache-Control: max-age`` in seconds (None when it gives none)."""
    if not url.startswith(("http://", "https://")):
        raise JwksFetchError(f"unsupported URL scheme in {redact_url(url)!r}")
    what = f"GET {redact_url(url)}"
    headers = {"Accept": "application/json", "User-Agent": "meshgate"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=tls) as answer:  # noqa: S310 - scheme checked
            body = answer.read(MAX_DOCUMENT_BYTES + 1)
            max_age = max_age_of(answer.headers.get("Cache-Control", ""), answer.headers.get("Age", ""))
    except OSError as error:  # URLError, HTTPError, timeouts, refused connections
        raise JwksFetchError(f"{what}: {error}") from None
    except http.client.HTTPException as error:  # a broken answer; its own text is the server's, not shown
        raise JwksFetchError(f"{what}: {type(error).__name__}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise JwksFetchError(f"{what}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body), max_age
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise JwksFetchError(f"{what}: not JSON: {error}") from None


def max_age_of(cache_control: str, age: str = "") -> float | None:
    """Seconds the response stays fresh: Cache-Control ``max-age`` minus the ``Age`` header. None without a usable
    max-age, and for ``no-cache``/``no-store`` or a fresh time of 0 (for a key set those mean "ask again", which
    the normal refresh interval already does)."""
    directives: dict[str, str] = {}
    for directive in cache_control.split(","):
        name, _, value = directive.partition("=")
        directives.setdefault(name.strip().lower(), value.strip().strip('"'))
    if "no-cache" in directives or "no-store" in directives:
        return None
    max_age = directives.get("max-age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        return None
    served_for = float(age) if age.strip().isdigit() and len(age.strip()) <= 10 else 0.0
    fresh = float(max_age) - served_for
    return fresh if fresh > 0 else None


REFRESH_AT_AGE = 0.8  # refresh when this share of the key set's max-age has passed
MIN_REFRESH_S = 1.0  # a max-age-driven refresh never comes sooner than this after the last one


class JwksCache:
    """The keys of one issuer. ``clock`` is monotonic seconds (rate limiting only)."""

    def __init__(self, issuer: JwtIssuer, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = issuer
        self._clock = clock
        self._keys = _EMPTY
        self._jwks_uri = issuer.jwks_uri  # discovered lazily when discovery is on
        self._tls = ssl.create_default_context(cafile=issuer.ca_file) if issuer.ca_file else None
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._last_attempt = -math.inf
        self._consecutive_failures = 0
        self._max_age: float | None = None  # the key set's Cache-Control max-age at the last good fetch
        self.fetches = 0  # attempts, for tests and diagnostics
        self.failures = 0
        self.last_success: float | None = None  # clock() of the last good fetch

    # -- request path ----------------------------------------------------------------------------------------
    def key_for(self, kid: str | None, alg: str = "") -> jwt.PyJWK | None:
        """The key for ``kid`` (bound to ``alg`` when the JWK leaves it open), or None when unknown."""
        keys = self._keys
        key = keys.sole if kid is None else keys.by_kid.get(kid)
        if key is None:
            return None
        return key.for_alg(alg) if alg else key.default

    def can_refetch(self) -> bool:
        """Would ``refetch_for_unknown_kid`` fetch (or join a fetch) now?"""
        return self._inflight is not None or self._clock() - self._last_attempt >= self.config.min_refetch_interval_s

    @property
    def key_count(self) -> int:
        return self._keys.size

    # -- I/O -------------------------------------------------------------------------------------------------
    async def refetch_for_unknown_kid(self) -> None:
        """Fetch now unless a fetch ran within ``min_refetch_interval_s``; concurrent callers share one fetch."""
        if self.can_refetch():
            await self.refresh()

    async def refresh(self) -> bool:
        """Fetch the key set (single-flight). True when it succeeded; on failure the old keys stay."""
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        # Shielded: one caller giving up (its deadline) must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> bool:
        self._last_attempt = self._clock()
        self.fetches += 1
        label = self.config.issuer
        try:
            uri, keys, max_age = await asyncio.to_thread(self._fetch_blocking, self._jwks_uri)
        except Exception as error:
            self.failures += 1
            self._consecutive_failures += 1
            if self.config.discovery:
                self._jwks_uri = ""  # rediscover next time: the jwks_uri itself may have moved
            _FETCHES.labels(label, "error").inc()
            log.warning("JWKS fetch for issuer %s failed (%s); keeping %d cached keys", label, error, self._keys.size)
            return False
        self._jwks_uri = uri
        keys = keys.keeping(self._keys)
        if keys.withdraws_from(self._keys):
            WITHDRAWALS.record()  # allows remembered on a withdrawn key must not be reused
        self._keys = keys
        self._max_age = max_age
        self._consecutive_failures = 0
        self.last_success = self._clock()
        _FETCHES.labels(label, "ok").inc()
        _KEYS.labels(label).set(keys.size)
        return True

    def _fetch_blocking(self, jwks_uri: str) -> tuple[str, _KeySet, float | None]:
        timeout = self.config.fetch_timeout_s
        if not jwks_uri:
            jwks_uri = self._discover(timeout)
        document, max_age = _http_get_json(jwks_uri, timeout, self._tls)
        return jwks_uri, parse_jwks(document, self.config.algorithms, self.config.issuer), max_age

    def _discover(self, timeout: float) -> str:
        issuer = self.config.issuer
        document, _ = _http_get_json(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout, self._tls)
        if not isinstance(document, dict):
            raise JwksFetchError("discovery document is not a JSON object")
        # OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer it was fetched for.
        if str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
            raise JwksFetchError("discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or http_url_problem(jwks_uri):
            raise JwksFetchError("discovery document has no usable jwks_uri")
        return jwks_uri

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """First fetch (a failure is logged, not fatal), then background refresh. Idempotent."""
        if self._refresher is not None:
            return
        _KEYS.labels(self.config.issuer).set(self._keys.size)  # 0 until a fetch succeeds: alerts can see it
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        await self.refresh()

    def _next_delay(self) -> float:
        interval = self.config.refresh_interval_s
        if not self._consecutive_failures:
            if self._max_age is None:
                return interval
            # Before the issuer's own expiry of the key set; never more often than min_refetch_interval_s (nor
            # than MIN_REFRESH_S, as that may be 0).
            floor = max(self.config.min_refetch_interval_s, MIN_REFRESH_S)
            return max(floor, min(interval, self._max_age * REFRESH_AT_AGE))
        # Retry a failed issuer sooner than the normal interval, backing off towards it.
        base = max(self.config.min_refetch_interval_s, 0.05)
        return min(interval, base * 2.0 ** min(self._consecutive_failures - 1, 20))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._next_delay())
            await self.refresh()

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = None
        self._inflight = None


def _cache_key(issuer: JwtIssuer) -> tuple[Any, ...]:
    # Everything that changes how keys are fetched or parsed; audiences and secrets do not.
    return (
        issuer.issuer,
        issuer.jwks_uri,
        issuer.discovery,
        issuer.algorithms,
        issuer.refresh_interval_s,
        issuer.min_refetch_interval_s,
        issuer.ca_file,
        file_state(issuer.ca_file) if issuer.ca_file else None,  # a CA bundle replaced in place: a new cache
        issuer.fetch_timeout_s,
    )


class JwksRegistry:
    """JWKS caches shared across policy reloads, keyed by what determines their keys."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._caches: SharedByKey[JwksCache] = SharedByKey()

    def get_or_create(self, issuer: JwtIssuer) -> JwksCache:
        return self._caches.get_or_create(_cache_key(issuer), lambda: JwksCache(issuer, self._clock))

    def caches(self) -> list[JwksCache]:
        return self._caches.values()

    async def retain(self, used: Iterable[JwksCache]) -> None:
        """Close and forget every cache not in ``used`` (call after a reload swapped in a new policy)."""
        await self._caches.retain(used)

    async def close(self) -> None:
        await self._caches.close()
