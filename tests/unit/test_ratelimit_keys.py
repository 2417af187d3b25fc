"""ratelimit.keys: counter keys are unambiguous, share one Cluster slot per descriptor, and hide values on request."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.config import load_config, parse_config
from ratelimit.keys import HASH_HEX_CHARS, counter_key, escape
from ratelimit.model import Algorithm, Entry, Limit, Rule, Unit

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ratelimit"
LIMIT = Limit(10, Unit.SECOND)
RULE = Rule(path="d.k", limits=(LIMIT,))


def entries(*pairs: tuple[str, str]) -> tuple[Entry, ...]:
    return tuple(Entry(key, value) for key, value in pairs)


def hash_tag(key: str) -> str:
    """The part Redis Cluster hashes: between the first '{' and the next '}', when non-empty."""
    start = key.index("{")
    end = key.index("}", start + 1)
    assert end > start + 1
    return key[start + 1 : end]


def test_layout() -> None:
    key = counter_key("shop", entries(("user", "alice"), ("path", "/a")), RULE, LIMIT)
    assert key == f"mg:{{shop|user=alice|path=/a}}:{LIMIT.ident}"
    assert counter_key("shop", entries(("user", "alice")), RULE, LIMIT, prefix="rl").startswith("rl:{shop|")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # envoyproxy's "domain_key_value_" joins make all of these pairs one key.
        (("d", (("a_b", "c"),)), ("d", (("a", "b_c"),))),
        (("d_a", (("b", "c"),)), ("d", (("a_b", "c"),))),
        # Values that try to forge structure.
        (("d", (("a", "b|c=d"),)), ("d", (("a", "b"), ("c", "d")))),
        (("d", (("a", "b}|x"),)), ("d", (("a", "b"), ("x", "")))),
        (("d", (("a=b", "c"),)), ("d", (("a", "b=c"),))),
        (("d|a", (("b", "c"),)), ("d", (("a", ""), ("b", "c")))),
        (("d", (("a", "%7C"),)), ("d", (("a", "|"),))),
        (("d", (("a", ""),)), ("d", ())),
    ],
)
def test_no_collisions_between_look_alikes(
    first: tuple[str, tuple[tuple[str, str], ...]], second: tuple[str, tuple[tuple[str, str], ...]]
) -> None:
    a = counter_key(first[0], entries(*first[1]), RULE, LIMIT)
    b = counter_key(second[0], entries(*second[1]), RULE, LIMIT)
    assert a != b


def test_values_cannot_move_the_hash_tag() -> None:
    key = counter_key("d", entries(("a", "}{evil}"), ("b", "{x}")), RULE, LIMIT)
    assert hash_tag(key) == "d|a=%7D%7Bevil%7D|b=%7Bx%7D"
    assert key.count("{") == 1 and key.count("}") == 1


def test_limits_of_one_descriptor_share_a_slot_with_distinct_keys() -> None:
    config = load_config(FIXTURES / "valid" / "extensions.yaml")
    request = entries(("api_key", "k1"))
    rule = config.lookup("shop", request)
    assert rule is not None and len(rule.limits) == 2
    keys = [counter_key("shop", request, rule, limit) for limit in rule.limits]
    assert keys[0] != keys[1]
    assert hash_tag(keys[0]) == hash_tag(keys[1])
    other = counter_key("shop", entries(("api_key", "k2")), rule, rule.limits[0])
    assert hash_tag(other) != hash_tag(keys[0])


def test_hashed_values() -> None:
    config = load_config(FIXTURES / "valid" / "extensions.yaml")
    request = entries(("api_key", "secret-key-123"))
    rule = config.lookup("shop", request)
    assert rule is not None and rule.hash_values
    key = counter_key("shop", request, rule, rule.limits[0])
    assert "secret-key-123" not in key
    digest = hashlib.sha256(b"secret-key-123").hexdigest()[:HASH_HEX_CHARS]
    assert key == f"mg:{{shop|api_key=#{digest}}}:{rule.limits[0].ident}"
    # stable (not Python's salted hash) and value-dependent
    assert key == counter_key("shop", request, rule, rule.limits[0])
    assert key != counter_key("shop", entries(("api_key", "secret-key-124")), rule, rule.limits[0])


def test_hashed_and_raw_forms_never_meet() -> None:
    digest = hashlib.sha256(b"v").hexdigest()[:HASH_HEX_CHARS]
    hashed = counter_key("d", entries(("k", "v")), Rule(path="d.k", hash_values=True), LIMIT)
    raw = counter_key("d", entries(("k", f"#{digest}")), RULE, LIMIT)
    assert hashed != raw


def test_share_threshold_counts_matching_values_as_one() -> None:
    config = load_config(FIXTURES / "valid" / "newer_fields.yaml")
    a, b = entries(("files", "files/a.pdf")), entries(("files", "files/b.pdf"))
    rule = config.lookup("newer", a)
    assert rule is not None and rule is config.lookup("newer", b)
    limit = rule.limits[0]
    assert counter_key("newer", a, rule, limit) == counter_key("newer", b, rule, limit)
    # Without sharing, no raw value (not even one spelling the marker and the pattern) reaches the shared key.
    plain = Rule(path=rule.path, limits=rule.limits)
    for value in ("files/*", "*files/*", "*files/%2A"):
        assert counter_key("newer", entries(("files", value)), plain, limit) != counter_key("newer", a, rule, limit)


def test_shared_level_in_a_nested_descriptor() -> None:
    config = load_config(FIXTURES / "valid" / "newer_fields.yaml")
    one, two = entries(("tenant", "t1"), ("user", "u")), entries(("tenant", "t2"), ("user", "u"))
    rule = config.lookup("newer", one)
    assert rule is not None
    limit = rule.limits[0]
    assert counter_key("newer", one, rule, limit) == counter_key("newer", two, rule, limit)
    assert counter_key("newer", one, rule, limit) != counter_key(
        "newer", entries(("tenant", "t1"), ("user", "v")), rule, limit
    )


def test_limit_override_uses_its_own_ident() -> None:
    override = Limit(3, Unit.MINUTE)
    key = counter_key("d", entries(("k", "v")), RULE, override)
    assert key.endswith(f":{override.ident}")
    config = parse_config("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n")
    rule = config.lookup("d", entries(("k", "v")))
    assert rule is not None
    assert counter_key("d", entries(("k", "v")), rule, override).endswith(f":{override.ident}")


def test_prefix_must_not_carry_braces() -> None:
    with pytest.raises(ValueError, match="braces"):
        counter_key("d", entries(("k", "v")), RULE, LIMIT, prefix="mg{x}")


def test_escape() -> None:
    assert escape("plain-value_1.2/3") == "plain-value_1.2/3"
    assert escape("%{}|=#*") == "%25%7B%7D%7C%3D%23%2A"


# --- properties ----------------------------------------------------------------------------------------------------

text = st.text(alphabet=st.sampled_from("ab_|={}%#*:.\\ é"), max_size=6)
descriptor = st.tuples(text, st.lists(st.tuples(text, text), min_size=1, max_size=3))
limits = st.sampled_from(
    [
        Limit(10, Unit.SECOND),
        Limit(10, Unit.MINUTE),
        Limit(10, Unit.MONTH),
        Limit(10, Unit.SECOND, window_units=2),
        Limit(10, Unit.SECOND, algorithm=Algorithm.TOKEN_BUCKET, burst=5),
        Limit(11, Unit.SECOND),
    ]
)


def _key(value: tuple[str, list[tuple[str, str]]], rule: Rule = RULE, limit: Limit = LIMIT) -> str:
    return counter_key(value[0], entries(*value[1]), rule, limit)


@settings(max_examples=400, deadline=None)
@given(descriptor, descriptor)
def test_distinct_descriptors_get_distinct_keys(
    a: tuple[str, list[tuple[str, str]]], b: tuple[str, list[tuple[str, str]]]
) -> None:
    if a != b:
        assert _key(a) != _key(b)
    else:
        assert _key(a) == _key(b)


@settings(max_examples=200, deadline=None)
@given(descriptor, descriptor)
def test_distinct_descriptors_get_distinct_hashed_keys(
    a: tuple[str, list[tuple[str, str]]], b: tuple[str, list[tuple[str, str]]]
) -> None:
    hashed = Rule(path="x", hash_values=True)
    assert (_key(a, hashed) == _key(b, hashed)) == (a == b)


@settings(max_examples=200, deadline=None)
@given(descriptor, limits, limits)
def test_one_tag_per_descriptor_one_key_per_limit(
    a: tuple[str, list[tuple[str, str]]], first: Limit, second: Limit
) -> None:
    key1, key2 = _key(a, limit=first), _key(a, limit=second)
    assert hash_tag(key1) == hash_tag(key2)
    assert (key1 == key2) == (first.ident == second.ident)
    assert re.fullmatch(r"mg:\{[^{}]+\}:[^{}]+", key1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(text.filter(bool), text), min_size=1, max_size=3, unique_by=lambda pair: pair[0]))
def test_compiled_rules_build_the_same_keys_as_plain_rules(pairs: list[tuple[str, str]]) -> None:
    # The precomputed per-rule parts must agree with the general path for the entries the rule matches.
    lines = ["domain: 'd|{x}'", "descriptors:"]
    indent = ""
    for index, (key, _) in enumerate(pairs):
        lines.append(f'{indent}  - key: "{_yaml(key)}"')
        if index == len(pairs) - 1:
            lines.append(f"{indent}    rate_limit: {{unit: second, requests_per_unit: 1}}")
        else:
            lines.append(f"{indent}    descriptors:")
        indent += "    "
    config = parse_config("\n".join(lines) + "\n")
    request = entries(*pairs)
    rule = config.lookup("d|{x}", request)
    assert rule is not None
    plain = Rule(path=rule.path, limits=rule.limits)
    assert counter_key("d|{x}", request, rule, rule.limits[0]) == counter_key("d|{x}", request, plain, rule.limits[0])


def _yaml(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
