"""Rate-limit response headers from descriptor statuses (pure functions, no I/O).

Two families, chosen by the ``headers`` setting (``off`` | ``draft`` | ``classic`` | ``both``):

- ``draft``: the IETF structured fields of draft-ietf-httpapi-ratelimit-headers, one list member per limit::

      RateLimit-Policy: "per-minute";q=100;w=60, "daily";q=1000;w=86400
      RateLimit: "per-minute";r=42;t=17, "daily";r=958;t=40117

  ``q`` quota, ``w`` window (seconds), ``r`` remaining, ``t`` seconds until reset (sf-integers, reset rounded up).
- ``classic``: ``X-RateLimit-Limit/Remaining/Reset`` as Envoy writes them (draft 03): the limit of the most
  restrictive status first, then every policy, ``10, 10;w=60, 1000;w=86400;name="daily"``.

``Retry-After`` (whole seconds, at least 1) is added to OVER_LIMIT answers in every mode but ``off``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast, get_args

from ratelimit.model import Code, DescriptorStatus, Limit

HeaderMode = Literal["off", "draft", "classic", "both"]
HEADER_MODES: tuple[str, ...] = get_args(HeaderMode)

Headers = tuple[tuple[str, str], ...]


def parse_mode(raw: str) -> HeaderMode:
    """The setting's value, case-insensitive; ValueError names the accepted ones."""
    value = raw.strip().lower()
    if value in HEADER_MODES:
        return cast(HeaderMode, value)
    raise ValueError(f"ratelimit headers: expected one of {', '.join(HEADER_MODES)}, got {raw!r}")


def ceil_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds))


def sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII only (others become ``?``), ``"`` and ``\\`` escaped."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_name(limit: Limit) -> str:
    """The limit's configured name, or a stable one derived from its shape (never from descriptor values)."""
    return limit.name or limit.ident


def limited(statuses: Sequence[DescriptorStatus]) -> list[DescriptorStatus]:
    return [status for status in statuses if status.limit is not None]


def most_restrictive(statuses: Sequence[DescriptorStatus]) -> DescriptorStatus | None:
    """OVER_LIMIT (or shadow-over) first, then the least remaining, then the latest reset."""
    best: DescriptorStatus | None = None
    best_rank: tuple[int, int, float] | None = None
    for status in statuses:
        if status.limit is None:
            continue
        over = status.code is Code.OVER_LIMIT or status.shadow
        rank = (0 if over else 1, status.remaining, -status.reset_s)
        if best_rank is None or rank < best_rank:
            best, best_rank = status, rank
    return best


def draft_headers(statuses: Sequence[DescriptorStatus]) -> Headers:
    """``RateLimit-Policy`` and ``RateLimit`` for every limited status (one member per distinct policy)."""
    policies: list[str] = []
    states: list[str] = []
    seen: set[tuple[str, int, int]] = set()
    for status in limited(statuses):
        limit = status.limit
        assert limit is not None
        name = sf_string(policy_name(limit))
        marker = (name, limit.requests_per_unit, limit.period_s)
        if marker in seen:
            continue
        seen.add(marker)
        policies.append(f"{name};q={limit.requests_per_unit};w={limit.period_s}")
        states.append(f"{name};r={max(0, status.remaining)};t={ceil_seconds(status.reset_s)}")
    if not policies:
        return ()
    return (("RateLimit-Policy", ", ".join(policies)), ("RateLimit", ", ".join(states)))


def classic_headers(statuses: Sequence[DescriptorStatus]) -> Headers:
    """``X-RateLimit-Limit``/``-Remaining``/``-Reset`` from the most restrictive status."""
    decisive = most_restrictive(statuses)
    if decisive is None or decisive.limit is None:
        return ()
    parts = [str(decisive.limit.requests_per_unit)]
    seen: set[tuple[int, int, str]] = set()
    for status in limited(statuses):
        limit = status.limit
        assert limit is not None
        marker = (limit.requests_per_unit, limit.period_s, limit.name)
        if marker in seen:
            continue
        seen.add(marker)
        item = f"{limit.requests_per_unit};w={limit.period_s}"
        parts.append(f"{item};name={sf_string(limit.name)}" if limit.name else item)
    return (
        ("X-RateLimit-Limit", ", ".join(parts)),
        ("X-RateLimit-Remaining", str(max(0, decisive.remaining))),
        ("X-RateLimit-Reset", str(ceil_seconds(decisive.reset_s))),
    )


def retry_after(seconds: float) -> tuple[str, str]:
    return ("Retry-After", str(max(1, ceil_seconds(seconds))))


def response_headers(
    mode: HeaderMode, statuses: Sequence[DescriptorStatus], code: Code, retry_after_s: float = 0.0
) -> Headers:
    """All headers ``mode`` asks for; ``retry_after_s`` is used only when ``code`` is OVER_LIMIT."""
    if mode == "off":
        return ()
    out: Headers = ()
    if mode in ("draft", "both"):
        out += draft_headers(statuses)
    if mode in ("classic", "both"):
        out += classic_headers(statuses)
    if code is Code.OVER_LIMIT:
        out += (retry_after(retry_after_s),)
    return out
