"""The gRPC Check adapter through a real grpc.aio server and client on loopback, plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extauthz import grpc_adapter, response
from extauthz.config import ResponseSettings
from extauthz.identity.base import RefreshNeeded
from extauthz.model import AuthenticationError, CheckInput, Decision, Identity, IdentityKind, Reason
from extauthz.pipeline import Pipeline
from extauthz.policy_api import Verdict
from meshgate.runtime import ServiceRuntime
from meshgate.settings import ServeSettings

AttributeContext = attribute_context_pb2.AttributeContext


class FakeProvider:
    """``Bearer good-<sub>[-admin]`` -> identity; ``bad`` -> rejected; ``refresh`` -> needs I/O once; ``boom``."""

    kind = IdentityKind.JWT

    def __init__(self) -> None:
        self.refreshed = False
        self.seen: list[CheckInput] = []

    def authenticate(self, inp: CheckInput) -> Identity | None:
        self.seen.append(inp)
        token = inp.headers.get("authorization", "").removeprefix("Bearer ")
        if not token:
            return None
        if token == "bad":
            raise AuthenticationError(Reason.INVALID_TOKEN, "bad signature")
        if token == "boom":
            raise RuntimeError("provider bug")
        if token == "refresh" and not self.refreshed:
            raise RefreshNeeded(self._refresh)
        sub = token.removeprefix("good-").removesuffix("-admin")
        roles = frozenset({"admin"}) if token.endswith("-admin") else frozenset()
        return Identity(
            kind=IdentityKind.JWT,
            subject=sub,
            issuer="iss",
            roles=roles,
            tier="gold",
            credential_header="authorization",
        )

    async def _refresh(self) -> None:
        self.refreshed = True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FakePolicy:
    def without_identity(self, inp: CheckInput) -> Verdict | None:
        return None

    def evaluate(self, inp: CheckInput, identity: Identity | None, auth_error: AuthenticationError | None) -> Verdict:
        if inp.path == "/public":
            return Verdict(True, 200, Reason.PUBLIC, rule="public")
        if identity is None:
            reason = auth_error.reason if auth_error else Reason.MISSING_CREDENTIAL
            return Verdict(False, 401, reason, message=auth_error.message if auth_error else "no credential")
        if inp.path.startswith("/admin") and "admin" not in identity.roles:
            return Verdict(False, 403, Reason.FORBIDDEN, rule="admins", message="forbidden")
        return Verdict(True, 200, Reason.ALLOWED, rule="users")


def make_pipeline(provider: FakeProvider | None = None) -> Pipeline:
    return Pipeline([provider or FakeProvider()], FakePolicy(), ResponseSettings())


def check_request(
    path: str = "/x?q=1",
    headers: dict[str, str] | None = None,
    *,
    header_map: dict[str, str] | None = None,
    principal: str = "",
    request_id: str = "",
) -> external_auth_pb2.CheckRequest:
    http = AttributeContext.HttpRequest(
        id="stream-7", method="GET", host="api.example", path=path, headers=headers or {}
    )
    for key, value in (header_map or {}).items():
        http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    if request_id:
        http.headers["x-request-id"] = request_id
    return external_auth_pb2.CheckRequest(
        attributes=AttributeContext(
            source=AttributeContext.Peer(principal=principal),
            request=AttributeContext.Request(http=http),
            context_extensions={"route": "r1"},
        )
    )


# -- pure translation --------------------------------------------------------------------------------------------
def test_to_check_input_splits_query_and_reads_attributes() -> None:
    inp = grpc_adapter.to_check_input(
        check_request("/a/b?x=1&y=2", {"authorization": "Bearer t"}, principal="spiffe://td/ns/a/sa/b")
    )
    assert (inp.method, inp.host, inp.path, inp.query) == ("GET", "api.example", "/a/b", "x=1&y=2")
    assert inp.headers["authorization"] == "Bearer t"
    assert inp.source_principal == "spiffe://td/ns/a/sa/b"
    assert inp.request_id == "stream-7"
    assert inp.context_extensions == {"route": "r1"}


def test_to_check_input_prefers_x_request_id_and_reads_header_map() -> None:
    request = check_request("/p", header_map={"X-Request-Id": "rid-1", "accept": "a", "Accept": "b"}, request_id="")
    inp = grpc_adapter.to_check_input(request)
    assert inp.headers == {"x-request-id": "rid-1", "accept": "a,b"}
    assert inp.request_id == "rid-1"
    assert inp.path == "/p"
    assert inp.query == ""


def test_to_check_input_falls_back_to_pseudo_headers() -> None:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers.update({":path": "/z?k=v", ":method": "PUT", ":authority": "h"})
    inp = grpc_adapter.to_check_input(request)
    assert (inp.method, inp.host, inp.path, inp.query) == ("PUT", "h", "/z", "k=v")


def test_to_check_response_allow_overwrites_and_sets_metadata() -> None:
    decision = Decision(
        allowed=True,
        status=200,
        reason=Reason.ALLOWED,
        headers_to_set=(("x-auth-subject", "alice"),),
        headers_to_remove=("authorization",),
        metadata={"sub": "alice", "tier": "gold"},
    )
    answer = grpc_adapter.to_check_response(decision)
    assert answer.status.code == 0
    (header,) = answer.ok_response.headers
    assert (header.header.key, header.header.value) == ("x-auth-subject", "alice")
    assert header.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert not header.HasField("append")
    assert list(answer.ok_response.headers_to_remove) == ["authorization"]
    assert dict(answer.dynamic_metadata) == {"sub": "alice", "tier": "gold"}


@pytest.mark.parametrize(("status", "code"), [(401, 16), (403, 7), (500, 14), (503, 14), (429, 7)])
def test_to_check_response_deny_codes(status: int, code: int) -> None:
    decision = Decision(
        allowed=False,
        status=status,
        reason=Reason.FORBIDDEN,
        response_headers=(("content-type", "application/json"),),
        body=b'{"error":{}}',
    )
    answer = grpc_adapter.to_check_response(decision)
    assert answer.status.code == code
    assert answer.denied_response.status.code == status
    assert answer.denied_response.body == '{"error":{}}'
    assert answer.denied_response.headers[0].header.key == "content-type"
    assert not answer.HasField("ok_response")


# -- a real server -----------------------------------------------------------------------------------------------
class Served:
    def __init__(self, runtime: ServiceRuntime, channel: grpc.aio.Channel, provider: FakeProvider) -> None:
        self.runtime = runtime
        self.channel = channel
        self.provider = provider
        self.stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        self.pipeline: Pipeline = make_pipeline(provider)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    config = tmp_path / "policy.yaml"
    config.write_text("{}\n")
    settings = ServeSettings(service="extauthz", config=config, grpc_port=0, http_port=-1, admin_port=-1)
    runtime = ServiceRuntime(settings)
    provider = FakeProvider()
    holder: dict[str, Served] = {}
    runtime.add_grpc_service(
        grpc_adapter.SERVICE_NAME,
        lambda server: grpc_adapter.add_to_server(server, lambda: holder["s"].pipeline),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime.started.wait(), 10)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}")
    holder["s"] = Served(runtime, channel, provider)
    yield holder["s"]
    await channel.close()
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_check_allow_over_grpc(served: Served) -> None:
    answer = await served.stub.Check(
        check_request("/x?token=secret", {"authorization": "Bearer good-alice"}, request_id="r-1")
    )
    assert answer.status.code == 0
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["x-auth-subject"] == "alice"
    assert "authorization" in answer.ok_response.headers_to_remove
    assert answer.dynamic_metadata["sub"] == "alice"
    assert answer.dynamic_metadata["tier"] == "gold"
    assert served.provider.seen[-1].query == "token=secret"


async def test_check_denials_over_grpc(served: Served) -> None:
    missing = await served.stub.Check(check_request("/x"))
    assert (missing.status.code, missing.denied_response.status.code) == (16, 401)
    assert '"missing_credential"' in missing.denied_response.body
    bad = await served.stub.Check(check_request("/x", {"authorization": "Bearer bad"}, request_id="r-2"))
    assert (bad.status.code, bad.denied_response.status.code) == (16, 401)
    assert '"request_id":"r-2"' in bad.denied_response.body
    forbidden = await served.stub.Check(check_request("/admin", {"authorization": "Bearer good-bob"}))
    assert (forbidden.status.code, forbidden.denied_response.status.code) == (7, 403)


async def test_bytes_that_are_no_check_request_get_a_denial_not_a_grpc_error(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    raw_check = served.channel.unary_unary(f"/{grpc_adapter.SERVICE_NAME}/Check")
    for garbage in (b"\xff" * 50, check_request("/x").SerializeToString()[:-3], b"\x0a\x05\xc3\x28"):
        answer = external_auth_pb2.CheckResponse.FromString(await raw_check(garbage))
        assert (answer.status.code, answer.denied_response.status.code) == (7, 400)
        assert '"bad_request"' in answer.denied_response.body
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert (await served.stub.Check(check_request("/x", {"authorization": "Bearer good-alice"}))).status.code == 0


async def test_check_refresh_needed_awaits_refresh(served: Served) -> None:
    answer = await served.stub.Check(check_request("/x", {"authorization": "Bearer refresh"}))
    assert answer.status.code == 0
    assert served.provider.refreshed


async def test_check_fails_closed_on_provider_bug(served: Served) -> None:
    answer = await served.stub.Check(check_request("/x", {"authorization": "Bearer boom"}))
    assert (answer.status.code, answer.denied_response.status.code) == (14, 500)
    assert "internal_error" in answer.denied_response.body


async def test_check_never_raises_when_pipeline_breaks(served: Served) -> None:
    class Broken(Pipeline):
        def decide(self, inp: CheckInput) -> Decision:
            raise RuntimeError("bug")

    served.pipeline = Broken([served.provider], FakePolicy(), ResponseSettings())
    answer = await served.stub.Check(check_request("/x"))
    assert (answer.status.code, answer.denied_response.status.code) == (14, 500)

    class VeryBroken(Broken):
        def fail_closed(self, inp: CheckInput, reason: Reason, message: str) -> Decision:
            raise RuntimeError("worse")

    served.pipeline = VeryBroken([served.provider], FakePolicy(), ResponseSettings())
    answer = await served.stub.Check(check_request("/x"))
    assert (answer.status.code, answer.denied_response.status.code) == (14, 500)
    assert "internal_error" in answer.denied_response.body


async def test_check_without_pipeline_answers_static_denial() -> None:
    def no_pipeline() -> Pipeline:
        raise LookupError("not loaded yet")

    servicer = grpc_adapter.AuthorizationServicer(no_pipeline)
    answer = await servicer.Check(check_request("/x"), None)
    assert (answer.status.code, answer.denied_response.status.code) == (14, 500)


async def test_check_with_unreadable_request_answers_static_denial(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(request: external_auth_pb2.CheckRequest) -> CheckInput:
        raise ValueError("bad")

    monkeypatch.setattr(grpc_adapter, "to_check_input", explode)
    servicer = grpc_adapter.AuthorizationServicer(make_pipeline)
    answer = await servicer.Check(check_request("/x"), None)
    assert answer.denied_response.status.code == 500


async def test_health_and_reflection_report_the_service(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", grpc_adapter.SERVICE_NAME):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {service.name for service in reply.list_services_response.service}
    assert {grpc_adapter.SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_allow_answers_are_built_once_per_decision() -> None:
    servicer = grpc_adapter.AuthorizationServicer(lambda: make_pipeline())
    identity = Identity(kind=IdentityKind.JWT, subject="alice", tier="gold")
    allow = response.allow(identity, "r", Reason.ALLOWED, ResponseSettings())
    first = servicer._answer(allow)
    assert servicer._answer(allow) is first
    other = response.allow(replace(identity, subject="bob"), "r", Reason.ALLOWED, ResponseSettings())
    assert servicer._answer(other) is not first
    assert first.dynamic_metadata.fields["sub"].string_value == "alice"
    denial = response.deny(
        CheckInput(method="GET", host="h", path="/"), 403, Reason.FORBIDDEN, "no", ResponseSettings()
    )
    assert servicer._answer(denial) is not servicer._answer(denial)  # denials carry request data: never reused


async def test_refresh_needed_is_awaited_then_answered(served: Served) -> None:
    answer = await served.stub.Check(check_request("/x", {"authorization": "Bearer refresh"}))
    assert answer.status.code == 0
    assert served.provider.refreshed
