"""The ShouldRateLimit adapter: pure translation, then a real grpc.aio server and client on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import wrappers_pb2

from meshgate.runtime import ServiceRuntime
from meshgate.settings import ServeSettings
from ratelimit import server
from ratelimit.backends.base import Hit, Outcome
from ratelimit.config import parse_config
from ratelimit.metrics import RuleStatsCollector
from ratelimit.model import Code, Descriptor, DescriptorStatus, Entry, Limit, RateLimitRequest, RateLimitResponse, Unit
from ratelimit.service import RateLimitService
from tests.unit.test_ratelimit_service import Clock, Recording, real_backend

RLS = rls_pb2.RateLimitResponse
Desc = ratelimit_pb2.RateLimitDescriptor

CONFIG = """\
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per_user}
"""


def descriptor(
    *pairs: tuple[str, str], limit: tuple[int, int] | None = None, hits: int | None = None
) -> ratelimit_pb2.RateLimitDescriptor:
    d = Desc(entries=[Desc.Entry(key=k, value=v) for k, v in pairs])
    if limit is not None:
        d.limit.CopyFrom(Desc.RateLimitOverride(requests_per_unit=limit[0], unit=limit[1]))
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


# -- pure translation --------------------------------------------------------------------------------------------
def test_to_request_maps_hits_addend_and_overrides() -> None:
    request = rls_pb2.RateLimitRequest(
        domain="shop",
        descriptors=[
            descriptor(("user", "a")),
            descriptor(("user", "b"), ("path", "/x"), limit=(7, ratelimit_unit_pb2.HOUR), hits=0),
            descriptor(("user", "c"), hits=3),
        ],
    )
    model = server.to_request(request)
    assert model.domain == "shop"
    assert model.hits_addend == 1  # 0 on the wire means 1
    assert model.descriptors == (
        Descriptor((Entry("user", "a"),)),
        Descriptor((Entry("user", "b"), Entry("path", "/x")), Limit(7, Unit.HOUR), 0),
        Descriptor((Entry("user", "c"),), None, 3),
    )
    request.hits_addend = 4
    assert server.to_request(request).hits_addend == 4


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (rls_pb2.RateLimitRequest(descriptors=[descriptor(("a", "b"))]), "domain must not be empty"),
        (rls_pb2.RateLimitRequest(domain="d"), "descriptor list must not be empty"),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("a", "b"), limit=(1, 0))]),
            "unknown unit",
        ),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("user", str(i))) for i in range(65)]),
            "at most 64 descriptors",
        ),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(*((f"k{i}", "v") for i in range(65)))]),
            "at most 64 entries",
        ),
        (rls_pb2.RateLimitRequest(domain="d" * 257, descriptors=[descriptor(("a", "b"))]), "at most 256 characters"),
        (rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k" * 257, "v"))]), "key may be at most 256"),
        (rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v" * 4097))]), "its value 4096"),
        (
            rls_pb2.RateLimitRequest(
                domain="d",
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="k", value="v")],
                        hits_addend=wrappers_pb2.UInt64Value(value=2**32),
                    )
                ],
            ),
            "hits_addend may be at most 4294967295",
        ),
    ],
)
def test_to_request_rejects_bad_requests(request_: rls_pb2.RateLimitRequest, message: str) -> None:
    with pytest.raises(server.BadRequest, match=message):
        server.to_request(request_)


def test_to_request_takes_as_many_descriptors_and_entries_as_the_json_endpoint() -> None:
    most = [descriptor(*((f"k{i}", "v") for i in range(64))) for _ in range(64)]
    assert len(server.to_request(rls_pb2.RateLimitRequest(domain="d", descriptors=most)).descriptors) == 64
    longest = descriptor(("k" * 256, "v" * 4096))
    assert server.to_request(rls_pb2.RateLimitRequest(domain="d" * 256, descriptors=[longest])).domain == "d" * 256


def test_to_response_fills_statuses_and_headers() -> None:
    limit = Limit(10, Unit.WEEK, name="weekly")
    answer = server.to_response(
        RateLimitResponse(
            Code.OVER_LIMIT,
            (DescriptorStatus(Code.OVER_LIMIT, limit, -1, 1.25), DescriptorStatus(Code.OK)),
            (("Retry-After", "2"),),
            (("x-shadow", "1"),),
        )
    )
    assert answer.overall_code == RLS.OVER_LIMIT
    first, second = answer.statuses
    assert first.code == RLS.OVER_LIMIT
    assert (first.current_limit.requests_per_unit, first.current_limit.unit) == (10, RLS.RateLimit.WEEK)
    assert first.current_limit.name == "weekly"
    assert first.limit_remaining == 0
    assert (first.duration_until_reset.seconds, first.duration_until_reset.nanos) == (1, 250_000_000)
    assert second.code == RLS.OK
    assert not second.HasField("current_limit")
    assert [(h.key, h.value) for h in answer.response_headers_to_add] == [("Retry-After", "2")]
    assert [(h.key, h.value) for h in answer.request_headers_to_add] == [("x-shadow", "1")]


# -- a real server -----------------------------------------------------------------------------------------------
class Hanging:
    """A backend that never answers (the adapter's deadline must)."""

    async def hit(self, hits: Sequence[Hit], now: float) -> list[Outcome]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class Served:
    def __init__(self, tmp_path: Path) -> None:
        config = parse_config(CONFIG)
        self.backend = Recording(real_backend())
        self.service = RateLimitService(
            lambda: config, self.backend, clock=Clock(), stats=RuleStatsCollector(), headers="draft"
        )
        self.hanging = RateLimitService(lambda: config, Hanging(), clock=Clock(), stats=RuleStatsCollector())
        self.current: RateLimitService | None = self.service
        self.stub: rls_pb2_grpc.RateLimitServiceStub

    def get(self) -> RateLimitService:
        if self.current is None:
            raise RuntimeError("no service")
        return self.current


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    settings = ServeSettings(service="ratelimit", config=tmp_path, grpc_port=0, http_port=-1, admin_port=-1)
    runtime = ServiceRuntime(settings)
    holder = Served(tmp_path)
    runtime.add_grpc_service(server.SERVICE_NAME, lambda s: server.add_to_server(s, holder.get, deadline_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime.started.wait(), 10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        holder.stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        yield holder
    stop.set()
    await asyncio.wait_for(task, 10)


async def call(served: Served, request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
    answer: rls_pb2.RateLimitResponse = await served.stub.ShouldRateLimit(request, timeout=5)
    return answer


async def test_should_rate_limit_over_grpc(served: Served) -> None:
    request = rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", "a")), descriptor(("x", "y"))])
    first = await call(served, request)
    assert first.overall_code == RLS.OK
    assert [s.code for s in first.statuses] == [RLS.OK, RLS.OK]
    assert first.statuses[0].limit_remaining == 1
    assert first.statuses[0].current_limit.name == "per_user"
    assert first.statuses[0].current_limit.unit == RLS.RateLimit.MINUTE
    assert {h.key for h in first.response_headers_to_add} == {"RateLimit-Policy", "RateLimit"}
    await call(served, request)
    third = await call(served, request)
    assert third.overall_code == RLS.OVER_LIMIT
    assert third.statuses[0].code == RLS.OVER_LIMIT
    assert third.statuses[0].duration_until_reset.seconds > 0
    assert "Retry-After" in {h.key for h in third.response_headers_to_add}
    # per-descriptor hits_addend 0 only looks; an override counts on its own key.
    look = rls_pb2.RateLimitRequest(
        domain="shop", descriptors=[descriptor(("user", "b"), hits=0), descriptor(("user", "c"), limit=(5, 1))]
    )
    answer = await call(served, look)
    assert [s.limit_remaining for s in answer.statuses] == [2, 4]
    assert answer.statuses[1].current_limit.requests_per_unit == 5


async def test_backend_unavailable_answers_unavailable_at_once(served: Served) -> None:
    served.backend.fail = True
    request = rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", "a"))])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(served, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend unavailable" in (caught.value.details() or "")
    served.backend.fail = False
    assert (await call(served, request)).overall_code == RLS.OK  # and serves again


async def test_deadline_bug_and_bad_input_never_hang(served: Served) -> None:
    request = rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", "a"))])
    served.current = served.hanging
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(served, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "deadline" in (caught.value.details() or "")
    served.current = None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(served, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    served.current = served.service
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(served, rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("a", "b"))]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_parser_reuses_models_and_never_raises() -> None:
    parse = server.RequestParser(size=2)
    data = rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", "a"))]).SerializeToString()
    first = parse(data)
    assert isinstance(first, RateLimitRequest)
    assert parse(bytes(data)) is first  # equal bytes, same model: the service reuses its plan for it
    assert isinstance(parse(b"\xff\xff\xff"), server.BadRequest)
    empty = rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("a", "b"))]).SerializeToString()
    assert isinstance(parse(empty), server.BadRequest)
    for user in ("b", "c", "d"):  # bounded
        parse(rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", user))]).SerializeToString())
    assert len(parse._parsed) <= 2
    big = rls_pb2.RateLimitRequest(domain="shop", descriptors=[descriptor(("user", "x" * 4000))] * 2)
    assert isinstance(parse(big.SerializeToString()), RateLimitRequest)
    assert big.SerializeToString() not in parse._parsed  # answered, not kept: only small requests are remembered


def _reference_response(response: RateLimitResponse) -> rls_pb2.RateLimitResponse:
    """The plain keyword-argument build of the same answer, which to_response must equal byte for byte."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import duration_pb2

    def status(item: DescriptorStatus) -> rls_pb2.RateLimitResponse.DescriptorStatus:
        if item.limit is None:
            return RLS.DescriptorStatus(code=server._CODES[item.code])
        seconds = max(0.0, item.reset_s)
        return RLS.DescriptorStatus(
            code=server._CODES[item.code],
            current_limit=RLS.RateLimit(
                requests_per_unit=min(item.limit.requests_per_unit, 2**32 - 1),
                unit=server._RESPONSE_UNITS[item.limit.unit],
                name=item.limit.name,
            ),
            limit_remaining=min(max(0, item.remaining), 2**32 - 1),
            duration_until_reset=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds - int(seconds)) * 1e9)),
        )

    return RLS(
        overall_code=server._CODES[response.code],
        statuses=[status(item) for item in response.statuses],
        response_headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in response.response_headers],
        request_headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in response.request_headers],
    )


def test_to_response_equals_the_plain_build_for_random_answers() -> None:
    rng = random.Random(7)
    limits = [Limit(rng.choice([1, 10, 2**40]), rng.choice(list(Unit)), name=rng.choice(["", "a"])) for _ in range(8)]
    for _ in range(300):
        statuses = tuple(
            DescriptorStatus(Code.OK)
            if rng.random() < 0.2
            else DescriptorStatus(
                rng.choice([Code.OK, Code.OVER_LIMIT]),
                rng.choice(limits),
                rng.choice([-3, 0, 1, 99, 2**40]),
                rng.choice([0.0, -1.0, 0.25, 59.999999, 86_400.5]),
            )
            for _ in range(rng.randint(1, 4))
        )
        headers = tuple(("x-h", str(n)) for n in range(rng.randint(0, 2)))
        response = RateLimitResponse(rng.choice([Code.OK, Code.OVER_LIMIT]), statuses, headers, headers[:1])
        built, reference = server.to_response(response), _reference_response(response)
        assert built == reference
        assert built.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
