"""The rate-limit service's own ``/v1`` admin routes (loopback clients unless ``admin_allow_remote``):

- ``GET /v1/config``: the config served, as ``/rlconfig`` gives it (the same function), typed.
- ``POST /v1/should-rate-limit``: ``/json``'s handler (it spends quota like any call), answering 200 with the
  verdict in ``overallCode`` (an over-limit verdict is the call's result, not an error of the call: no 429 that
  a client's retry logic would act on); errors in the admin API's shape (400, 413 over 64 KiB, 503).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from meshgate.admin_api import local_router
from meshgate.admin_errors import error_responses
from ratelimit.admin import REQUEST_BODY_SCHEMA, should_rate_limit_json
from ratelimit.service import RateLimitService

# -- /v1/config: RateLimitConfig.to_dict(), typed -------------------------------------------------------------


class LimitOut(BaseModel):
    requests_per_unit: int
    unit: str
    window: int = Field(description="the window in units (2 with unit minute: two minutes)")
    algorithm: str
    burst: int = Field(default=0, description="token bucket size; 0: requests_per_unit")
    name: str = ""


class RuleOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # optional extras (metadata, value_to_metric_levels, ...) pass through

    path: str
    source: str = Field(description="file:line")
    unlimited: bool
    limits: list[LimitOut]
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    count_blocked: bool
    hash_values: bool
    replaces: list[str]


class DescriptorOut(BaseModel):
    key: str
    value: str = ""
    rule: RuleOut | None = None
    descriptors: list[DescriptorOut] = []


class DomainOut(BaseModel):
    domain: str
    source: str
    on_backend_error: str | None = Field(description="allow or deny when the backend fails; null: gRPC UNAVAILABLE")
    descriptors: list[DescriptorOut]


class RateLimitConfigOut(BaseModel):
    domains: dict[str, DomainOut]
    sources: list[str]


# -- /v1/should-rate-limit: the RateLimitResponse as protobuf JSON (fields at their default are left out) --------


class _ProtoJson(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class RateLimitOut(_ProtoJson):
    requests_per_unit: int = 0
    unit: str = "UNKNOWN"
    name: str = ""


class DescriptorStatusOut(_ProtoJson):
    code: str = Field(default="UNKNOWN", description="OK or OVER_LIMIT")
    current_limit: RateLimitOut | None = None
    limit_remaining: int = 0
    duration_until_reset: str | None = Field(default=None, description='protobuf Duration, e.g. "42s"')


class HeaderOut(_ProtoJson):
    key: str
    value: str = ""


class ShouldRateLimitOut(_ProtoJson):
    overall_code: str = Field(default="UNKNOWN", description="OK or OVER_LIMIT")
    statuses: list[DescriptorStatusOut] = []
    response_headers_to_add: list[HeaderOut] = []
    request_headers_to_add: list[HeaderOut] = []


def build_v1_router(
    get_service: Callable[[], RateLimitService],
    config_dict: Callable[[], dict[str, Any]],
    *,
    allow_remote: bool,
) -> APIRouter:
    router = local_router(allow_remote)

    @router.get(
        "/config",
        summary="The rate-limit config served (what /rlconfig gives), typed",
        response_model_exclude_unset=True,
    )
    async def config() -> RateLimitConfigOut:
        return RateLimitConfigOut.model_validate(config_dict())

    @router.post(
        "/should-rate-limit",
        summary="ShouldRateLimit with a JSON body, as /json (spends quota); 200 with the verdict in overallCode",
        response_model=ShouldRateLimitOut,
        response_model_exclude_unset=True,
        responses=error_responses(400, 413, 503),
        openapi_extra=REQUEST_BODY_SCHEMA,
    )
    async def should_rate_limit(request: Request) -> ShouldRateLimitOut:
        answer = await should_rate_limit_json(request, get_service)
        return ShouldRateLimitOut.model_validate(answer.payload)

    return router
