"""In-process counters: exact for one process, no I/O.

A request's hits are applied by ``algorithms.apply_hits`` with no await in between, so on the event loop they are
atomic.  Time is the request's ``now`` (the service's clock), never the wall clock read here.

Memory stays bounded three ways.  Lazily: an expired key is dropped when it is next read.  A sweep: every
``sweep_interval_s`` (of request time) a pass starts from a snapshot of the keys (a list copy, ~13 ms per million
keys here) and each call then checks at most ``sweep_batch`` of them, so an expired key is gone within one interval
plus one pass and no call pauses long.  A bound: when a request leaves more than ``max_keys`` keys, expired keys
are purged at once and, if live keys still exceed it, the oldest are evicted with 1% of ``max_keys`` to spare (as
Redis' maxmemory eviction: those counters restart, which errs towards allowing); so the store never holds more
than ``max_keys`` plus one request's new keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from ratelimit.algorithms import MODE_DECIDE, Cell, apply_hits, to_ms, to_outcome
from ratelimit.backends.base import Hit, Outcome


class MemoryBackend:
    """``CounterBackend`` over a dict of ``algorithms.Cell``."""

    def __init__(self, max_keys: int = 1_000_000, *, sweep_interval_s: float = 10.0, sweep_batch: int = 64) -> None:
        if max_keys < 1 or sweep_batch < 1 or sweep_interval_s <= 0:
            raise ValueError("max_keys and sweep_batch must be >= 1, sweep_interval_s > 0")
        self._cells: dict[str, Cell] = {}
        self._max_keys = max_keys
        self._evict_batch = max(1, max_keys // 100)  # when full of live keys: a full purge per this many new keys
        self._sweep_interval_ms = round(sweep_interval_s * 1000)
        self._sweep_batch = sweep_batch
        self._sweep_keys: list[str] = []  # the current pass's snapshot, consumed from the end
        self._next_sweep_ms: int | None = None
        self.evicted = 0  # live keys dropped because the store was full (for metrics)

    async def hit(self, hits: Sequence[Hit], now: float) -> list[Outcome]:
        return self.hit_now(hits, now)

    def hit_now(self, hits: Sequence[Hit], now: float, mode: int = MODE_DECIDE) -> list[Outcome]:
        """The synchronous core of ``hit`` (callers already on the loop can skip the coroutine)."""
        now_ms = to_ms(now)
        self._sweep(now_ms)
        raws = apply_hits(self._cells, hits, now_ms, mode)
        if len(self._cells) > self._max_keys:
            self._make_room(now_ms)
        return [to_outcome(raw) for raw in raws]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._cells.clear()
        self._sweep_keys = []

    def __len__(self) -> int:
        """Keys held now, expired ones not yet dropped included."""
        return len(self._cells)

    def expire_at_ms(self, key: str) -> int | None:
        """When a stored key expires (ms, on the clock of the ``now`` given to ``hit``); None when absent."""
        cell = self._cells.get(key)
        return None if cell is None else cell.expire_at

    def _sweep(self, now_ms: int) -> None:
        if not self._sweep_keys:
            if self._next_sweep_ms is not None and now_ms < self._next_sweep_ms:
                return
            self._next_sweep_ms = now_ms + self._sweep_interval_ms
            self._sweep_keys = list(self._cells)
        cells = self._cells
        for _ in range(min(self._sweep_batch, len(self._sweep_keys))):
            key = self._sweep_keys.pop()
            cell = cells.get(key)
            if cell is not None and cell.expire_at <= now_ms:
                del cells[key]

    def _make_room(self, now_ms: int) -> None:
        cells = self._cells
        for key in [k for k, cell in cells.items() if cell.expire_at <= now_ms]:
            del cells[key]
        excess = len(cells) - self._max_keys
        if excess > 0:  # still full of live keys: drop the oldest, a batch more than needed to make room
            excess += self._evict_batch
            for key in list(islice(cells, excess)):
                del cells[key]
            self.evicted += excess
