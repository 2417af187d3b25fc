"""Hot reload of config files by polling: validate the new version, swap it in, keep the last good one on failure.

Polling (not inotify) because Kubernetes updates a mounted ConfigMap by swapping one symlink: the directory holds
``..2024_x/`` (the real files), ``..data -> ..2024_x`` and ``policy.yaml -> ..data/policy.yaml``; the kubelet writes
``..2024_y/`` and atomically renames a new ``..data`` over the old one. Following symlinks and fingerprinting each
file's real path, inode, mtime and size catches that swap, in-place edits and editors' rename-over writes alike.

The fingerprint is taken *before* each load, so a file that changes while a load is running differs from the
recorded fingerprint at the next check and is loaded then (no lost updates). A failed load is logged once per
version (one warning with the ``file:line`` error), counted, and the last good config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from meshgate.periodic import Periodic
from meshgate.yamlconf import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

RELOADS = Counter("meshgate_config_reloads_total", "Config reloads after start-up, by result", ["component", "result"])
LAST_RELOAD_SUCCESS = Gauge(
    "meshgate_config_last_reload_success", "1 when the last config load succeeded, else 0", ["component"]
)
LAST_RELOAD_TIMESTAMP = Gauge(
    "meshgate_config_last_reload_timestamp_seconds",
    "Unix time of the last successful config load",
    ["component"],
)

# One watched path's state: a sorted tuple of (real path, inode, mtime_ns, size), or a marker.
PathState = tuple[tuple[str | int, ...], ...]
Fingerprint = dict[str, PathState]

_MISSING: PathState = (("missing",),)
_UNSETTLED: PathState = (("unsettled",),)  # never equal to a real state: forces a reload at the next check
_MAX_DEPTH = 8  # directory recursion bound (symlink loops are also cut by tracking real paths)
_SETTLE_ATTEMPTS = 3


def fingerprint(paths: Sequence[str | Path]) -> Fingerprint:
    """State of each watched file or directory, following symlinks; never raises."""
    return {str(path): file_state(str(path)) for path in paths}


def _stat_entry(path: str, info: os.stat_result) -> tuple[str | int, ...]:
    return (os.path.realpath(path), info.st_ino, info.st_mtime_ns, info.st_size)


def file_state(path: str) -> PathState:
    """One file's or directory's state (what ``fingerprint`` compares): equal while it is unchanged."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return _MISSING
    except OSError as error:
        return (("error", error.errno or 0),)
    if not stat.S_ISDIR(info.st_mode):
        return (_stat_entry(path, info),)
    entries: list[tuple[str | int, ...]] = []
    _walk(path, entries, 0, set())
    return tuple(sorted(entries, key=repr))


def _walk(directory: str, out: list[tuple[str | int, ...]], depth: int, seen: set[str]) -> None:
    real = os.path.realpath(directory)
    if depth > _MAX_DEPTH or real in seen:
        return
    seen.add(real)
    try:
        names = os.listdir(directory)
    except OSError as error:
        out.append((directory, "unreadable", error.errno or 0))
        return
    for name in names:
        # ConfigMap internals (..data, ..2024_x) hold the same files that the visible symlinks point to.
        if name.startswith(".."):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.stat(path)
        except OSError:
            out.append((path, "dangling"))
            continue
        if stat.S_ISDIR(info.st_mode):
            _walk(path, out, depth + 1, seen)
        elif stat.S_ISREG(info.st_mode):
            out.append(_stat_entry(path, info))


def content_digest(seen: Fingerprint) -> str:
    """``sha256:<hex>`` of the regular files in a fingerprint (names and contents), so replicas can be compared:
    equal contents give equal digests whatever the inodes, ConfigMap folder names and the order the config lists
    its files in. Inside a watched directory, hidden files and folders (an editor's swap file, a ``.git``) are no
    config and do not count; a file the config names itself always counts. Files are read in chunks, never whole.
    Never raises: an unreadable file counts as its name alone (the load reads it or fails)."""
    files: list[tuple[bytes, bytes]] = []
    for watched, state in seen.items():
        root = os.path.realpath(watched)
        for entry in state:
            if len(entry) != 4 or not isinstance(entry[0], str):
                continue  # a marker (missing, dangling, unreadable): no file to read
            path = entry[0]
            if path != root and _hidden_below(root, path):
                continue
            try:
                with open(path, "rb") as file:
                    content = hashlib.file_digest(file, "sha256").digest()
            except OSError:
                content = b""
            files.append((os.path.basename(path).encode("utf-8", "surrogateescape"), content))
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name + b"\0" + content)
    return f"sha256:{digest.hexdigest()}"


def _hidden_below(root: str, path: str) -> bool:
    """Whether ``path`` sits in a hidden file or folder below ``root`` (".x"; ConfigMap internals, "..x", are not)."""
    parts = os.path.relpath(path, root).split(os.sep)
    return any(part.startswith(".") and not part.startswith("..") for part in parts)


@dataclass(frozen=True, slots=True)
class ReloadAttempt:
    """The outcome of one load after start-up, or of the initial one. ``error`` is ``file:line: message``."""

    ok: bool
    at: float  # epoch seconds
    error: str = ""


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """A read-only view of what a ``ConfigWatcher`` serves and how its last load went."""

    component: str
    paths: tuple[str, ...]  # watched files and directories of the config being served
    generation: int  # 1 after the initial load, +1 per config swapped in since; 0 before the initial load
    loaded_at: float  # epoch seconds of the load being served
    digest: str  # content_digest of the files the served config was loaded from
    last_attempt: ReloadAttempt | None


class ConfigWatcher(Generic[T]):
    """Holds the current config of one component and replaces it when its files change.

    ``load`` builds a config (raising ``ConfigError`` or anything else on a bad one); ``watched`` names the files
    or directories to watch for a config (``None`` before the first load), e.g. the policy file plus the API-key
    file it names; ``on_swap`` is awaited with each reloaded config *before* ``current`` changes: if it raises,
    the reload counts as failed and the old config stays current. It is not called by ``load_initial``.

    A reload's ``load`` runs in a worker thread, as does fingerprinting (stat calls): parsing a large policy or
    descriptor directory takes seconds and must not stall the calls being answered. So ``load`` must not need the
    event loop: it builds objects, and ``on_swap`` (on the loop) starts them.
    """

    def __init__(
        self,
        load: Callable[[], T],
        watched: Callable[[T | None], Sequence[Path]],
        on_swap: Callable[[T], Awaitable[None]],
        *,
        component: str,
        interval_s: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._load = load
        self._watched = watched
        self._on_swap = on_swap
        self.component = component
        self.interval_s = interval_s
        self._wall_clock = wall_clock
        self._current: T | None = None
        self._seen: Fingerprint = {}
        self._lock = asyncio.Lock()
        self._pending: Fingerprint | None = None  # a change seen by the last poll, not loaded yet (see _poll)
        self._generation = 0
        self._loaded_at = 0.0
        self._digest = ""
        self._last_attempt: ReloadAttempt | None = None
        self._poller = Periodic(self._poll, interval_s, f"{component}-config-watcher")
        # Create both series at 0 so dashboards and alerts see them before the first reload.
        RELOADS.labels(component, "success")
        RELOADS.labels(component, "failure")

    @property
    def current(self) -> T:
        if self._current is None:
            raise RuntimeError(f"{self.component}: load_initial() has not been called")
        return self._current

    def load_initial(self) -> T:
        """Load at start-up; raises on a bad config so that start-up fails loudly."""
        try:
            value, seen, digest = self._load_settled(None)
        except Exception:
            LAST_RELOAD_SUCCESS.labels(self.component).set(0)
            raise
        self._current, self._seen = value, seen
        self._mark_success(digest)
        return value

    async def check_now(self) -> bool:
        """Reload if a watched file changed since the last load; True when a new config was swapped in."""
        async with self._lock:
            now = await asyncio.to_thread(fingerprint, self._paths(self._current))
            if self._current is not None and now == self._seen:
                return False
            try:
                value, seen, digest = await asyncio.to_thread(self._load_settled, self._current)
                await self._on_swap(value)
            except Exception as error:
                # Remember the rejected version so it is reported once, not at every poll.
                self._seen = now
                self._mark_failure(error)
                return False
            self._current, self._seen = value, seen
            RELOADS.labels(self.component, "success").inc()
            self._mark_success(digest)
            log.info("%s config reloaded", self.component, extra={"component": self.component})
            return True

    def status(self) -> ConfigStatus:
        """What is served and how the last load went; after ``check_now`` returns, its outcome (no await between)."""
        paths = tuple(self._paths(self._current)) if self._current is not None else ()
        return ConfigStatus(self.component, paths, self._generation, self._loaded_at, self._digest, self._last_attempt)

    async def _poll(self) -> bool:
        """The background check: a change is loaded once it has held still for one interval, so a file caught
        mid-write (truncated, then written in pieces) is not what gets served. A ConfigMap's ``..data`` swap or
        a rename is atomic and is loaded one interval later. ``check_now`` loads at once."""
        now = await asyncio.to_thread(fingerprint, self._paths(self._current))
        if self._current is not None and now == self._seen:
            self._pending = None
            return False
        if now != self._pending:
            self._pending = now
            return False
        self._pending = None
        return await self.check_now()

    async def start(self) -> None:
        """Poll in the background every ``interval_s``. Idempotent."""
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()

    # -- internals -------------------------------------------------------------------------------------------
    def _paths(self, basis: T | None) -> list[str]:
        return list(dict.fromkeys(str(path) for path in self._watched(basis)))

    def _load_settled(self, basis: T | None) -> tuple[T, Fingerprint, str]:
        """Load, with a fingerprint taken before the load of every file the loaded config depends on, and the
        digest of those files, read with the fingerprint: a change after it differs from the fingerprint, so the
        next check loads again (a digest read after the load could describe a later version that gets rejected).

        When the new config watches files the old one did not (e.g. a new API-key file), fingerprint those and load
        again, a bounded number of times; if it never settles, mark the new files so the next check reloads.
        """
        paths = self._paths(basis)
        for _ in range(_SETTLE_ATTEMPTS):
            seen = fingerprint(paths)
            digest = content_digest(seen)
            value = self._load()
            wanted = self._paths(value)
            if set(wanted) <= set(paths):
                settled = {path: seen[path] for path in wanted}
                return value, settled, digest if len(wanted) == len(paths) else content_digest(settled)
            paths = wanted
        unsettled = {path: seen.get(path, _UNSETTLED) for path in wanted}
        return value, unsettled, content_digest(fingerprint(wanted))

    def _mark_success(self, digest: str) -> None:
        now = self._wall_clock()
        self._generation += 1
        self._loaded_at, self._digest = now, digest
        self._last_attempt = ReloadAttempt(ok=True, at=now)
        LAST_RELOAD_SUCCESS.labels(self.component).set(1)
        LAST_RELOAD_TIMESTAMP.labels(self.component).set(now)

    def _mark_failure(self, error: Exception) -> None:
        RELOADS.labels(self.component, "failure").inc()
        LAST_RELOAD_SUCCESS.labels(self.component).set(0)
        # ConfigError's text is "file:line: message" and never carries secret values.
        text = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        self._last_attempt = ReloadAttempt(ok=False, at=self._wall_clock(), error=text)
        log.warning(
            "%s config reload failed, keeping the last good config: %s",
            self.component,
            text,
            extra={"component": self.component, "error": text},
        )
