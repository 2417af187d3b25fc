"""The rate-limit decision: descriptors -> rules -> ONE backend call -> statuses, overall code and headers.

Plain Python; knows nothing of protobuf (``server.py`` translates). Semantics follow envoyproxy/ratelimit:

- each descriptor is looked up in the config (``lookup(domain, entries)``); no rule means OK without a limit;
- a descriptor's ``limit_override`` (Envoy's per-descriptor ``limit``) replaces the rule's limits, even when no rule
  matched, and is never in shadow mode (as envoyproxy does);
- ``replaces``: a limit named by any matched rule's ``replaces`` is dropped from the request (unlimited rules may
  replace too, which is how "premium: unlimited" overrides a generic per-client limit);
- cost is the descriptor's ``hits_addend`` when set (0 = only look), else the request's;
- every remaining limit becomes one ``Hit``; all hits of the request go to the backend in ONE call;
- a descriptor with several limits reports the decisive one: an over limit if any, else the least remaining;
- shadow mode (per rule or global) never answers OVER_LIMIT, but the would-be refusal is counted and logged
  (at most one line per configured rule per ``shadow_log_interval_s``, whatever values its detailed series see);
- ``quota_mode`` (envoyproxy's soft limit): the descriptor's status says OVER_LIMIT, but it never makes the overall
  code OVER_LIMIT and never blocks the request's other hits;
- ``BackendUnavailable``: the domain's ``on_backend_error`` answers (``allow``: all OK; ``deny``: every limited
  descriptor OVER_LIMIT), or, when unset, the exception propagates so the server answers gRPC UNAVAILABLE and
  Envoy's ``failure_mode_deny`` decides.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ratelimit import headers as rl_headers
from ratelimit import metrics
from ratelimit.backends.base import BackendUnavailable, CounterBackend, Hit, Outcome
from ratelimit.headers import HeaderMode
from ratelimit.keys import counter_key
from ratelimit.metrics import RuleStats, RuleStatsCollector
from ratelimit.model import (
    Algorithm,
    Code,
    Descriptor,
    DescriptorStatus,
    Entry,
    Limit,
    RateLimitRequest,
    RateLimitResponse,
    Rule,
)

log = logging.getLogger(__name__)

_NO_LIMIT = DescriptorStatus(Code.OK)
_OK_COUNT = metrics.REQUESTS.labels("ok")
_OVER_COUNT = metrics.REQUESTS.labels("over_limit")
_ERROR_COUNT = metrics.REQUESTS.labels("backend_error")


class DomainPolicy(Protocol):
    @property
    def on_backend_error(self) -> str | None: ...


class ConfigView(Protocol):
    """What the service needs of ``ratelimit.config.RateLimitConfig``."""

    @property
    def domains(self) -> Mapping[str, DomainPolicy]: ...

    def lookup(self, domain: str, entries: Sequence[Entry]) -> Rule | None: ...


class OverLimitCache:
    """Fixed-window counter keys known to be exhausted, until their window ends.

    Why this is safe for fixed windows only: within one epoch-aligned window a fixed-window count never goes
    down (replicas sharing the store only add to it), so once the stored count reached the limit, every later
    hit with cost >= 1 in that window is over, whatever it would do to the store. A sliding window decays and a
    token bucket refills continuously, so "over" there is not stable until a known instant; they are never cached.
    Keys embed the limit (``Limit.ident``), so a reload that changes a limit uses fresh keys.
    Bounded: when full, expired entries are purged and, if that frees less than an eighth, the oldest eighth goes
    too (so a cache full of long windows costs one purge per eighth of puts, not one per put, and keeps learning).
    """

    def __init__(self, max_entries: int = 65_536) -> None:
        self._until: dict[str, float] = {}
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._until)

    def get(self, key: str, now: float) -> float | None:
        """The window's end when ``key`` is known exhausted at ``now``, else None."""
        until = self._until.get(key)
        if until is None:
            return None
        if until <= now:
            del self._until[key]
            return None
        return until

    def put(self, key: str, until: float, now: float) -> None:
        if len(self._until) >= self._max and key not in self._until:
            live = [(k, v) for k, v in self._until.items() if v > now]
            keep = min(len(live), self._max - max(1, self._max // 8))
            self._until = dict(live[len(live) - keep :])  # insertion order: the oldest go first
        self._until[key] = until

    def clear(self) -> None:
        self._until.clear()


PLAN_CACHE_SIZE = 4096
OVERRIDE_RULE = "<override>"  # the rule label of a limit override that matched no rule
UNKNOWN_DOMAIN = "<unknown>"  # the domain label of a domain the config does not have


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything about a request that depends only on it and the config: built once per (request, config)."""

    request: RateLimitRequest
    config: ConfigView
    hits: tuple[Hit, ...]
    owners: tuple[int, ...]  # descriptor index of each hit
    costs: tuple[int, ...]
    shadows: tuple[bool, ...]
    quota: tuple[bool, ...]
    rule_stats: tuple[RuleStats | None, ...]
    no_limit: RateLimitResponse


def _cacheable(hit: Hit) -> bool:
    return hit.limit.algorithm is Algorithm.FIXED_WINDOW and not hit.shadow


class RateLimitService:
    def __init__(
        self,
        get_config: Callable[[], ConfigView],
        backend: CounterBackend,
        *,
        clock: Callable[[], float] = time.time,
        shadow_mode_global: bool = False,
        near_limit_ratio: float = 0.8,
        headers: HeaderMode = "off",
        key_prefix: str = "mg",
        local_cache: OverLimitCache | None = None,
        use_local_cache: bool = True,
        backend_name: str = "memory",
        stats: RuleStatsCollector | None = None,
        shadow_log_interval_s: float = 1.0,
    ) -> None:
        if not 0.0 < near_limit_ratio <= 1.0:
            raise ValueError("near_limit_ratio must be in (0, 1]")
        self._get_config = get_config
        self.backend = backend
        self._clock = clock
        self.shadow_mode_global = shadow_mode_global
        self._near_ratio = near_limit_ratio
        self.headers: HeaderMode = headers
        self._prefix = key_prefix
        self.local_cache: OverLimitCache | None = (local_cache or OverLimitCache()) if use_local_cache else None
        self._stats = stats if stats is not None else metrics.RULE_STATS
        self._shadow_log_interval_s = shadow_log_interval_s
        self._plans: dict[int, _Plan] = {}
        self._backend_seconds = metrics.BACKEND_SECONDS.labels(backend_name)
        self._backend_errors = metrics.BACKEND_ERRORS.labels(backend_name)

    async def should_rate_limit(self, request: RateLimitRequest) -> RateLimitResponse:
        started = time.perf_counter()
        try:
            response = await self._decide(request)
        except BackendUnavailable:
            _ERROR_COUNT.inc()
            raise
        finally:
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        (_OVER_COUNT if response.code is Code.OVER_LIMIT else _OK_COUNT).inc()
        return response

    # -- the decision ----------------------------------------------------------------------------------------
    async def _decide(self, request: RateLimitRequest) -> RateLimitResponse:
        config = self._get_config()
        plan = self._plan_for(config, request)
        if not plan.hits:
            return plan.no_limit
        hits = plan.hits
        now = self._clock()
        cached = self._from_cache(hits, now)
        degraded: str | None = None
        try:
            outcomes = await self._call_backend(hits, cached, now)
        except BackendUnavailable:
            domain_config = config.domains.get(request.domain)
            degraded = domain_config.on_backend_error if domain_config is not None else None
            if degraded not in ("allow", "deny"):
                raise
            outcomes = [Outcome(over=degraded == "deny", remaining=0, reset_s=0.0) for _ in hits]
        else:
            self._remember_exhausted(hits, outcomes, cached, now)

        return self._answer(plan, outcomes, cached, now, degraded=degraded is not None)

    def _plan_for(self, config: ConfigView, request: RateLimitRequest) -> _Plan:
        """The request's hits, reused while the same request object meets the same config.

        The gRPC adapter hands out one model object per distinct request (it caches parsed requests by their
        bytes), so for the repeated descriptors of real traffic lookups, keys and hits are built once.
        """
        plan = self._plans.get(id(request))
        if plan is not None and plan.request is request and plan.config is config:
            return plan
        plan = self._plan(config, request)
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[id(request)] = plan
        return plan

    def _plan(self, config: ConfigView, request: RateLimitRequest) -> _Plan:
        domain = request.domain
        descriptors = request.descriptors
        rules = [self._rule_for(config, domain, descriptor) for descriptor in descriptors]
        replacing: set[str] = set()
        for rule in rules:
            if rule is not None and rule.replaces:
                replacing.update(rule.replaces)

        hits: list[Hit] = []
        owners: list[int] = []  # descriptor index of each hit
        costs: list[int] = [0] * len(descriptors)
        rule_stats: list[RuleStats | None] = [None] * len(descriptors)
        shadows: list[bool] = [False] * len(descriptors)
        quota: list[bool] = [False] * len(descriptors)
        shadow_global = self.shadow_mode_global
        # Metric labels: a domain the config does not know is the client's to choose, so it is not a label.
        stats_domain = domain if domain in config.domains else UNKNOWN_DOMAIN
        for index, (descriptor, rule) in enumerate(zip(descriptors, rules, strict=True)):
            if rule is None or rule.unlimited:
                continue
            limits = rule.limits
            if replacing:
                limits = tuple(limit for limit in limits if not (limit.name and limit.name in replacing))
            if not limits:
                continue
            cost = descriptor.hits_addend if descriptor.hits_addend is not None else request.hits_addend
            costs[index] = cost
            shadow = shadows[index] = shadow_global or rule.shadow_mode
            quota[index] = rule.quota_mode
            rule_stats[index] = self._stats.for_rule(stats_domain, rule, descriptor.entries)
            for limit in limits:
                key = counter_key(domain, descriptor.entries, rule, limit, self._prefix)
                # A quota-mode limit never refuses, so like a shadow hit it must not block the others.
                hits.append(Hit(key, limit, cost, rule.count_blocked, shadow or rule.quota_mode))
                owners.append(index)
        return _Plan(
            request=request,
            config=config,
            hits=tuple(hits),
            owners=tuple(owners),
            costs=tuple(costs),
            shadows=tuple(shadows),
            quota=tuple(quota),
            rule_stats=tuple(rule_stats),
            no_limit=RateLimitResponse(Code.OK, tuple(_NO_LIMIT for _ in descriptors)),
        )

    def _rule_for(self, config: ConfigView, domain: str, descriptor: Descriptor) -> Rule | None:
        rule = config.lookup(domain, descriptor.entries)
        override = descriptor.limit_override
        if override is None:
            return rule
        # envoyproxy: an override applies even without a matching rule, and never in shadow mode. Its metric
        # series is one per domain: the keys are the client's to choose (and so, see _plan, is an unknown domain).
        if rule is None:
            return Rule(path=OVERRIDE_RULE, limits=(override,))
        # A plain Rule, not a copy of the ConfigRule: its ``shared`` must not apply (envoyproxy's GetLimit returns
        # the override before walking the tree, so share_threshold never reaches it and each value counts alone),
        # and its precomputed idents would name the rule's limit, not the override's.
        return Rule(
            path=rule.path,
            limits=(override,),
            detailed_metric=rule.detailed_metric,
            count_blocked=rule.count_blocked,
            hash_values=rule.hash_values,
            source=rule.source,
        )

    def _from_cache(self, hits: Sequence[Hit], now: float) -> list[Outcome | None] | None:
        """Outcomes known locally (exhausted fixed windows), or None when the backend must see every hit."""
        cache = self.local_cache
        if cache is None or not len(cache):
            return None
        cached: list[Outcome | None] = [None] * len(hits)
        found = False
        for position, hit in enumerate(hits):
            if hit.cost > 0 and _cacheable(hit):
                until = cache.get(hit.key, now)
                if until is not None:
                    left = until - now
                    cached[position] = Outcome(over=True, remaining=0, reset_s=left, retry_after_s=left)
                    found = True
        if not found:
            return None
        # The request is now known blocked, but the backend would not know it: a count_blocked=false hit sent
        # alone would be consumed. Then let the backend see the whole request (its atomic rule decides).
        for position, hit in enumerate(hits):
            if cached[position] is None and hit.cost > 0 and not hit.count_blocked:
                return None
        metrics.LOCAL_CACHE_HITS.inc(sum(1 for outcome in cached if outcome is not None))
        return cached

    async def _call_backend(
        self, hits: Sequence[Hit], cached: Sequence[Outcome | None] | None, now: float
    ) -> list[Outcome]:
        if cached is None:
            send: Sequence[Hit] = hits
        else:
            send = [hit for hit, known in zip(hits, cached, strict=True) if known is None]
        if not send:  # every hit answered by the cache
            return [known for known in cached if known is not None] if cached is not None else []
        started = time.perf_counter()
        try:
            got = await self.backend.hit(send, now)
        except BackendUnavailable:
            self._backend_errors.inc()
            raise
        except Exception as error:  # a backend bug must look like an outage, not crash the call
            self._backend_errors.inc()
            raise BackendUnavailable(f"{type(error).__name__}: {error}") from error
        finally:
            self._backend_seconds.observe(time.perf_counter() - started)
        if len(got) != len(send):
            self._backend_errors.inc()
            raise BackendUnavailable(f"backend answered {len(got)} outcomes for {len(send)} hits")
        if cached is None:
            return got
        merged: list[Outcome] = []
        sent = iter(got)
        for known in cached:
            merged.append(known if known is not None else next(sent))
        return merged

    def _remember_exhausted(
        self, hits: Sequence[Hit], outcomes: Sequence[Outcome], cached: Sequence[Outcome | None] | None, now: float
    ) -> None:
        """Cache fixed-window keys whose stored count has certainly reached the limit (see OverLimitCache)."""
        cache = self.local_cache
        if cache is None:
            return
        blocked = any(outcome.over and not hit.shadow for hit, outcome in zip(hits, outcomes, strict=True))
        for position, (hit, outcome) in enumerate(zip(hits, outcomes, strict=True)):
            if outcome.remaining > 0 or not _cacheable(hit) or outcome.reset_s <= 0:
                continue
            if cached is not None and cached[position] is not None:
                continue
            # The outcome is computed "as if consumed"; it is the stored truth only when it really was consumed
            # (count_blocked, or the request passed) or nothing was to be consumed (cost 0).
            if hit.cost == 0 or hit.count_blocked or not blocked:
                cache.put(hit.key, now + outcome.reset_s, now)

    def _answer(
        self,
        plan: _Plan,
        outcomes: Sequence[Outcome],
        cached: Sequence[Outcome | None] | None,
        now: float,
        *,
        degraded: bool,
    ) -> RateLimitResponse:
        hits, owners, shadows, quota = plan.hits, plan.owners, plan.shadows, plan.quota
        count = len(plan.request.descriptors)
        best: list[tuple[Limit, Outcome, bool] | None] = [None] * count  # decisive (limit, outcome, from cache)
        for position, (hit, outcome) in enumerate(zip(hits, outcomes, strict=True)):
            index = owners[position]
            current = best[index]
            from_cache = cached is not None and cached[position] is not None
            if current is None or _more_restrictive(outcome, current[1]):
                best[index] = (hit.limit, outcome, from_cache)

        statuses: list[DescriptorStatus] = []
        overall = Code.OK
        retry_after_s = 0.0
        for index in range(count):
            decided = best[index]
            if decided is None:
                statuses.append(_NO_LIMIT)
                continue
            limit, outcome, from_cache = decided
            shadow = shadows[index]
            over = outcome.over
            code = Code.OVER_LIMIT if over and not shadow else Code.OK
            if code is Code.OVER_LIMIT and not quota[index]:
                overall = Code.OVER_LIMIT
                retry_after_s = max(retry_after_s, outcome.retry_after_s or outcome.reset_s)
            statuses.append(
                DescriptorStatus(code, limit, max(0, outcome.remaining), max(0.0, outcome.reset_s), over and shadow)
            )
            stats = plan.rule_stats[index]
            if stats is not None and not degraded:
                self._count(stats, limit, outcome, plan.costs[index], shadow=shadow, from_cache=from_cache, now=now)

        if self.headers == "off":
            return RateLimitResponse(overall, tuple(statuses))
        if degraded:
            extra = (rl_headers.retry_after(1.0),) if overall is Code.OVER_LIMIT else ()
            return RateLimitResponse(overall, tuple(statuses), extra)
        return RateLimitResponse(
            overall,
            tuple(statuses),
            rl_headers.response_headers(self.headers, statuses, overall, retry_after_s),
        )

    def _count(
        self, stats: RuleStats, limit: Limit, outcome: Outcome, cost: int, *, shadow: bool, from_cache: bool, now: float
    ) -> None:
        stats.total_hits += cost
        if outcome.over:
            stats.over_limit += cost
            if from_cache:
                stats.over_limit_with_local_cache += cost
            if shadow:
                stats.shadow_mode += cost
                gate = stats.shadow_gate
                if now - gate[0] >= self._shadow_log_interval_s:
                    gate[0] = now
                    log.info(
                        "shadow mode: over the limit, allowed",
                        extra={"domain": stats.domain, "rule": stats.rule, "limit": rl_headers.policy_name(limit)},
                    )
            return
        stats.within_limit += cost
        # envoyproxy: hits past floor(limit * ratio) count as near the limit.
        threshold = math.floor(limit.requests_per_unit * self._near_ratio)
        used = limit.requests_per_unit - outcome.remaining
        if used > threshold:
            stats.near_limit += min(used - threshold, cost)


def _more_restrictive(candidate: Outcome, current: Outcome) -> bool:
    if candidate.over != current.over:
        return candidate.over
    if candidate.remaining != current.remaining:
        return candidate.remaining < current.remaining
    return candidate.reset_s > current.reset_s
