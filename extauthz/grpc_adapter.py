"""Thin ``Authorization/Check`` adapter: CheckRequest -> CheckInput -> Decision -> CheckResponse.

The only module that knows the protobuf shapes. ``Check`` never raises: any failure is a fail-closed denial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from extauthz.identity.base import RefreshNeeded
from extauthz.model import CheckInput, Decision, Reason
from extauthz.pipeline import REQUEST_ID_HEADER, Pipeline

log = logging.getLogger(__name__)

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name

# google.rpc.Code values Envoy sees; it only distinguishes OK from not OK, the HTTP status travels separately.
OK = 0
PERMISSION_DENIED = 7
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = status_pb2.Status(code=OK)
_STATUS_BY_CODE = {code: status_pb2.Status(code=code) for code in (PERMISSION_DENIED, UNAVAILABLE, UNAUTHENTICATED)}


def grpc_code_for(http_status: int) -> int:
    if http_status == 401:
        return UNAUTHENTICATED
    if http_status >= 500:
        return UNAVAILABLE
    return PERMISSION_DENIED


def _fixed_denial(grpc_code: int, http_status: int, code: str, message: str) -> external_auth_pb2.CheckResponse:
    """A denial decided without the request: its JSON body holds nothing of the input."""
    body = json.dumps({"error": {"code": code, "message": message}})
    return external_auth_pb2.CheckResponse(
        status=_STATUS_BY_CODE[grpc_code],
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),
            headers=[_header("content-type", "application/json")],
            body=body,
        ),
    )


def _malformed_denial() -> external_auth_pb2.CheckResponse:
    """The answer to bytes that are no CheckRequest (never from Envoy)."""
    return _fixed_denial(PERMISSION_DENIED, 400, "bad_request", "malformed CheckRequest")


def _static_denial() -> external_auth_pb2.CheckResponse:
    """The answer when even the fail-closed path failed."""
    return _fixed_denial(UNAVAILABLE, 500, Reason.INTERNAL_ERROR.value, "internal error")


def parse_check_request(data: bytes) -> external_auth_pb2.CheckRequest | None:
    """The method's request deserializer: the request, or None for bytes that are no CheckRequest. It must not
    raise: grpc would answer UNKNOWN with the exception's text and log a traceback per call."""
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except Exception:
        return None


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def to_check_input(request: external_auth_pb2.CheckRequest) -> CheckInput:
    attributes = request.attributes
    http = attributes.request.http
    # The protobuf map is read in place (no copy): CheckInput only needs get / in / iteration.
    headers: Mapping[str, str] = http.headers
    if not headers and len(http.header_map.headers):
        # Newer Envoy fills header_map (raw values) instead; repeated names are joined like Envoy does.
        headers = {}
        for entry in http.header_map.headers:
            key = entry.key.lower()
            value = entry.value or entry.raw_value.decode("utf-8", "replace")
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    path = http.path or headers.get(":path", "/")
    cut = path.find("?")
    if cut >= 0:
        path, query = path[:cut], path[cut + 1 :]
    else:
        query = http.query
    return CheckInput(
        method=http.method or headers.get(":method", ""),
        host=http.host or headers.get(":authority", ""),
        path=path,
        query=query,
        headers=headers,
        source_principal=attributes.source.principal,
        request_id=headers.get(REQUEST_ID_HEADER) or http.id,
        context_extensions=attributes.context_extensions,  # read in place too
    )


def to_check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(name, value) for name, value in decision.headers_to_set],
            headers_to_remove=decision.headers_to_remove,
        )
        answer = external_auth_pb2.CheckResponse(status=_OK_STATUS, ok_response=ok)
        fields = answer.dynamic_metadata.fields
        for key, value in decision.metadata.items():
            fields[key].string_value = value
        return answer
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=decision.status),
        headers=[_header(name, value) for name, value in decision.response_headers],
        body=decision.body.decode("utf-8", "replace"),
    )
    return external_auth_pb2.CheckResponse(
        status=_STATUS_BY_CODE[grpc_code_for(decision.status)], denied_response=denied
    )


ALLOW_CACHE_SIZE = 4096


class AuthorizationServicer:
    """``Check``, registered by ``add_to_server`` with a deserializer that never raises."""

    def __init__(self, get_pipeline: Callable[[], Pipeline]) -> None:
        self._get_pipeline = get_pipeline
        self._static_denial = _static_denial()
        self._malformed_denial = _malformed_denial()
        # Built allow answers by decision object: the pipeline reuses allow decisions, and building the proto
        # (headers, Struct) costs more than everything else we do per call.
        self._allow_answers: dict[int, tuple[Decision, external_auth_pb2.CheckResponse]] = {}

    def _answer(self, decision: Decision) -> external_auth_pb2.CheckResponse:
        if not decision.allowed:
            return to_check_response(decision)
        cached = self._allow_answers.get(id(decision))
        if cached is not None and cached[0] is decision:
            return cached[1]
        answer = to_check_response(decision)
        if len(self._allow_answers) >= ALLOW_CACHE_SIZE:
            self._allow_answers.clear()
        self._allow_answers[id(decision)] = (decision, answer)
        return answer

    async def Check(
        self, request: external_auth_pb2.CheckRequest | None, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        if request is None:
            return self._malformed_denial
        try:
            pipeline = self._get_pipeline()
        except Exception:
            log.exception("no pipeline to answer Check; denying")
            return self._static_denial
        try:
            inp = to_check_input(request)
        except Exception:
            log.exception("could not read CheckRequest; denying")
            return self._static_denial
        try:
            try:
                decision = pipeline.decide(inp)  # no extra coroutine unless a key refresh is needed
            except RefreshNeeded as needed:
                decision = await pipeline.check_after_refresh(inp, needed)
            return self._answer(decision)
        except Exception:
            log.exception("Check failed; denying")
            try:
                return to_check_response(pipeline.fail_closed(inp, Reason.INTERNAL_ERROR, "internal error"))
            except Exception:
                return self._static_denial


def add_to_server(server: grpc.aio.Server, get_pipeline: Callable[[], Pipeline]) -> AuthorizationServicer:
    servicer = AuthorizationServicer(get_pipeline)
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=parse_check_request,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))
    return servicer
