"""envoyproxy/ratelimit descriptor YAML -> an immutable descriptor tree per domain; ``lookup`` walks it per request.

One file holds one domain. envoyproxy/ratelimit's files are read unchanged; our extensions are optional and marked
(ext) below. Unknown keys and bad values are ``ConfigError`` with ``file:line``::

    domain: shop                         # required, non-empty, unique across all files
    on_backend_error: allow              # (ext) allow | deny: answer this when the counter store fails;
                                         #   absent: gRPC UNAVAILABLE, so Envoy's failure_mode_deny decides
    descriptors:                         # optional list, nested to any depth
      - key: generic_key                 # required, non-empty
        value: slowpath                  # optional; "prefix*" (trailing star) matches values starting with prefix
        rate_limit:                      # optional; this descriptor (at the request's last entry) is limited
          unit: second                   # second | minute | hour | day | week | month | year (any case)
          requests_per_unit: 10          # required, 0 .. 2**32-1 (0 refuses everything)
          unlimited: false               # true: never limited, never counted; then no unit/algorithm/window/burst
          name: slow                     # optional; names this limit for `replaces`
          replaces: [{name: other}]      # drop the limits named here when both apply to one request
          algorithm: fixed_window        # (ext) fixed_window (envoyproxy's) | sliding_window | token_bucket
          window: 1                      # (ext) the window is N units (default 1)
          burst: 20                      # (ext) token_bucket only: bucket size (default requests_per_unit)
        rate_limits:                     # (ext) several limits at once, instead of rate_limit; each item takes
          - {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 20}  # the keys above except
          - {unit: day, requests_per_unit: 1000, name: daily}                           # unlimited
        shadow_mode: false               # count and report, never refuse
        quota_mode: false                # envoyproxy's soft limit: never refuse; over-limit is reported instead
        detailed_metric: false           # metric key carries every request value ("shop.generic_key_x")
        value_to_metric: false           # metric key carries this entry's request value (bare-key/wildcard match)
        share_threshold: false           # wildcard only: every matching value shares one counter
        metadata: {backend: a}           # free-form mapping, kept on the rule for the service to return
        count_blocked: true              # (ext) false: a refused request consumes no quota
        hash_values: false               # (ext) true: request values appear only hashed in counter keys
        descriptors: [...]               # nested descriptors: the request's next entry

Matching, per entry of a request descriptor, at each level: the exact ``key``+``value`` child, else the first
declared wildcard child of that key whose prefix the value starts with, else the bare-key child (no ``value``).
No match ends the walk with no rule. A rule applies only when the request's *last* entry lands on its descriptor:
a request shorter or longer than the config's nesting gets no limit (envoyproxy's "same level" rule).

The metric key of a rule (``Rule.path``) is envoyproxy's: the domain and each level's ``key`` or ``key_value``
(wildcards keep their pattern), joined by dots, e.g. ``shop.generic_key_slowpath.user``; ``metric_path`` adds the
request values that ``detailed_metric`` / ``value_to_metric`` ask for.

A directory is read as envoyproxy's runtime directory: every ``*.yaml`` / ``*.yml`` file below it (one domain per
file), skipping hidden names, so a Kubernetes ConfigMap mount (``..data/`` with top-level symlinks into it) loads
each file once. A domain defined twice is an error naming both files.

Deliberate differences from envoyproxy (stricter or exact where it is lax or ambiguous): key and value are matched
as a pair, never as the joined string ``key_value`` (so key ``a_b`` never matches key ``a``, value ``b_c``), yet two
descriptors whose joined names collide at one level are rejected, as envoyproxy does, to keep metric keys unique; a
rate limit without ``requests_per_unit`` is an error rather than a silent zero; ``value``/``key`` given as a YAML
float must be quoted.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from meshgate.yamlconf import ConfigError, Reader, load, loads
from ratelimit.keys import escape
from ratelimit.model import Algorithm, Entry, Limit, Rule, Unit

MAX_REQUESTS_PER_UNIT = 2**32 - 1
MAX_DEPTH = 64  # descriptor nesting; real configs use a handful of levels
BACKEND_ERROR_POLICIES = ("allow", "deny")
CONFIG_SUFFIXES = (".yaml", ".yml")
_UNITS = tuple(unit.value for unit in Unit)
_ALGORITHMS = tuple(algorithm.value for algorithm in Algorithm)
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_TOP_KEYS = ("domain", "descriptors", "on_backend_error")
_DESCRIPTOR_KEYS = (
    "key",
    "value",
    "rate_limit",
    "rate_limits",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
    "count_blocked",
    "hash_values",
)
_LIMIT_KEYS = ("unit", "requests_per_unit", "name", "replaces", "algorithm", "window", "burst")


@dataclass(frozen=True, slots=True)
class ConfigRule(Rule):
    """A ``Rule`` compiled from YAML, plus what only the config knows; use it as a plain ``Rule`` anywhere."""

    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, compare=False)
    parts: tuple[str, ...] = field(default=(), compare=False)  # metric key parts after the domain, one per level
    value_levels: tuple[int, ...] = ()  # value_to_metric: levels whose request value joins the metric key
    shared: tuple[tuple[int, str], ...] = ()  # share_threshold: (level, wildcard pattern) counted as one value
    # Precomputed for keys.counter_key (it runs per request): limit idents in limits' order, and the escaped
    # "domain" and "key=" head of each level (a rule is reached only through entries with exactly these keys).
    idents: tuple[str, ...] = field(default=(), compare=False)
    key_heads: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class DomainConfig:
    domain: str
    on_backend_error: str | None  # "allow" | "deny" | None (= answer gRPC UNAVAILABLE)
    source: str  # the file that defines it


@dataclass(frozen=True, slots=True, eq=False)
class _Node:
    """One descriptor of the config; the domain itself is the root node (no key)."""

    key: str
    value: str  # "" for a bare key; a wildcard keeps its trailing "*"
    rule: ConfigRule | None
    children: tuple[_Node, ...]  # declaration order, for to_dict
    exact: Mapping[tuple[str, str], _Node]
    wildcards: Mapping[str, tuple[tuple[str, _Node], ...]]  # key -> (value prefix, child) in declaration order
    bare: Mapping[str, _Node]


class RateLimitConfig:
    """The loaded descriptor trees of all domains; immutable, shared by concurrent requests."""

    __slots__ = ("_roots", "domains", "sources")

    def __init__(
        self, domains: Mapping[str, DomainConfig], roots: Mapping[str, _Node], sources: Sequence[str] = ()
    ) -> None:
        self.domains: Mapping[str, DomainConfig] = MappingProxyType(dict(domains))
        self.sources: tuple[str, ...] = tuple(sources)  # the files read, in load order
        self._roots = dict(roots)

    def lookup(self, domain: str, entries: Sequence[Entry]) -> Rule | None:
        """The rule for one request descriptor, or None (unknown domain, no match, or no limit at that depth)."""
        node = self._roots.get(domain)
        if node is None or not entries:
            return None
        last = len(entries) - 1
        for index, entry in enumerate(entries):
            key, value = entry.key, entry.value
            child = node.exact.get((key, value))
            if child is None:
                for prefix, candidate in node.wildcards.get(key, ()):
                    if value.startswith(prefix):
                        child = candidate
                        break
                else:
                    child = node.bare.get(key)
                    if child is None:
                        return None
            if index == last:
                return child.rule
            if not child.children:
                return None
            node = child
        return None  # pragma: no cover - the loop always returns

    def to_dict(self) -> dict[str, Any]:
        """The loaded config as JSON-ready data (for the /rlconfig admin endpoint)."""
        return {
            "domains": {
                name: {
                    "domain": name,
                    "source": settings.source,
                    "on_backend_error": settings.on_backend_error,
                    "descriptors": [_node_dict(child) for child in self._roots[name].children],
                }
                for name, settings in sorted(self.domains.items())
            },
            "sources": list(self.sources),
        }


def detailed_path(domain: str, entries: Sequence[Entry]) -> str:
    """envoyproxy's ``detailed_metric`` key: the domain and every entry's ``key_value`` (raw values)."""
    return ".".join([domain, *(f"{entry.key}_{entry.value}" for entry in entries)])


def metric_path(domain: str, entries: Sequence[Entry], rule: Rule) -> str:
    """The metric key envoyproxy would use for ``rule`` matched by ``entries`` (``rule.path`` unless the rule asks
    for request values via ``detailed_metric`` or ``value_to_metric``)."""
    if not isinstance(rule, ConfigRule):
        return detailed_path(domain, entries) if rule.detailed_metric else rule.path
    if rule.detailed_metric:
        if not rule.shared:
            return detailed_path(domain, entries)
        patterns = dict(rule.shared)
        return ".".join(
            [domain, *(f"{entry.key}_{patterns.get(level, entry.value)}" for level, entry in enumerate(entries))]
        )
    if not rule.value_levels or len(entries) != len(rule.parts):
        return rule.path
    parts = list(rule.parts)
    for level in rule.value_levels:
        entry = entries[level]
        parts[level] = f"{entry.key}_{entry.value}" if entry.value else entry.key
    return ".".join([domain, *parts])


def load_config(path: str | Path) -> RateLimitConfig:
    """Load a directory of domain files (envoyproxy's runtime directory, or a ConfigMap mount) or one file."""
    path = Path(path)
    if path.is_dir():
        files = config_files(path)
    elif path.exists():
        files = [path]
    else:
        raise ConfigError(str(path), 0, "no such file or directory")
    return build_config((str(file), _load(file)) for file in files)


def parse_config(text: str, source: str = "<ratelimit>") -> RateLimitConfig:
    """One domain file's YAML text -> config (tests, `meshgate validate` on stdin)."""
    try:
        data = loads(text, source)
    except RecursionError:
        raise ConfigError(source, 0, "nested too deeply") from None
    return build_config([(source, data)])


def config_files(directory: Path) -> list[Path]:
    """The domain files under ``directory``: sorted, hidden names skipped, each real file once."""
    found: list[Path] = []
    seen: set[str] = set()

    # followlinks=False: directory symlinks (a ConfigMap's ..data) are not walked, and loops cannot occur.
    # A folder that cannot be listed is an error, not an empty folder: its domains would vanish without a word.
    def unreadable(error: OSError) -> None:
        raise ConfigError(str(error.filename or directory), 0, f"cannot read: {error.strerror or error}")

    for current, dirnames, filenames in os.walk(directory, onerror=unreadable, followlinks=False):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.endswith(CONFIG_SUFFIXES):
                continue
            candidate = Path(current, name)
            if not candidate.is_file():  # a dangling symlink, mid-swap, or a link to a directory
                continue
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                found.append(candidate)
    return found


def _load(path: Path) -> Any:
    try:
        return load(path)
    except RecursionError:  # the YAML parser recurses per nesting level
        raise ConfigError(str(path), 0, "nested too deeply") from None


def build_config(documents: Iterator[tuple[str, Any]] | Sequence[tuple[str, Any]]) -> RateLimitConfig:
    """Compile parsed YAML documents (source name, data) into one config; a domain may appear only once."""
    domains: dict[str, DomainConfig] = {}
    roots: dict[str, _Node] = {}
    first_seen: dict[str, str] = {}
    sources: list[str] = []
    for source, data in documents:
        settings, root, where = _domain_file(data, source, first_seen)
        domains[settings.domain] = settings
        roots[settings.domain] = root
        first_seen[settings.domain] = where
        sources.append(source)
    return RateLimitConfig(domains, roots, sources)


def _domain_file(data: Any, source: str, first_seen: Mapping[str, str]) -> tuple[DomainConfig, _Node, str]:
    if data is None:
        raise ConfigError(source, 0, "the file is empty; expected a mapping with 'domain' and 'descriptors'")
    top = Reader(data, source, what="mapping with 'domain' and 'descriptors'")
    _known(top, _TOP_KEYS)
    domain = top.require("domain", str)
    if not domain:
        raise top.error("domain", "must not be empty")
    where = f"{source}:{top.line_of('domain')}"
    if domain in first_seen:
        raise top.error("domain", f"duplicate domain {domain!r}: already defined at {first_seen[domain]}")
    policy = top.get("on_backend_error", str, "")
    if policy and policy not in BACKEND_ERROR_POLICIES:
        raise top.error("on_backend_error", f"must be one of {', '.join(BACKEND_ERROR_POLICIES)}; got {policy!r}")
    readers = list(top.children("descriptors"))
    top.done()
    root = _level(readers, _Chain(domain))
    return DomainConfig(domain, policy or None, source), root, where


@dataclass(frozen=True, slots=True)
class _Chain:
    """What a descriptor inherits from the descriptors above it."""

    domain: str
    parts: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    value_levels: tuple[int, ...] = ()
    shared: tuple[tuple[int, str], ...] = ()


def _level(
    readers: Sequence[Reader], chain: _Chain, key: str = "", value: str = "", rule: ConfigRule | None = None
) -> _Node:
    """Build one node whose children are the descriptors in ``readers``."""
    children: list[_Node] = []
    exact: dict[tuple[str, str], _Node] = {}
    wildcards: dict[str, list[tuple[str, _Node]]] = {}
    bare: dict[str, _Node] = {}
    names: dict[str, int] = {}
    for reader in readers:
        child = _descriptor(reader, chain, names)
        children.append(child)
        if not child.value:
            bare[child.key] = child
        elif child.value.endswith("*"):
            wildcards.setdefault(child.key, []).append((child.value[:-1], child))
        else:
            exact[(child.key, child.value)] = child
    return _Node(
        key=key,
        value=value,
        rule=rule,
        children=tuple(children),
        exact=exact,
        wildcards={name: tuple(items) for name, items in wildcards.items()},
        bare=bare,
    )


def _descriptor(r: Reader, chain: _Chain, names: dict[str, int]) -> _Node:
    _known(r, _DESCRIPTOR_KEYS)
    key = r.convert("key", _text, "")
    if not r.has("key"):
        raise ConfigError(r.source, r.line, "descriptor without 'key'")
    if not key:
        raise r.error("key", "must not be empty")
    value = r.convert("value", _text, "")
    part = f"{key}_{value}" if value else key
    level = len(chain.parts)
    if level >= MAX_DEPTH:
        raise ConfigError(r.source, r.line, f"descriptors nested deeper than {MAX_DEPTH} levels")
    parts = (*chain.parts, part)
    if part in names:
        shown = ".".join([chain.domain, *parts])
        raise ConfigError(r.source, r.line, f"duplicate descriptor {shown!r} (first at line {names[part]})")
    names[part] = r.line

    wildcard = value.endswith("*")
    shared = chain.shared
    if r.get("share_threshold", bool, False):
        if not wildcard:
            raise r.error("share_threshold", "needs a wildcard value (ending in '*')")
        shared = (*shared, (level, value))
    value_levels = chain.value_levels
    if r.get("value_to_metric", bool, False) and (wildcard or not value):
        value_levels = (*value_levels, level)
    metadata = r.convert("metadata", _metadata, _EMPTY)
    shadow_mode = r.get("shadow_mode", bool, False)
    quota_mode = r.get("quota_mode", bool, False)
    detailed_metric = r.get("detailed_metric", bool, False)
    count_blocked = r.get("count_blocked", bool, True)
    hash_values = r.get("hash_values", bool, False)
    if r.has("rate_limit") and r.has("rate_limits"):
        raise r.error("rate_limits", "give either rate_limit or rate_limits, not both")
    single = r.child("rate_limit")
    several = list(r.children("rate_limits"))
    if r.has("rate_limits") and not several:
        raise r.error("rate_limits", "must list at least one limit")
    nested = list(r.children("descriptors"))
    r.done()

    rule = None
    if single is not None or several:
        if single is not None:
            limits, unlimited, replaces = _rate_limit(single, allow_unlimited=True)
        else:
            limits, unlimited, replaces = _limits(several)
        rule = ConfigRule(
            path=".".join([chain.domain, *parts]),
            limits=limits,
            unlimited=unlimited,
            replaces=replaces,
            source=f"{r.source}:{r.line}",
            metadata=metadata,
            parts=parts,
            value_levels=value_levels,
            shared=shared,
            idents=tuple(limit.ident for limit in limits),
            key_heads=(escape(chain.domain), *(f"{escape(name)}=" for name in (*chain.keys, key))),
            shadow_mode=shadow_mode,
            quota_mode=quota_mode,
            detailed_metric=detailed_metric,
            count_blocked=count_blocked,
            hash_values=hash_values,
        )
    below = _Chain(chain.domain, parts, (*chain.keys, key), value_levels, shared)
    return _level(nested, below, key, value, rule)


def _limits(readers: Sequence[Reader]) -> tuple[tuple[Limit, ...], bool, tuple[str, ...]]:
    limits: list[Limit] = []
    replacing: list[tuple[Reader, str]] = []
    idents: dict[str, int] = {}
    for reader in readers:
        (limit,), _, names = _rate_limit(reader, allow_unlimited=False)
        if limit.ident in idents:  # one counter per ident: two such limits would share it
            raise ConfigError(
                reader.source,
                reader.line,
                f"same algorithm, unit, window and rate as the limit at line {idents[limit.ident]}",
            )
        idents[limit.ident] = reader.line
        limits.append(limit)
        replacing.extend((reader, name) for name in names)
    own = {limit.name for limit in limits if limit.name}
    for reader, name in replacing:
        if name in own:
            raise ConfigError(reader.source, reader.line, f"a limit cannot replace its own descriptor's {name!r}")
    return tuple(limits), False, tuple(dict.fromkeys(name for _, name in replacing))


def _rate_limit(r: Reader, *, allow_unlimited: bool) -> tuple[tuple[Limit, ...], bool, tuple[str, ...]]:
    if not allow_unlimited and r.has("unlimited"):
        raise r.error("unlimited", "only rate_limit can be unlimited, not an item of rate_limits")
    _known(r, (*_LIMIT_KEYS, "unlimited") if allow_unlimited else _LIMIT_KEYS)
    unlimited = r.get("unlimited", bool, False) if allow_unlimited else False
    name = r.get("name", str, "")
    replaces = _replaces(r, name)
    if unlimited:
        for key in ("unit", "algorithm", "window", "burst"):
            if r.has(key):
                raise r.error(key, "not allowed with unlimited: true")
        r.get("requests_per_unit", int, 0)  # envoyproxy accepts and ignores it here
        r.done()
        return (), True, replaces
    unit_text = r.get("unit", str, "")
    if not r.has("unit"):
        raise ConfigError(r.source, r.line, f"missing required key 'unit' (one of {', '.join(_UNITS)})")
    if unit_text.lower() not in _UNITS:
        raise r.error("unit", f"invalid unit {unit_text!r}; expected one of {', '.join(_UNITS)}")
    requests = r.require("requests_per_unit", int)
    if not 0 <= requests <= MAX_REQUESTS_PER_UNIT:
        raise r.error("requests_per_unit", f"must be between 0 and {MAX_REQUESTS_PER_UNIT}, got {requests}")
    algorithm = Algorithm(r.choice("algorithm", _ALGORITHMS, Algorithm.FIXED_WINDOW.value))
    if requests == 0 and algorithm is Algorithm.TOKEN_BUCKET:  # its refill rate; 0 would divide by zero
        raise r.error("requests_per_unit", "a token_bucket needs at least 1 (a fixed window of 0 blocks everything)")
    window = r.get("window", int, 1)
    if window < 1:
        raise r.error("window", f"must be at least 1, got {window}")
    burst = r.get("burst", int, 0)
    if r.has("burst") and algorithm is not Algorithm.TOKEN_BUCKET:
        raise r.error("burst", "only token_bucket takes a burst")
    if burst < 0:
        raise r.error("burst", f"must not be negative, got {burst}")
    r.done()
    limit = Limit(
        requests_per_unit=requests,
        unit=Unit(unit_text.lower()),
        window_units=window,
        algorithm=algorithm,
        burst=burst,
        name=name,
    )
    return (limit,), False, replaces


def _replaces(r: Reader, own_name: str) -> tuple[str, ...]:
    names: list[str] = []
    for item in r.children("replaces"):
        _known(item, ("name",))
        name = item.get("name", str, "")
        if not name:
            raise ConfigError(item.source, item.line, "replaces entry without a name")
        if own_name and name == own_name:
            raise item.error("name", f"a limit cannot replace itself ({name!r})")
        item.done()
        names.append(name)
    return tuple(names)


def _known(r: Reader, allowed: tuple[str, ...]) -> None:
    """Reject unknown keys before anything else, so a misspelt key is named rather than reported as missing."""
    for key in r.data:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(r.source, r.line_of(key), f"unknown key {key!r}{hint}")


def _text(value: Any) -> str:
    """A key or value scalar as envoyproxy reads it into a string field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    raise ValueError(f"expected a string, got {type(value).__name__} {value!r} (quote it)")


def _metadata(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {'a list' if isinstance(value, list) else repr(value)}")
    return MappingProxyType(_plain(value))


def _plain(value: Any) -> Any:
    """Located YAML data -> plain JSON-ready values (metadata is sent back to Envoy as a Struct)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError(f"metadata values must be strings, numbers, booleans, lists or mappings; got {value!r}")


def _node_dict(node: _Node) -> dict[str, Any]:
    out: dict[str, Any] = {"key": node.key}
    if node.value:
        out["value"] = node.value
    if node.rule is not None:
        out["rule"] = _rule_dict(node.rule)
    if node.children:
        out["descriptors"] = [_node_dict(child) for child in node.children]
    return out


def _rule_dict(rule: ConfigRule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": rule.path,
        "source": rule.source,
        "unlimited": rule.unlimited,
        "limits": [
            {
                "requests_per_unit": limit.requests_per_unit,
                "unit": limit.unit.value,
                "window": limit.window_units,
                "algorithm": limit.algorithm.value,
                "burst": limit.burst,
                "name": limit.name,
            }
            for limit in rule.limits
        ],
        "shadow_mode": rule.shadow_mode,
        "quota_mode": rule.quota_mode,
        "detailed_metric": rule.detailed_metric,
        "count_blocked": rule.count_blocked,
        "hash_values": rule.hash_values,
        "replaces": list(rule.replaces),
    }
    if rule.value_levels:
        out["value_to_metric_levels"] = list(rule.value_levels)
    if rule.shared:
        out["share_threshold"] = [{"level": level, "pattern": pattern} for level, pattern in rule.shared]
    if rule.metadata:
        out["metadata"] = _plain(dict(rule.metadata))
    return out
