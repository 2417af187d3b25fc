"""Audit lines and decision metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from extauthz.audit import AuditObserver, audit_entry
from extauthz.config import AuditSettings
from extauthz.model import CheckInput, Decision, Identity, IdentityKind, Reason
from meshgate.log import AUDIT_LOGGER, JsonFormatter

INPUT = CheckInput(
    method="GET",
    host="api.example",
    path="/orders",
    query="access_token=SECRET",
    headers={"authorization": "Bearer SECRET", "cookie": "sid=SECRET", "x-api-key": "SECRET"},
    request_id="r-1",
)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def audit() -> Iterator[Capture]:
    capture = Capture()
    logger = logging.getLogger(AUDIT_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(level)


def allow(identity: Identity | None = None) -> Decision:
    return Decision(allowed=True, status=200, reason=Reason.ALLOWED, identity=identity, rule="users")


def deny() -> Decision:
    return Decision(allowed=False, status=401, reason=Reason.INVALID_TOKEN, request_id="r-1", body=b"{}")


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_every_deny_is_logged_without_secrets(audit: Capture) -> None:
    observer = AuditObserver(AuditSettings(allow_sample_rate=0.0), rng=lambda: 0.0)
    observer.record(INPUT, deny(), 0.000123)
    (line,) = audit.lines
    assert "SECRET" not in line
    entry = json.loads(line)
    assert entry["logger"] == AUDIT_LOGGER
    assert {k: entry[k] for k in ("request_id", "method", "host", "path", "decision", "status", "reason")} == {
        "request_id": "r-1",
        "method": "GET",
        "host": "api.example",
        "path": "/orders",
        "decision": "deny",
        "status": 401,
        "reason": "invalid_token",
    }
    assert entry["latency_us"] == 123
    assert entry["identity_kind"] == ""
    assert "time" in entry


def test_allows_are_sampled_with_the_injected_rng(audit: Capture) -> None:
    draws = iter([0.05, 0.2, 0.09, 0.5])
    observer = AuditObserver(AuditSettings(allow_sample_rate=0.1), rng=lambda: next(draws))
    for _ in range(4):
        observer.record(INPUT, allow(), 0.00001)
    assert len(audit.lines) == 2
    never = AuditObserver(AuditSettings(allow_sample_rate=0.0), rng=lambda: 0.0)
    never.record(INPUT, allow(), 0.00001)
    always = AuditObserver(AuditSettings(allow_sample_rate=1.0), rng=lambda: 0.999)
    always.record(INPUT, allow(), 0.00001)
    assert len(audit.lines) == 3


def test_metrics_count_by_result_and_reason() -> None:
    labels = {"result": "deny", "reason": "invalid_token"}
    before = metric("meshgate_extauthz_decisions_total", labels)
    before_allow = metric("meshgate_extauthz_decisions_total", {"result": "allow", "reason": "allowed"})
    before_count = metric("meshgate_extauthz_check_duration_seconds_count")
    before_fast = metric("meshgate_extauthz_check_duration_seconds_bucket", {"le": "1e-05"})
    observer = AuditObserver(AuditSettings(allow_sample_rate=0.0))
    observer.record(INPUT, deny(), 0.000005)
    observer.record(INPUT, deny(), 0.02)
    observer.record(INPUT, allow(), 0.00005)
    assert metric("meshgate_extauthz_decisions_total", labels) == before + 2
    assert metric("meshgate_extauthz_decisions_total", {"result": "allow", "reason": "allowed"}) == before_allow + 1
    assert metric("meshgate_extauthz_check_duration_seconds_count") == before_count + 3
    assert metric("meshgate_extauthz_check_duration_seconds_bucket", {"le": "1e-05"}) == before_fast + 1


@pytest.mark.parametrize(
    ("identity", "kind", "subject"),
    [
        (Identity(kind=IdentityKind.JWT, subject="alice"), "jwt", "alice"),
        (Identity(kind=IdentityKind.API_KEY, subject="key-1", client="acme"), "api_key", "acme"),
        (Identity(kind=IdentityKind.API_KEY, subject="key-1"), "api_key", "key-1"),
        (
            Identity(kind=IdentityKind.SPIFFE, subject="sa", principal="spiffe://td/ns/a/sa/b"),
            "spiffe",
            "spiffe://td/ns/a/sa/b",
        ),
    ],
)
def test_identity_kind_and_subject(identity: Identity, kind: str, subject: str) -> None:
    entry = audit_entry(INPUT, allow(identity), 0.0)
    assert (entry["identity_kind"], entry["subject"], entry["rule"]) == (kind, subject, "users")
    assert entry["request_id"] == "r-1"  # from the input when the decision has none


def test_a_remembered_input_is_logged_under_this_requests_id() -> None:
    """A transport answering an identical earlier request passes this request's id along with the old input."""
    entry = audit_entry(INPUT, allow(Identity(kind=IdentityKind.JWT, subject="alice")), 0.0, "r-2")
    assert entry["request_id"] == "r-2"


def test_a_reused_allow_decision_is_counted_under_its_own_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extauthz.audit.ALLOW_COUNTERS_SIZE", 2)
    allowed = {"result": "allow", "reason": "allowed"}
    public = {"result": "allow", "reason": "public"}
    before = metric("meshgate_extauthz_decisions_total", allowed), metric("meshgate_extauthz_decisions_total", public)
    observer = AuditObserver(AuditSettings(allow_sample_rate=0.0))
    reused = allow()
    for _ in range(3):
        observer.record(INPUT, reused, 0.00001)  # the pipeline hands out the same allow object again and again
    for i in range(6):  # short-lived objects of alternating reasons, past the bound: each under its own reason
        reason = Reason.PUBLIC if i % 2 else Reason.ALLOWED
        observer.record(INPUT, Decision(allowed=True, status=200, reason=reason, rule="r"), 0.00001)
        observer.record(INPUT, reused, 0.00001)
    assert len(observer._allow_counters) <= 2  # bounded
    assert metric("meshgate_extauthz_decisions_total", allowed) == before[0] + 3 + 3 + 6
    assert metric("meshgate_extauthz_decisions_total", public) == before[1] + 3
