import os
import threading
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


@pytest.fixture(autouse=True, params=["libyaml", "python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both parsers: libyaml where PyYAML has it, pure Python where it does not."""
    if request.param == "python":
        monkeypatch.setattr(yamlconf, "LOADER", yamlconf._PythonLoader)
    elif not yamlconf._HAS_LIBYAML:
        pytest.skip("PyYAML built without libyaml")
    return str(request.param)


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
        # What a fuzzer found raising out of the loader, each now an error on its line:
        ("a: 1\nb: [\x01]\n", "x.yaml:2: invalid YAML: "),  # each parser words it its own way
        ("a: 1\nb: !!int x\n", "x.yaml:2: not a valid int value"),
        ("a: !!float\n", "x.yaml:1: not a valid float value"),
        ("a: !!bool x\n", "x.yaml:1: not a valid bool value"),
        ("a: 1" + "0" * 5000 + "\n", "x.yaml:1: not a valid int value"),  # over Python's int-from-text limit
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "x.yaml: invalid YAML: nested too deeply"),
        ("? " + "[x]" + "\n: 1\n", "x.yaml:1: keys must be strings, got a list"),
    ],
)
def test_bad_documents(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Reader(yamlconf.loads(text, "x.yaml"), "x.yaml")
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: ééé\nb: \x07\n", 2),
        ("é\né\né: x\x07", 3),
        ("\x07", 1),
        ("name: ééééééééééé\nother: ééé\nbad: \x07\n", 3),  # bytes and characters name different lines
    ],
)
def test_a_bad_character_is_reported_on_its_line_after_multibyte_text(text: str, line: int) -> None:
    with pytest.raises(ConfigError, match=r"\(#x0007\)") as caught:
        yamlconf.loads(text, "x.yaml")
    assert caught.value.line == line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:\n\tb: 1\n", "x.yaml:2: invalid YAML: found character '\\t' that cannot start any token"),
        ("a: é\nb: `x\n", "x.yaml:2: invalid YAML: found character '`' that cannot start any token"),
    ],
)
def test_both_parsers_name_a_character_that_cannot_start_a_token(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        yamlconf.loads(text, "x.yaml")
    assert str(caught.value) == message


def test_a_lone_surrogate_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml(:1)?: invalid YAML"):
        yamlconf.loads("a: \ud800\n", "x.yaml")


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


def test_only_regular_files_of_bounded_size_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    outcome: list[str] = []

    def read() -> None:
        try:
            yamlconf.load(fifo)
        except ConfigError as error:
            outcome.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome == [f"{fifo}: cannot read: not a regular file"]
    device = tmp_path / "zero.yaml"
    device.symlink_to("/dev/zero")  # endless: must not be read into memory
    with pytest.raises(ConfigError, match="not a regular file"):
        yamlconf.load(device)
    with pytest.raises(ConfigError, match="not a regular file"):
        yamlconf.load(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 45 + "\n")  # 49 bytes
    monkeypatch.setattr(yamlconf, "MAX_FILE_BYTES", 40)
    with pytest.raises(ConfigError, match="cannot read: larger than 40 bytes"):
        yamlconf.load(big)
    monkeypatch.setattr(yamlconf, "MAX_FILE_BYTES", 50)
    assert yamlconf.load(big) == {"a": "x" * 45}


def test_aliases_that_expand_past_the_bound_are_refused_at_load() -> None:
    """Ten-way aliases nested eight deep: a 500-byte file that would be 10**8 values once walked or copied."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 9)]
    with pytest.raises(ConfigError, match="over 1,000,000 values once its aliases are expanded"):
        yamlconf.loads("\n".join(levels) + "\n", "x.yaml")
    merged = yamlconf.loads("base: &base {a: 1}\nuse: {<<: *base, b: 2}\nagain: *base\n", "x.yaml")
    assert merged["use"] == {"a": 1, "b": 2} and merged["again"] == {"a": 1}  # ordinary aliases still work


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".nan", "must be a finite number, got nan"),
        ("-.inf", "must be a finite number"),
        ("0x" + "f" * 400, "number too large"),
    ],
)
def test_numbers_must_be_finite(value: str, message: str) -> None:
    r = Reader(yamlconf.loads(f"n: {value}\nf: {value}\n", "x.yaml"), "x.yaml")
    with pytest.raises(ConfigError, match=f"x.yaml:1: n: {message}"):
        r.number("n", 1.0, minimum=0)
    with pytest.raises(ConfigError, match=f"x.yaml:2: f: {message}"):
        r.get("f", float, 1.0)


def test_long_values_are_shortened_in_messages() -> None:
    r = Reader(yamlconf.loads(f"n: {'x' * 100_000}\n", "x.yaml"), "x.yaml")
    with pytest.raises(ConfigError) as caught:
        r.get("n", int, 0)
    assert len(str(caught.value)) < 200 and str(caught.value).endswith("...")
