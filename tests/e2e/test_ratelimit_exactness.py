"""Exactness: two ``meshgate serve ratelimit`` processes share one Redis; 64 concurrent gRPC clients hammer them.

Each round starts just after a 1 s window boundary and must finish inside that window (judged on the client's
clock: the service decides at some instant between a call's send and its reply, so a round bracketed by one window
was decided in it; a round that spills over is retried, a bounded number of times). Every request carries three
descriptors, one per algorithm (tests/fixtures/ratelimit/e2e/exactness.yaml), and per descriptor the number of OK
answers in the round must equal the algorithm's own exact expectation:

- fixed_window, 40/s, the SAME key every round: exactly 40 per window (rounds in different windows also show that
  a window starts from zero);
- sliding_window, 40/s, the SAME key every round, rounds two windows apart: the window before a round is empty, so
  the estimate is the current count only and exactly 40 pass, round after round (the window right after a hammered
  one depends on its weight at each instant: no exact number to check there);
- token_bucket, burst 40 refilling 1/min, a fresh key per round: the refill is nil within a round, so exactly 40.

Blocked calls are counted (envoyproxy's default), so each descriptor's counting is independent of the others.

Across refills (``test_token_bucket_refills_exactly``): ONE token bucket key (burst 5, one token every 0.5 s, blocked
calls not counted), hammered in rounds by the same clients through both servers. GCRA keeps the bucket's theoretical
arrival time TAT = a + A * T exactly (a: when its first call was decided, A: calls allowed so far, T: 0.5 s) as long
as the bucket never fills up, so a call at t passes iff A + 1 <= burst + floor((t - a) / T): tokens arrive only at
the instants a + k * T. A round whose calls all fall between two such instants sees no refill while it runs; when
the one before emptied the bucket g periods earlier it lets exactly min(g, burst) through (a bucket left alone
longer is full, and is capped there). A lone first call fixes ``a`` to within its round trip; rounds are placed
between the instants with some slack (judged on the client's clock, as above); when one spills over, the run starts
again on a fresh key, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from meshgate.devservers.service import ServiceProcess

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit" / "e2e" / "exactness.yaml"
LIMIT = 40  # every algorithm's expectation per round (exactness.yaml)
CLIENTS = 64
CALLS_PER_CLIENT = 3  # 192 calls per round: well over the limit
ALGORITHMS = ("fixed", "sliding", "token")
START_AFTER_BOUNDARY_S = 0.02
MAX_ATTEMPTS_PER_ROUND = 4

REFILL_CONFIG = """\
# test_ratelimit_exactness.py, across refills: one token every 0.5 s, a bucket of 5; a refused call takes nothing
domain: refill
descriptors:
  - key: bucket
    count_blocked: false
    rate_limit: {unit: second, requests_per_unit: 2, algorithm: token_bucket, burst: 5}
"""
REFILL_PERIOD_S = 0.5  # T
BURST = 5
# Refill periods before each round, counted from when the bucket was last empty (the lone first call leaves it at
# BURST - 1 tokens: as if emptied BURST - 1 periods before). The last round comes after more periods than the bucket
# holds: exactly BURST pass. It moves the bucket's phase (a full bucket starts again at its first call), so it is
# the last round.
REFILL_GAPS = (BURST - 1, 1, 3, BURST + 1)
EDGE_SLACK_S = 0.005  # the service rounds its time to ms: stay that far from a token's instant
MAX_REFILL_RUNS = 3

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


@dataclass
class Servers:
    ports: list[int]
    services: list[ServiceProcess]


@pytest.fixture(scope="module", params=[("standalone", 3), ("cluster", 1)], ids=["standalone", "cluster"])
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Servers, int]]:
    kind, rounds = request.param
    url = str(request.getfixturevalue(f"redis_{kind}_url"))
    env = {**os.environ, "MESHGATE_BACKEND_TIMEOUT_S": "2"}  # a loaded 2-core machine is slow, not down
    config = tmp_path_factory.mktemp("exactness-config")  # a config folder: one domain per file
    shutil.copy(CONFIG, config / CONFIG.name)
    (config / "refill.yaml").write_text(REFILL_CONFIG)
    args = ["ratelimit", "--config", str(config), "--backend", url, "--drain-seconds", "0.1"]
    with ServiceProcess(args, env=env) as first, ServiceProcess(args, env=env) as second:
        yield Servers([first.ports["grpc_port"], second.ports["grpc_port"]], [first, second]), rounds


def _request(run: str, round_id: str) -> rls_pb2.RateLimitRequest:
    def descriptor(key: str, value: str) -> ratelimit_pb2.RateLimitDescriptor:
        return ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)]
        )

    return rls_pb2.RateLimitRequest(
        domain="exact",
        descriptors=[descriptor("fixed", run), descriptor("sliding", run), descriptor("token", round_id)],
    )


async def _sleep_to_a_quiet_window(last_round_end: float) -> float:
    """Sleep until just after a 1 s boundary whose previous window had no round (the sliding window then starts
    from its current count alone); return that window's end (epoch seconds)."""
    now = time.time()
    start = max(float(int(now) + 1), float(int(last_round_end) + 2))
    await asyncio.sleep(start - now + START_AFTER_BOUNDARY_S)
    return start + 1.0


async def _round(
    stubs: list[rls_pb2_grpc.RateLimitServiceStub], run: str, last_round_end: float
) -> tuple[list[int], bool, float, float]:
    """One round: OK counts per algorithm, whether every call was decided inside one window, its first send and
    last reply (epoch seconds)."""
    round_id = f"{run}-{uuid.uuid4().hex[:8]}"
    request = _request(run, round_id)
    window_end = await _sleep_to_a_quiet_window(last_round_end)
    window_start = window_end - 1.0
    first_send = time.time()

    async def client(index: int) -> list[list[int]]:
        stub = stubs[index % len(stubs)]
        codes = []
        for _ in range(CALLS_PER_CLIENT):
            reply = await stub.ShouldRateLimit(request, timeout=5)
            codes.append([status.code for status in reply.statuses])
        return codes

    results = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    last_reply = time.time()
    inside = window_start <= first_send and last_reply < window_end
    allowed = [0] * len(ALGORITHMS)
    for codes in results:
        for statuses in codes:
            assert set(statuses) <= {OK, OVER}, statuses
            for index, code in enumerate(statuses):
                allowed[index] += code == OK
    return allowed, inside, first_send, last_reply


async def test_allowed_per_window_equals_the_limit(servers: tuple[Servers, int]) -> None:
    cluster, rounds = servers
    run = uuid.uuid4().hex[:8]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in cluster.ports]
    try:
        stubs = [rls_pb2_grpc.RateLimitServiceStub(channel) for channel in channels]
        for stub in stubs:  # connect and warm both servers outside the measured windows (a key of its own)
            await stub.ShouldRateLimit(_request(f"warm-{run}", f"warm-{run}"), timeout=5)
        outcomes: list[tuple[list[int], float]] = []
        last_reply = time.time()  # the warm-up touched only its own keys, but keep the rule simple
        for _ in range(rounds):
            for _attempt in range(MAX_ATTEMPTS_PER_ROUND):
                allowed, inside, first_send, last_reply = await _round(stubs, run, last_reply)
                if inside:
                    outcomes.append((allowed, last_reply - first_send))
                    break
            else:
                pytest.fail(f"no round of {CLIENTS * CALLS_PER_CLIENT} calls fit in a 1 s window")
    finally:
        for channel in channels:
            await channel.close()
    for allowed, seconds in outcomes:
        print(f"round: allowed per algorithm {dict(zip(ALGORITHMS, allowed, strict=True))} in {seconds:.2f} s")
    assert [allowed for allowed, _ in outcomes] == [[LIMIT] * len(ALGORITHMS)] * rounds
    assert all(service.proc.poll() is None for service in cluster.services)


async def _burst(
    stubs: list[rls_pb2_grpc.RateLimitServiceStub], request: rls_pb2.RateLimitRequest
) -> tuple[int, float, float]:
    """Every client at once, each ``CALLS_PER_CLIENT`` calls in turn: OK answers, first send, last reply."""

    async def client(index: int) -> int:
        stub = stubs[index % len(stubs)]
        allowed = 0
        for _ in range(CALLS_PER_CLIENT):
            reply = await stub.ShouldRateLimit(request, timeout=5)
            assert reply.overall_code in (OK, OVER), reply
            allowed += reply.overall_code == OK
        return allowed

    first_send = time.time()
    allowed = sum(await asyncio.gather(*(client(i) for i in range(CLIENTS))))
    return allowed, first_send, time.time()


def _bucket_request() -> rls_pb2.RateLimitRequest:
    """A request on a fresh token bucket of the ``refill`` domain."""
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="bucket", value=uuid.uuid4().hex)
    return rls_pb2.RateLimitRequest(domain="refill", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])])


async def _refill_rounds(stubs: list[rls_pb2_grpc.RateLimitServiceStub]) -> list[tuple[int, float]] | None:
    """On a fresh bucket: a lone first call, then one round per ``REFILL_GAPS``; per round the OK answers and its
    seconds, or None when a round did not fit between two token instants (its count is then not exact)."""
    request = _bucket_request()
    anchor_send = time.time()
    assert (await stubs[0].ShouldRateLimit(request, timeout=5)).overall_code == OK
    anchor_reply = time.time()  # a, when that call was decided, lies in between
    allowed_so_far = 1  # A
    rounds: list[tuple[int, float]] = []
    for gap in REFILL_GAPS:
        # The bucket was last empty at a + (A - BURST) * T; this round goes into the gap-th period after that.
        cell = allowed_so_far - BURST + gap
        start = anchor_reply + cell * REFILL_PERIOD_S + EDGE_SLACK_S
        end = anchor_send + (cell + 1) * REFILL_PERIOD_S - EDGE_SLACK_S
        await asyncio.sleep(max(0.0, start + START_AFTER_BOUNDARY_S - time.time()))
        allowed, first_send, last_reply = await _burst(stubs, request)
        if not start <= first_send or not last_reply < end:
            print(f"round after {gap} refill periods spilled over a token's instant ({allowed} allowed): again")
            return None
        rounds.append((allowed, last_reply - first_send))
        allowed_so_far += min(gap, BURST)  # as expected (checked by the caller): a wrong count cannot move the plan
    return rounds


async def test_token_bucket_refills_exactly(servers: tuple[Servers, int]) -> None:
    cluster, _rounds = servers
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in cluster.ports]
    try:
        stubs = [rls_pb2_grpc.RateLimitServiceStub(channel) for channel in channels]
        for stub in stubs:  # connect and warm both servers (a key of their own)
            await stub.ShouldRateLimit(_request("warm", "warm"), timeout=5)
        for _attempt in range(MAX_REFILL_RUNS):
            rounds = await _refill_rounds(stubs)
            if rounds is not None:
                break
        else:
            pytest.fail(f"no run whose rounds of {CLIENTS * CALLS_PER_CLIENT} calls all fit between two refills")
    finally:
        for channel in channels:
            await channel.close()
    for gap, (allowed, seconds) in zip(REFILL_GAPS, rounds, strict=True):
        print(f"round after {gap} refill periods: {allowed} allowed in {seconds:.2f} s")
    assert [allowed for allowed, _ in rounds] == [min(gap, BURST) for gap in REFILL_GAPS]
    assert all(service.proc.poll() is None for service in cluster.services)
