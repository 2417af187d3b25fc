"""Redis down, through a real Envoy: meshgate answers UNAVAILABLE at once, so Envoy's failure_mode_deny decides.

Two Envoys share one `meshgate serve ratelimit` whose Redis is killed: the fail-open one (envoy/ratelimit.yaml as
shipped, failure_mode_deny false) lets requests through, the fail-closed one (the same config with failure_mode_deny
true) refuses them. Neither waits for its own RLS timeout: Envoy counts service errors, not timeouts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshgate.devservers.echo import EchoThread
from meshgate.devservers.service import ServiceProcess
from meshgate.envoy import EnvoyProcess, render
from tests.support.http import get
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit" / "e2e" / "envoy-e2e.yaml"


def _stat(envoy: EnvoyProcess, name: str) -> int:
    for line in envoy.admin_get("/stats").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"Envoy has no stat {name}")


@contextmanager
def envoys(service: ServiceProcess) -> Iterator[tuple[EnvoyProcess, EnvoyProcess]]:
    """(fail-open, fail-closed) Envoys in front of an echo upstream, both asking ``service``."""
    with EchoThread() as upstream:
        values = {
            "listen_port": 0,
            "upstream_port": upstream.port,
            "ratelimit_port": service.ports["grpc_port"],
            "domain": "e2e",
        }
        fail_open_config = render("ratelimit.yaml", **values)
        fail_closed_config = fail_open_config.replace("failure_mode_deny: false", "failure_mode_deny: true")
        assert fail_closed_config != fail_open_config
        with EnvoyProcess().start(fail_open_config) as fail_open, EnvoyProcess().start(fail_closed_config) as closed:
            yield fail_open, closed


def test_redis_outage_is_decided_by_envoys_failure_mode(redis_server: RedisServer) -> None:
    env = {**os.environ, "MESHGATE_BACKEND_TIMEOUT_S": "0.05"}
    args = ["ratelimit", "--config", str(CONFIG), "--backend", redis_server.url, "--drain-seconds", "0.1"]
    with ServiceProcess(args, env=env) as service, envoys(service) as (fail_open, closed):
        user = {"x-user": "outage"}
        assert get(fail_open.listener_port(), "/x", user)[0] == 200  # Redis up: counted normally

        redis_server.stop()
        for _ in range(3):
            assert get(fail_open.listener_port(), "/x", user)[0] == 200
            assert get(closed.listener_port(), "/x", user)[0] == 500
        # Envoy saw the service fail (UNAVAILABLE), and let the fail-open requests through because of it.
        assert _stat(fail_open, "cluster.upstream.ratelimit.failure_mode_allowed") >= 3
        assert _stat(closed, "cluster.upstream.ratelimit.error") >= 3
        # ...and answered every call itself, before Envoy's own RLS timeout (0.25 s) could fire.
        for envoy in (fail_open, closed):
            assert _stat(envoy, "cluster.ratelimit.upstream_rq_timeout") == 0
        assert service.proc.poll() is None

        redis_server.start()
        # Counting works again: the per-user limit (3 per hour) refuses within a few requests. Bounded; a
        # request that raced the reconnect passed fail-open uncounted, hence "within", not "exactly the 4th".
        statuses = []
        for _ in range(10):
            statuses.append(get(fail_open.listener_port(), "/x", {"x-user": "after"})[0])
            if statuses[-1] == 429:
                break
        assert statuses[-1] == 429, statuses
        assert statuses.count(200) >= 3


def test_ratelimit_service_down_is_decided_by_envoys_failure_mode() -> None:
    """With meshgate itself gone (SIGTERM), the shipped fail-open config passes traffic; fail-closed refuses it."""
    args = ["ratelimit", "--config", str(CONFIG), "--drain-seconds", "0.1"]
    with ServiceProcess(args) as service, envoys(service) as (fail_open, closed):
        assert get(closed.listener_port(), "/x", {"x-user": "down"})[0] == 200  # service up: allowed
        assert service.stop() == 0  # drained and exited cleanly
        assert get(fail_open.listener_port(), "/x", {"x-user": "down"})[0] == 200
        assert get(closed.listener_port(), "/x", {"x-user": "down"})[0] == 500
        assert _stat(fail_open, "cluster.upstream.ratelimit.failure_mode_allowed") >= 1
