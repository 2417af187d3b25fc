"""RedisBackend against real redis-server processes: round trips, expiry, NOSCRIPT, failure and recovery, Cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from ratelimit.backends.base import BackendUnavailable, Hit
from ratelimit.backends.redis import RedisBackend
from ratelimit.model import Algorithm, Limit, Unit
from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
    RedisCluster,
    RedisServer,
    command_calls,
    redis_cluster,
    redis_sentinel,
    redis_standalone,
)

TIMEOUT_S = 0.5
NOW = 1_700_000_000.25  # injected clock: the backend computes windows from `now`, never from its own clock


def _key(tag: str = "") -> str:
    return f"mgtest:{{{tag or uuid.uuid4().hex}}}:f1mi10"


def _hit(
    key: str,
    limit: int = 10,
    *,
    cost: int = 1,
    count_blocked: bool = True,
    algorithm: Algorithm = Algorithm.FIXED_WINDOW,
) -> Hit:
    return Hit(key, Limit(limit, Unit.MINUTE, algorithm=algorithm), cost, count_blocked=count_blocked)


@pytest.fixture
async def standalone(redis_standalone: RedisServer) -> AsyncIterator[RedisBackend]:  # noqa: F811
    backend = RedisBackend.from_url(redis_standalone.url, timeout_s=TIMEOUT_S)
    yield backend
    await backend.close()


async def test_one_round_trip_per_request(redis_standalone: RedisServer, standalone: RedisBackend) -> None:  # noqa: F811
    hits = [
        _hit(_key()),
        _hit(_key(), algorithm=Algorithm.SLIDING_WINDOW),
        _hit(_key(), algorithm=Algorithm.TOKEN_BUCKET),
    ]
    await standalone.hit(hits, NOW)  # the script is cached from here on
    with redis_standalone.client() as admin:
        admin.config_resetstat()
        for _ in range(5):
            await standalone.hit(hits, NOW)
        assert command_calls(admin, "evalsha") == 5
        assert command_calls(admin, "eval") == 0
        # the commands inside the script are counted too; nothing else reached Redis from the client
        inside = {"evalsha", "get", "incrby", "set", "pexpire", "config", "info"}
        names = {name.removeprefix("cmdstat_").split("|")[0] for name in admin.info("commandstats")}
        assert names <= inside


async def test_counts_and_blocks_like_the_contract(standalone: RedisBackend) -> None:
    key = _key()
    outcomes = [(await standalone.hit([_hit(key, 3)], NOW))[0] for _ in range(4)]
    assert [o.over for o in outcomes] == [False, False, False, True]
    assert [o.remaining for o in outcomes] == [2, 1, 0, 0]
    assert outcomes[0].reset_s == pytest.approx(60 - 20.25)


async def test_concurrent_requests_are_coalesced_and_stay_exact(standalone: RedisBackend) -> None:
    key = _key()
    standalone.batches = standalone.batched_requests = 0
    results = await asyncio.gather(*(standalone.hit([_hit(key, 10)], NOW) for _ in range(25)))
    assert sum(not outcome[0].over for outcome in results) == 10
    assert standalone.batched_requests == 25
    assert standalone.batches < 25  # several requests shared a script call


async def test_keys_expire_from_creation(redis_standalone: RedisServer, standalone: RedisBackend) -> None:  # noqa: F811
    key = _key()
    now = time.time()
    await standalone.hit([_hit(key)], now)
    with redis_standalone.client() as admin:
        (stored,) = admin.keys(key + ":*")
        first = admin.pttl(stored)
        assert 0 < first <= 61_000
        admin.pexpire(stored, 500_000)  # a marker: a later hit must not set the expiry again
        await standalone.hit([_hit(key)], now)
        assert admin.pttl(stored) > 400_000
        assert int(admin.get(stored)) == 2


async def test_noscript_after_script_flush_recovers(redis_standalone: RedisServer, standalone: RedisBackend) -> None:  # noqa: F811
    key = _key()
    await standalone.hit([_hit(key)], NOW)
    with redis_standalone.client() as admin:
        admin.script_flush()
        outcome = await standalone.hit([_hit(key)], NOW)
        assert outcome[0].remaining == 8
        admin.config_resetstat()
        await standalone.hit([_hit(key)], NOW)
        assert command_calls(admin, "evalsha") == 1  # loaded again: back to one EVALSHA
        assert command_calls(admin, "eval") == 0


async def test_redis_down_then_back() -> None:
    with RedisServer() as server:
        backend = RedisBackend.from_url(server.url, timeout_s=TIMEOUT_S)
        try:
            key = _key()
            assert (await backend.hit([_hit(key)], NOW))[0].remaining == 9
            assert await backend.ping()
            server.stop()
            async with asyncio.timeout(5 * TIMEOUT_S):  # never hangs: each call is bounded by its deadline
                with pytest.raises(BackendUnavailable):
                    await backend.hit([_hit(key)], NOW)
                with pytest.raises(BackendUnavailable):
                    await asyncio.gather(*(backend.hit([_hit(key)], NOW) for _ in range(5)))
                assert not await backend.ping()
            server.start()  # same port, empty store; the same backend object must recover by itself
            started = time.monotonic()
            for _attempt in range(50):
                try:
                    outcome = await backend.hit([_hit(key)], NOW)
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("the backend did not recover after Redis came back")
            print(f"recovered {1000 * (time.monotonic() - started):.1f} ms after Redis was ready")
            assert outcome[0].remaining == 9  # a fresh store
            assert await backend.ping()
        finally:
            await backend.close()


async def test_wrong_password_is_backend_unavailable() -> None:
    with RedisServer(password="right") as server:
        backend = RedisBackend.from_url(f"redis://:wrong@127.0.0.1:{server.port}", timeout_s=TIMEOUT_S)
        try:
            with pytest.raises(BackendUnavailable) as info:
                await backend.hit([_hit(_key())], NOW)
            assert "wrong" not in str(info.value)
            assert not await backend.ping()
        finally:
            await backend.close()


async def test_from_url_rejects_bad_urls() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisBackend.from_url("mysql://h", timeout_s=TIMEOUT_S)
    with pytest.raises(ValueError, match="timeout"):
        RedisBackend.from_url("redis://h", timeout_s=0)


async def test_cluster_one_call_per_slot_in_parallel(redis_cluster: RedisCluster) -> None:  # noqa: F811
    backend = RedisBackend.from_url(redis_cluster.url, timeout_s=2.0)
    try:
        a, b = _key(), _key()
        same_slot = [_hit(_key("shared") + "x"), _hit(_key("shared") + "y")]
        await backend.hit([_hit(a), _hit(b), *same_slot], NOW)  # warm up: slots map, scripts cached
        admins = [node.client() for node in redis_cluster.nodes]
        for admin in admins:
            admin.config_resetstat()
        outcomes = await backend.hit([_hit(a, 3), _hit(b, 5), *same_slot], NOW)
        assert [o.remaining for o in outcomes] == [1, 3, 8, 8]  # in hit order
        slots = {redis.crc.key_slot(k.encode()) for k in (a, b, same_slot[0].key)}
        assert sum(command_calls(admin, "evalsha") for admin in admins) == len(slots)
        for admin in admins:
            admin.close()
    finally:
        await backend.close()


async def test_cluster_refusal_in_one_slot_stops_count_blocked_false_in_another(redis_cluster: RedisCluster) -> None:  # noqa: F811
    backend = RedisBackend.from_url(redis_cluster.url, timeout_s=2.0)
    try:
        full, thrifty = _key(), _key()
        await backend.hit([_hit(full, 1)], NOW)  # `full` is now at its limit
        for _ in range(3):
            outcomes = await backend.hit([_hit(full, 1), _hit(thrifty, 5, count_blocked=False)], NOW)
            assert outcomes[0].over
            assert not outcomes[1].over
        assert (await backend.hit([_hit(thrifty, 5)], NOW))[0].remaining == 4  # nothing consumed before
    finally:
        await backend.close()


async def test_sentinel_backend_counts(redis_sentinel: object) -> None:  # noqa: F811
    from tests.support.redis_servers import RedisSentinel

    assert isinstance(redis_sentinel, RedisSentinel)
    backend = RedisBackend.from_url(redis_sentinel.url, timeout_s=2.0)
    try:
        key = _key()
        assert [(await backend.hit([_hit(key, 2)], NOW))[0].over for _ in range(3)] == [False, False, True]
        assert await backend.ping()
    finally:
        await backend.close()
