"""ServiceRuntime lifecycle with real servers on loopback: ports, health, readiness, hooks, two-stage drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import runtime as runtime_module
from meshgate.runtime import AsyncioServerListener, Readiness, ServiceRuntime
from meshgate.settings import ServeSettings
from tests.unit.test_admin import http_get

SLOW = "test.Slow"
REPO_ROOT = Path(__file__).resolve().parents[2]


def settings_for(tmp_path: Path, **overrides: object) -> ServeSettings:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    values: dict[str, object] = {"grpc_port": 0, "http_port": -1, "admin_port": 0, "drain_s": 10.0}
    values.update(overrides)
    return ServeSettings(service="extauthz", config=config, **values)  # type: ignore[arg-type]


def slow_service(entered: asyncio.Event, release: asyncio.Event) -> Callable[[grpc.aio.Server], None]:
    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        entered.set()
        await release.wait()
        return b"done:" + request

    handler = grpc.method_handlers_generic_handler(SLOW, {"Wait": grpc.unary_unary_rpc_method_handler(wait)})
    return lambda server: server.add_generic_rpc_handlers((handler,))


async def start(runtime: ServiceRuntime, stop: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.create_task(runtime.run(stop))
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    return task


def test_readiness_checks_and_listeners() -> None:
    readiness = Readiness()
    changes: list[bool] = []
    readiness.subscribe(changes.append)
    assert readiness.ready
    readiness.set("policy", False)
    readiness.set("policy", False)
    readiness.set("jwks", True)
    assert not readiness.ready
    assert readiness.snapshot() == {"policy": False, "jwks": True}
    readiness.set("policy", True)
    readiness.start_draining()
    assert changes == [False, True, False]
    assert readiness.draining
    assert not readiness.ready


async def test_drain_marks_not_ready_first_and_finishes_in_flight(tmp_path: Path) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    runtime = ServiceRuntime(settings_for(tmp_path))
    runtime.add_grpc_service(SLOW, slow_service(entered, release))
    events: list[str] = []

    async def on_start() -> None:
        events.append("start")

    async def on_stop() -> None:
        events.append("stop")

    async def failing_stop() -> None:
        raise RuntimeError("hook bug is logged, not raised")

    runtime.on_start(on_start)
    runtime.on_stop(on_stop)
    runtime.on_stop(failing_stop)
    echo = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    runtime.add_listener("http", lambda: _ready(echo))

    stop = asyncio.Event()
    task = await start(runtime, stop)
    assert events == ["start"]
    assert runtime.grpc_port > 0
    assert runtime.admin_port > 0
    assert runtime.http_port == echo.sockets[0].getsockname()[1]
    assert (await http_get(runtime.admin_port, "/readyz"))[0] == 200

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SLOW))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    call = channel.unary_unary(f"/{SLOW}/Wait")(b"in-flight")
    await asyncio.wait_for(entered.wait(), 10)

    stop.set()
    await asyncio.wait_for(runtime.readiness.drain_started.wait(), 10)
    # Stage 1 is visible while the in-flight call still runs: /readyz 503, health NOT_SERVING.
    status, _, body = await http_get(runtime.admin_port, "/readyz")
    assert status == 503
    assert json.loads(body)["draining"] is True
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    assert not task.done()

    release.set()
    assert await asyncio.wait_for(call, 10) == b"done:in-flight"
    await asyncio.wait_for(task, 10)
    assert events == ["start", "stop"]
    await channel.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", runtime.admin_port)


async def test_shutdown_delay_keeps_serving_while_not_ready(tmp_path: Path) -> None:
    """After SIGTERM with a delay: /readyz 503 and health NOT_SERVING at once, but new calls on new connections
    are still answered until the delay ends (Kubernetes endpoints and Envoy catch up meanwhile); then it drains."""
    entered, release = asyncio.Event(), asyncio.Event()
    release.set()  # calls answer at once
    runtime = ServiceRuntime(settings_for(tmp_path, shutdown_delay_s=1.0, drain_s=1.0))
    runtime.add_grpc_service(SLOW, slow_service(entered, release))
    stop = asyncio.Event()
    task = await start(runtime, stop)
    stop.set()
    await asyncio.wait_for(runtime.readiness.drain_started.wait(), 10)
    assert (await http_get(runtime.admin_port, "/readyz"))[0] == 503
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as fresh:  # a new connection
        assert await fresh.unary_unary(f"/{SLOW}/Wait")(b"late", timeout=5) == b"done:late"
        health = health_pb2_grpc.HealthStub(fresh)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SLOW), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not task.done()
    await asyncio.wait_for(task, 10)


async def _ready(server: asyncio.Server) -> asyncio.Server:
    return server


async def test_readiness_drives_grpc_health(tmp_path: Path) -> None:
    runtime = ServiceRuntime(settings_for(tmp_path, admin_port=-1), info={"extra": "x"})
    runtime.readiness.set("policy", False)
    runtime.add_grpc_service(SLOW, slow_service(asyncio.Event(), asyncio.Event()))
    stop = asyncio.Event()
    task = await start(runtime, stop)
    assert runtime.admin_port == -1
    assert runtime.info["extra"] == "x"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SLOW)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = health.Watch(request)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        runtime.readiness.set("policy", True)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_busy_grpc_port_fails_loudly(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        runtime = ServiceRuntime(settings_for(tmp_path, grpc_port=busy.getsockname()[1], admin_port=-1))
        with pytest.raises(OSError, match="cannot bind gRPC"):
            await asyncio.wait_for(runtime.run(asyncio.Event()), 10)
    finally:
        busy.close()


async def test_asyncio_listener_stops() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    listener = AsyncioServerListener(server)
    assert listener.port == server.sockets[0].getsockname()[1]
    await listener.stop(1.0)
    assert not server.is_serving()


def test_install_uvloop_sets_policy() -> None:
    before = asyncio.get_event_loop_policy()
    try:
        assert runtime_module.install_uvloop()
        assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(before)


CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from pathlib import Path
    import grpc
    from meshgate.log import configure_logging
    from meshgate.runtime import ServiceRuntime, run_forever
    from meshgate.settings import ServeSettings

    configure_logging("info")
    log = logging.getLogger("child")

    async def build(runtime: ServiceRuntime) -> None:
        async def wait(request, context):
            log.info("entered")
            await runtime.readiness.drain_started.wait()
            await asyncio.sleep(0)  # answer after the runtime began stopping the server
            return b"drained-ok:" + str(runtime.readiness.ready).encode()

        handler = grpc.method_handlers_generic_handler(
            "test.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
        )
        runtime.add_grpc_service("test.Slow", lambda server: server.add_generic_rpc_handlers((handler,)))

    settings = ServeSettings(
        service="extauthz", config=Path(sys.argv[1]), grpc_port=0, http_port=-1, admin_port=0, drain_s=10.0
    )
    run_forever(settings, build)
    """
)


async def read_json_line(stream: asyncio.StreamReader, msg: str) -> dict[str, object]:
    for _ in range(200):
        line = await asyncio.wait_for(stream.readline(), 20)
        assert line, f"child exited before logging {msg!r}"
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == msg:
            return entry  # type: ignore[no-any-return]
    raise AssertionError(f"no {msg!r} line")


async def test_sigterm_drains_in_flight_call_in_subprocess(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(config), stderr=asyncio.subprocess.PIPE, env=env
    )
    assert child.stderr is not None
    try:
        listening = await read_json_line(child.stderr, "listening")
        grpc_port, admin_port = listening["grpc_port"], listening["admin_port"]
        assert isinstance(grpc_port, int) and grpc_port > 0
        assert isinstance(admin_port, int) and admin_port > 0
        assert (await http_get(admin_port, "/readyz"))[0] == 200
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            call = channel.unary_unary("/test.Slow/Wait")(b"")
            await read_json_line(child.stderr, "entered")
            child.send_signal(signal.SIGTERM)
            # The handler only returns once draining began; readiness was already false then.
            assert await asyncio.wait_for(call, 20) == b"drained-ok:False"
        await read_json_line(child.stderr, "stopped")
        assert await asyncio.wait_for(child.wait(), 20) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_the_heap_is_frozen_once_serving_not_before() -> None:
    import gc
    from types import SimpleNamespace

    from meshgate.runtime import freeze_heap_when_started

    fake = SimpleNamespace(started=asyncio.Event())
    gc.unfreeze()
    task = asyncio.get_running_loop().create_task(freeze_heap_when_started(fake))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert gc.get_freeze_count() == 0  # not serving yet: start-up may still be building
    fake.started.set()
    await asyncio.wait_for(task, 10)
    try:
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # give this test process its collector back


def test_a_sigterm_while_building_stops_the_process_once_built(tmp_path: Path) -> None:
    """Handlers are installed before build(): as PID 1 a signal without one is ignored, and the process would
    come up and serve after all."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "serve.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            from pathlib import Path
            from meshgate.log import configure_logging
            from meshgate.runtime import run_forever
            from meshgate.settings import ServeSettings

            async def build(runtime):
                print("building", flush=True)
                await asyncio.sleep(1.5)  # e.g. reaching Redis

            configure_logging("info")
            settings = ServeSettings("extauthz", Path({str(tmp_path)!r}), grpc_port=0, http_port=-1, admin_port=-1)
            run_forever(settings, build)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped before serving" in err and '"msg":"listening"' not in err
