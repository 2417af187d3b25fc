"""The versioned admin API both services share: ``GET /v1/status`` and ``POST /v1/reload``, plus the guard and the
bounded body reader that each service's own ``/v1`` routes use.

``/v1/status`` is read-only and answers anyone who reaches the admin port (kubelet probes and Prometheus do). The
calls that reveal or change things (``local_router``'s) answer only loopback clients unless ``admin_allow_remote``
is set: ``kubectl port-forward`` and ``kubectl exec`` arrive on loopback. 127.0.0.6 is not loopback here: an Istio
sidecar forwards every inbound connection to the app from that address, so under Istio it is any pod of the mesh.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from meshgate.admin import ReadinessView
from meshgate.admin_errors import ApiError, ErrorDetail, error_responses
from meshgate.reload import ConfigStatus
from meshgate.settings import env_name

log = logging.getLogger(__name__)

REMOTE_SETTING = "admin_allow_remote"
WITHHELD = f"rejected; the error answers loopback clients (or with {REMOTE_SETTING}), and is in the log"
ISTIO_INBOUND_SOURCE = ipaddress.ip_address("127.0.0.6")  # Istio's inbound passthrough binds here (see module doc)


class WatchedConfig(Protocol):
    """What the API needs of a ``meshgate.reload.ConfigWatcher``."""

    def status(self) -> ConfigStatus: ...

    async def check_now(self) -> bool: ...


# -- response models -------------------------------------------------------------------------------------------
class ReloadAttemptOut(BaseModel):
    ok: bool
    at: datetime
    error: str | None = Field(default=None, description="file:line: message, when the load failed")


class ConfigOut(BaseModel):
    component: str
    paths: list[str] = Field(description="watched files and directories of the config being served")
    generation: int = Field(description="1 after start-up, +1 per config swapped in since")
    loaded_at: datetime = Field(description="when the config being served was loaded")
    digest: str = Field(description="sha256 of the watched files' names and contents: equal on replicas in sync")
    last_reload: ReloadAttemptOut | None = Field(description="the last load attempt, which may have failed")

    @classmethod
    def of(cls, status: ConfigStatus, *, show_error: bool = True) -> ConfigOut:
        """``show_error``: the last attempt's error text, else only that it failed (see ``WITHHELD``)."""
        attempt = status.last_attempt
        return cls(
            component=status.component,
            paths=list(status.paths),
            generation=status.generation,
            loaded_at=_utc(status.loaded_at),
            digest=status.digest,
            last_reload=None
            if attempt is None
            else ReloadAttemptOut(
                ok=attempt.ok,
                at=_utc(attempt.at),
                error=(attempt.error if show_error or not attempt.error else WITHHELD) or None,
            ),
        )


class StatusOut(BaseModel):
    service: str
    version: str
    started_at: datetime
    uptime_s: float
    ready: bool = Field(description="what /readyz answers: every check passes and not draining")
    draining: bool
    checks: dict[str, bool]
    config: ConfigOut


class ReloadOut(BaseModel):
    changed: bool = Field(description="a new config was swapped in (false: the files had not changed)")
    config: ConfigOut


class ReloadFailedOut(BaseModel):
    """The files on disk were rejected; ``config`` is what keeps serving (its generation unchanged)."""

    error: ErrorDetail
    config: ConfigOut


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


# -- who may call ----------------------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8 (but Istio's 127.0.0.6), ::1 and their IPv4-mapped forms; anything else (no address) is not."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback and address != ISTIO_INBOUND_SOURCE


def local_only(allow_remote: bool) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: 403 for a non-loopback client unless ``allow_remote``."""

    async def guard(request: Request) -> None:
        if may_call_local(request, allow_remote):
            return
        flag = "--" + REMOTE_SETTING.replace("_", "-")
        raise ApiError(
            403,
            "forbidden",
            f"{request.url.path} answers loopback clients only (kubectl port-forward or exec); to open it to remote "
            f"clients set {REMOTE_SETTING}: true ({flag} / {env_name(REMOTE_SETTING)}=true)",
        )

    return guard


def local_router(allow_remote: bool) -> APIRouter:
    """A ``/v1`` router whose routes answer loopback clients only (unless ``allow_remote``); 403 in the schema."""
    return APIRouter(
        prefix="/v1",
        tags=["v1"],
        dependencies=[Depends(local_only(allow_remote))],
        responses=error_responses(403),
    )


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def may_call_local(request: Request, allow_remote: bool) -> bool:
    """Whether ``request`` may use the calls that reveal or change things: a loopback client, or any when allowed."""
    return allow_remote or is_loopback(client_of(request))


# -- bodies ----------------------------------------------------------------------------------------------------
def json_request_body(model: type[BaseModel], *, by_alias: bool = True) -> dict[str, Any]:
    """A route's ``openapi_extra`` for a JSON body read by hand (``read_body``) that ``model`` validates.

    pydantic's schema refers to nested models as ``#/$defs/...``, which means nothing once it sits inside the
    OpenAPI document's ``paths``: they are inlined (the models are not recursive; a recursive one raises)."""
    schema = model.model_json_schema(by_alias=by_alias)
    defs: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any, expanding: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, expanding) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in expanding:
                raise ValueError(f"{model.__name__}: {name} is recursive; its schema cannot be inlined")
            rest = {key: value for key, value in node.items() if key != "$ref"}
            return inline({**defs[name], **rest}, (*expanding, name))
        return {key: inline(value, expanding) for key, value in node.items()}

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema, ())}}}}


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body: 413 as soon as it is known to be over ``limit`` bytes (the rest is never read, so a huge
    or endless upload cannot fill the memory first), 400 when the client left before the end."""
    too_large = ApiError(413, "body_too_large", f"request body too large (at most {limit} bytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # the client left (or sent a broken chunked body): nobody to answer
        raise ApiError(400, "incomplete_body", "request body incomplete") from None
    return b"".join(chunks)


# -- the shared routes -----------------------------------------------------------------------------------------
def v1_router(
    info: Mapping[str, Any],
    readiness: ReadinessView,
    watcher: WatchedConfig,
    *,
    allow_remote: bool,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> APIRouter:
    """``GET /v1/status`` (anyone) and ``POST /v1/reload`` (loopback unless ``allow_remote``)."""
    started, started_at = clock(), wall_clock()
    public = APIRouter(prefix="/v1", tags=["v1"])

    @public.get("/status", summary="Service, version, uptime, readiness and the config served (read-only)")
    async def status(request: Request) -> StatusOut:
        # A rejected config's error quotes the file's content (a value, a URL): for callers of the local routes only.
        show_error = may_call_local(request, allow_remote)
        return StatusOut(
            service=str(info.get("service", "")),
            version=str(info.get("version", "")),
            started_at=_utc(started_at),
            uptime_s=round(clock() - started, 3),
            ready=readiness.ready,
            draining=readiness.draining,
            checks=readiness.snapshot(),
            config=ConfigOut.of(watcher.status(), show_error=show_error),
        )

    local = local_router(allow_remote)

    @local.post(
        "/reload",
        response_model=ReloadOut,
        summary="Check the config files now: 200 with the generation served, 422 when they are rejected",
        responses={422: {"model": ReloadFailedOut, "description": "rejected; the last good config keeps serving"}},
    )
    async def reload(request: Request) -> ReloadOut | JSONResponse:
        changed = await watcher.check_now()
        current = watcher.status()  # no await since check_now: its outcome
        attempt = current.last_attempt
        log.info(
            "admin reload requested",
            extra={"client": client_of(request), "changed": changed, "generation": current.generation},
        )
        if attempt is not None and not attempt.ok:  # unchanged since a rejected version counts as rejected too
            body = ReloadFailedOut(
                error=ErrorDetail(code="invalid_config", message=attempt.error), config=ConfigOut.of(current)
            )
            return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=422)
        return ReloadOut(changed=changed, config=ConfigOut.of(current))

    router = APIRouter()
    router.include_router(public)
    router.include_router(local)
    return router
