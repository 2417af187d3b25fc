"""The counting algorithms: exact values of the Python form, and the Lua form agreeing with it bit for bit.

Time is injected (integer ms); nothing sleeps.  The Lua half runs ``HITS_LUA`` in a real redis-server (the shared
fixture of tests/support/redis_servers.py) and is skipped where there is none.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit import algorithms as alg
from ratelimit.algorithms import (
    EXPIRY_SLACK_MS,
    HITS_LUA,
    MODE_BLOCKED,
    MODE_DECIDE,
    MODE_DRY_RUN,
    Cell,
    apply_hits,
    script_args,
    script_keys,
    storage_keys,
    to_ms,
    to_outcome,
)
from ratelimit.backends.base import Hit, Outcome
from ratelimit.model import Algorithm, Limit, Unit

with contextlib.suppress(ImportError):  # the shared redis-server fixture, where the redis helper provides it
    from tests.support.redis_servers import redis_standalone  # noqa: F401  (pytest fixture)

T0 = 19_676 * 86_400_000  # 2023-11-15T00:00Z in ms: aligned to every unit up to a day
FW, SW, TB = Algorithm.FIXED_WINDOW, Algorithm.SLIDING_WINDOW, Algorithm.TOKEN_BUCKET


def lim(n: int, algorithm: Algorithm = FW, unit: Unit = Unit.SECOND, burst: int = 0, units: int = 1) -> Limit:
    return Limit(n, unit, units, algorithm, burst)


def H(key: str, limit: Limit, cost: int = 1, count_blocked: bool = True, shadow: bool = False) -> Hit:
    return Hit(key, limit, cost, count_blocked, shadow)


def one(states: dict[str, Cell], hit: Hit, now: int, mode: int = MODE_DECIDE) -> tuple[int, int, int, int]:
    return apply_hits(states, [hit], now, mode)[0]


# --- small pieces ---------------------------------------------------------------------------------------------------


def test_to_ms_and_ceil_div() -> None:
    assert to_ms(1_700_000_000.123) == 1_700_000_000_123
    assert to_ms(0.0004) == 0
    assert [alg.ceil_div(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_storage_keys_keep_the_hash_tag_and_name_the_window_in_seconds() -> None:
    now = T0 + 61_500
    assert storage_keys(H("{a}x", lim(1, FW, Unit.MINUTE)), now) == (f"{{a}}x:{(T0 + 60_000) // 1000}",)
    assert storage_keys(H("{a}x", lim(1, SW, Unit.MINUTE)), now) == (
        f"{{a}}x:{(T0 + 60_000) // 1000}",
        f"{{a}}x:{T0 // 1000}",
    )
    assert storage_keys(H("{a}x", lim(1, TB, Unit.MINUTE)), now) == ("{a}x",)
    # N-unit windows are aligned to the epoch too
    assert storage_keys(H("k", lim(1, FW, Unit.MINUTE, units=5)), T0 + 301_000) == (f"k:{(T0 + 300_000) // 1000}",)


def test_script_keys_and_args_layout() -> None:
    hits = [H("a", lim(5, SW), 2, count_blocked=False), H("b", lim(7, TB, Unit.MINUTE, burst=3), 0, shadow=True)]
    assert script_keys(hits, T0) == ["a:" + str(T0 // 1000), "a:" + str(T0 // 1000 - 1), "b"]
    assert script_args(hits, T0, MODE_DRY_RUN) == [T0, MODE_DRY_RUN, 2, 5, 1000, 0, 2, 0, 0, 3, 7, 60_000, 3, 0, 1, 1]


def test_to_outcome_in_seconds() -> None:
    assert to_outcome([1, 0, 1500, 250]) == Outcome(over=True, remaining=0, reset_s=1.5, retry_after_s=0.25)


# --- fixed window ---------------------------------------------------------------------------------------------------


def test_fixed_window_sequence_rollover_and_expiry() -> None:
    states: dict[str, Cell] = {}
    hit = H("k", lim(3))
    now = T0 + 250
    assert [one(states, hit, now) for _ in range(4)] == [
        (0, 2, 750, 0),
        (0, 1, 750, 0),
        (0, 0, 750, 0),
        (1, 0, 750, 750),  # retry at the window's end
    ]
    key = f"k:{T0 // 1000}"
    assert states[key].value == 4  # count_blocked (the default): the refused one was counted
    assert states[key].expire_at == T0 + 1000 + EXPIRY_SLACK_MS  # set at creation, not moved by later hits
    assert one(states, hit, T0 + 1000) == (0, 2, 1000, 0)  # new window, new key
    assert one(states, hit, T0 + 1999) == (0, 1, 1, 0)
    assert one(states, H("k", lim(3), cost=0), T0 + 2500) == (0, 3, 500, 0)  # a look creates nothing
    assert f"k:{(T0 + 2000) // 1000}" not in states


def test_fixed_window_cost_and_check_only() -> None:
    states: dict[str, Cell] = {}
    assert one(states, H("k", lim(10), cost=4), T0) == (0, 6, 1000, 0)
    assert one(states, H("k", lim(10), cost=0), T0) == (0, 6, 1000, 0)  # look only
    assert one(states, H("k", lim(10), cost=7), T0) == (1, 0, 1000, 1000)
    assert one(states, H("k", lim(10), cost=0), T0) == (1, 0, 1000, 1000)  # 11 > 10: over, even to a look
    assert one(states, H("k", lim(10), cost=11), T0 + 1000) == (1, 0, 1000, 1000)  # never fits: retry = reset


# --- sliding window -------------------------------------------------------------------------------------------------


def test_sliding_window_weights_the_previous_window() -> None:
    states: dict[str, Cell] = {}
    hit = H("k", lim(4, SW), count_blocked=False)
    now = T0 + 500
    assert [one(states, hit, now)[:2] for _ in range(4)] == [(0, 3), (0, 2), (0, 1), (0, 0)]
    # over; the current count will weigh 3/4 at T0+1250: 4 * 0.75 + 1 = 4
    assert one(states, hit, now) == (1, 0, 1500, 750)
    assert one(states, hit, T0 + 1249)[0] == 1
    assert one(states, hit, T0 + 1250) == (0, 0, 1750, 0)
    assert one(states, hit, T0 + 1500) == (0, 0, 1500, 0)  # 4 * 0.5 + 2 = 4
    # over again, and the previous window's weight frees one request 250 ms later: 4 * 0.25 + 3 = 4
    assert one(states, hit, T0 + 1500) == (1, 0, 1500, 250)
    assert one(states, hit, T0 + 1750)[:2] == (0, 0)


def test_sliding_window_reset_and_retry_definitions() -> None:
    states: dict[str, Cell] = {}
    assert one(states, H("k", lim(4, SW), cost=0), T0 + 100) == (0, 4, 0, 0)  # nothing counted: whole now
    one(states, H("k", lim(4, SW), cost=2), T0 + 100)
    assert one(states, H("k", lim(4, SW), cost=0), T0 + 1100) == (0, 2, 900, 0)  # only the previous weighs
    assert one(states, H("k", lim(4, SW), cost=5), T0 + 1100) == (1, 0, 1900, 1900)  # never fits: retry = reset
    # count_blocked: the refused request counts, so its retry moves out: the count 3 decays in the next window,
    # 3 * (1 - e/1000) + 1 <= 2 at e = 667
    blocked = H("b", lim(2, SW), cost=1)
    assert [one(states, blocked, T0) for _ in range(3)][2] == (1, 0, 2000, 1667)
    # a look (cost 0) is over while the estimate is: 3 * (1 - e/1000) <= 2 at e = 334
    assert one(states, H("b", lim(2, SW), cost=0), T0) == (1, 0, 2000, 1334)
    assert one(states, H("b", lim(2, SW), count_blocked=False), T0 + 1666)[0] == 1
    assert one(states, blocked, T0 + 1667)[0] == 0


def test_sliding_window_key_expiry_covers_the_next_window() -> None:
    states: dict[str, Cell] = {}
    one(states, H("k", lim(4, SW)), T0 + 300)
    assert states[f"k:{T0 // 1000}"].expire_at == T0 + 2000 + EXPIRY_SLACK_MS


# --- token bucket (GCRA) --------------------------------------------------------------------------------------------


def test_token_bucket_burst_then_one_per_interval() -> None:
    states: dict[str, Cell] = {}
    hit = H("k", lim(2, TB, burst=4), count_blocked=False)  # T = 500 ms, capacity 4
    assert [one(states, hit, T0) for _ in range(4)] == [
        (0, 3, 500, 0),
        (0, 2, 1000, 0),
        (0, 1, 1500, 0),
        (0, 0, 2000, 0),
    ]
    assert one(states, hit, T0) == (1, 0, 2500, 500)
    assert one(states, hit, T0 + 499)[0] == 1
    assert one(states, hit, T0 + 500) == (0, 0, 2000, 0)
    assert states["k"].value == T0 + 2500 and states["k"].ticks == 0
    assert states["k"].expire_at == T0 + 2500 + EXPIRY_SLACK_MS  # the state is worthless once TAT has passed
    assert one(states, H("k", lim(2, TB, burst=4), cost=0), T0 + 2500) == (0, 4, 0, 0)  # full again


def test_token_bucket_count_blocked_pushes_the_retry_out() -> None:
    states: dict[str, Cell] = {}
    hit = H("k", lim(2, TB, burst=4))
    for _ in range(4):
        one(states, hit, T0)
    assert one(states, hit, T0) == (1, 0, 2500, 1000)  # the refused request was counted too


def test_token_bucket_fractional_interval_is_exact() -> None:
    """3/s: T = 333.33 ms, kept exactly in ticks of 1/3 ms (floats would drift and refuse the 3rd request)."""
    states: dict[str, Cell] = {}
    hit = H("k", lim(3, TB), count_blocked=False)
    assert [one(states, hit, T0)[:3] for _ in range(3)] == [(0, 2, 334), (0, 1, 667), (0, 0, 1000)]
    assert one(states, hit, T0) == (1, 0, 1334, 334)
    assert states["k"].value == T0 + 1000 and states["k"].ticks == 0
    assert one(states, hit, T0 + 333)[0] == 1
    assert one(states, hit, T0 + 334)[0] == 0
    assert (states["k"].value, states["k"].ticks) == (T0 + 1333, 1)  # 1000 + 333.33 ms
    # hammering every 7 ms for 10 s: exactly burst + floor(t / T) pass
    allowed = sum(1 - one(states, hit, T0 + 1000 + t)[0] for t in range(0, 10_000, 7))
    last = 1000 + (10_000 - 1) // 7 * 7
    assert 4 + allowed == 3 + last * 3 // 1000


def test_token_bucket_cost_larger_than_capacity_never_fits() -> None:
    states: dict[str, Cell] = {}
    assert one(states, H("k", lim(2, TB, burst=4), cost=5, count_blocked=False), T0) == (1, 0, 2500, 2500)


# --- a request's hits together --------------------------------------------------------------------------------------


def test_one_over_blocks_the_others_unless_shadow() -> None:
    states: dict[str, Cell] = {}
    full = H("full", lim(1))
    one(states, full, T0)
    ok = H("ok", lim(5), count_blocked=False)
    counted = H("counted", lim(5))
    assert apply_hits(states, [ok, counted, full], T0) == [(0, 4, 1000, 0), (0, 4, 1000, 0), (1, 0, 1000, 1000)]
    second = T0 // 1000
    assert f"ok:{second}" not in states  # refused request, count_blocked false: not consumed
    assert states[f"counted:{second}"].value == 1  # count_blocked true: consumed anyway
    # the same over hit in shadow mode blocks nothing: everything is consumed
    shadow_full = H("full", lim(1), shadow=True)
    assert apply_hits(states, [ok, shadow_full], T0) == [(0, 4, 1000, 0), (1, 0, 1000, 1000)]
    assert states[f"ok:{second}"].value == 1
    assert states[f"full:{second}"].value == 3


def test_modes_dry_run_and_blocked() -> None:
    states: dict[str, Cell] = {}
    hits = [H("a", lim(5)), H("b", lim(5, TB), count_blocked=False)]
    assert apply_hits(states, hits, T0, MODE_DRY_RUN) == [(0, 4, 1000, 0), (0, 4, 200, 0)]
    assert states == {}
    apply_hits(states, hits, T0, MODE_BLOCKED)  # blocked elsewhere: only count_blocked hits consume
    assert list(states) == [f"a:{T0 // 1000}"]


def test_duplicate_keys_in_one_request_are_each_consumed() -> None:
    states: dict[str, Cell] = {}
    for algorithm in Algorithm:
        hit = H(f"{algorithm}", lim(10, algorithm))
        assert apply_hits(states, [hit, hit], T0) == apply_hits({}, [hit], T0) * 2  # both judged on the state before
        assert one(states, H(f"{algorithm}", lim(10, algorithm), cost=0), T0)[1] == 8


@given(
    algorithm=st.sampled_from(list(Algorithm)),
    limit=st.integers(1, 12),
    burst=st.integers(0, 5),
    steps=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 3)), min_size=1, max_size=60),
)
@settings(max_examples=150, deadline=None)
def test_never_more_than_the_limit_allows(
    algorithm: Algorithm, limit: int, burst: int, steps: list[tuple[int, int]]
) -> None:
    """Allowed cost in any window (fixed), any period-long span (sliding: <= 2x), or by time t (GCRA)."""
    states: dict[str, Cell] = {}
    now = T0
    granted: list[tuple[int, int]] = []
    for gap, cost in steps:
        now += gap
        over, remaining, reset, retry = one(states, H("k", lim(limit, algorithm, burst=burst), cost), now)
        assert remaining >= 0 and reset >= 0 and retry >= 0 and (retry > 0) == bool(over)
        if not over:
            granted.append((now, cost))
    if algorithm is FW:
        per_window: dict[int, int] = {}
        for at, cost in granted:
            per_window[at // 1000] = per_window.get(at // 1000, 0) + cost
        assert all(total <= limit for total in per_window.values())
    elif algorithm is SW:
        for start, _ in granted:
            assert sum(c for at, c in granted if start <= at < start + 1000) <= 2 * limit
    else:
        capacity = burst or limit
        first = granted[0][0] if granted else T0
        for end, _ in granted:
            spent = sum(c for at, c in granted if at <= end)
            assert spent <= capacity + (end - first) * limit // 1000


# --- the Lua form ---------------------------------------------------------------------------------------------------


def test_lua_touches_only_its_keys_and_no_clock() -> None:
    commands = set(re.findall(r"redis\.call\('(\w+)'", HITS_LUA))
    assert commands == {"GET", "INCRBY", "PEXPIRE", "SET"}
    assert "TIME" not in HITS_LUA and "math.random" not in HITS_LUA
    assert re.findall(r"KEYS\[([^\]]+)\]", HITS_LUA) == ["k", "k", "k + 1", "k", "ev.key"]


@pytest.fixture
def lua(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A sync redis client on the shared standalone server, flushed, and the script's SHA."""
    try:
        server = request.getfixturevalue("redis_standalone")
    except pytest.FixtureLookupError:  # pragma: no cover
        pytest.skip("tests.support.redis_servers is not available")
    client = server.client()
    client.flushdb()
    sha = client.script_load(HITS_LUA)
    yield client, sha
    client.flushdb()
    client.close()


def _run_lua(lua: Any, hits: list[Hit], now: int, mode: int = MODE_DECIDE) -> list[tuple[int, ...]]:
    client, sha = lua
    keys = script_keys(hits, now)
    return [tuple(raw) for raw in client.evalsha(sha, len(keys), *keys, *script_args(hits, now, mode))]


_limits = st.builds(
    Limit,
    requests_per_unit=st.sampled_from([1, 2, 3, 7, 10, 999_983]),
    unit=st.sampled_from([Unit.SECOND, Unit.MINUTE, Unit.DAY]),
    window_units=st.sampled_from([1, 3]),
    algorithm=st.sampled_from(list(Algorithm)),
    burst=st.sampled_from([0, 0, 1, 5]),
)
_steps = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 7, 333, 1000, 59_999, 86_400_000]),
        st.sampled_from([MODE_DECIDE, MODE_DECIDE, MODE_DRY_RUN, MODE_BLOCKED]),
        st.lists(
            st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 1, 2, 9]), st.booleans(), st.booleans()),
            min_size=1,
            max_size=4,
        ),
    ),
    min_size=1,
    max_size=25,
)


@given(limits=st.lists(_limits, min_size=4, max_size=4), steps=_steps, start=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lua_and_python_agree_exactly(lua: Any, limits: list[Limit], steps: Any, start: int) -> None:
    client, _ = lua
    client.flushdb()
    states: dict[str, Cell] = {}
    now = T0 + start
    for gap, mode, picks in steps:
        now += gap
        hits = [H(f"{{t}}{i}", limits[i], cost, blocked, shadow) for i, cost, blocked, shadow in picks]
        assert _run_lua(lua, hits, now, mode) == apply_hits(states, hits, now, mode)
        for key, cell in states.items():  # and they store the same thing
            if cell.expire_at > now:
                stored = client.get(key).decode()
                assert stored == (f"{cell.value}:{cell.ticks}" if ":" in stored else str(cell.value))


def test_lua_sets_expiry_only_when_creating(lua: Any) -> None:
    client, _ = lua
    for algorithm in (FW, SW):
        hit = H(f"{{e}}{algorithm}", lim(5, algorithm))
        _run_lua(lua, [hit], T0 + 400)
        key = storage_keys(hit, T0 + 400)[0]
        ttl = 1000 * (1 if algorithm is FW else 2) - 400 + EXPIRY_SLACK_MS
        assert 0 < client.pttl(key) <= ttl
        client.pexpire(key, 10**9)  # a marker: a later hit must not touch the expiry
        _run_lua(lua, [hit], T0 + 500)
        assert client.pttl(key) > 10**8
    hit = H("{e}tb", lim(2, TB))
    _run_lua(lua, [hit, hit], T0)
    assert 0 < client.pttl("{e}tb") <= 1000 + EXPIRY_SLACK_MS  # TAT = now + 2 * 500 ms


def test_lua_rejects_malformed_calls(lua: Any) -> None:
    import redis

    client, sha = lua
    with pytest.raises(redis.ResponseError, match="bad ARGV count"):
        client.evalsha(sha, 0, T0, 0, 1, 2)
    with pytest.raises(redis.ResponseError, match="unknown algorithm"):
        client.evalsha(sha, 1, "k", T0, 0, 9, 1, 1000, 0, 1, 1, 0)
    with pytest.raises(redis.ResponseError, match="KEYS do not match"):
        client.evalsha(sha, 2, "k", "j", T0, 0, 1, 1, 1000, 0, 1, 1, 0)
