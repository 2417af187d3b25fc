"""RedisBackend against real redis-server processes: round trips, the MULTI fast path against the script, expiry,
NOSCRIPT, failure and recovery (killed and hung servers), Cluster, Sentinel."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from meshgate.redis import connect
from ratelimit.algorithms import storage_keys, to_ms
from ratelimit.backends.base import BackendUnavailable, CounterBackend, Hit
from ratelimit.backends.memory import MemoryBackend
from ratelimit.backends.redis import RedisBackend
from ratelimit.model import Algorithm, Limit, Unit
from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
    RedisCluster,
    RedisSentinel,
    RedisServer,
    command_calls,
    commands_run,
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
        assert commands_run(admin) <= inside


async def test_fast_path_is_one_multi_exec_per_request(redis_standalone: RedisServer, standalone: RedisBackend) -> None:  # noqa: F811
    # every hit fixed window, counted when blocked (envoyproxy's semantics) or only looked at: no script needed
    hits = [_hit(_key()), _hit(_key(), 5, cost=3), _hit(_key(), cost=0, count_blocked=False)]
    await standalone.hit(hits, NOW)  # connected
    with redis_standalone.client() as admin:
        admin.config_resetstat()
        for _ in range(5):
            await standalone.hit(hits, NOW)
        assert command_calls(admin, "exec") == 5
        assert command_calls(admin, "multi") == 5
        assert command_calls(admin, "incrby") == 2 * 5
        assert command_calls(admin, "get") == 5
        assert commands_run(admin) <= {"multi", "set", "incrby", "get", "exec", "config", "info"}
        assert admin.exists(storage_keys(hits[2], to_ms(NOW))[0]) == 0  # a look never creates a key
    assert standalone.batches == 0  # no script call at all


async def test_fast_path_and_script_agree_on_random_sequences(redis_standalone: RedisServer) -> None:  # noqa: F811
    """The same requests through the MULTI fast path, the Lua script and the memory backend: identical answers,
    identical stored counts. Duplicate keys in one request, looks (cost 0), shadow hits and window changes."""
    fast = RedisBackend(connect(redis_standalone.url, timeout_s=TIMEOUT_S), timeout_s=TIMEOUT_S)
    script = RedisBackend(connect(redis_standalone.url, timeout_s=TIMEOUT_S), timeout_s=TIMEOUT_S, fast_path=False)
    backends: dict[str, CounterBackend] = {"fast": fast, "script": script, "memory": MemoryBackend()}
    tags = {name: uuid.uuid4().hex for name in backends}
    limits = [Limit(3, Unit.MINUTE), Limit(5, Unit.MINUTE), Limit(4, Unit.HOUR), Limit(2, Unit.MINUTE, 2)]
    rng = random.Random(20261128)

    def random_shape() -> list[tuple[str, Limit, int, bool]]:
        return [
            (rng.choice("abc"), rng.choice(limits), rng.choice([0, 1, 1, 2, 4]), rng.random() < 0.2)
            for _ in range(rng.randint(1, 4))
        ]

    def make_hits(name: str, shape: list[tuple[str, Limit, int, bool]]) -> list[Hit]:
        # one key per period, as counter_key makes them (limits of one period may share a key: the first two
        # do); keys of different periods never do (the memory backend expires by the injected clock)
        return [
            Hit(f"eq:{{{tags[name]}}}:{k}{limit.period_s}", limit, cost, shadow=shadow)
            for k, limit, cost, shadow in shape
        ]

    # Most requests repeat one of a few shapes as the same tuple, as the service's per-request plans do (the fast
    # path keeps those packed, and must repack them when a window turns); the others are fresh lists.
    pool = [random_shape() for _ in range(5)]
    plans = {name: [tuple(make_hits(name, shape)) for shape in pool] for name in backends}
    ms = 19_676 * 86_400_000  # an aligned day; windows change as the injected clock moves (minutes, not seconds:
    try:  # Redis expires keys by its own clock, and none may expire during the test)
        for _request in range(250):
            ms += rng.choice([0, 0, 1, 250, 9_000, 31_000])
            planned = rng.randrange(len(pool)) if rng.random() < 0.7 else None
            shape = pool[planned] if planned is not None else random_shape()
            answers = {}
            for name, backend in backends.items():
                hits = plans[name][planned] if planned is not None else make_hits(name, shape)
                answers[name] = await backend.hit(hits, ms / 1000)
            assert answers["fast"] == answers["script"] == answers["memory"], (shape, ms)
        assert 0 < len(fast._packs) <= len(pool)  # the planned requests were answered from packed commands
        with redis_standalone.client() as admin:
            stored = {
                name: {key.decode().split("}")[1]: int(admin.get(key)) for key in admin.keys(f"eq:{{{tags[name]}}}:*")}
                for name in ("fast", "script")
            }
            assert stored["fast"] == stored["script"]
            assert len(stored["fast"]) > 10
            assert all(admin.pttl(key) > 0 for key in admin.keys(f"eq:{{{tags['fast']}}}:*"))  # all expire
        assert fast.batches == 0
        assert script.batches == 250
    finally:
        await fast.close()
        await script.close()


async def test_packed_requests_are_bounded(standalone: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ratelimit.backends.redis.PACKED_CACHE_SIZE", 2)
    plans = [(_hit(_key()),) for _ in range(5)]
    for plan in plans * 2:
        assert (await standalone.hit(plan, NOW))[0].remaining in (8, 9)
    assert 0 < len(standalone._packs) <= 2


async def test_counts_and_blocks_like_the_contract(standalone: RedisBackend) -> None:
    key = _key()
    outcomes = [(await standalone.hit([_hit(key, 3)], NOW))[0] for _ in range(4)]
    assert [o.over for o in outcomes] == [False, False, False, True]
    assert [o.remaining for o in outcomes] == [2, 1, 0, 0]
    assert outcomes[0].reset_s == pytest.approx(60 - 20.25)


async def test_concurrent_script_calls_are_coalesced_and_stay_exact(standalone: RedisBackend) -> None:
    key = _key()
    standalone.batches = standalone.batched_requests = 0
    hit = _hit(key, 10, count_blocked=False)  # the script's path (the fast path has no batches)
    results = await asyncio.gather(*(standalone.hit([hit], NOW) for _ in range(25)))
    assert sum(not outcome[0].over for outcome in results) == 10
    assert standalone.batched_requests == 25
    assert standalone.batches < 25  # several requests shared a script call


async def test_one_failing_request_in_a_batch_fails_alone(
    redis_standalone: RedisServer,  # noqa: F811
    standalone: RedisBackend,
) -> None:
    """A script error in one request of a coalesced batch (here a key holding a list) is that request's own."""
    broken = _key()
    with redis_standalone.client() as admin:
        admin.rpush(f"{broken}:{int(NOW) // 60 * 60}", "not a counter")
    standalone.batches = standalone.batched_requests = 0
    hits = [_hit(broken if i == 7 else _key(), 10, count_blocked=False) for i in range(25)]
    results = await asyncio.gather(*(standalone.hit([hit], NOW) for hit in hits), return_exceptions=True)
    assert standalone.batches < 25  # the batch wrapper ran
    failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == [7], results
    assert isinstance(results[7], BackendUnavailable) and "WRONGTYPE" in str(results[7])


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
    hit = _hit(_key(), algorithm=Algorithm.SLIDING_WINDOW)
    await standalone.hit([hit], NOW)
    with redis_standalone.client() as admin:
        admin.script_flush()
        outcome = await standalone.hit([hit], NOW)
        assert outcome[0].remaining == 8
        admin.config_resetstat()
        await standalone.hit([hit], NOW)
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


async def test_hung_redis_is_backend_unavailable_within_the_deadline_then_recovers() -> None:
    with RedisServer() as server:
        backend = RedisBackend.from_url(server.url, timeout_s=0.2)
        try:
            fast, script = _hit(_key()), _hit(_key(), count_blocked=False)
            assert (await backend.hit([fast, script], NOW))[0].remaining == 9
            with server.paused():
                async with asyncio.timeout(5.0):  # never hangs: each call is bounded by its deadline
                    for hits in ([fast], [script], [fast], [fast, script]):
                        with pytest.raises(BackendUnavailable, match="TimeoutError"):
                            await backend.hit(hits, NOW)
                    # many at once share one deadline timer: each still times out on its own
                    results = await asyncio.gather(
                        *(backend.hit([fast] if i % 2 else [script], NOW) for i in range(6)), return_exceptions=True
                    )
                    assert all(isinstance(result, BackendUnavailable) for result in results), results
                    # a caller's own cancellation stays a cancellation (not a backend failure); a backend with a
                    # long deadline, so that a stall of the test machine cannot let the deadline come first
                    patient = RedisBackend.from_url(server.url, timeout_s=3.0)
                    try:
                        call = asyncio.ensure_future(patient.hit([fast], NOW))
                        await asyncio.sleep(0.05)
                        call.cancel()
                        with pytest.raises(asyncio.CancelledError):
                            await call
                    finally:
                        await patient.close()
                    assert not await backend.ping()
            async with asyncio.timeout(5.0):
                for _attempt in range(50):
                    try:
                        outcomes = await backend.hit([fast, script], NOW)
                        break
                    except BackendUnavailable:
                        await asyncio.sleep(0.05)
                else:
                    pytest.fail("the backend did not recover after Redis resumed")
            # the calls that timed out may or may not have been applied (Redis ran them when it resumed)
            assert outcomes[0].remaining in range(9)
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
    await _counts_through(redis_sentinel.url)


async def _counts_through(url: str) -> None:
    """A backend on ``url`` counts a limit of 2 exactly and answers ping."""
    backend = RedisBackend.from_url(url, timeout_s=2.0)
    try:
        key = _key()
        assert [(await backend.hit([_hit(key, 2)], NOW))[0].over for _ in range(3)] == [False, False, True]
        assert await backend.ping()
    finally:
        await backend.close()


async def test_sentinel_with_passwords_on_the_master_and_on_the_sentinels() -> None:
    """Real servers: the master and replica require one password, the sentinels another (sentinel_password=)."""
    with RedisSentinel(password="m4ster-pw", sentinel_password="s3ntinel-pw") as sentinels:
        await _counts_through(sentinels.url)
        secrets = ("m4ster-pw", "s3ntinel-pw")
        await _refused_without_showing(sentinels.url.replace("?sentinel_password=s3ntinel-pw", ""), secrets)
        await _refused_without_showing(sentinels.url.replace(":m4ster-pw@", ":wrong@"), secrets)


async def test_cluster_with_a_password() -> None:
    """Real servers: every node of the Cluster requires the password; a wrong one is refused without showing it."""
    with RedisCluster(password="c1uster-pw") as cluster:
        await _counts_through(cluster.url)
        await _refused_without_showing(cluster.url.replace(":c1uster-pw@", ":wrong-pw@"), ("c1uster-pw", "wrong-pw"))


async def _refused_without_showing(url: str, secrets: tuple[str, ...]) -> None:
    """A backend on ``url`` (a missing or wrong password) fails as BackendUnavailable, naming none of ``secrets``."""
    refused = RedisBackend.from_url(url, timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await refused.hit([_hit(_key(), 2)], NOW)
        assert not any(secret in str(caught.value) for secret in secrets)
        assert not await refused.ping()
    finally:
        await refused.close()


async def test_sentinel_failover_is_followed() -> None:
    """After a failover the old master is a replica (READONLY) or gone: the lean client asks Sentinel again."""
    with RedisSentinel() as sentinels:
        backend = RedisBackend.from_url(sentinels.url, timeout_s=TIMEOUT_S)
        try:
            fast, script = _hit(_key()), _hit(_key(), count_blocked=False)
            await backend.hit([fast, script], NOW)
            old_port = sentinels.master_port()
            with sentinels.sentinels[0].client() as admin:
                for _attempt in range(200):  # bounded: the sentinel may not rate the fresh replica as good yet
                    try:
                        admin.execute_command("SENTINEL", "FAILOVER", RedisSentinel.MASTER_NAME)
                        break
                    except redis.ResponseError as error:
                        if "NOGOODSLAVE" not in str(error):
                            raise
                        await asyncio.sleep(0.05)
            for _attempt in range(400):  # bounded: ~20 s
                if sentinels.master_port() != old_port:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("sentinel did not fail over")
            with sentinels.master.client() as old_master:
                # Until it is demoted the old master still takes writes (Sentinel's known window). The sentinels
                # demote it at their next INFO poll (~10 s): do it now, as they would.
                old_master.execute_command("REPLICAOF", "127.0.0.1", sentinels.master_port())
            recovered = []
            for _attempt in range(400):
                try:
                    recovered.append(await backend.hit([fast], NOW))
                    recovered.append(await backend.hit([script], NOW))
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the backend did not follow the failover")
            assert backend.target.resp is not None
            assert backend.target.resp.connects >= 2
            with sentinels.replica.client() as new_master:
                assert new_master.execute_command("ROLE")[0] == b"master"
        finally:
            await backend.close()
