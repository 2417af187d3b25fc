from pathlib import Path

import pytest

from meshgate import yamlconf
from meshgate.yamlconf import ConfigError, Reader

DOC = """\
name: demo
count: 3
ratio: 0.5
flag: true
tags: [a, b]
single: one
nested:
  inner: 1
items:
  - q: 1
  - q: 2
    extra: 3
when: 2026-01-01T00:00:00Z
"""


def reader() -> Reader:
    return Reader(yamlconf.loads(DOC, "t.yaml"), "t.yaml")


def test_typed_access_and_lines() -> None:
    r = reader()
    assert r.get("name", str, "") == "demo"
    assert r.require("count", int) == 3
    assert r.get("ratio", float, 0.0) == 0.5
    assert r.get("count", float, 0.0) == 3.0
    assert r.number("ratio", 1.0, minimum=0) == 0.5
    assert r.strings("tags") == ("a", "b")
    assert r.strings("single") == ("one",)
    assert r.strings("absent", ("x",)) == ("x",)
    assert r.line_of("nested") == 7
    # Timestamps stay strings so that callers parse (and report) them.
    assert r.get("when", str, "") == "2026-01-01T00:00:00Z"


def test_unknown_key_in_list_item_names_its_line() -> None:
    items = list(reader().children("items"))
    assert [item.get("q", int, 0) for item in items] == [1, 2]
    items[0].done()
    with pytest.raises(ConfigError) as caught:
        items[1].done()
    assert str(caught.value) == "t.yaml:12: unknown key 'extra'"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.get("name", int, 0), "t.yaml:1: name: expected int, got str 'demo'"),
        (lambda r: r.get("flag", int, 0), "t.yaml:4: flag: expected int, got bool True"),
        (lambda r: r.require("missing", str), "t.yaml:1: missing required key 'missing'"),
        (lambda r: r.number("name", 0), "t.yaml:1: name: expected a number, got str 'demo'"),
        (lambda r: r.number("count", 0, minimum=5), "t.yaml:2: count: must be at least 5, got 3"),
        (lambda r: r.strings("nested"), "t.yaml:7: nested: expected a string or a list of strings"),
        (lambda r: list(r.children("name")), "t.yaml:1: name: expected a list, got str 'demo'"),
        (lambda r: r.choice("name", ("a", "b"), "a"), "t.yaml:1: name: must be one of a, b; got 'demo'"),
        (
            lambda r: r.convert("name", int, 0),
            "t.yaml:1: name: invalid literal for int() with base 10: 'demo'",
        ),
    ],
)
def test_errors_name_file_and_line(call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        call(reader())
    assert str(caught.value) == message


def test_unused_keys_rejected_by_done() -> None:
    r = reader()
    r.get("name", str, "")
    with pytest.raises(ConfigError, match=r"t\.yaml:2: unknown key 'count'"):
        r.done()


def test_child_and_convert() -> None:
    r = reader()
    nested = r.child("nested")
    assert nested is not None
    assert nested.get("inner", int, 0) == 1
    assert r.child("absent") is None
    assert r.convert("count", lambda v: v * 2, 0) == 6
    assert r.convert("absent", int, 7) == 7
    assert r.has("count") and not r.has("absent")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\na: 2\n", "x.yaml:2: duplicate key 'a'"),
        ("a: [1, 2\n", "x.yaml:2: invalid YAML"),
        ("? [1]\n: 2\n", "x.yaml:1: keys must be strings"),
        ("- 1\n- 2\n", "x.yaml:1: expected a mapping, got a list"),
        ("", "x.yaml: expected a mapping, got nothing"),
    ],
)
def test_bad_documents(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Reader(yamlconf.loads(text, "x.yaml"), "x.yaml")
    assert str(caught.value).startswith(message)


def test_load_reads_files_and_reports_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\n")
    assert yamlconf.load(good) == {"a": 1}
    with pytest.raises(ConfigError, match="cannot read"):
        yamlconf.load(tmp_path / "missing.yaml")
    binary = tmp_path / "bad.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        yamlconf.load(binary)
