"""ConfigWatcher with real files: edits, ConfigMap ..data swaps, bad versions kept out, metrics, the poll task."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from meshgate.reload import ConfigWatcher, fingerprint
from meshgate.yamlconf import ConfigError, load

_COMPONENT_IDS = iter(range(1_000_000))


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Harness:
    """Loads ``{value: int, extra: optional path}`` from ``main`` and records every swap."""

    def __init__(self, main: Path, *, watch_dir: Path | None = None) -> None:
        self.main = main
        self.watch_dir = watch_dir
        self.swapped: list[dict[str, object]] = []
        self.loads = 0
        self.component = f"test{next(_COMPONENT_IDS)}"
        self.watcher: ConfigWatcher[dict[str, object]] = ConfigWatcher(
            self.load,
            self.watched,
            self.on_swap,
            component=self.component,
            interval_s=0.01,
            wall_clock=lambda: 42.0,
        )

    def load(self) -> dict[str, object]:
        self.loads += 1
        data = load(self.main)
        if not isinstance(data, dict) or not isinstance(data.get("value"), int):
            raise ConfigError(str(self.main), getattr(data, "line", 1), "value: expected an integer")
        extra = data.get("extra")
        if extra is not None:
            data["extra_text"] = (self.main.parent / extra).read_text()
        return dict(data)

    def watched(self, current: dict[str, object] | None) -> Sequence[Path]:
        paths = [self.watch_dir or self.main]
        if current is not None and current.get("extra"):
            paths.append(self.main.parent / str(current["extra"]))
        return paths

    async def on_swap(self, value: dict[str, object]) -> None:
        self.swapped.append(value)

    def metric(self, name: str, **labels: str) -> float:
        return metric(name, component=self.component, **labels)


def current(harness: Harness, key: str) -> object:
    return harness.watcher.current[key]


def rewrite(path: Path, text: str) -> None:
    """Write and make sure the stat changes even on coarse-mtime file systems (size or inode may not)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


async def test_initial_load_then_edit_is_swapped_in(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    assert harness.watcher.load_initial()["value"] == 1
    assert current(harness, "value") == 1
    assert harness.metric("meshgate_config_last_reload_success") == 1
    assert harness.metric("meshgate_config_last_reload_timestamp_seconds") == 42.0
    assert harness.metric("meshgate_config_reloads_total", result="success") == 0
    assert await harness.watcher.check_now() is False
    rewrite(main, "value: 22\n")
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 22
    assert harness.swapped == [harness.watcher.current]
    assert harness.metric("meshgate_config_reloads_total", result="success") == 1
    assert await harness.watcher.check_now() is False


async def test_a_reload_loads_off_the_event_loop_which_keeps_running(tmp_path: Path) -> None:
    """A large policy takes seconds to parse: the load waits for the loop to run a callback, which it could not do
    if the load blocked the loop."""
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    loading, loop_ran = threading.Event(), threading.Event()
    plain_load = harness.load

    def slow_load() -> dict[str, object]:
        loading.set()
        assert loop_ran.wait(timeout=10), "the event loop did not run while the config loaded"
        return plain_load()

    harness.watcher._load = slow_load
    rewrite(main, "value: 2\n")
    reload = asyncio.create_task(harness.watcher.check_now())
    assert await asyncio.to_thread(loading.wait, 10)
    loop_ran.set()  # only reachable while the load is in progress
    assert await reload is True
    assert current(harness, "value") == 2


async def test_bad_config_keeps_the_last_good_then_a_good_one_swaps_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    rewrite(main, "value: nope\n")
    assert await harness.watcher.check_now() is False
    assert current(harness, "value") == 1
    assert harness.metric("meshgate_config_reloads_total", result="failure") == 1
    assert harness.metric("meshgate_config_last_reload_success") == 0
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert f"{main}:1: value: expected an integer" in warnings[0].getMessage()
    # The same bad version is not retried (or logged) at every poll.
    loads = harness.loads
    assert await harness.watcher.check_now() is False
    assert harness.loads == loads
    assert harness.metric("meshgate_config_reloads_total", result="failure") == 1
    rewrite(main, "value: 3\n")
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 3
    assert harness.metric("meshgate_config_last_reload_success") == 1


async def test_configmap_data_symlink_swap_is_detected(tmp_path: Path) -> None:
    first, second = tmp_path / "..2024_a", tmp_path / "..2024_b"
    first.mkdir()
    second.mkdir()
    (first / "config.yaml").write_text("value: 1\n")
    (second / "config.yaml").write_text("value: 2\n")
    os.symlink("..2024_a", tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    harness = Harness(tmp_path / "config.yaml", watch_dir=tmp_path)
    harness.watcher.load_initial()
    before = fingerprint([tmp_path])
    assert len(before[str(tmp_path)]) == 1  # the file is seen once, not again under ..data and ..2024_a
    assert await harness.watcher.check_now() is False
    os.symlink("..2024_b", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # what the kubelet does: one atomic rename
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 2


async def test_watching_the_file_symlink_alone_sees_the_swap(tmp_path: Path) -> None:
    for name, value in (("..2024_a", 1), ("..2024_b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"value: {value}\n")
    os.symlink("..2024_a", tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    harness = Harness(tmp_path / "config.yaml")
    harness.watcher.load_initial()
    os.symlink("..2024_b", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 2


async def test_a_file_the_config_names_is_watched_too(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    (tmp_path / "keys.txt").write_text("k1")
    main.write_text("value: 1\nextra: keys.txt\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    assert harness.loads == 2  # the loaded config named a new file: loaded again after fingerprinting it
    assert await harness.watcher.check_now() is False
    rewrite(tmp_path / "keys.txt", "k2-rotated")
    assert await harness.watcher.check_now() is True
    assert current(harness, "extra_text") == "k2-rotated"
    # The config starts naming another file: it is picked up and watched from then on.
    (tmp_path / "other.txt").write_text("o1")
    rewrite(main, "value: 1\nextra: other.txt\n")
    assert await harness.watcher.check_now() is True
    assert current(harness, "extra_text") == "o1"
    assert await harness.watcher.check_now() is False
    rewrite(tmp_path / "other.txt", "o2")
    assert await harness.watcher.check_now() is True
    assert current(harness, "extra_text") == "o2"


async def test_a_change_during_a_reload_is_not_lost(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    original_load = harness.load

    def load_then_edit() -> dict[str, object]:
        value = original_load()
        if value["value"] == 2:
            rewrite(main, "value: 3\n")  # lands after the file was read, while the reload is still running
        return value

    harness.watcher._load = load_then_edit
    rewrite(main, "value: 2\n")
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 2
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 3


async def test_failing_on_swap_keeps_the_old_config(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()

    async def refuse(value: dict[str, object]) -> None:
        raise RuntimeError("cannot apply")

    harness.watcher._on_swap = refuse
    rewrite(main, "value: 2\n")
    assert await harness.watcher.check_now() is False
    assert current(harness, "value") == 1
    assert harness.metric("meshgate_config_reloads_total", result="failure") == 1


async def test_a_deleted_file_is_a_failed_reload(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    main.unlink()
    assert await harness.watcher.check_now() is False
    assert current(harness, "value") == 1
    main.write_text("value: 5\n")
    assert await harness.watcher.check_now() is True
    assert current(harness, "value") == 5


def test_initial_failure_raises_and_sets_the_gauge(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: [\n")
    harness = Harness(main)
    with pytest.raises(ConfigError):
        harness.watcher.load_initial()
    assert harness.metric("meshgate_config_last_reload_success") == 0
    with pytest.raises(RuntimeError, match="load_initial"):
        _ = harness.watcher.current


async def test_background_poll_swaps_and_closes(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    await harness.watcher.start()
    await harness.watcher.start()  # idempotent
    rewrite(main, "value: 2\n")
    for _ in range(500):  # bounded: the poll interval is 10 ms
        if harness.swapped:
            break
        await asyncio.sleep(0.01)
    assert current(harness, "value") == 2
    await harness.watcher.close()
    await harness.watcher.close()


async def test_the_poll_loads_a_change_only_once_it_held_still_for_an_interval(tmp_path: Path) -> None:
    """A policy caught mid-write (truncated, then written in pieces) must not be served: a rule missing from the
    half-written file could turn a deny into an allow."""
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    rewrite(main, "value: 2\n")  # the first piece of a write
    assert await harness.watcher._poll() is False  # seen, not loaded
    rewrite(main, "value: 23\n")  # the writer goes on
    assert await harness.watcher._poll() is False  # changed again: wait once more
    assert current(harness, "value") == 1 and harness.loads == 1
    assert await harness.watcher._poll() is True  # held still for an interval: loaded
    assert current(harness, "value") == 23
    assert await harness.watcher._poll() is False


async def test_poll_loop_survives_unexpected_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    main = tmp_path / "config.yaml"
    main.write_text("value: 1\n")
    harness = Harness(main)
    harness.watcher.load_initial()
    calls = 0

    def broken_watched(current: object) -> Sequence[Path]:
        nonlocal calls
        calls += 1
        raise OSError("boom")

    harness.watcher._watched = broken_watched
    await harness.watcher.start()
    for _ in range(500):
        if calls >= 2:
            break
        await asyncio.sleep(0.01)
    await harness.watcher.close()
    assert calls >= 2
    assert "config-watcher failed" in caplog.text


def test_fingerprint_states(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "a.yaml").write_text("a")
    (tmp_path / "b.yaml").write_text("b")
    os.symlink("missing-target", tmp_path / "dangling")
    os.symlink(".", tmp_path / "sub" / "loop")  # a symlink loop must not hang the walk
    state = fingerprint([tmp_path, tmp_path / "nope", tmp_path / "b.yaml"])
    entries = state[str(tmp_path)]
    assert {entry[0] for entry in entries} >= {
        str(tmp_path / "b.yaml"),
        str(tmp_path / "sub" / "deeper" / "a.yaml"),
        str(tmp_path / "dangling"),
    }
    assert state[str(tmp_path / "nope")] == (("missing",),)
    assert state[str(tmp_path / "b.yaml")][0][0] == str(tmp_path / "b.yaml")


def test_fingerprint_of_unreadable_paths(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x").write_text("x")
    hidden = locked / "x"
    locked.chmod(0o000)
    try:
        state = fingerprint([locked, hidden])
    finally:
        locked.chmod(0o755)
    assert state[str(locked)][0][1] == "unreadable"
    assert state[str(hidden)][0][0] == "error"


def test_interval_must_be_positive() -> None:
    async def on_swap(value: object) -> None:
        return None

    with pytest.raises(ValueError, match="interval_s"):
        ConfigWatcher(lambda: 1, lambda _: [], on_swap, component="x", interval_s=0)


async def test_a_config_whose_watched_files_never_settle_is_reloaded_next_check(tmp_path: Path) -> None:
    counter = iter(range(1000))

    def load_counter() -> int:
        return next(counter)

    def watched(current: int | None) -> Sequence[Path]:
        return [tmp_path / f"file-{current}"]  # every load names a different file

    async def on_swap(value: int) -> None:
        return None

    watcher = ConfigWatcher(load_counter, watched, on_swap, component="test-unsettled")
    first = watcher.load_initial()
    assert first == 2  # three attempts to settle, then give up and mark the new file
    assert await watcher.check_now() is True
    assert watcher.current > first


def test_fingerprint_of_a_path_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    state = fingerprint([tmp_path / "f" / "child"])
    assert state[str(tmp_path / "f" / "child")][0][0] == "error"
