"""Counter keys: one per (descriptor, limit), unambiguous, with a Redis Cluster hash tag per descriptor.

Layout: ``<prefix>:{<domain>|<key>=<value>|<key>=<value>...}:<limit ident>``; the backend appends window suffixes.

- Unambiguous: ``% { } | = # *`` inside the domain, keys and values are percent-escaped, so ``|`` and ``=`` only
  ever separate, and a request value can neither close the hash tag nor forge another entry (envoyproxy's
  ``domain_key_value_`` joins cannot tell key ``a_b`` from key ``a`` with value ``b``).
- A value is written as itself (escaped), as ``#`` + a truncated SHA-256 hex digest when the rule hashes values,
  or as ``*`` + its wildcard pattern when the rule's ``share_threshold`` makes all matching values one counter;
  the escaped ``#`` and ``*`` keep the three forms apart.
- ``{...}`` around the descriptor part puts every limit of one descriptor in one Cluster slot, so one request's
  hits on that descriptor run in one script call; the limit's ident outside it keeps their counters apart.

Rules compiled by ``ratelimit.config`` carry precomputed parts (``idents``, ``key_heads``, ``shared``); any other
``Rule`` (e.g. one the service builds for Envoy's per-descriptor limit override) takes the general path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import lru_cache

from ratelimit.model import Entry, Limit, Rule

HASH_HEX_CHARS = 24  # 96 bits: collisions are out of reach for any number of live counters
_SPECIAL = re.compile(r"[%{}|=#*]")
_ESCAPES = str.maketrans({char: f"%{ord(char):02X}" for char in "%{}|=#*"})


def counter_key(domain: str, entries: Sequence[Entry], rule: Rule, limit: Limit, prefix: str = "mg") -> str:
    """The store key of ``limit`` for one request descriptor matched to ``rule`` (with exactly these entries)."""
    if "{" in prefix or "}" in prefix:
        raise ValueError("the key prefix must not contain braces (they would move the Redis Cluster hash tag)")
    heads: tuple[str, ...] = getattr(rule, "key_heads", ())
    if len(heads) != len(entries) + 1:  # not compiled by config (or not for these entries): build the heads
        heads = (escape(domain), *[f"{escape(entry.key)}=" for entry in entries])
    parts = [heads[0]]
    if rule.hash_values:
        for level, entry in enumerate(entries, 1):
            parts.append(f"{heads[level]}#{_digest(entry.value)}")
    else:
        for level, entry in enumerate(entries, 1):
            parts.append(heads[level] + escape(entry.value))
    shared: tuple[tuple[int, str], ...] = getattr(rule, "shared", ())
    for level, pattern in shared:  # the levels whose matching values all count as one
        if level < len(entries):
            parts[level + 1] = f"{heads[level + 1]}*{escape(pattern)}"
    return f"{prefix}:{{{'|'.join(parts)}}}:{_ident(rule, limit)}"


def escape(text: str) -> str:
    """Percent-escape the characters that structure a key (``% { } | = # *``)."""
    # The search is cheaper than translate() and almost every key and value has nothing to escape.
    return text.translate(_ESCAPES) if _SPECIAL.search(text) else text


def _ident(rule: Rule, limit: Limit) -> str:
    idents: tuple[str, ...] = getattr(rule, "idents", ())
    if idents:
        for index, candidate in enumerate(rule.limits):
            if candidate is limit:
                return idents[index]
    return limit.ident


@lru_cache(maxsize=65_536)
def _digest(value: str) -> str:
    """Stable across processes and restarts (unlike hash()), so replicas sharing a store agree."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX_CHARS]
