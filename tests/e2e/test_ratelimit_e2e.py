"""ratelimit through a real Envoy (envoy/ratelimit.yaml), with the memory backend and with Redis standalone.

One ``meshgate serve ratelimit`` child and one Envoy per backend. The service adds the IETF ``RateLimit`` /
``RateLimit-Policy`` headers and ``Retry-After`` (``MESHGATE_RATELIMIT_HEADERS=draft``); Envoy adds the classic
``X-RateLimit-*`` from the statuses (``enable_x_ratelimit_headers``). Every test uses its own user, so the tests
of a module share the counters without seeing each other's.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshgate.devservers.echo import EchoThread
from meshgate.devservers.service import ServiceProcess
from meshgate.envoy import EnvoyProcess, render
from tests.support.http import get

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit" / "e2e" / "envoy-e2e.yaml"
DOMAIN = "e2e"
USER_LIMIT = 3  # per-user, per hour (envoy-e2e.yaml)
REPORTS_LIMIT = 2  # path=reports, shadow mode


@dataclass
class Stack:
    backend: str
    service: ServiceProcess
    envoy: EnvoyProcess
    config: Path

    @property
    def port(self) -> int:
        return self.envoy.listener_port()

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.service.ports['admin_port']}{path}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())


@pytest.fixture(scope="module", params=["memory", "redis", "redis-unix"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    backend = "memory"
    if request.param == "redis":
        backend = str(request.getfixturevalue("redis_standalone_url"))
    elif request.param == "redis-unix":  # the same server over its unix socket; db 1, so the counts start afresh
        backend = str(request.getfixturevalue("redis_unix_url")) + "?db=1"
    folder = tmp_path_factory.mktemp(f"rl-e2e-{request.param}")
    config = folder / "e2e.yaml"
    shutil.copy(CONFIG, config)
    env = {
        **os.environ,
        "MESHGATE_RATELIMIT_HEADERS": "draft",
        "MESHGATE_RELOAD_INTERVAL_S": "0.1",
        "MESHGATE_BACKEND_TIMEOUT_S": "0.5",  # generous: a busy 2-core machine must not look like an outage
    }
    args = ["ratelimit", "--config", str(folder), "--backend", backend, "--drain-seconds", "0.1"]
    with EchoThread() as upstream, ServiceProcess(args, env=env) as service:
        rendered = render(
            "ratelimit.yaml",
            listen_port=0,
            upstream_port=upstream.port,
            ratelimit_port=service.ports["grpc_port"],
            domain=DOMAIN,
        )
        with EnvoyProcess().start(rendered) as envoy:
            yield Stack(request.param, service, envoy, config)


def _user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def _clear_of_hour_boundary() -> None:
    """The limits are per (epoch-aligned) hour: do not start a counting test in the last 2 s of one."""
    left = 3600 - time.time() % 3600
    if left < 2:
        time.sleep(left + 0.05)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_429_after_the_limit_with_headers(stack: Stack) -> None:
    _clear_of_hour_boundary()
    user = _user()
    seen = []
    for _ in range(USER_LIMIT + 2):  # bounded: two past the limit
        status, headers, _ = get(stack.port, "/orders", {"x-user": user})
        seen.append((status, headers))
    assert [status for status, _ in seen] == [200] * USER_LIMIT + [429, 429]

    ok_headers = seen[0][1]
    assert ok_headers["x-ratelimit-limit"].startswith(f"{USER_LIMIT}, ")  # Envoy's, from the statuses
    assert ok_headers["x-ratelimit-remaining"] == str(USER_LIMIT - 1)
    assert '"per-user";q=3;w=3600' in ok_headers["ratelimit-policy"]  # meshgate's IETF headers
    assert f'"per-user";r={USER_LIMIT - 1};' in ok_headers["ratelimit"]
    assert "retry-after" not in ok_headers

    status, headers = seen[USER_LIMIT]
    assert status == 429
    assert headers["x-ratelimit-remaining"] == "0"
    assert 0 < int(headers["x-ratelimit-reset"]) <= 3600
    assert '"per-user";r=0;' in headers["ratelimit"]
    assert '"per-user";q=3;w=3600' in headers["ratelimit-policy"]
    assert 1 <= int(headers["retry-after"]) <= 3600
    assert headers.get("x-envoy-ratelimited") == "true"


def test_users_are_limited_independently(stack: Stack) -> None:
    _clear_of_hour_boundary()
    alice, bob = _user(), _user()
    for _ in range(USER_LIMIT):
        assert get(stack.port, "/orders", {"x-user": alice})[0] == 200
    assert get(stack.port, "/orders", {"x-user": alice})[0] == 429
    for _ in range(USER_LIMIT):  # bob's quota is untouched by alice's
        assert get(stack.port, "/orders", {"x-user": bob})[0] == 200
    assert get(stack.port, "/orders", {"x-user": bob})[0] == 429
    assert get(stack.port, "/orders")[0] == 200  # no user: only the generous generic limit applies


def test_shadow_mode_never_refuses_but_counts(stack: Stack) -> None:
    """path=reports is in shadow mode: every call passes, the would-be refusals show in /metrics."""
    _clear_of_hour_boundary()
    labels = {"domain": DOMAIN, "rule": f"{DOMAIN}.path_reports"}
    before = stack.admin("/metrics")
    calls = REPORTS_LIMIT + 3
    statuses = [get(stack.port, "/reports/daily")[0] for _ in range(calls)]
    assert statuses == [200] * calls
    after = stack.admin("/metrics")
    shadow = _metric(after, "ratelimit_service_rate_limit_shadow_mode", **labels)
    shadow_before = _metric(before, "ratelimit_service_rate_limit_shadow_mode", **labels)
    total = _metric(after, "ratelimit_service_rate_limit_total_hits", **labels)
    total_before = _metric(before, "ratelimit_service_rate_limit_total_hits", **labels)
    assert total - total_before == calls
    assert shadow - shadow_before == calls - REPORTS_LIMIT  # only this test calls /reports
    assert _metric(after, "ratelimit_service_rate_limit_over_limit", **labels) >= shadow


def test_config_reload_while_serving(stack: Stack) -> None:
    """A bad file is rejected (old config serves on), a good one applied; unchanged rules keep their counts."""
    _clear_of_hour_boundary()
    user, vip = _user(), _user()
    for _ in range(USER_LIMIT - 1):  # user has one call left
        assert get(stack.port, "/orders", {"x-user": user})[0] == 200
    good = stack.config.read_text()
    try:
        stack.config.write_text(good.replace("requests_per_unit: 3,", "requests_per_unit: three,"))
        _wait_until(lambda: "reload failed" in stack.service.log_text(), "the failed reload to be logged")
        assert "per-user" in stack.admin("/rlconfig")  # the last good config is still served
        # A good change: a stricter rule for user=<vip> (the per-user rule itself is unchanged).
        stack.config.write_text(
            good + f"  - key: user\n    value: {vip}\n    rate_limit: {{unit: hour, requests_per_unit: 1}}\n"
        )
        _wait_until(lambda: vip in stack.admin("/rlconfig"), "the good config to be served")
        assert [get(stack.port, "/orders", {"x-user": vip})[0] for _ in range(2)] == [200, 429]
        # The unchanged per-user rule kept its count across both reloads: one call left, then 429.
        assert get(stack.port, "/orders", {"x-user": user})[0] == 200
        assert get(stack.port, "/orders", {"x-user": user})[0] == 429
        assert stack.service.proc.poll() is None
    finally:
        stack.config.write_text(good)
        _wait_until(lambda: vip not in stack.admin("/rlconfig"), "the original config to be served again")
