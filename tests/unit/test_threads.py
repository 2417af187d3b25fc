"""Helper threads as SCHED_BATCH: only the helpers change, failures are skipped, and a served process has it."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgate.threads import batch_helper_threads, batch_helper_threads_while_serving
from tests.support.procs import start

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _policy(thread_id: int) -> int:
    return os.sched_getscheduler(thread_id)


def _thread_ids(pid: int | str = "self") -> list[int]:
    return [int(name) for name in os.listdir(f"/proc/{pid}/task")]


@pytest.fixture
def restore_policies() -> Iterator[None]:
    """This test process's threads get their policies back (the test changes them on purpose)."""
    before = {}
    for thread_id in _thread_ids():
        try:
            before[thread_id] = _policy(thread_id)
        except OSError:
            continue
    yield
    for thread_id in _thread_ids():
        try:
            os.sched_setscheduler(thread_id, before.get(thread_id, os.SCHED_OTHER), os.sched_param(0))
        except OSError:
            continue


@pytest.fixture
def helper() -> Iterator[int]:
    """A live helper thread; its native id."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="helper", daemon=True)
    thread.start()
    assert thread.native_id is not None
    yield thread.native_id
    stop.set()
    thread.join(5)


def test_every_thread_but_the_loop_thread_becomes_batch(restore_policies: None, helper: int) -> None:
    loop_thread = threading.get_native_id()
    assert _policy(loop_thread) == os.SCHED_OTHER
    assert _policy(helper) == os.SCHED_OTHER
    assert batch_helper_threads(loop_thread) >= 1
    assert _policy(helper) == os.SCHED_BATCH
    assert _policy(loop_thread) == os.SCHED_OTHER
    assert batch_helper_threads(loop_thread) == 0  # nothing left to change
    # a thread started now by a batch thread would inherit; one started by the loop thread is picked up next time
    os.sched_setscheduler(helper, os.SCHED_OTHER, os.sched_param(0))
    assert batch_helper_threads(loop_thread) == 1


def test_threads_it_cannot_read_or_set_are_left_alone(
    tmp_path: Path, restore_policies: None, helper: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert batch_helper_threads(threading.get_native_id(), tasks=tmp_path / "missing") == 0
    (tmp_path / "not-a-thread").mkdir()
    assert batch_helper_threads(threading.get_native_id(), tasks=tmp_path) == 0
    gone = tmp_path / "ids"
    gone.mkdir()
    (gone / str(helper)).mkdir()
    (gone / "2147483600").mkdir()  # no such thread
    assert batch_helper_threads(threading.get_native_id(), tasks=gone) == 1
    assert _policy(helper) == os.SCHED_BATCH

    def forbidden(*args: object) -> None:
        raise PermissionError("not permitted")

    os.sched_setscheduler(helper, os.SCHED_OTHER, os.sched_param(0))
    monkeypatch.setattr(os, "sched_setscheduler", forbidden)
    assert batch_helper_threads(threading.get_native_id(), tasks=gone) == 0
    monkeypatch.delattr(os, "sched_setscheduler")
    assert batch_helper_threads(threading.get_native_id(), tasks=gone) == 0  # not Linux


async def test_it_waits_until_serving_then_rescans(restore_policies: None, helper: int) -> None:
    serving = asyncio.Event()
    task = asyncio.get_running_loop().create_task(batch_helper_threads_while_serving(serving, rescan_s=0.01))
    try:
        await asyncio.sleep(0.05)
        assert _policy(helper) == os.SCHED_OTHER  # not serving yet
        serving.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if _policy(helper) == os.SCHED_BATCH:
                break
        assert _policy(helper) == os.SCHED_BATCH
        assert _policy(threading.get_native_id()) == os.SCHED_OTHER
        os.sched_setscheduler(helper, os.SCHED_OTHER, os.sched_param(0))  # as if started since
        for _ in range(200):
            await asyncio.sleep(0.01)
            if _policy(helper) == os.SCHED_BATCH:
                break
        assert _policy(helper) == os.SCHED_BATCH
    finally:
        task.cancel()


def _policies_once_settled(pid: int, want_batch: bool) -> dict[int, int]:
    """Each thread's policy, 3 s after start-up (threads started since, such as the config watcher's worker after
    1 s, are included), then as soon as every helper is batch; for the off case, at 3 s."""
    settle_at = time.monotonic() + 3
    deadline = settle_at + 10  # covers one rescan (every 5 s) on a slow machine
    while True:
        policies = {}
        for thread_id in _thread_ids(pid):
            try:
                policies[thread_id] = _policy(thread_id)
            except OSError:
                continue
        helpers = [policy for thread_id, policy in policies.items() if thread_id != pid]
        settled = all(policy == os.SCHED_BATCH for policy in helpers)
        now = time.monotonic()
        if (now >= settle_at and (settled or not want_batch)) or now > deadline:
            return policies
        time.sleep(0.05)


SERVE = [sys.executable, "-m", "meshgate", "serve", "ratelimit", "--grpc-port", "0", "--admin-port", "-1"]
FLOOR = [sys.executable, "-m", "bench.floors", "grpc", "--port", "0"]


@pytest.mark.parametrize(
    ("command", "batch"),
    [
        (SERVE, True),
        ([*SERVE, "--batch-helper-threads"], True),
        ([*SERVE, "--no-batch-helper-threads"], False),
        ([*FLOOR, "--batch-helper-threads"], True),  # the bench's floor with the same tuning
        (FLOOR, False),
    ],
    ids=["serve-default", "serve-on", "serve-off", "floor-on", "floor-off"],
)
def test_served_processes_run_their_helpers_as_batch_unless_told_not_to(
    tmp_path: Path, command: list[str], batch: bool
) -> None:
    (tmp_path / "shop.yaml").write_text("domain: shop\n")
    with start(
        [*command, "--config", str(tmp_path)] if command[2] == "meshgate" else command,
        ready_line="listening",
        timeout=30,
        cwd=REPO_ROOT,
        name="served",
    ) as proc:
        policies = _policies_once_settled(proc.pid, batch)
        assert len(policies) > 3  # grpc's poller and event-engine threads exist
        assert policies[proc.pid] == os.SCHED_OTHER  # the event loop's thread is the main one
        helpers = {policy for thread_id, policy in policies.items() if thread_id != proc.pid}
        assert helpers == ({os.SCHED_BATCH} if batch else {os.SCHED_OTHER})
