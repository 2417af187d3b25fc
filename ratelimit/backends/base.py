"""The contract every counter backend keeps (one contract test suite runs against all of them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ratelimit.model import Limit


@dataclass(frozen=True, slots=True)
class Hit:
    """Count ``cost`` against ``limit`` under ``key`` (``keys.counter_key``; the backend adds window suffixes)."""

    key: str
    limit: Limit
    cost: int  # 0: only look, consume nothing
    count_blocked: bool = True  # False: a refused request consumes nothing
    shadow: bool = False  # a shadow hit never blocks the others


@dataclass(frozen=True, slots=True)
class Outcome:
    over: bool  # this hit is over its limit
    remaining: int  # requests left in the current window / bucket after this hit (>= 0)
    reset_s: float  # seconds until the quota is whole again (fixed window: to the window's end)
    retry_after_s: float = 0.0  # when over: seconds until a request of this cost could pass


class BackendUnavailable(Exception):
    """The store did not answer in time or failed; the service maps it to its on_backend_error policy."""


class CounterBackend(Protocol):
    async def hit(self, hits: Sequence[Hit], now: float) -> list[Outcome]:
        """Apply all hits of one request atomically (per store slot) in ONE round trip; outcomes in order.

        Semantics, the same for every backend:
        - every hit's outcome is computed as if it were consumed;
        - ``blocked`` = some non-shadow hit is over;
        - a hit with cost > 0 is consumed when ``count_blocked`` is true, or when the request is not ``blocked``;
        - keys expire on their own (set when created, not on every hit).
        Raises ``BackendUnavailable`` on any store failure or deadline.
        """
        ...

    async def ping(self) -> bool:
        """Is the store reachable now (readiness)?"""
        ...

    async def close(self) -> None: ...
