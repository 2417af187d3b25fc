"""Prometheus metrics of the rate-limit service.

The per-rule counters keep envoyproxy/ratelimit's exposed names (``ratelimit_service_rate_limit_total_hits`` ...),
because that is what existing dashboards query. prometheus_client would expose a Counter as ``<name>_total``, so
these come from a small collector over plain integers instead (exposed as untyped samples with the exact names;
``rate()`` works on them as on counters). That is also the cheapest request path: one dict lookup per rule resolves
its ``RuleStats`` (cached), then plain ``+=`` (everything runs on the event loop's thread).

Labels are ``domain`` and ``rule`` (the config path, e.g. ``shop.generic_key_slowpath``), both bounded by the
config. Raw descriptor values appear only for rules with ``detailed_metric`` (or ``value_to_metric``), and even
then at most ``MAX_DETAILED_SERIES`` distinct series per process; beyond that the rule's plain series is used.
Everything else is a regular ``meshgate_ratelimit_*`` metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from meshgate.fastmetrics import Counter, Histogram
from ratelimit.config import metric_path
from ratelimit.model import Entry, Rule

log = logging.getLogger(__name__)

MAX_DETAILED_SERIES = 2000
MAX_LABEL_CHARS = 256  # a label with request values is cut here

PER_RULE_METRICS: tuple[tuple[str, str], ...] = (
    ("total_hits", "Hits (request cost) counted against the rule"),
    ("over_limit", "Hits over the limit (shadow mode included)"),
    ("near_limit", "Hits past near_limit_ratio of the limit but within it"),
    ("within_limit", "Hits within the limit"),
    ("shadow_mode", "Hits over the limit that shadow mode let through"),
    ("over_limit_with_local_cache", "Over-limit hits answered by the local over-limit cache, without the backend"),
)
METRIC_PREFIX = "ratelimit_service_rate_limit_"


class RuleStats:
    """The counters of one (domain, rule) series; incremented in place on the request path."""

    __slots__ = (
        "domain",
        "near_limit",
        "over_limit",
        "over_limit_with_local_cache",
        "rule",
        "shadow_gate",
        "shadow_mode",
        "total_hits",
        "within_limit",
    )

    def __init__(self, domain: str, rule: str, shadow_gate: list[float] | None = None) -> None:
        self.domain = domain
        self.rule = rule
        self.total_hits = 0
        self.over_limit = 0
        self.near_limit = 0
        self.within_limit = 0
        self.shadow_mode = 0
        self.over_limit_with_local_cache = 0
        # When the rule last logged a shadow-mode refusal: one cell per configured rule, shared by its detailed
        # series, so that a client sending ever new values cannot multiply the log lines.
        self.shadow_gate = shadow_gate if shadow_gate is not None else [float("-inf")]


def wants_values(rule: Rule) -> bool:
    """Does the rule's metric key carry request values (``detailed_metric`` or ``value_to_metric``)?"""
    return rule.detailed_metric or bool(getattr(rule, "value_levels", ()))


def detailed_rule_label(domain: str, rule: Rule, entries: Sequence[Entry]) -> str:
    """envoyproxy's metric key with request values (``shop.generic_key_x``), cut to ``MAX_LABEL_CHARS``."""
    return metric_path(domain, entries, rule)[:MAX_LABEL_CHARS]


class RuleStatsCollector(Collector):
    """Holds every RuleStats; ``for_rule`` is the cached lookup used per descriptor."""

    def __init__(self, max_detailed: int = MAX_DETAILED_SERIES) -> None:
        self._plain: dict[tuple[str, str], RuleStats] = {}
        self._detailed: dict[tuple[str, str], RuleStats] = {}
        self._gates: dict[tuple[str, str], list[float]] = {}  # per (domain, rule path): see RuleStats.shadow_gate
        self._max_detailed = max_detailed
        self._detailed_full_logged = False

    def for_rule(self, domain: str, rule: Rule, entries: Sequence[Entry]) -> RuleStats:
        if wants_values(rule):
            label = detailed_rule_label(domain, rule, entries)
            key = (domain, label)
            stats = self._detailed.get(key)
            if stats is not None:
                return stats
            if len(self._detailed) < self._max_detailed:
                gate = self._gates.setdefault((domain, rule.path), [float("-inf")])
                stats = self._detailed[key] = RuleStats(domain, label, gate)
                return stats
            if not self._detailed_full_logged:
                self._detailed_full_logged = True
                log.warning("detailed_metric series limit reached; further values are counted under their rule")
        key = (domain, rule.path)
        stats = self._plain.get(key)
        if stats is None:
            stats = self._plain[key] = RuleStats(domain, rule.path, self._gates.setdefault(key, [float("-inf")]))
        return stats

    def series(self) -> list[RuleStats]:
        return [*self._plain.values(), *self._detailed.values()]

    def collect(self) -> Iterator[Metric]:
        every = self.series()
        for field, documentation in PER_RULE_METRICS:
            name = METRIC_PREFIX + field
            metric = Metric(name, documentation, "unknown")
            for stats in every:
                metric.add_sample(name, {"domain": stats.domain, "rule": stats.rule}, float(getattr(stats, field)))
            yield metric


LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

RULE_STATS = RuleStatsCollector()
REGISTRY.register(RULE_STATS)

REQUEST_SECONDS = Histogram(
    "meshgate_ratelimit_request_duration_seconds",
    "Time to answer one ShouldRateLimit (config lookup, backend round trip, statuses)",
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "meshgate_ratelimit_requests_total",
    "ShouldRateLimit answers by result (ok, over_limit, backend_error)",
    ["result"],
)
BACKEND_SECONDS = Histogram(
    "meshgate_ratelimit_backend_duration_seconds",
    "Time of one backend call (all hits of a request)",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)
BACKEND_ERRORS = Counter(
    "meshgate_ratelimit_backend_errors_total",
    "Backend calls that failed or missed their deadline",
    ["backend"],
)
LOCAL_CACHE_HITS = Counter(
    "meshgate_ratelimit_local_cache_hits_total",
    "Hits answered OVER_LIMIT from the local over-limit cache (no backend call for them)",
)
BACKEND_UP = Gauge("meshgate_ratelimit_backend_up", "1 when the last backend ping succeeded", ["backend"])
CONFIG_DOMAINS = Gauge("meshgate_ratelimit_config_domains", "Domains in the config currently served")
for _result in ("ok", "over_limit", "backend_error"):
    REQUESTS.labels(_result)
