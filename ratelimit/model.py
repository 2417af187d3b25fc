"""Plain data of the rate-limit service; knows nothing of protobuf, YAML or Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Unit(StrEnum):
    """envoyproxy/ratelimit's units; a month is 30 days and a year 365, as there."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"

    @property
    def seconds(self) -> int:
        return _UNIT_SECONDS[self]


_UNIT_SECONDS = {
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86_400,
    Unit.WEEK: 604_800,
    Unit.MONTH: 2_592_000,
    Unit.YEAR: 31_536_000,
}


class Algorithm(StrEnum):
    FIXED_WINDOW = "fixed_window"  # envoyproxy's: windows aligned to the epoch
    SLIDING_WINDOW = "sliding_window"  # weighted previous + current window (sliding window counter)
    TOKEN_BUCKET = "token_bucket"  # GCRA: requests_per_unit per window, bursts up to `burst`


class Code(StrEnum):
    OK = "OK"
    OVER_LIMIT = "OVER_LIMIT"


@dataclass(frozen=True, slots=True)
class Limit:
    """One quota: ``requests_per_unit`` per ``window_units`` x ``unit``."""

    requests_per_unit: int
    unit: Unit
    window_units: int = 1
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    burst: int = 0  # token bucket only: bucket size; 0 means requests_per_unit
    name: str = ""

    @property
    def period_s(self) -> int:
        return self.unit.seconds * self.window_units

    @property
    def ident(self) -> str:
        """Distinguishes the counters of several limits on one descriptor (part of the key)."""
        return f"{self.algorithm.value[0]}{self.window_units}{self.unit.value[0:2]}{self.requests_per_unit}"


@dataclass(frozen=True, slots=True)
class Rule:
    """What the config says for one matched descriptor: zero or more limits and how to apply them."""

    path: str  # config path for metrics and messages, e.g. "shop.generic_key_slowpath" (no raw wildcard values)
    limits: tuple[Limit, ...] = ()
    unlimited: bool = False
    shadow_mode: bool = False
    detailed_metric: bool = False
    quota_mode: bool = False
    count_blocked: bool = True
    hash_values: bool = False  # store descriptor values hashed in counter keys
    replaces: tuple[str, ...] = ()  # names of limits this rule's limits replace
    source: str = ""  # "file:line"


# What one request may carry, over gRPC as over the JSON endpoint. Envoy sends a descriptor per matching
# rate_limits action and an entry per action in it: a handful. The bound keeps one request from holding the
# event loop (100,000 descriptors took 3 s to answer).
MAX_DESCRIPTORS = 64
MAX_ENTRIES = 64
# Sizes: a domain, key or value beyond these is no real descriptor (Envoy's come from headers, paths, metadata),
# and every cache on the way (parsed requests, plans, keys, the over-limit cache) would hold it.
MAX_DOMAIN_CHARS = 256
MAX_KEY_CHARS = 256
MAX_VALUE_CHARS = 4096
# hits_addend: uint32 at the request level in Envoy's proto; the per-descriptor one (UInt64Value) gets the same
# bound, so no request can push a shared counter towards Redis's 2^63 or a token bucket years into its debt.
MAX_HITS_ADDEND = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[Entry, ...]
    limit_override: Limit | None = None  # from Envoy's per-descriptor `limit` (rate-limit override)
    hits_addend: int | None = None  # None: use the request's; 0 means check only


@dataclass(frozen=True, slots=True)
class RateLimitRequest:
    domain: str
    descriptors: tuple[Descriptor, ...]
    hits_addend: int = 1  # the request-level value; Envoy's 0 already mapped to 1 by the adapter


@dataclass(frozen=True, slots=True)
class DescriptorStatus:
    code: Code
    limit: Limit | None = None  # None: no limit applied (no rule, or unlimited)
    remaining: int = 0
    reset_s: float = 0.0  # seconds until the quota resets (duration_until_reset)
    shadow: bool = False  # over the limit, but in shadow mode: reported OK


@dataclass(frozen=True, slots=True)
class RateLimitResponse:
    code: Code
    statuses: tuple[DescriptorStatus, ...]
    response_headers: tuple[tuple[str, str], ...] = ()
    request_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
