"""extauthz's own ``/v1`` admin routes (loopback clients unless ``admin_allow_remote``):

- ``GET /v1/policy``: the policy served (``extauthz.policy_summary``), without any secret.
- ``POST /v1/check``: a dry run of the decision pipeline for a request described in JSON: the verdict, the identity
  and what Envoy would be told. It runs the served pipeline's providers and rules (``Pipeline.unrecorded``): no
  decision metric, no audit line. The providers' own work is real: a JWKS fetch for an unknown key, an
  introspection call for an opaque token, their cache metrics. Credentials are never echoed: the answer holds the
  identity and the headers meshgate sets, never a request header's value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from extauthz.model import CheckInput, Decision, Identity
from extauthz.pipeline import REQUEST_ID_HEADER, Pipeline
from extauthz.policy_summary import PolicyOut, summarize
from extauthz.response import header_safe
from meshgate.admin_api import client_of, json_request_body, local_router, read_body
from meshgate.admin_errors import error_responses, invalid_request

log = logging.getLogger(__name__)

MAX_CHECK_BODY = 64 * 1024
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"  # where Envoy publishes ext_authz's dynamic metadata


class CheckIn(BaseModel):
    """A request as Envoy would describe it to ext_authz."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(default="GET", min_length=1, max_length=32)
    host: str = Field(default="", max_length=1024, description="the :authority")
    path: str = Field(default="/", min_length=1, max_length=8192, description="may include the ?query")
    headers: dict[str, str | list[str]] = Field(
        default_factory=dict, max_length=256, description="repeated headers as a list; names in any case"
    )
    source_principal: str = Field(default="", max_length=2048, description="the caller's SPIFFE ID (mTLS peer)")
    context_extensions: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        return path

    @field_validator("headers")
    @classmethod
    def _names(cls, headers: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        if any(not name.strip() for name in headers):
            raise ValueError("a header name must not be empty")
        return headers

    def to_input(self) -> CheckInput:
        """As the transports build it: lower-case names, repeated headers joined with commas (as Envoy does),
        the path split from its query."""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.strip().lower()
            joined = ",".join(value) if isinstance(value, list) else value
            headers[key] = f"{headers[key]},{joined}" if key in headers else joined
        path, _, query = self.path.partition("?")
        return CheckInput(
            method=self.method.upper(),
            host=self.host,
            path=path,
            query=query,
            headers=headers,
            source_principal=self.source_principal,
            request_id=headers.get(REQUEST_ID_HEADER, ""),
            context_extensions=dict(self.context_extensions),
        )


class IdentityOut(BaseModel):
    kind: str
    subject: str
    client: str
    roles: list[str]
    scopes: list[str]
    tier: str
    issuer: str
    principal: str
    expires_at: datetime | None = None
    credential_header: str = Field(description="the header that carried the credential (its name only)")

    @classmethod
    def of(cls, identity: Identity) -> IdentityOut:
        # Claims as the headers carry them (header_safe): a signed claim may hold a lone surrogate, which JSON
        # cannot encode, or control characters.
        return cls(
            kind=identity.kind.value,
            subject=header_safe(identity.subject),
            client=header_safe(identity.client),
            roles=sorted(header_safe(role) for role in identity.roles),
            scopes=sorted(header_safe(scope) for scope in identity.scopes),
            tier=header_safe(identity.tier),
            issuer=header_safe(identity.issuer),
            principal=header_safe(identity.principal),
            expires_at=_utc_or_none(identity.expires_at),
            credential_header=identity.credential_header,
        )


def _utc_or_none(epoch_s: float) -> datetime | None:
    """None for no expiry, or one past what ``datetime`` holds (a signed ``exp`` may be any number)."""
    try:
        return datetime.fromtimestamp(epoch_s, UTC)
    except (OverflowError, OSError, ValueError):
        return None


class HeaderOut(BaseModel):
    name: str
    value: str


class EnvoyOut(BaseModel):
    """Allowed: the upstream request's headers to set and remove, and dynamic metadata. Denied: the answer that
    Envoy sends the client (status, headers, body)."""

    headers_to_set: list[HeaderOut] = []
    headers_to_remove: list[str] = []
    dynamic_metadata: dict[str, dict[str, str]] = Field(default_factory=dict, description="by namespace")
    denied_status: int | None = None
    denied_headers: list[HeaderOut] = []
    denied_body: str | None = None


class CheckOut(BaseModel):
    dry_run: bool = Field(default=True, description="not counted in metrics nor written to the audit log")
    allowed: bool
    status: int
    reason: str
    rule: str
    message: str
    identity: IdentityOut | None
    envoy: EnvoyOut

    @classmethod
    def of(cls, decision: Decision) -> CheckOut:
        if decision.allowed:
            envoy = EnvoyOut(
                headers_to_set=[HeaderOut(name=name, value=value) for name, value in decision.headers_to_set],
                headers_to_remove=list(decision.headers_to_remove),
                dynamic_metadata={METADATA_NAMESPACE: dict(decision.metadata)} if decision.metadata else {},
            )
        else:
            envoy = EnvoyOut(
                denied_status=decision.status,
                denied_headers=[HeaderOut(name=name, value=value) for name, value in decision.response_headers],
                denied_body=decision.body.decode("utf-8", "replace"),
            )
        return cls(
            allowed=decision.allowed,
            status=decision.status,
            reason=decision.reason.value,
            rule=decision.rule,
            message=decision.message,
            identity=None if decision.identity is None else IdentityOut.of(decision.identity),
            envoy=envoy,
        )


async def _check_input(request: Request) -> CheckInput:
    raw = await read_body(request, MAX_CHECK_BODY)
    try:
        return CheckIn.model_validate_json(raw).to_input()
    except ValidationError as error:
        raise invalid_request(error) from None


def build_v1_router(pipeline: Callable[[], Pipeline], policy_path: Path, *, allow_remote: bool) -> APIRouter:
    router = local_router(allow_remote)

    @router.get("/policy", summary="The policy served: rules and identity providers, without any secret")
    async def policy() -> PolicyOut:
        return summarize(pipeline(), str(policy_path))

    @router.post(
        "/check",
        summary="Dry run: what extauthz would decide for a request described in JSON (not counted nor audited)",
        responses=error_responses(400, 413),
        openapi_extra=json_request_body(CheckIn),
    )
    async def check(request: Request) -> CheckOut:
        inp = await _check_input(request)
        decision = await pipeline().unrecorded().check(inp)
        log.info(
            "admin dry-run check",
            extra=_log_fields(client_of(request), inp, decision),
        )
        return CheckOut.of(decision)

    return router


def _log_fields(client: str, inp: CheckInput, decision: Decision) -> Mapping[str, object]:
    # Request shape only, as the audit log: never headers or the query.
    return {
        "client": client,
        "method": inp.method,
        "host": inp.host,
        "path": inp.path,
        "allowed": decision.allowed,
        "reason": decision.reason.value,
    }
