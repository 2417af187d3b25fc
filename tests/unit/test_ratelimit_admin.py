"""Admin routes (/json, /rlconfig), the backend probe and the composition root, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from meshgate.admin import AdminServer, build_admin_app, serve_admin
from meshgate.runtime import Readiness, ServiceRuntime
from meshgate.settings import ServeSettings, SettingsError
from meshgate.yamlconf import ConfigError
from ratelimit import app as rl_app
from ratelimit.admin import BackendProbe, build_router
from ratelimit.config import parse_config
from ratelimit.metrics import RuleStatsCollector
from ratelimit.model import Entry, RateLimitRequest
from ratelimit.service import RateLimitService
from tests.unit.test_ratelimit_service import Clock, Recording, real_backend, req

CONFIG = """\
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1, name: per_user}
"""


async def http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    writer.write((head + "Content-Type: application/json\r\n\r\n").encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload else None


class Admin:
    def __init__(self, server: AdminServer, backend: Recording, readiness: Readiness) -> None:
        self.server = server
        self.backend = backend
        self.readiness = readiness

    async def post(self, body: Any) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await http(self.server.port, "POST", "/json", raw)


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    config = parse_config(CONFIG)
    backend = Recording(real_backend())
    service = RateLimitService(lambda: config, backend, clock=Clock(), stats=RuleStatsCollector())
    readiness = Readiness()
    app = build_admin_app(readiness, {"service": "ratelimit"}, [build_router(lambda: service, config.to_dict)])
    server = await serve_admin(app, "127.0.0.1", 0)
    try:
        yield Admin(server, backend, readiness)
    finally:
        await server.stop()


async def test_json_endpoint_answers_like_envoyproxy(admin: Admin) -> None:
    body = {
        "domain": "shop",
        "descriptors": [{"entries": [{"key": "user", "value": "a"}]}, {"entries": [{"key": "x"}]}],
    }
    status, answer = await admin.post(body)
    assert status == 200
    assert answer["overallCode"] == "OK"
    assert answer["statuses"][0] == {
        "code": "OK",
        "currentLimit": {"requestsPerUnit": 1, "unit": "MINUTE", "name": "per_user"},
        "durationUntilReset": "60s",
    }
    assert answer["statuses"][1] == {"code": "OK"}
    status, answer = await admin.post(body)
    assert status == 429
    assert answer["overallCode"] == "OVER_LIMIT"
    camel = {
        "domain": "shop",
        "hitsAddend": 0,
        "descriptors": [{"entries": [{"key": "user", "value": "b"}], "limit": {"requestsPerUnit": 3, "unit": "HOUR"}}],
    }
    status, answer = await admin.post(camel)
    assert status == 200
    assert answer["statuses"][0]["limitRemaining"] == 2
    admin.backend.fail = True
    status, answer = await admin.post(camel)
    assert status == 503


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        {"domain": "", "descriptors": [{"entries": [{"key": "k"}]}]},
        {"domain": "shop", "descriptors": []},
        {"domain": "shop", "descriptors": [{"entries": [{"key": "k"}]}], "unknown": 1},
        {"domain": "shop", "descriptors": [{"entries": [{"key": "k"}], "hits_addend": -1}]},
        {
            "domain": "shop",
            "descriptors": [{"entries": [{"key": "k"}], "limit": {"requests_per_unit": 1, "unit": "x"}}],
        },
        b"x" * 70_000,
    ],
    ids=["not-json", "empty-domain", "no-descriptors", "unknown-key", "negative-hits", "bad-unit", "too-large"],
)
async def test_json_endpoint_rejects_bad_input_with_400(admin: Admin, body: Any) -> None:
    status, answer = await admin.post(body)
    assert status == 400
    assert "error" in answer


@pytest.mark.parametrize(
    ("framing", "first_part"),
    [
        ("Content-Length: 100000000", b"{"),  # says it is too large: refused before any of it is read
        ("Transfer-Encoding: chunked", b"10000\r\n" + b"x" * 0x10000 + b"\r\n1\r\nx\r\n"),  # 64 KiB + 1 so far
    ],
    ids=["declared", "chunked"],
)
async def test_json_endpoint_refuses_a_large_body_without_waiting_for_all_of_it(
    admin: Admin, framing: str, first_part: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.port)
    writer.write(f"POST /json HTTP/1.1\r\nHost: admin\r\n{framing}\r\n\r\n".encode() + first_part)
    await writer.drain()  # and never send the rest: the answer must come anyway
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.split()[1] == b"400"
    head_and_body = await asyncio.wait_for(reader.read(4096), 10)
    assert b"request body too large" in head_and_body
    writer.close()


async def test_json_endpoint_logs_no_error_for_a_broken_chunked_body(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.port)
    writer.write(b"POST /json HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"400"  # the HTTP server's own answer
    writer.close()
    assert (await http(admin.server.port, "GET", "/healthz"))[0] == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_rlconfig_and_openapi(admin: Admin) -> None:
    status, config = await http(admin.server.port, "GET", "/rlconfig")
    assert status == 200
    assert config["domains"]["shop"]["descriptors"][0]["key"] == "user"
    status, schema = await http(admin.server.port, "GET", "/openapi.json")
    assert status == 200
    assert "/json" in schema["paths"]
    assert "requestBody" in schema["paths"]["/json"]["post"]


async def test_backend_probe_sets_readiness_and_recovers() -> None:
    backend = Recording(real_backend())
    readiness = Readiness()
    probe = BackendProbe(backend, lambda ok: readiness.set("backend", ok), interval_s=0.01, timeout_s=1.0)
    await probe.start()
    assert readiness.snapshot() == {"backend": True}
    backend.fail = True
    for _ in range(500):  # bounded: the probe runs every 10 ms
        if not readiness.ready:
            break
        await asyncio.sleep(0.01)
    assert readiness.snapshot() == {"backend": False}
    backend.fail = False
    assert await probe.check_now()
    assert readiness.ready
    await probe.close()
    await probe.close()  # idempotent


# -- composition root --------------------------------------------------------------------------------------------
def test_options_come_from_the_settings(tmp_path: Path) -> None:
    from meshgate.settings import load_settings

    env = {
        "MESHGATE_SHADOW_MODE": "yes",
        "MESHGATE_RATELIMIT_HEADERS": "classic",
        "MESHGATE_BACKEND_TIMEOUT_S": "0.05",
    }
    settings = load_settings({"service": "ratelimit", "config": str(tmp_path)}, env)
    options = rl_app.RateLimitOptions.from_settings(settings)
    assert options == rl_app.RateLimitOptions(shadow_mode=True, headers="classic", backend_timeout_s=0.05)
    defaults = load_settings({"service": "ratelimit", "config": str(tmp_path)}, {})
    assert rl_app.RateLimitOptions.from_settings(defaults) == rl_app.RateLimitOptions()
    for bad in (
        {"MESHGATE_SHADOW_MODE": "maybe"},
        {"MESHGATE_RATELIMIT_HEADERS": "x"},
        {"MESHGATE_BACKEND_TIMEOUT_S": "soon"},
        {"MESHGATE_BACKEND_TIMEOUT_S": "0"},
        {"MESHGATE_NEAR_LIMIT_RATIO": "2"},
    ):
        with pytest.raises(SettingsError):
            load_settings({"service": "ratelimit", "config": str(tmp_path)}, bad)


def test_backend_names() -> None:
    assert rl_app.backend_name("memory") == "memory"
    assert rl_app.backend_name("redis+sentinel://mymaster@h:26379") == "redis"
    assert rl_app.backend_name("unix:///run/redis.sock") == "redis"
    with pytest.raises(SettingsError, match="expected memory or a redis URL"):
        rl_app.backend_name("postgres://x")


async def test_app_reload_swaps_config_and_keeps_counters(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(CONFIG)
    (tmp_path / "other.yaml").write_text("domain: other\ndescriptors: []\n")
    backend = rl_app.make_backend("memory", timeout_s=0.1)
    app = rl_app.RateLimitApp(tmp_path, backend, reload_interval_s=60)
    await app.start()
    try:
        assert sorted(app.config().domains) == ["other", "shop"]
        first = await app.get_service().should_rate_limit(req({"user": "a"}))
        assert first.statuses[0].remaining == 0
        # A bad file: the last good config keeps serving.
        (tmp_path / "other.yaml").write_text("domain: other\ndescriptors: [{key: k, nope: 1}]\n")
        assert not await app.watcher.check_now()
        assert sorted(app.config().domains) == ["other", "shop"]
        # A good change elsewhere: swapped in, and the unchanged rule's counter is intact.
        (tmp_path / "other.yaml").write_text("domain: other2\ndescriptors: []\n")
        assert await app.watcher.check_now()
        assert sorted(app.config().domains) == ["other2", "shop"]
        again = await app.get_service().should_rate_limit(RateLimitRequest("shop", req({"user": "a"}).descriptors))
        assert again.code.value == "OVER_LIMIT"
        assert app.config().lookup("shop", (Entry("user", "z"),)) is not None
    finally:
        await app.close()


async def test_a_reload_that_leaves_no_domain_keeps_the_last_good_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every file gone at once (a botched ConfigMap) would lift every limit: refused; a domain without descriptors
    says it on purpose and is taken."""
    (tmp_path / "shop.yaml").write_text(CONFIG)
    app = rl_app.RateLimitApp(tmp_path, rl_app.make_backend("memory", timeout_s=0.1), reload_interval_s=60)
    await app.start()
    try:
        (tmp_path / "shop.yaml").unlink()
        assert not await app.watcher.check_now()
        assert list(app.config().domains) == ["shop"]
        assert "no domain left" in caplog.text
        (tmp_path / "shop.yaml").write_text("domain: shop\ndescriptors: []\n")
        assert await app.watcher.check_now()
        assert app.config().lookup("shop", (Entry("user", "a"),)) is None
    finally:
        await app.close()


async def test_build_ratelimit_registers_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shop.yaml").write_text(CONFIG)
    settings = ServeSettings(
        service="ratelimit", config=tmp_path, grpc_port=0, http_port=-1, admin_port=0, ratelimit_headers="both"
    )
    runtime = ServiceRuntime(settings)
    await rl_app.build_ratelimit(runtime)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 10)
        status, ready = await http(runtime.admin_port, "GET", "/readyz")
        assert status == 200
        assert ready["checks"] == {"config": True, "backend": True}
        body = {"domain": "shop", "descriptors": [{"entries": [{"key": "user", "value": "a"}]}]}
        status, _ = await http(runtime.admin_port, "POST", "/json", json.dumps(body).encode())
        assert status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_build_ratelimit_refuses_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text("domain: shop\ndescriptors: [{key: k, bogus: 1}]\n")
    settings = ServeSettings(service="ratelimit", config=tmp_path, grpc_port=0, http_port=-1, admin_port=-1)
    with pytest.raises(ConfigError, match=r"shop\.yaml:2: unknown key"):
        await rl_app.build_ratelimit(ServiceRuntime(settings))


async def test_make_backend_redis_urls_and_an_unreachable_store() -> None:
    backend = rl_app.make_backend("redis://127.0.0.1:1", timeout_s=0.05)
    try:
        assert type(backend).__name__ == "RedisBackend"
        readiness = Readiness()
        probe = BackendProbe(backend, lambda ok: readiness.set("backend", ok), timeout_s=1.0, backend_name="redis")
        assert not await probe.check_now()  # nothing listens on port 1: not ready, no hang
        assert not readiness.ready
        assert REGISTRY.get_sample_value("meshgate_ratelimit_backend_up", {"backend": "redis"}) == 0
    finally:
        await backend.close()
    with pytest.raises(SettingsError, match="master name"):
        rl_app.make_backend("redis+sentinel://h", timeout_s=0.05)
