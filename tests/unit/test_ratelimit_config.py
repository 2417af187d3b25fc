"""ratelimit.config: envoyproxy/ratelimit's README examples, matching rules, errors with lines, directories."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from meshgate.yamlconf import ConfigError
from ratelimit.config import (
    ConfigRule,
    DomainConfig,
    RateLimitConfig,
    config_files,
    detailed_path,
    load_config,
    metric_path,
    parse_config,
)
from ratelimit.model import Algorithm, Entry, Limit, Rule, Unit

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit"
README = FIXTURES / "readme"
INVALID = FIXTURES / "invalid"


def entries(*pairs: tuple[str, str]) -> tuple[Entry, ...]:
    return tuple(Entry(key, value) for key, value in pairs)


def _config(text: str) -> RateLimitConfig:
    return parse_config(text, "test.yaml")


# --- every README example, with the behaviour its README text documents -------------------------------------------

# (file, request entries, expected) where expected is None (no limit) or the facts of the matched rule:
# (path, requests_per_unit or "unlimited", unit, extra checks)
README_CASES: list[
    tuple[str, tuple[tuple[str, str], ...], tuple[str, int | str, str | None, dict[str, Any]] | None]
] = [
    # Example 1: two values of one key, 500/s each; other values are not limited.
    ("example1", (("database", "users"),), ("mongo_cps.database_users", 500, "second", {})),
    ("example1", (("database", "default"),), ("mongo_cps.database_default", 500, "second", {})),
    ("example1", (("database", "other"),), None),
    ("example1", (("table", "users"),), None),
    # Example 2: nested placeholder + bare key; each number gets its own 5/day (marketing) and 100/day.
    (
        "example2",
        (("message_type", "marketing"), ("to_number", "2061111111")),
        ("messaging.message_type_marketing.to_number", 5, "day", {}),
    ),
    (
        "example2",
        (("message_type", "marketing"), ("to_number", "2062222222")),
        ("messaging.message_type_marketing.to_number", 5, "day", {}),
    ),
    ("example2", (("to_number", "2061111111"),), ("messaging.to_number", 100, "day", {})),
    ("example2", (("message_type", "marketing"),), None),  # the placeholder has no limit of its own
    ("example2", (("message_type", "transactional"), ("to_number", "2061111111")), None),
    # Example 3: key+value is tried before the bare key, so 50.0.0.5 is blocked while others get 10/s.
    ("example3", (("remote_address", "50.0.0.1"),), ("edge_proxy_per_ip.remote_address", 10, "second", {})),
    ("example3", (("remote_address", "50.0.0.5"),), ("edge_proxy_per_ip.remote_address_50.0.0.5", 0, "second", {})),
    # Example 4: a limit applies only at the request's last entry (same number of levels).
    ("example4a", (("key", "value"), ("subkey", "subvalue")), None),
    ("example4a", (("key", "value"),), ("example4.key_value", 300, "second", {})),
    ("example4b", (("key", "value"), ("subkey", "subvalue")), ("example4.key_value.subkey", 300, "second", {})),
    ("example4b", (("key", "value"),), None),
    # Example 5: unlimited is a rule (distinguishable from "no rule"), not counted.
    ("example5", (("ldap", "any"),), ("internal.ldap", "unlimited", None, {})),
    ("example5", (("azure", "any"),), ("internal.azure", 100, "minute", {})),
    ("example5", (("aws", "any"),), None),
    # Example 6: user-a is in shadow mode (never refused), user-b is enforced at 20/s.
    (
        "example6",
        (("service", "auth-service"), ("user", "user-a")),
        ("example6.service.user_user-a", 10, "second", {"shadow_mode": True}),
    ),
    (
        "example6",
        (("service", "auth-service"), ("user", "user-b")),
        ("example6.service.user_user-b", 20, "second", {"shadow_mode": False}),
    ),
    ("example6", (("service", "auth-service"), ("user", "user-c")), None),
    # Example 7: a named limit, and a limit that replaces it (the service drops the replaced one).
    (
        "example7",
        (("key_1", "value_1"), ("user", "bkthomps")),
        ("example7.key_1_value_1.user_bkthomps", 5, "second", {"name": "specific_limit", "replaces": ()}),
    ),
    (
        "example7",
        (("key_2", "value_2"), ("user", "bkthomps")),
        ("example7.key_2_value_2.user_bkthomps", 10, "second", {"name": "", "replaces": ("specific_limit",)}),
    ),
    # Example 8: detailed_metric puts the request value into the metric key; explicit values keep theirs.
    (
        "example8",
        (("key1", "unspecified_value"),),
        ("example8.key1", 10, "minute", {"detailed_metric": True, "metric": "example8.key1_unspecified_value"}),
    ),
    (
        "example8",
        (("key1", "unspecified_value2"),),
        ("example8.key1", 10, "minute", {"metric": "example8.key1_unspecified_value2"}),
    ),
    ("example8", (("key1", "value1"),), ("example8.key1_value1", 20, "minute", {"metric": "example8.key1_value1"})),
    # Example 9: a trailing * matches every value with that prefix; the metric key keeps the pattern.
    ("example9", (("key1", "value1"),), ("example9.key1_value*", 20, "minute", {"metric": "example9.key1_value*"})),
    ("example9", (("key1", "value2"),), ("example9.key1_value*", 20, "minute", {})),
    ("example9", (("key1", "value"),), ("example9.key1_value*", 20, "minute", {})),
    ("example9", (("key1", "other"),), None),
]


@pytest.mark.parametrize(("name", "pairs", "expected"), README_CASES)
def test_readme_examples(
    name: str,
    pairs: tuple[tuple[str, str], ...],
    expected: tuple[str, int | str, str | None, dict[str, Any]] | None,
) -> None:
    config = load_config(README / f"{name}.yaml")
    (domain,) = config.domains
    request = entries(*pairs)
    rule = config.lookup(domain, request)
    if expected is None:
        assert rule is None
        return
    path, requests, unit, extra = expected
    assert rule is not None
    assert rule.path == path
    if requests == "unlimited":
        assert rule.unlimited
        assert rule.limits == ()
    else:
        assert not rule.unlimited
        (limit,) = rule.limits
        assert limit.requests_per_unit == requests
        assert unit is not None and limit.unit == Unit(unit)
        assert limit.algorithm is Algorithm.FIXED_WINDOW  # envoyproxy's counting unless asked otherwise
        assert limit.window_units == 1
        assert rule.count_blocked  # envoyproxy counts refused calls too
    if "shadow_mode" in extra:
        assert rule.shadow_mode is extra["shadow_mode"]
    if "name" in extra:
        assert rule.limits[0].name == extra["name"]
    if "replaces" in extra:
        assert rule.replaces == extra["replaces"]
    if "detailed_metric" in extra:
        assert rule.detailed_metric is extra["detailed_metric"]
    assert metric_path(domain, request, rule) == extra.get("metric", path)


def test_every_readme_example_has_cases() -> None:
    covered = {name for name, _, _ in README_CASES}
    assert covered == {path.stem for path in README.glob("*.yaml")}


def test_readme_directory_needs_distinct_domains() -> None:
    # Both Example 4 configs use domain "example4": as one runtime directory that is envoyproxy's error too.
    with pytest.raises(ConfigError, match="duplicate domain 'example4'") as caught:
        load_config(README)
    assert caught.value.source.endswith("example4b.yaml")
    assert "example4a.yaml:2" in caught.value.message


# --- invalid configs: one fixture per error, the expected line marked "# <-" ---------------------------------------


def _expectation(path: Path) -> tuple[str, int]:
    lines = path.read_text().splitlines()
    match = re.match(r"# expect: (.+)", lines[0])
    assert match, f"{path.name} must start with '# expect: <message fragment>'"
    marked = [number for number, line in enumerate(lines, 1) if "# <-" in line]
    assert len(marked) <= 1
    return match.group(1).strip(), marked[0] if marked else 0


@pytest.mark.parametrize("path", sorted(INVALID.glob("*.yaml")), ids=lambda path: path.stem)
def test_invalid_fixture_names_its_line(path: Path) -> None:
    fragment, line = _expectation(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.line == line, str(caught.value)
    assert fragment in caught.value.message
    assert str(caught.value).startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_duplicate_domain_across_files_names_both() -> None:
    directory = FIXTURES / "invalid_dirs" / "duplicate_domain"
    fragment, line = _expectation(directory / "b.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(directory)
    assert (caught.value.source, caught.value.line) == (str(directory / "b.yaml"), line)
    assert fragment in caught.value.message
    assert f"{directory / 'a.yaml'}:2" in caught.value.message


def test_invalid_fixtures_cover_distinct_errors() -> None:
    fragments = [_expectation(path)[0] for path in INVALID.glob("*.yaml")]
    assert len(fragments) >= 40
    assert len(set(fragments)) == len(fragments)


def test_missing_path() -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_config(FIXTURES / "nothing-here")


# --- matching rules ------------------------------------------------------------------------------------------------

PRECEDENCE = """
domain: d
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    value: ab*
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: k
    value: a*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: k
    value: abc
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: other
    value: "*"
    rate_limit: {unit: second, requests_per_unit: 5}
"""


@pytest.mark.parametrize(
    ("pair", "requests"),
    [
        (("k", "abc"), 4),  # exact beats every wildcard
        (("k", "abd"), 2),  # first declared matching wildcard ("ab*" before "a*"), as envoyproxy scans them
        (("k", "axe"), 3),
        (("k", "zzz"), 1),  # no value match: the bare key
        (("k", ""), 1),
        (("other", "anything"), 5),  # "*" matches every value ...
        (("other", ""), 5),  # ... the empty one too
        (("missing", "abc"), None),
    ],
)
def test_match_precedence(pair: tuple[str, str], requests: int | None) -> None:
    rule = _config(PRECEDENCE).lookup("d", entries(pair))
    assert (rule.limits[0].requests_per_unit if rule else None) == requests


def test_wildcards_are_per_level() -> None:
    # A wildcard declared at one level must not be used at another (an old envoyproxy bug kept them per domain).
    config = _config(
        """
domain: d
descriptors:
  - key: a
    value: x*
    descriptors:
      - key: b
        value: y*
        rate_limit: {unit: second, requests_per_unit: 7}
  - key: b
    rate_limit: {unit: second, requests_per_unit: 8}
"""
    )
    assert config.lookup("d", entries(("a", "x1"), ("b", "y1"))).limits[0].requests_per_unit == 7  # type: ignore[union-attr]
    assert config.lookup("d", entries(("a", "x1"), ("b", "z1"))) is None
    assert config.lookup("d", entries(("b", "y1"))).limits[0].requests_per_unit == 8  # type: ignore[union-attr]
    assert config.lookup("d", entries(("a", "zz"), ("b", "y1"))) is None


def test_no_backtracking_to_bare_key() -> None:
    # The exact child wins even when it cannot serve a deeper request; envoyproxy does not fall back either.
    config = _config(
        """
domain: d
descriptors:
  - key: k
    value: v
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    descriptors:
      - key: sub
        rate_limit: {unit: second, requests_per_unit: 2}
"""
    )
    assert config.lookup("d", entries(("k", "v"), ("sub", "s"))) is None
    assert config.lookup("d", entries(("k", "w"), ("sub", "s"))).path == "d.k.sub"  # type: ignore[union-attr]


def test_limit_only_at_last_entry() -> None:
    config = _config(
        """
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
    descriptors:
      - key: b
        rate_limit: {unit: minute, requests_per_unit: 2}
"""
    )
    assert config.lookup("d", entries(("a", "1"))).path == "d.a"  # type: ignore[union-attr]
    assert config.lookup("d", entries(("a", "1"), ("b", "2"))).path == "d.a.b"  # type: ignore[union-attr]
    assert config.lookup("d", entries(("a", "1"), ("b", "2"), ("c", "3"))) is None  # longer than the config
    assert config.lookup("d", entries(("a", "1"), ("x", "2"))) is None
    assert config.lookup("d", ()) is None
    assert config.lookup("unknown", entries(("a", "1"))) is None


def test_key_and_value_match_as_a_pair() -> None:
    # envoyproxy joins "key_value" before looking up, so request ("a", "b_c") would hit key "a_b" value "c".
    config = _config(
        """
domain: d
descriptors:
  - key: a_b
    value: c
    rate_limit: {unit: second, requests_per_unit: 1}
"""
    )
    assert config.lookup("d", entries(("a", "b_c"))) is None
    assert config.lookup("d", entries(("a_b", "c"))) is not None


def test_whitelisted_descriptor_has_no_rule() -> None:
    config = _config("domain: d\ndescriptors:\n  - key: a\n  - key: b\n    rate_limit:\n")
    assert config.lookup("d", entries(("a", "1"))) is None
    assert config.lookup("d", entries(("b", "1"))) is None


def test_scalar_keys_and_values_read_as_envoyproxy_strings() -> None:
    config = load_config(FIXTURES / "valid" / "newer_fields.yaml")
    assert config.lookup("newer", entries(("status", "429"))).path == "newer.status_429"  # type: ignore[union-attr]
    assert config.lookup("newer", entries(("debug", "true"))).path == "newer.debug_true"  # type: ignore[union-attr]


def test_lookup_returns_the_same_immutable_rule() -> None:
    config = load_config(README / "example2.yaml")
    request = entries(("to_number", "1"))
    first = config.lookup("messaging", request)
    assert first is config.lookup("messaging", entries(("to_number", "2")))
    with pytest.raises(TypeError):
        config.domains["x"] = DomainConfig("x", None, "s")  # type: ignore[index]


# --- extensions and newer envoyproxy fields ------------------------------------------------------------------------


def test_extensions() -> None:
    config = load_config(FIXTURES / "valid" / "extensions.yaml")
    assert config.domains["shop"] == DomainConfig("shop", "allow", str(FIXTURES / "valid" / "extensions.yaml"))

    api = config.lookup("shop", entries(("api_key", "k1")))
    assert api is not None
    assert api.limits == (
        Limit(10, Unit.SECOND, algorithm=Algorithm.TOKEN_BUCKET, burst=20, name="burst"),
        Limit(1000, Unit.DAY, name="daily"),
    )
    assert api.hash_values
    assert not api.count_blocked
    assert api.source.endswith("extensions.yaml:5")

    search = config.lookup("shop", entries(("path", "/search/books")))
    assert search is not None
    assert search.limits == (Limit(60, Unit.MINUTE, window_units=5, algorithm=Algorithm.SLIDING_WINDOW),)
    assert search.limits[0].period_s == 300
    assert search.count_blocked and not search.hash_values

    free = config.lookup("shop", entries(("tier", "free"), ("subject", "alice")))
    assert free is not None
    assert free.replaces == ("anonymous",)
    premium = config.lookup("shop", entries(("tier", "premium")))
    assert premium is not None and premium.unlimited
    assert config.lookup("shop", entries(("anonymous", "1.2.3.4"))).limits[0].name == "anonymous"  # type: ignore[union-attr]


def test_on_backend_error_defaults_to_none() -> None:
    assert load_config(README / "example1.yaml").domains["mongo_cps"].on_backend_error is None
    assert _config("domain: d\non_backend_error: deny\n").domains["d"].on_backend_error == "deny"


def test_newer_envoyproxy_fields() -> None:
    config = load_config(FIXTURES / "valid" / "newer_fields.yaml")
    backend = config.lookup("newer", entries(("backend", "gpt-a")))
    assert isinstance(backend, ConfigRule)
    assert backend.quota_mode
    assert dict(backend.metadata) == {"backend": "gpt-a", "weight": 2, "tags": ["fast", "cheap"]}
    assert backend.limits[0].unit is Unit.MINUTE  # "MINUTE": units are case-insensitive, as envoyproxy's

    files = config.lookup("newer", entries(("files", "files/a.pdf")))
    assert isinstance(files, ConfigRule)
    assert files.shared == ((0, "files/*"),)
    assert metric_path("newer", entries(("files", "files/a.pdf")), files) == "newer.files_files/*"

    for unit, pairs in (
        (Unit.WEEK, (("route", "/a"), ("user", "u1"))),
        (Unit.YEAR, (("yearly", "x"),)),
    ):
        rule = config.lookup("newer", entries(*pairs))
        assert rule is not None and rule.limits[0].unit is unit


def test_metric_paths() -> None:
    config = load_config(FIXTURES / "valid" / "newer_fields.yaml")
    route = entries(("route", "/a"), ("user", "u1"))
    rule = config.lookup("newer", route)
    assert rule is not None
    assert rule.path == "newer.route.user"
    assert metric_path("newer", route, rule) == "newer.route_/a.user"  # value_to_metric on "route" only
    assert metric_path("newer", route[:1], rule) == rule.path  # not the entries it matched: no values

    # detailed_metric with a shared wildcard level: every value, except the shared level keeps its pattern.
    tenant = entries(("tenant", "t42"), ("user", "u1"))
    rule = config.lookup("newer", tenant)
    assert rule is not None and rule.detailed_metric
    assert metric_path("newer", tenant, rule) == "newer.tenant_t*.user_u1"

    assert detailed_path("d", entries(("a", "1"), ("b", ""))) == "d.a_1.b_"
    plain = Rule(path="d.a", detailed_metric=True)
    assert metric_path("d", entries(("a", "1")), plain) == "d.a_1"
    assert metric_path("d", entries(("a", "1")), Rule(path="d.a")) == "d.a"


def test_to_dict_is_json_ready() -> None:
    config = load_config(FIXTURES / "valid")
    data = config.to_dict()
    json.dumps(data)  # must not raise
    assert sorted(data["domains"]) == ["newer", "shop"]
    shop = data["domains"]["shop"]
    assert shop["on_backend_error"] == "allow"
    first = shop["descriptors"][0]
    assert first["key"] == "api_key"
    assert first["rule"]["limits"][0] == {
        "requests_per_unit": 10,
        "unit": "second",
        "window": 1,
        "algorithm": "token_bucket",
        "burst": 20,
        "name": "burst",
    }
    assert first["rule"]["hash_values"] is True
    tier = shop["descriptors"][2]
    assert tier == {
        "key": "tier",
        "value": "free",
        "descriptors": [tier["descriptors"][0]],
    }
    newer = data["domains"]["newer"]["descriptors"]
    assert newer[0]["rule"]["metadata"]["tags"] == ["fast", "cheap"]
    assert newer[1]["rule"]["share_threshold"] == [{"level": 0, "pattern": "files/*"}]
    assert newer[2]["descriptors"][0]["rule"]["value_to_metric_levels"] == [0]
    assert data["sources"] == [
        str(FIXTURES / "valid" / "extensions.yaml"),
        str(FIXTURES / "valid" / "newer_fields.yaml"),
    ]


def test_metadata_must_be_plain() -> None:
    with pytest.raises(ConfigError, match="metadata values must be") as caught:
        _config("domain: d\ndescriptors:\n  - key: a\n    metadata: {blob: !!binary aGk=}\n")
    assert caught.value.line == 4


# --- directories: envoyproxy's runtime layout and Kubernetes ConfigMap mounts ------------------------------------


def _write(path: Path, domain: str, requests: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"domain: {domain}\ndescriptors:\n  - key: k\n    rate_limit: {{unit: second, requests_per_unit: {requests}}}\n"
    )


def _configmap(root: Path, version: str, files: dict[str, tuple[str, int]]) -> None:
    """What the kubelet writes: ..<version>/ with the files, ..data -> it, and top-level links into ..data/."""
    for name, (domain, requests) in files.items():
        _write(root / f"..{version}" / name, domain, requests)
    tmp = root / "..data_tmp"
    tmp.symlink_to(f"..{version}")
    os.replace(tmp, root / "..data")
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def _requests(config: RateLimitConfig, domain: str) -> int:
    rule = config.lookup(domain, entries(("k", "v")))
    assert rule is not None
    return rule.limits[0].requests_per_unit


def test_configmap_layout(tmp_path: Path) -> None:
    _configmap(tmp_path, "2024_01_01_00_00_00.1", {"a.yaml": ("alpha", 1), "b.yml": ("beta", 2)})
    config = load_config(tmp_path)
    assert sorted(config.domains) == ["alpha", "beta"]  # each file once, though ..data holds them too
    assert config.domains["alpha"].source == str(tmp_path / "a.yaml")
    assert _requests(config, "alpha") == 1

    _configmap(tmp_path, "2024_01_02_00_00_00.2", {"a.yaml": ("alpha", 10), "b.yml": ("beta", 20)})
    config = load_config(tmp_path)  # after the kubelet's ..data swap: the new content
    assert (_requests(config, "alpha"), _requests(config, "beta")) == (10, 20)


def test_directory_rules(tmp_path: Path) -> None:
    _write(tmp_path / "one.yaml", "one")
    _write(tmp_path / "nested" / "two.yml", "two")  # envoyproxy's runtime loads subdirectories too
    _write(tmp_path / ".hidden.yaml", "hidden")
    _write(tmp_path / ".git" / "three.yaml", "hidden_dir")
    _write(tmp_path / "notes.txt", "text")
    (tmp_path / "same.yaml").symlink_to("one.yaml")  # one real file reached twice: loaded once
    (tmp_path / "dangling.yaml").symlink_to("gone.yaml")  # mid-swap: skipped
    (tmp_path / "dir.yaml").mkdir()
    files = config_files(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in files] == ["one.yaml", "nested/two.yml"]
    config = load_config(tmp_path)
    assert sorted(config.domains) == ["one", "two"]
    assert config.sources == (str(tmp_path / "one.yaml"), str(tmp_path / "nested" / "two.yml"))


def test_empty_directory_and_single_file(tmp_path: Path) -> None:
    assert dict(load_config(tmp_path).domains) == {}
    _write(tmp_path / "only.yaml", "only", 3)
    single = load_config(tmp_path / "only.yaml")
    assert _requests(single, "only") == 3
    assert single.sources == (str(tmp_path / "only.yaml"),)


def test_a_folder_that_cannot_be_listed_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an empty folder: its domains would vanish from a reload without a word. (Root lists everything, so the
    walk's error is injected.)"""
    (tmp_path / "a.yaml").write_text("domain: a\ndescriptors: []\n")
    real_walk = os.walk

    def walk(top: Any, onerror: Any = None, followlinks: bool = False) -> Any:
        yield from real_walk(top, onerror=onerror, followlinks=followlinks)
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "b")))

    monkeypatch.setattr("ratelimit.config.os.walk", walk)
    with pytest.raises(ConfigError, match="cannot read: Permission denied") as caught:
        load_config(tmp_path)
    assert caught.value.source == str(tmp_path / "b")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"domain: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_nesting_is_bounded(tmp_path: Path) -> None:
    deep = "domain: d\ndescriptors:\n" + "".join(
        f"{'  ' * (2 * n)}  - key: k{n}\n{'  ' * (2 * n)}    descriptors:\n" for n in range(70)
    )
    with pytest.raises(ConfigError, match="nested deeper than 64") as caught:
        _config(deep)
    assert caught.value.line == 2 + 2 * 64 + 1
    absurd = "domain: d\ndescriptors: " + "[" * 400 + "]" * 400 + "\n"
    with pytest.raises(ConfigError, match="nested too deeply"):
        _config(absurd)
    (tmp_path / "absurd.yaml").write_text(absurd)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(tmp_path)
