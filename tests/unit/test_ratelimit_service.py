"""RateLimitService decisions against the real config loader and counting code, with an injected clock."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from meshgate.yamlconf import loads
from ratelimit import metrics
from ratelimit.backends.base import BackendUnavailable, CounterBackend, Hit, Outcome
from ratelimit.backends.memory import MemoryBackend
from ratelimit.config import RateLimitConfig, build_config, load_config, parse_config
from ratelimit.metrics import RuleStatsCollector
from ratelimit.model import (
    Code,
    Descriptor,
    DescriptorStatus,
    Entry,
    Limit,
    RateLimitRequest,
    Rule,
    Unit,
)
from ratelimit.service import OverLimitCache, RateLimitService

SHOP = """\
domain: shop
descriptors:
  - key: generic_key
    value: slow
    rate_limit: {unit: minute, requests_per_unit: 3, name: slow}
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2, name: per_user}
  - key: tier
    value: premium
    rate_limit: {unlimited: true, replaces: [{name: per_user}]}
  - key: tier
    value: gold
    rate_limit: {unit: minute, requests_per_unit: 5, name: gold, replaces: [{name: per_user}]}
  - key: api
    rate_limits:
      - {unit: second, requests_per_unit: 5, name: burst}
      - {unit: day, requests_per_unit: 7, name: daily}
  - key: shadowed
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: sh}
  - key: quota
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: strict
    count_blocked: false
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: sliding_window}
  - key: detailed
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"""
OPEN = """\
domain: open
on_backend_error: allow
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 1}
"""
CLOSED = """\
domain: closed
on_backend_error: deny
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: s
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"""

T0 = 1_000_800.0  # the start of an hour (minute, second) window: resets are whole numbers


def load() -> RateLimitConfig:
    docs = [
        (name, loads(text, name)) for name, text in (("shop.yaml", SHOP), ("open.yaml", OPEN), ("closed.yaml", CLOSED))
    ]
    return build_config(docs)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def real_backend() -> CounterBackend:
    return MemoryBackend()


class Recording:
    """Wraps a backend: records each call's hits; ``fail`` makes it unavailable; ``broken`` raises a bug."""

    def __init__(self, inner: CounterBackend) -> None:
        self.inner = inner
        self.calls: list[list[Hit]] = []
        self.fail = False
        self.broken = False
        self.short = False

    async def hit(self, hits: Sequence[Hit], now: float) -> list[Outcome]:
        self.calls.append(list(hits))
        if self.fail:
            raise BackendUnavailable("down")
        if self.broken:
            raise KeyError("bug")
        got = await self.inner.hit(hits, now)
        return got[:-1] if self.short else got

    async def ping(self) -> bool:
        return not self.fail

    async def close(self) -> None:
        await self.inner.close()


def make(**kwargs: Any) -> tuple[RateLimitService, Recording, Clock, RuleStatsCollector]:
    config = load()
    backend = Recording(real_backend())
    clock = Clock()
    stats = RuleStatsCollector()
    service = RateLimitService(lambda: config, backend, clock=clock, stats=stats, **kwargs)
    return service, backend, clock, stats


def req(*descriptors: Descriptor | dict[str, str], domain: str = "shop", hits: int = 1) -> RateLimitRequest:
    built = tuple(
        d if isinstance(d, Descriptor) else Descriptor(tuple(Entry(k, v) for k, v in d.items())) for d in descriptors
    )
    return RateLimitRequest(domain, built, hits)


def stats_of(stats: RuleStatsCollector, rule: str) -> dict[str, int]:
    (one,) = [s for s in stats.series() if s.rule == rule]
    fields = ("total_hits", "over_limit", "near_limit", "within_limit", "shadow_mode", "over_limit_with_local_cache")
    return {name: getattr(one, name) for name in fields}


SLOW = {"generic_key": "slow"}


async def test_fixed_window_counts_down_then_over_with_exact_statuses() -> None:
    service, backend, clock, stats = make()
    slow = Limit(3, Unit.MINUTE, name="slow")
    answers = [await service.should_rate_limit(req(SLOW)) for _ in range(4)]
    assert [a.code for a in answers] == [Code.OK, Code.OK, Code.OK, Code.OVER_LIMIT]
    assert [a.statuses[0] for a in answers] == [
        DescriptorStatus(Code.OK, slow, 2, 60.0),
        DescriptorStatus(Code.OK, slow, 1, 60.0),
        DescriptorStatus(Code.OK, slow, 0, 60.0),
        DescriptorStatus(Code.OVER_LIMIT, slow, 0, 60.0),
    ]
    assert answers[0].response_headers == ()  # headers off by default
    clock.now += 61  # next window: whole again
    again = await service.should_rate_limit(req(SLOW))
    assert again.statuses[0] == DescriptorStatus(Code.OK, slow, 2, 59.0)
    counted = stats_of(stats, "shop.generic_key_slow")
    assert counted["total_hits"] == 5
    assert counted["within_limit"] == 4
    assert counted["over_limit"] == 1
    assert counted["near_limit"] == 1  # past floor(3 * 0.8) = 2: the 3rd hit (the 4th is over)
    assert counted["over_limit_with_local_cache"] == 1  # the 3rd hit exhausted the window; the 4th never left
    assert len(backend.calls) == 4


async def test_no_rule_unknown_domain_and_empty_are_ok_without_backend() -> None:
    service, backend, _, _ = make()
    answer = await service.should_rate_limit(req({"nothing": "here"}, {"generic_key": "fast"}))
    assert answer.code is Code.OK
    assert answer.statuses == (DescriptorStatus(Code.OK), DescriptorStatus(Code.OK))
    assert (await service.should_rate_limit(req(SLOW, domain="elsewhere"))).statuses == (DescriptorStatus(Code.OK),)
    assert backend.calls == []


async def test_one_backend_call_for_all_descriptors_and_statuses_in_order() -> None:
    service, backend, _, _ = make()
    answer = await service.should_rate_limit(req({"user": "a"}, {"none": "x"}, SLOW, {"api": "k"}))
    assert len(backend.calls) == 1
    assert len(backend.calls[0]) == 4  # user, slow, api (two limits)
    assert [s.limit.name if s.limit else None for s in answer.statuses] == ["per_user", None, "slow", "burst"]
    assert [s.remaining for s in answer.statuses] == [1, 0, 2, 4]


async def test_several_limits_report_the_least_remaining_then_the_one_over() -> None:
    service, _, clock, _ = make()
    api = {"api": "k"}
    first = await service.should_rate_limit(req(api))
    assert first.statuses[0] == DescriptorStatus(Code.OK, Limit(5, Unit.SECOND, name="burst"), 4, 1.0)
    for _ in range(4):
        await service.should_rate_limit(req(api))
    clock.now += 1  # a new second: burst whole again, daily at 5 of 7 used
    answer = await service.should_rate_limit(req(api))
    daily = Limit(7, Unit.DAY, name="daily")
    assert answer.statuses[0].limit == daily
    assert answer.statuses[0].remaining == 1
    await service.should_rate_limit(req(api))
    over = await service.should_rate_limit(req(api))
    assert over.code is Code.OVER_LIMIT
    assert over.statuses[0].limit == daily
    assert over.statuses[0].code is Code.OVER_LIMIT


async def test_replaces_drops_the_named_limit_and_unlimited_replaces_too() -> None:
    service, backend, _, _ = make()
    gold = await service.should_rate_limit(req({"user": "a"}, {"tier": "gold"}))
    assert gold.statuses[0] == DescriptorStatus(Code.OK)  # per_user replaced by gold
    assert gold.statuses[1].limit is not None
    assert gold.statuses[1].limit.name == "gold"
    assert [hit.limit.name for hit in backend.calls[-1]] == ["gold"]
    for _ in range(5):
        premium = await service.should_rate_limit(req({"user": "a"}, {"tier": "premium"}))
        assert premium.code is Code.OK
        assert premium.statuses == (DescriptorStatus(Code.OK), DescriptorStatus(Code.OK))
    assert len(backend.calls) == 1  # premium: nothing to count at all


async def test_limit_override_replaces_the_rule_and_applies_without_one() -> None:
    service, backend, _, stats = make()
    override = Limit(1, Unit.HOUR)
    on_rule = Descriptor((Entry("generic_key", "slow"),), limit_override=override)
    first = await service.should_rate_limit(req(on_rule))
    assert first.statuses[0] == DescriptorStatus(Code.OK, override, 0, 3600.0)
    assert (await service.should_rate_limit(req(on_rule))).code is Code.OVER_LIMIT
    assert (await service.should_rate_limit(req(SLOW))).statuses[0].remaining == 2  # the rule's own counter
    no_rule = Descriptor((Entry("free", "x"),), limit_override=Limit(2, Unit.SECOND))
    assert (await service.should_rate_limit(req(no_rule))).statuses[0].remaining == 1
    assert any((s.domain, s.rule) == ("shop", "<override>") for s in stats.series())
    shadow_override = Descriptor((Entry("shadowed", "x"),), limit_override=Limit(0, Unit.SECOND))
    assert (await service.should_rate_limit(req(shadow_override))).code is Code.OVER_LIMIT  # never shadow
    assert backend.calls


WILDCARDS = """\
domain: files
descriptors:
  - key: file
    value: shared/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: file
    value: own/*
    rate_limit: {unit: hour, requests_per_unit: 10}
"""


def wildcard_service() -> tuple[RateLimitService, Recording, Clock]:
    config = parse_config(WILDCARDS)
    backend = Recording(real_backend())
    clock = Clock()
    return RateLimitService(lambda: config, backend, clock=clock, stats=RuleStatsCollector()), backend, clock


def file(value: str, override: Limit | None = None) -> RateLimitRequest:
    return req(Descriptor((Entry("file", value),), limit_override=override), domain="files")


async def test_limit_override_on_a_shared_wildcard_counts_each_value_alone() -> None:
    """envoyproxy's GetLimit returns the override before walking the descriptor tree, so the rule's
    share_threshold never reaches it: each value counts alone, under the override's limit."""
    service, backend, _ = wildcard_service()
    assert (await service.should_rate_limit(file("shared/a"))).statuses[0].remaining == 9
    assert (await service.should_rate_limit(file("shared/b"))).statuses[0].remaining == 8  # one shared counter
    shared_key = backend.calls[-1][0].key
    override = Limit(1, Unit.HOUR)
    a = await service.should_rate_limit(file("shared/a", override))
    a_key = backend.calls[-1][0].key
    b = await service.should_rate_limit(file("shared/b", override))
    assert a.statuses[0] == b.statuses[0] == DescriptorStatus(Code.OK, override, 0, 3600.0)
    assert len({shared_key, a_key, backend.calls[-1][0].key}) == 3
    assert "file=shared/a" in a_key  # the raw value, not the pattern
    assert (await service.should_rate_limit(file("shared/a", override))).code is Code.OVER_LIMIT
    assert (await service.should_rate_limit(file("shared/c"))).statuses[0].remaining == 7  # untouched by overrides


async def test_limit_override_on_a_plain_wildcard_counts_each_value_alone() -> None:
    service, _, _ = wildcard_service()
    override = Limit(2, Unit.MINUTE)
    first = [await service.should_rate_limit(file("own/a", override)) for _ in range(2)]
    assert [answer.statuses[0].remaining for answer in first] == [1, 0]
    assert (await service.should_rate_limit(file("own/b", override))).statuses[0].remaining == 1
    assert (await service.should_rate_limit(file("own/a", override))).code is Code.OVER_LIMIT
    assert (await service.should_rate_limit(file("own/a"))).statuses[0].remaining == 9  # the rule's own counter


async def test_limit_override_unit_sets_the_window_not_the_rules() -> None:
    """The rule counts per hour; an override's unit is its window (as envoyproxy's key takes the override's
    divider), and the same count per another unit is another counter."""
    service, _, clock = wildcard_service()
    per_second = Limit(2, Unit.SECOND)
    answers = [await service.should_rate_limit(file("shared/a", per_second)) for _ in range(3)]
    assert [a.statuses[0] for a in answers] == [
        DescriptorStatus(Code.OK, per_second, 1, 1.0),
        DescriptorStatus(Code.OK, per_second, 0, 1.0),
        DescriptorStatus(Code.OVER_LIMIT, per_second, 0, 1.0),
    ]
    clock.now += 1  # the override's next second: whole again
    assert (await service.should_rate_limit(file("shared/a", per_second))).statuses[0].remaining == 1
    per_minute = Limit(10, Unit.MINUTE)  # the rule's count, another unit
    assert (await service.should_rate_limit(file("shared/a", per_minute))).statuses[0] == DescriptorStatus(
        Code.OK, per_minute, 9, 59.0
    )
    rule = Limit(10, Unit.HOUR)
    assert (await service.should_rate_limit(file("shared/b"))).statuses[0] == DescriptorStatus(Code.OK, rule, 9, 3599.0)


async def test_client_chosen_names_never_multiply_metric_series_or_shadow_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Overrides with keys of the client's choosing, unknown domains, ever new values under a detailed shadow rule:
    the series stay a handful and one rule logs once per interval."""
    service, _, _, stats = make(shadow_mode_global=True)
    with caplog.at_level("INFO", logger="ratelimit.service"):
        for i in range(50):
            zero = Limit(0, Unit.SECOND)
            await service.should_rate_limit(req(Descriptor((Entry(f"key{i}", "x"),), limit_override=zero)))
            await service.should_rate_limit(
                req(Descriptor((Entry("k", "v"),), limit_override=zero), domain=f"made-up-{i}")
            )
    labels = {(s.domain, s.rule) for s in stats.series()}
    assert labels == {("shop", "<override>"), ("<unknown>", "<override>")}
    shadow_lines = [r for r in caplog.records if r.getMessage().startswith("shadow mode")]
    assert len(shadow_lines) == 2  # one per series and interval, not one per request
    caplog.clear()
    with caplog.at_level("INFO", logger="ratelimit.service"):
        for i in range(50):  # a detailed rule: a series per value, but one log line for the rule
            for _ in range(2):  # the second is over (1 per minute)
                await service.should_rate_limit(req({"detailed": f"value-{i}"}))
    assert len([r for r in caplog.records if r.getMessage().startswith("shadow mode")]) == 1
    assert len([s for s in stats.series() if s.rule.startswith("shop.detailed_value-")]) == 50


async def test_hits_addend_request_level_descriptor_level_and_zero_checks_only() -> None:
    service, backend, _, _ = make()
    answer = await service.should_rate_limit(req(SLOW, hits=2))
    assert answer.statuses[0].remaining == 1
    look = Descriptor((Entry("generic_key", "slow"),), hits_addend=0)
    for _ in range(3):
        peek = await service.should_rate_limit(req(look, hits=5))
        assert peek.code is Code.OK
        assert peek.statuses[0].remaining == 1  # nothing consumed
    heavy = Descriptor((Entry("generic_key", "slow"),), hits_addend=2)
    over = await service.should_rate_limit(req(heavy))
    assert over.code is Code.OVER_LIMIT
    assert [hit.cost for hit in backend.calls[-1]] == [2]
    assert (await service.should_rate_limit(req(look))).statuses[0].remaining == 0  # count_blocked: consumed


async def test_shadow_mode_rule_never_refuses_but_counts(caplog: pytest.LogCaptureFixture) -> None:
    service, _, clock, stats = make()
    caplog.set_level("INFO", logger="ratelimit.service")
    answers = [await service.should_rate_limit(req({"shadowed": "x"})) for _ in range(4)]
    assert all(a.code is Code.OK for a in answers)
    assert [a.statuses[0].shadow for a in answers] == [False, True, True, True]
    assert stats_of(stats, "shop.shadowed")["shadow_mode"] == 3
    assert stats_of(stats, "shop.shadowed")["over_limit"] == 3
    assert len([r for r in caplog.records if "shadow mode" in r.getMessage()]) == 1  # sampled
    clock.now += 2
    await service.should_rate_limit(req({"shadowed": "x"}))
    assert len([r for r in caplog.records if "shadow mode" in r.getMessage()]) == 2


async def test_shadow_mode_global_never_refuses_and_never_blocks_others() -> None:
    service, _, _, stats = make(shadow_mode_global=True)
    for _ in range(5):
        answer = await service.should_rate_limit(req(SLOW, {"strict": "s"}))
        assert answer.code is Code.OK
    assert answer.statuses[0].shadow
    assert stats_of(stats, "shop.generic_key_slow")["shadow_mode"] == 2


async def test_quota_mode_reports_over_but_never_refuses_the_request() -> None:
    service, _, _, _ = make()
    await service.should_rate_limit(req({"quota": "q"}))
    answer = await service.should_rate_limit(req({"quota": "q"}, SLOW))
    assert answer.code is Code.OK
    assert answer.statuses[0].code is Code.OVER_LIMIT
    assert answer.statuses[1].remaining == 2  # the quota hit did not block (nor refuse) the other one
    assert (await service.should_rate_limit(req(SLOW))).statuses[0].remaining == 1


async def test_count_blocked_false_consumes_nothing_when_refused() -> None:
    service, _, _, _ = make()
    for _ in range(3):
        await service.should_rate_limit(req(SLOW))  # exhausted (and cached locally)
    for _ in range(3):
        answer = await service.should_rate_limit(req({"strict": "s"}, SLOW))
        assert answer.code is Code.OVER_LIMIT
    alone = await service.should_rate_limit(req({"strict": "s"}))
    assert alone.code is Code.OK
    assert alone.statuses[0].remaining == 1  # none of the refused requests consumed it


async def test_on_backend_error_allow_deny_and_unavailable() -> None:
    service, backend, _, stats = make(headers="both")
    backend.fail = True
    with pytest.raises(BackendUnavailable):
        await service.should_rate_limit(req(SLOW))
    allowed = await service.should_rate_limit(req({"k": "1"}, {"none": "x"}, domain="open"))
    assert allowed.code is Code.OK
    assert [s.code for s in allowed.statuses] == [Code.OK, Code.OK]
    assert allowed.response_headers == ()
    denied = await service.should_rate_limit(req({"k": "1"}, {"s": "1"}, {"none": "x"}, domain="closed"))
    assert denied.code is Code.OVER_LIMIT
    assert [s.code for s in denied.statuses] == [Code.OVER_LIMIT, Code.OK, Code.OK]
    assert denied.response_headers == (("Retry-After", "1"),)
    assert not [s for s in stats.series() if s.domain in ("open", "closed") and s.total_hits]
    backend.fail = False
    backend.broken = True  # any backend bug is an outage too
    with pytest.raises(BackendUnavailable):
        await service.should_rate_limit(req(SLOW))
    backend.broken = False
    backend.short = True
    with pytest.raises(BackendUnavailable):
        await service.should_rate_limit(req(SLOW))


async def test_local_cache_skips_the_backend_until_the_window_ends() -> None:
    service, backend, clock, _ = make()
    for _ in range(3):
        await service.should_rate_limit(req(SLOW))
    calls = len(backend.calls)
    clock.now += 10
    over = await service.should_rate_limit(req(SLOW))
    assert over.code is Code.OVER_LIMIT
    assert over.statuses[0].reset_s == pytest.approx(50.0)
    assert len(backend.calls) == calls  # answered locally
    # A request with the cached key and another descriptor: only the other goes to the backend.
    await service.should_rate_limit(req(SLOW, {"user": "u"}))
    assert [hit.limit.name for hit in backend.calls[-1]] == ["per_user"]
    # count_blocked: false on the other descriptor: the backend must see the whole request.
    await service.should_rate_limit(req(SLOW, {"strict": "s"}))
    assert len(backend.calls[-1]) == 2
    clock.now += 50  # the window ended: the backend decides again
    fresh = await service.should_rate_limit(req(SLOW))
    assert fresh.code is Code.OK
    assert backend.calls[-1][0].limit.name == "slow"


async def test_local_cache_never_holds_sliding_windows_or_shadow_hits() -> None:
    service, backend, _, _ = make()
    for _ in range(3):
        await service.should_rate_limit(req({"sliding": "s"}, {"shadowed": "x"}))
    assert service.local_cache is not None
    assert len(service.local_cache) == 0
    assert len(backend.calls) == 3
    off, off_backend, _, _ = make(use_local_cache=False)
    for _ in range(5):
        await off.should_rate_limit(req(SLOW))
    assert len(off_backend.calls) == 5
    assert off.local_cache is None


async def test_local_cache_is_bounded() -> None:
    cache = OverLimitCache(max_entries=2)
    cache.put("a", 10.0, 0.0)
    cache.put("b", 5.0, 0.0)
    cache.put("c", 10.0, 6.0)  # full: "b" expired and is purged, room for "c"
    assert cache.get("c", 6.0) == 10.0 and cache.get("a", 6.0) == 10.0
    assert cache.get("a", 10.0) is None  # expired at its window's end
    cache.clear()
    assert len(cache) == 0


async def test_local_cache_full_of_long_windows_keeps_learning_without_a_purge_per_put() -> None:
    """Filled with year-long keys (anyone can send overrides of 0 per year), it drops its oldest eighth and goes on
    caching; the next puts fit without another purge."""
    cache = OverLimitCache(max_entries=16)
    for i in range(16):
        cache.put(f"k{i}", 1e9, 0.0)
    cache.put("fresh", 1e9, 0.0)
    assert cache.get("fresh", 1.0) == 1e9
    assert cache.get("k0", 1.0) is None and cache.get("k1", 1.0) is None and cache.get("k2", 1.0) == 1e9
    assert len(cache) == 15  # 16 - 2 + 1: room for one more before the next purge
    cache.put("next", 1e9, 0.0)
    assert len(cache) == 16 and cache.get("k2", 1.0) == 1e9


async def test_headers_draft_classic_both_and_retry_after() -> None:
    service, _, _, _ = make(headers="both")
    answer = await service.should_rate_limit(req(SLOW, {"api": "k"}, {"none": "x"}))
    headers = dict(answer.response_headers)
    assert headers["RateLimit-Policy"] == '"slow";q=3;w=60, "burst";q=5;w=1'
    assert headers["RateLimit"] == '"slow";r=2;t=60, "burst";r=4;t=1'
    assert headers["X-RateLimit-Limit"] == '3, 3;w=60;name="slow", 5;w=1;name="burst"'
    assert headers["X-RateLimit-Remaining"] == "2"
    assert headers["X-RateLimit-Reset"] == "60"
    assert "Retry-After" not in headers
    for _ in range(2):
        await service.should_rate_limit(req(SLOW))
    over = dict((await service.should_rate_limit(req(SLOW))).response_headers)
    assert over["Retry-After"] == "60"
    assert over["RateLimit"] == '"slow";r=0;t=60'
    draft, _, _, _ = make(headers="draft")
    only = dict((await draft.should_rate_limit(req(SLOW))).response_headers)
    assert set(only) == {"RateLimit-Policy", "RateLimit"}
    none = await draft.should_rate_limit(req({"none": "x"}))
    assert none.response_headers == ()


async def test_detailed_metric_labels_carry_values_and_stay_bounded() -> None:
    config = load()
    stats = RuleStatsCollector(max_detailed=2)
    service = RateLimitService(lambda: config, Recording(real_backend()), clock=Clock(), stats=stats)
    for value in ("a", "b", "c", "d"):
        await service.should_rate_limit(req({"detailed": value}))
    rules = sorted(s.rule for s in stats.series() if s.rule.startswith("shop.detailed"))
    assert rules == ["shop.detailed", "shop.detailed_a", "shop.detailed_b"]
    assert stats_of(stats, "shop.detailed")["total_hits"] == 2


async def test_service_metrics_count_answers_backend_calls_errors_and_local_hits() -> None:
    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    backend_label = {"backend": "unit-metrics"}
    service, backend, clock, _ = make(backend_name="unit-metrics")
    before = {
        "requests": sample("meshgate_ratelimit_request_duration_seconds_count"),
        "ok": sample("meshgate_ratelimit_requests_total", {"result": "ok"}),
        "over": sample("meshgate_ratelimit_requests_total", {"result": "over_limit"}),
        "error": sample("meshgate_ratelimit_requests_total", {"result": "backend_error"}),
        "local": sample("meshgate_ratelimit_local_cache_hits_total"),
        "backend": sample("meshgate_ratelimit_backend_duration_seconds_count", backend_label),
        "backend_errors": sample("meshgate_ratelimit_backend_errors_total", backend_label),
    }
    for _ in range(3):  # slow allows 3 per minute; the third leaves none, so the key is known to be over
        await service.should_rate_limit(req(SLOW))
    for _ in range(2):  # answered from the local over-limit cache, no backend call
        clock.now += 1
        await service.should_rate_limit(req(SLOW))
    backend.fail = True
    with pytest.raises(BackendUnavailable):
        await service.should_rate_limit(req({"user": "u"}))
    assert sample("meshgate_ratelimit_request_duration_seconds_count") == before["requests"] + 6
    assert sample("meshgate_ratelimit_requests_total", {"result": "ok"}) == before["ok"] + 3
    assert sample("meshgate_ratelimit_requests_total", {"result": "over_limit"}) == before["over"] + 2
    assert sample("meshgate_ratelimit_requests_total", {"result": "backend_error"}) == before["error"] + 1
    assert sample("meshgate_ratelimit_local_cache_hits_total") == before["local"] + 2
    assert sample("meshgate_ratelimit_backend_duration_seconds_count", backend_label) == before["backend"] + 4
    assert sample("meshgate_ratelimit_backend_errors_total", backend_label) == before["backend_errors"] + 1


def test_metrics_collect_exposes_envoyproxy_names() -> None:
    stats = RuleStatsCollector()
    rule = Rule(path="shop.k", limits=(Limit(1, Unit.SECOND),))
    one = stats.for_rule("shop", rule, (Entry("k", "v"),))
    assert stats.for_rule("shop", rule, (Entry("k", "w"),)) is one  # cached per rule
    one.total_hits += 3
    families = {family.name: family for family in stats.collect()}
    assert set(families) == {metrics.METRIC_PREFIX + name for name, _ in metrics.PER_RULE_METRICS}
    (sample,) = families["ratelimit_service_rate_limit_total_hits"].samples
    assert sample.labels == {"domain": "shop", "rule": "shop.k"}
    assert sample.value == 3


def test_rejects_a_bad_near_limit_ratio() -> None:
    with pytest.raises(ValueError, match="near_limit_ratio"):
        make(near_limit_ratio=0)


async def test_plan_is_reused_per_request_object_and_config() -> None:
    config = parse_config(CONFIG_FOR_PLANS)
    current = {"config": config}
    service = RateLimitService(lambda: current["config"], MemoryBackend(), clock=lambda: 1000.0)
    request = RateLimitRequest("shop", (Descriptor((Entry("user", "a"),)),))
    await service.should_rate_limit(request)
    plan = service._plans[id(request)]
    await service.should_rate_limit(request)
    assert service._plans[id(request)] is plan
    current["config"] = parse_config(CONFIG_FOR_PLANS)  # a reload: plans are rebuilt against the new config
    await service.should_rate_limit(request)
    assert service._plans[id(request)] is not plan
    equal = RateLimitRequest("shop", (Descriptor((Entry("user", "a"),)),))
    answer = await service.should_rate_limit(equal)
    assert answer.statuses[0].remaining == 1  # one counter whatever the object: 5 per minute, 4th hit


CONFIG_FOR_PLANS = """\
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5}
"""


README_EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "ratelimit" / "readme"


@pytest.mark.parametrize(
    ("example", "descriptors", "requests", "first_refused"),
    [
        # Example 1: 500 per second per database.
        ("example1", [{"database": "users"}], 501, 501),
        # Example 2: marketing messages to one number, 5 per day; a number alone, 100 per day.
        ("example2", [{"message_type": "marketing", "to_number": "2061111111"}], 6, 6),
        ("example2", [{"to_number": "2061111111"}], 101, 101),
        # Example 3: a blocked address (0 per second) is refused at once; another gets 10 per second.
        ("example3", [{"remote_address": "50.0.0.5"}], 1, 1),
        ("example3", [{"remote_address": "50.0.0.1"}], 11, 11),
        # Example 5: unlimited is never refused; a limited sibling is.
        ("example5", [{"ldap": "any"}], 300, None),
        ("example5", [{"azure": "any"}], 101, 101),
        # Example 6: user-a is in shadow mode (never refused), user-b is enforced.
        ("example6", [{"service": "auth-service", "user": "user-a"}], 15, None),
        ("example6", [{"service": "auth-service", "user": "user-b"}], 21, 21),
        # Example 7: the 10/s limit replaces specific_limit (5/s) when both descriptors come in one request.
        ("example7", [{"key_1": "value_1", "user": "bkthomps"}], 6, 6),
        ("example7", [{"key_1": "value_1", "user": "bkthomps"}, {"key_2": "value_2", "user": "bkthomps"}], 11, 11),
        # Example 9: value* matches by prefix, 20 per minute.
        ("example9", [{"key1": "value42"}], 21, 21),
    ],
)
async def test_envoyproxy_readme_examples_behave_as_documented(
    example: str, descriptors: list[dict[str, str]], requests: int, first_refused: int | None
) -> None:
    config = load_config(README_EXAMPLES / f"{example}.yaml")
    (domain,) = config.domains
    service = RateLimitService(lambda: config, MemoryBackend(), clock=Clock(), stats=RuleStatsCollector())
    codes = [(await service.should_rate_limit(req(*descriptors, domain=domain))).code for _ in range(requests)]
    refused = [number for number, code in enumerate(codes, 1) if code is Code.OVER_LIMIT]
    assert (refused[0] if refused else None) == first_refused
    assert refused == ([] if first_refused is None else list(range(first_refused, requests + 1)))
