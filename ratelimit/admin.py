"""Admin HTTP routes of the rate-limit service (mounted by ``ServiceRuntime.add_admin_router``), and the backend probe.

- ``POST /json``: envoyproxy/ratelimit's JSON endpoint. Body: the JSON form of a RateLimitRequest
  (``{"domain": "shop", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}``; snake_case or camelCase;
  optional ``hits_addend`` and per-descriptor ``limit {requests_per_unit, unit}``/``hits_addend``). Answer: the
  RateLimitResponse as protobuf JSON (what envoyproxy answers), HTTP 200, or 429 when OVER_LIMIT; 400 on bad input;
  503 when the backend is unavailable.
- ``GET /rlconfig``: the loaded config (``RateLimitConfig.to_dict()``) as JSON.
- ``BackendProbe``: pings the backend periodically and sets the runtime's ``backend`` readiness check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from meshgate.admin_api import json_request_body, read_body
from meshgate.admin_errors import ApiError, invalid_request
from meshgate.periodic import Periodic
from ratelimit import metrics
from ratelimit.backends.base import CounterBackend
from ratelimit.model import (
    MAX_DESCRIPTORS,
    MAX_DOMAIN_CHARS,
    MAX_ENTRIES,
    MAX_HITS_ADDEND,
    MAX_KEY_CHARS,
    MAX_VALUE_CHARS,
    Code,
    Descriptor,
    Entry,
    Limit,
    RateLimitRequest,
    Unit,
)
from ratelimit.server import to_response
from ratelimit.service import RateLimitService

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class JsonEntry(_Model):
    key: str = Field(min_length=1, max_length=MAX_KEY_CHARS)
    value: str = Field(default="", max_length=MAX_VALUE_CHARS)


class JsonLimit(_Model):
    requests_per_unit: int = Field(ge=0, le=2**32 - 1)
    unit: str = Field(min_length=1, max_length=16, description="SECOND, MINUTE, HOUR, DAY, WEEK, MONTH or YEAR")


class JsonDescriptor(_Model):
    entries: list[JsonEntry] = Field(min_length=1, max_length=MAX_ENTRIES)
    limit: JsonLimit | None = None
    hits_addend: int | None = Field(default=None, ge=0, le=MAX_HITS_ADDEND)


class JsonRequest(_Model):
    domain: str = Field(min_length=1, max_length=MAX_DOMAIN_CHARS)
    descriptors: list[JsonDescriptor] = Field(min_length=1, max_length=MAX_DESCRIPTORS)
    hits_addend: int = Field(default=0, ge=0, le=MAX_HITS_ADDEND)


def _unit(raw: str) -> Unit:
    try:
        return Unit(raw.lower())
    except ValueError:
        raise ValueError(f"unknown unit {raw!r}") from None


def to_model(body: JsonRequest) -> RateLimitRequest:
    descriptors = tuple(
        Descriptor(
            entries=tuple(Entry(entry.key, entry.value) for entry in descriptor.entries),
            limit_override=(
                Limit(descriptor.limit.requests_per_unit, _unit(descriptor.limit.unit)) if descriptor.limit else None
            ),
            hits_addend=descriptor.hits_addend,
        )
        for descriptor in body.descriptors
    )
    return RateLimitRequest(body.domain, descriptors, body.hits_addend or 1)


REQUEST_BODY_SCHEMA: dict[str, Any] = json_request_body(JsonRequest, by_alias=False)


class JsonAnswer(NamedTuple):
    payload: dict[str, Any]  # the RateLimitResponse as protobuf JSON (what envoyproxy answers)
    over_limit: bool


async def should_rate_limit_json(request: Request, get_service: Callable[[], RateLimitService]) -> JsonAnswer:
    """The handler both ``POST /json`` and ``POST /v1/should-rate-limit`` share: the body (JSON, at most 64 KiB) ->
    ShouldRateLimit -> the RateLimitResponse as protobuf JSON. Raises ``ApiError``: 400 bad input, 413 too large,
    503 backend unavailable."""
    raw = await read_body(request, MAX_BODY)
    try:
        body = JsonRequest.model_validate_json(raw)
        inp = to_model(body)
    except ValidationError as error:
        raise invalid_request(error, "invalid rate limit request") from None
    except ValueError as error:
        raise ApiError(400, "invalid_request", str(error)) from None
    try:
        answer = await get_service().should_rate_limit(inp)
    except Exception:  # BackendUnavailable or anything else: the caller decides, as with gRPC UNAVAILABLE
        raise ApiError(503, "backend_unavailable", "rate limit backend unavailable") from None
    return JsonAnswer(json_format.MessageToDict(to_response(answer)), answer.code is Code.OVER_LIMIT)


def build_router(
    get_service: Callable[[], RateLimitService],
    config_dict: Callable[[], dict[str, Any]],
) -> APIRouter:
    router = APIRouter(tags=["ratelimit"])

    @router.post(
        "/json",
        summary="envoyproxy/ratelimit's JSON endpoint: ShouldRateLimit with a JSON body (429 when over the limit)",
        openapi_extra=REQUEST_BODY_SCHEMA,
    )
    async def json_endpoint(request: Request) -> JSONResponse:
        try:
            answer = await should_rate_limit_json(request, get_service)
        except ApiError as error:  # envoyproxy's shape: {"error": message}; 400 for any bad body
            content: dict[str, Any] = {"error": error.message}
            if error.details is not None:
                content["details"] = error.details
            return JSONResponse(content, status_code=400 if error.status == 413 else error.status)
        return JSONResponse(answer.payload, status_code=429 if answer.over_limit else 200)

    @router.get("/rlconfig", summary="The rate-limit config currently served (domains, descriptors, limits)")
    async def rlconfig() -> dict[str, Any]:
        return config_dict()

    return router


class BackendProbe:
    """Pings the backend every ``interval_s`` (each ping bounded by ``timeout_s``) and publishes readiness."""

    def __init__(
        self,
        backend: CounterBackend,
        set_ready: Callable[[bool], None],
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        backend_name: str = "memory",
    ) -> None:
        self._backend = backend
        self._set_ready = set_ready
        self._timeout_s = timeout_s
        self._up = metrics.BACKEND_UP.labels(backend_name)
        self._poller = Periodic(self.check_now, interval_s, "ratelimit-backend-probe")
        self._last: bool | None = None

    async def check_now(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (close() would then hang).
            async with asyncio.timeout(self._timeout_s):
                ok = bool(await self._backend.ping())
        except Exception:
            ok = False
        if ok != self._last:
            if self._last is not None:
                log.warning("rate limit backend %s", "reachable again" if ok else "unreachable")
            self._last = ok
        self._up.set(1 if ok else 0)
        self._set_ready(ok)
        return ok

    async def start(self) -> None:
        await self.check_now()
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()
