"""One behaviour suite for every CounterBackend (backends/base.py): memory, Redis standalone, Cluster, Sentinel.

Every backend must give the same answers for the same hits at the same injected ``now`` (nothing sleeps).  The
Redis params use the shared servers of tests/support/redis_servers.py and ``RedisBackend.from_url``; they skip
with the reason when redis-server or those modules are missing.  Keys carry a hash tag unique to the test, so
tests never share counters on a shared server and one request's keys share a Cluster slot unless a test wants
otherwise.  The memory backend's own duties (sweep, bounded size) are at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ratelimit.algorithms import EXPIRY_SLACK_MS, storage_keys, to_ms
from ratelimit.backends.base import CounterBackend, Hit, Outcome
from ratelimit.backends.memory import MemoryBackend
from ratelimit.model import Algorithm, Limit, Unit

with contextlib.suppress(ImportError):  # the redis helper's session fixtures (start real redis-server processes)
    from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
        redis_cluster,
        redis_cluster_url,
        redis_sentinel,
        redis_sentinel_url,
        redis_standalone,
        redis_standalone_url,
        redis_unix_url,
    )

BACKENDS = ["memory", "redis", "redis_unix", "redis_cluster", "redis_sentinel"]
URL_FIXTURES = {
    "redis": "redis_standalone_url",
    "redis_unix": "redis_unix_url",
    "redis_cluster": "redis_cluster_url",
    "redis_sentinel": "redis_sentinel_url",
}
REDIS_TIMEOUT_S = 5.0  # generous: a loaded test machine; no assertion depends on it

T0_MS = 19_676 * 86_400_000  # 2023-11-15T00:00Z: aligned to every unit up to a day
FW, SW, TB = Algorithm.FIXED_WINDOW, Algorithm.SLIDING_WINDOW, Algorithm.TOKEN_BUCKET


def at(ms: int) -> float:
    """The request time ``ms`` after T0, in the seconds the interface takes."""
    return (T0_MS + ms) / 1000


def lim(n: int, algorithm: Algorithm = FW, unit: Unit = Unit.SECOND, burst: int = 0) -> Limit:
    return Limit(n, unit, 1, algorithm, burst)


def raw(outcome: Outcome) -> tuple[int, int, int, int]:
    """(over, remaining, reset ms, retry ms): exact integers to compare."""
    return (
        int(outcome.over),
        outcome.remaining,
        round(outcome.reset_s * 1000),
        round(outcome.retry_after_s * 1000),
    )


class Backends:
    """What the ``backend_factory`` fixture yields: ``await factory()`` makes a backend on the param's store."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.shared = url is not None  # two backends see the same counters (not so for memory)
        self.prefix = uuid.uuid4().hex[:12]
        self.made: list[CounterBackend] = []

    async def __call__(self) -> CounterBackend:
        backend: CounterBackend
        if self.url is None:
            backend = MemoryBackend()
        else:
            module = pytest.importorskip("ratelimit.backends.redis", reason="ratelimit.backends.redis not there yet")
            made: Any = module.RedisBackend.from_url(self.url, timeout_s=REDIS_TIMEOUT_S)
            backend = await made if inspect.isawaitable(made) else made
        self.made.append(backend)
        return backend

    def key(self, name: str, tag: str = "") -> str:
        """A counter key for this test; keys with the same ``tag`` share a Cluster slot."""
        return f"mgt:{{{self.prefix}{tag}}}:{name}"

    async def pttl(self, backend: CounterBackend, key: str, now: float) -> int | None:
        """ms until a stored key expires, seen at ``now`` (Redis: its own clock); None when absent."""
        if isinstance(backend, MemoryBackend):
            expire_at = backend.expire_at_ms(key)
            return None if expire_at is None else expire_at - to_ms(now)
        target: Any = getattr(backend, "target", None)
        client = target.cluster or target.client
        ttl = int(await client.pttl(key))
        return None if ttl == -2 else ttl

    async def close(self) -> None:
        for backend in self.made:
            await backend.close()


@pytest.fixture(params=BACKENDS)
async def backend_factory(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    url: str | None = None
    if request.param != "memory":
        try:
            url = request.getfixturevalue(URL_FIXTURES[request.param])
        except pytest.FixtureLookupError:
            pytest.skip(f"no {URL_FIXTURES[request.param]} fixture (tests/support/redis_servers.py) yet")
    factory = Backends(request.param, url)
    yield factory
    await factory.close()


@pytest.fixture
async def backend(backend_factory: Backends) -> CounterBackend:
    return await backend_factory()


async def run(backend: CounterBackend, hits: list[Hit], ms: int) -> list[tuple[int, int, int, int]]:
    return [raw(outcome) for outcome in await backend.hit(hits, at(ms))]


async def seq(backend: CounterBackend, hit: Hit, ms: int, times: int) -> list[tuple[int, int, int, int]]:
    return [(await run(backend, [hit], ms))[0] for _ in range(times)]


# --- each algorithm over time ---------------------------------------------------------------------------------------


async def test_fixed_window_allows_the_limit_per_window(backend: CounterBackend, backend_factory: Backends) -> None:
    hit = Hit(backend_factory.key("fw"), lim(3), 1)
    assert await seq(backend, hit, 250, 4) == [(0, 2, 750, 0), (0, 1, 750, 0), (0, 0, 750, 0), (1, 0, 750, 750)]
    assert await seq(backend, hit, 999, 1) == [(1, 0, 1, 1)]
    assert await seq(backend, hit, 1000, 4) == [(0, 2, 1000, 0), (0, 1, 1000, 0), (0, 0, 1000, 0), (1, 0, 1000, 1000)]
    # windows of N units are aligned to the epoch too
    five_min = Hit(backend_factory.key("fw5"), Limit(2, Unit.MINUTE, 5), 1)
    assert await seq(backend, five_min, 299_000, 3) == [(0, 1, 1000, 0), (0, 0, 1000, 0), (1, 0, 1000, 1000)]
    assert await seq(backend, five_min, 300_000, 1) == [(0, 1, 300_000, 0)]


async def test_sliding_window_weights_the_previous_window(backend: CounterBackend, backend_factory: Backends) -> None:
    hit = Hit(backend_factory.key("sw"), lim(4, SW), 1, count_blocked=False)
    over = (1, 0, 1500, 750)  # the estimate falls back to 4 at 1250 (4 * 3/4 + 1)
    assert await seq(backend, hit, 500, 5) == [(0, 3, 1500, 0), (0, 2, 1500, 0), (0, 1, 1500, 0), (0, 0, 1500, 0), over]
    assert await seq(backend, hit, 1249, 1) == [(1, 0, 1751, 1)]
    assert await seq(backend, hit, 1250, 1) == [(0, 0, 1750, 0)]  # 4 * 3/4 + 1 = 4
    assert await seq(backend, hit, 1500, 2) == [(0, 0, 1500, 0), (1, 0, 1500, 250)]  # 4 * 1/2 + 2, then wait
    assert await seq(backend, hit, 1750, 1) == [(0, 0, 1250, 0)]
    assert await seq(backend, hit, 3000, 1) == [(0, 3, 2000, 0)]  # the window holding 3 has slid out


async def test_token_bucket_bursts_then_refills(backend: CounterBackend, backend_factory: Backends) -> None:
    hit = Hit(backend_factory.key("tb"), lim(2, TB, burst=4), 1, count_blocked=False)  # one per 500 ms, burst 4
    over = (1, 0, 2500, 500)
    assert await seq(backend, hit, 0, 5) == [(0, 3, 500, 0), (0, 2, 1000, 0), (0, 1, 1500, 0), (0, 0, 2000, 0), over]
    assert await seq(backend, hit, 499, 1) == [(1, 0, 2001, 1)]
    assert await seq(backend, hit, 500, 2) == [(0, 0, 2000, 0), (1, 0, 2500, 500)]
    assert await seq(backend, Hit(hit.key, hit.limit, 0), 2500, 1) == [(0, 4, 0, 0)]  # full again
    # a fractional interval (3/s: 333.33 ms) stays exact: the 3rd request fits, the 4th waits 334 ms
    third = Hit(backend_factory.key("tb3"), lim(3, TB), 1, count_blocked=False)
    assert await seq(backend, third, 0, 4) == [(0, 2, 334, 0), (0, 1, 667, 0), (0, 0, 1000, 0), (1, 0, 1334, 334)]
    assert [o[0] for o in await seq(backend, third, 333, 1) + await seq(backend, third, 334, 1)] == [1, 0]


async def test_a_token_bucket_cost_that_can_never_fit_is_over_and_bounded(
    backend: CounterBackend, backend_factory: Backends
) -> None:
    """A cost above the capacity is refused; counted (count_blocked), it weighs like capacity + 1, so the bucket
    is whole again after (capacity + 1) intervals, not after years (2**32 - 1 at 2/s: 68 years)."""
    key = backend_factory.key("tbhuge")
    huge = Hit(key, lim(2, TB, burst=4), 2**32 - 1)  # count_blocked by default: it is consumed
    assert await seq(backend, huge, 0, 1) == [(1, 0, 2500, 2500)]
    assert await seq(backend, Hit(key, huge.limit, 0), 2500, 1) == [(0, 4, 0, 0)]  # full again
    ttl = await backend_factory.pttl(backend, key, at(0))
    assert ttl is not None and ttl < 10_000


async def test_count_blocked_counts_refused_requests(backend: CounterBackend, backend_factory: Backends) -> None:
    for algorithm, blocked_retry in ((FW, 1000), (SW, 1667), (TB, 1000)):
        hit = Hit(backend_factory.key(f"cb{algorithm}"), lim(2, algorithm), 1)  # count_blocked by default
        outcomes = await seq(backend, hit, 0, 3)
        assert [o[0] for o in outcomes] == [0, 0, 1]
        assert outcomes[2][3] == blocked_retry, algorithm  # the refused request counted: its retry moves out


# --- cost -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_cost_and_check_only(backend: CounterBackend, backend_factory: Backends, algorithm: Algorithm) -> None:
    key, limit = backend_factory.key("cost"), lim(10, algorithm)
    assert (await run(backend, [Hit(key, limit, 0)], 100))[0][:2] == (0, 10)  # a look consumes nothing
    assert (await run(backend, [Hit(key, limit, 4)], 100))[0][:2] == (0, 6)
    assert (await run(backend, [Hit(key, limit, 0)], 100))[0][:2] == (0, 6)
    assert (await run(backend, [Hit(key, limit, 7, count_blocked=False)], 100))[0][:2] == (1, 0)
    assert (await run(backend, [Hit(key, limit, 6)], 100))[0][:2] == (0, 0)
    never = (await run(backend, [Hit(key, limit, 11, count_blocked=False)], 100))[0]
    assert never[0] == 1 and never[3] == never[2]  # more than the limit never fits: retry_after = reset


# --- several hits in one request ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags", [("", "", ""), ("a", "b", "c")], ids=["one-slot", "cross-slot"])
async def test_one_over_hit_blocks_the_request(backend_factory: Backends, tags: tuple[str, str, str]) -> None:
    backend = await backend_factory()
    k = backend_factory.key
    full, ok = Hit(k("full", tags[0]), lim(1), 1), Hit(k("ok", tags[1]), lim(5), 1, count_blocked=False)
    counted = Hit(k("counted", tags[2]), lim(5, SW), 1)
    await run(backend, [full], 0)
    assert await run(backend, [ok, counted, full], 0) == [(0, 4, 1000, 0), (0, 4, 2000, 0), (1, 0, 1000, 1000)]
    # ok was not consumed (count_blocked false), counted was
    looks = [Hit(ok.key, ok.limit, 0), Hit(counted.key, counted.limit, 0)]
    assert [o[1] for o in await run(backend, looks, 0)] == [5, 4]
    # the same over hit in shadow mode blocks nothing: ok is consumed now
    shadow_full = Hit(full.key, full.limit, 1, shadow=True)
    assert await run(backend, [ok, shadow_full], 0) == [(0, 4, 1000, 0), (1, 0, 1000, 1000)]
    assert [o[1] for o in await run(backend, looks, 0)] == [4, 4]


async def test_independent_keys_and_limits(backend: CounterBackend, backend_factory: Backends) -> None:
    a, b = backend_factory.key("a"), backend_factory.key("b")
    assert await seq(backend, Hit(a, lim(1), 1), 0, 2) == [(0, 0, 1000, 0), (1, 0, 1000, 1000)]
    assert await run(backend, [Hit(b, lim(1), 1)], 0) == [(0, 0, 1000, 0)]  # another key
    assert await run(backend, [Hit(a, lim(2), 1)], 0) == [(1, 0, 1000, 1000)]  # same key, same windows: shared
    # two limits on one descriptor (the service keys them apart with Limit.ident): both count
    burst, daily = Hit(backend_factory.key("d:s"), lim(2), 1), Hit(backend_factory.key("d:d"), lim(3, FW, Unit.DAY), 1)
    outcomes = [await run(backend, [burst, daily], ms) for ms in (0, 0, 1000, 2000)]
    assert [[o[0] for o in pair] for pair in outcomes] == [[0, 0], [0, 0], [0, 0], [0, 1]]


async def test_no_hits(backend: CounterBackend) -> None:
    assert await backend.hit([], at(0)) == []
    assert await backend.ping() is True


# --- expiry ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "ttl_ms"),
    [(FW, 1000 - 400 + EXPIRY_SLACK_MS), (SW, 2000 - 400 + EXPIRY_SLACK_MS), (TB, 1000 + EXPIRY_SLACK_MS)],
)
async def test_keys_expire_on_their_own(
    backend: CounterBackend, backend_factory: Backends, algorithm: Algorithm, ttl_ms: int
) -> None:
    hit = Hit(backend_factory.key("exp"), lim(2, algorithm), 1)
    now = at(400)
    for _ in range(2):
        await backend.hit([hit], now)
    key = storage_keys(hit, to_ms(now))[0]
    ttl = await backend_factory.pttl(backend, key, now)
    assert ttl is not None and 0 < ttl <= ttl_ms
    # long after: the quota is whole again
    assert (await run(backend, [Hit(hit.key, hit.limit, 0)], 86_400_000))[0][:2] == (0, 2)


# --- exactness under concurrency ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_concurrent_requests_get_exactly_the_limit(backend_factory: Backends, algorithm: Algorithm) -> None:
    # two backends: on a shared store (Redis) they race on one key; memory backends count apart, so use one
    backends = (
        [await backend_factory(), await backend_factory()] if backend_factory.shared else [await backend_factory()]
    )
    hit = Hit(backend_factory.key("race"), lim(25, algorithm, Unit.MINUTE), 1, count_blocked=False)
    now = at(1000)

    async def one(index: int) -> bool:
        return not (await backends[index % len(backends)].hit([hit], now))[0].over

    results = await asyncio.gather(*(one(i) for i in range(120)))
    assert sum(results) == 25


# --- the memory backend's own duties --------------------------------------------------------------------------------


def _many(count: int, algorithm: Algorithm = FW, unit: Unit = Unit.SECOND) -> list[Hit]:
    return [Hit(f"k{i}", lim(5, algorithm, unit), 1) for i in range(count)]


async def test_memory_sweep_drops_expired_keys_a_bounded_batch_per_call() -> None:
    backend = MemoryBackend(sweep_interval_s=1.0, sweep_batch=10)
    await backend.hit(_many(100), at(0))  # keys expire at 1000 + slack
    assert len(backend) == 100
    probe = [Hit("probe", lim(5), 0)]  # a look: creates nothing
    sizes = []
    for _ in range(12):
        await backend.hit(probe, at(5000))
        sizes.append(len(backend))
    assert sizes == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0, 0, 0]


async def test_memory_sweep_keeps_live_keys_and_waits_for_its_interval() -> None:
    backend = MemoryBackend(sweep_interval_s=10.0, sweep_batch=1000)
    await backend.hit(_many(5, unit=Unit.DAY), at(0))
    await backend.hit(_many(5), at(20_000))  # a pass: nothing expired (day windows), all kept
    assert len(backend) == 5 + 5
    await backend.hit([], at(25_000))  # the 1 s keys have expired, but the next pass is not due before 30 s
    assert len(backend) == 10
    await backend.hit([], at(30_000))
    assert len(backend) == 5


async def test_memory_drops_an_expired_key_when_read() -> None:
    backend = MemoryBackend(sweep_interval_s=3600.0)
    hit = Hit("tb", lim(2, TB), 1)
    assert backend.expire_at_ms("tb") is None
    await backend.hit([hit], at(0))
    assert backend.expire_at_ms("tb") == T0_MS + 500 + EXPIRY_SLACK_MS
    assert [raw(o) for o in backend.hit_now([Hit("tb", hit.limit, 0)], at(2000))] == [(0, 2, 0, 0)]
    assert len(backend) == 0


async def test_memory_is_bounded_by_max_keys() -> None:
    backend = MemoryBackend(max_keys=100, sweep_interval_s=3600.0)
    await backend.hit(_many(50), at(0))  # expire at 2000
    await backend.hit([Hit(f"day{i}", lim(5, FW, Unit.DAY), 1) for i in range(50)], at(0))
    await backend.hit([Hit("new", lim(5), 1)], at(5000))  # full: the expired ones are purged, nothing evicted
    assert (len(backend), backend.evicted) == (51, 0)
    await backend.hit([Hit(f"more{i}", lim(5, FW, Unit.DAY), 1) for i in range(49)], at(5000))
    assert len(backend) == 100
    # over the bound with live keys only: the oldest go, one more than needed (a batch: 1% of max_keys)
    await backend.hit([Hit("one-more", lim(5, FW, Unit.DAY), 1)], at(5000))
    assert (len(backend), backend.evicted) == (99, 2)
    # evicted counters restart (errs towards allowing, as Redis eviction does); a look evicts nothing
    looks = [Hit(f"day{i}", lim(5, FW, Unit.DAY), 0) for i in range(3)]
    assert [o.remaining for o in backend.hit_now(looks, at(5000))] == [5, 5, 4]
    assert len(backend) == 99


async def test_memory_arguments_ping_and_close() -> None:
    for bad in ({"max_keys": 0}, {"sweep_batch": 0}, {"sweep_interval_s": 0.0}):
        with pytest.raises(ValueError, match="must be"):
            MemoryBackend(**bad)
    backend = MemoryBackend()
    await backend.hit(_many(3), at(0))
    assert await backend.ping() is True
    await backend.close()
    assert len(backend) == 0
