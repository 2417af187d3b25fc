"""Audit log and decision metrics: the pipeline's ``DecisionObserver``.

Every deny is logged; allows are sampled (``allow_sample_rate``) so the hot path stays free of logging. Only
request-shape facts are written: never tokens, keys, cookies or query strings (``CheckInput.path`` has no query).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from extauthz.config import AuditSettings
from extauthz.model import CheckInput, Decision, IdentityKind
from meshgate.fastmetrics import Counter, CounterCell, Histogram
from meshgate.log import get_audit_logger

DECISIONS = Counter(
    "meshgate_extauthz_decisions",
    "Authorization decisions by result and reason code",
    ("result", "reason"),
)
CHECK_DURATION = Histogram(
    "meshgate_extauthz_check_duration_seconds",
    "Time to decide one check (identity, policy, response), excluding the transport",
    buckets=(
        0.00001,
        0.000025,
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
    ),
)

ALLOW_COUNTERS_SIZE = 1024  # allow decisions whose counter series is kept at hand (cleared when full)

_audit = get_audit_logger()


def _subject(decision: Decision) -> tuple[str, str]:
    identity = decision.identity
    if identity is None:
        return "", ""
    if identity.kind is IdentityKind.API_KEY:
        return identity.kind.value, identity.client or identity.subject
    if identity.kind is IdentityKind.SPIFFE:
        return identity.kind.value, identity.principal or identity.subject
    return identity.kind.value, identity.subject


def audit_entry(inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> dict[str, Any]:
    """The audit record's fields (the logger adds ``time``); ``request_id`` overrides ``inp``'s."""
    kind, subject = _subject(decision)
    return {
        "request_id": inp.request_id if request_id is None else request_id,
        "identity_kind": kind,
        "subject": subject,
        "method": inp.method,
        "host": inp.host,
        "path": inp.path,
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason.value,
        "rule": decision.rule,
        "latency_us": round(elapsed_s * 1_000_000),
    }


class AuditObserver:
    def __init__(self, settings: AuditSettings, rng: Callable[[], float] = random.random) -> None:
        self._sample_rate = settings.allow_sample_rate
        self._rng = rng
        self._duration = CHECK_DURATION.labels()
        # The decisions counter's series per (result, reason), and per allow decision object (the pipeline reuses
        # those; keyed by id, checked by ``is``): a repeated allow then touches one cell and nothing else.
        self._counters: dict[tuple[bool, str], CounterCell] = {}
        self._allow_counters: dict[int, tuple[Decision, CounterCell]] = {}

    def _counter(self, decision: Decision) -> CounterCell:
        key = (decision.allowed, decision.reason.value)
        cell = self._counters.get(key)
        if cell is None:
            cell = self._counters[key] = DECISIONS.labels("allow" if decision.allowed else "deny", key[1])
        if decision.allowed:
            if len(self._allow_counters) >= ALLOW_COUNTERS_SIZE:
                self._allow_counters.clear()
            self._allow_counters[id(decision)] = (decision, cell)
        return cell

    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None:
        known = self._allow_counters.get(id(decision))
        (known[1] if known is not None and known[0] is decision else self._counter(decision)).inc()
        self._duration.observe(elapsed_s)
        if decision.allowed and (self._sample_rate <= 0 or self._rng() >= self._sample_rate):
            return
        _audit.info("decision", extra=audit_entry(inp, decision, elapsed_s, request_id))
