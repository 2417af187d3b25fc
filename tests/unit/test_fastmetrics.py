"""meshgate.fastmetrics exposes what prometheus_client's own Counter and Histogram would, given the same calls."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshgate import fastmetrics

BUCKETS = (0.00001, 0.000025, 0.0001, 0.001, 0.1)
VALUES = (0.000001, 0.00001, 0.0000100001, 0.00003, 0.0001, 0.5, 3.0, 0.000025)


def _exposition(registry: CollectorRegistry) -> list[str]:
    """The scrape text without prometheus_client's optional ``_created`` samples (and their TYPE/HELP lines)."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(line for line in lines if "_created" not in line)


def test_counter_matches_prometheus_client() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = fastmetrics.Counter("demo_decisions", "Decisions", ("result", "reason"), registry=ours_registry)
    theirs = prometheus_client.Counter("demo_decisions", "Decisions", ("result", "reason"), registry=theirs_registry)
    for result, reason, amount in (("allow", "ok", 1), ("deny", "no_rule", 2), ("allow", "ok", 3.5)):
        ours.labels(result, reason).inc(amount)
        theirs.labels(result, reason).inc(amount)
    assert _exposition(ours_registry) == _exposition(theirs_registry)
    assert ours_registry.get_sample_value("demo_decisions_total", {"result": "allow", "reason": "ok"}) == 4.5


def test_unlabelled_counter_and_total_suffix() -> None:
    registry = CollectorRegistry()
    counter = fastmetrics.Counter("demo_hits_total", "Hits", registry=registry)
    counter.inc()
    counter.inc(2)
    assert registry.get_sample_value("demo_hits_total") == 3
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1)


@pytest.mark.parametrize("labelled", [False, True])
def test_histogram_matches_prometheus_client(labelled: bool) -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    names = ("backend",) if labelled else ()
    ours = fastmetrics.Histogram("demo_seconds", "Latency", names, buckets=BUCKETS, registry=ours_registry)
    theirs = prometheus_client.Histogram("demo_seconds", "Latency", names, buckets=BUCKETS, registry=theirs_registry)
    for value in VALUES:  # on, below, just above and past the bounds
        if labelled:
            ours.labels("redis").observe(value)
            theirs.labels("redis").observe(value)
        else:
            ours.observe(value)
            theirs.observe(value)
    assert _exposition(ours_registry) == _exposition(theirs_registry)


def test_wrong_label_count_and_bad_buckets_are_refused() -> None:
    registry = CollectorRegistry()
    counter = fastmetrics.Counter("demo_x", "X", ("a", "b"), registry=registry)
    with pytest.raises(ValueError, match="expected 2 label values"):
        counter.labels("only-one")
    with pytest.raises(ValueError, match="distinct"):
        fastmetrics.Histogram("demo_y", "Y", buckets=(0.1, 0.1), registry=registry)
    with pytest.raises(ValueError, match="distinct"):
        fastmetrics.Histogram("demo_z", "Z", buckets=(), registry=registry)


def test_a_family_registers_once_and_describes_itself() -> None:
    registry = CollectorRegistry()
    fastmetrics.Histogram("demo_seconds", "Latency", buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        fastmetrics.Histogram("demo_seconds", "Latency", buckets=BUCKETS, registry=registry)
