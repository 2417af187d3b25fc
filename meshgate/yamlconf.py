"""YAML loading that remembers where every value came from, so config errors name file and line.

``load(path)`` returns plain dicts/lists/scalars, except that mappings are ``Located`` dicts which know the line of
each key; ``Reader`` walks them strictly (unknown keys and wrong types are ``ConfigError`` with ``file:line``).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """A config file is not acceptable. ``str()`` is ``file:line: message``."""

    def __init__(self, source: str, line: int, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        super().__init__(f"{source}:{line}: {message}" if line else f"{source}: {message}")


class Located(dict[str, Any]):
    """A mapping that remembers its own line and each key's line (1-based)."""

    line: int = 0
    key_lines: dict[str, int]


class LocatedList(list[Any]):
    line: int = 0
    item_lines: list[int]


# A config's values once its aliases are expanded (an alias is shared at load; code walking the config copies it):
# far above any real config, far below what ten nested ten-way aliases (a 500-byte file) expand to.
MAX_EXPANDED_VALUES = 1_000_000


class _LocatedConstruction:
    """What both loaders add to PyYAML's safe loading: ``Located`` results, and a tag's refusal as a ConfigError."""

    name: str

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except (ConfigError, yaml.YAMLError, RecursionError):
            raise
        except Exception:  # a tag's constructor refusing its text: `!!int x`, an int of 5,000 digits
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise ConfigError(self.name, node.start_mark.line + 1, f"not a valid {kind} value") from None


class _PythonLoader(_LocatedConstruction, yaml.SafeLoader):
    pass


# libyaml parses about 5x faster than the pure-Python parser (a 1.2 MB policy: 1.7 s against 9 s).
_HAS_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))


class _LibyamlLoader(_LocatedConstruction, yaml.CSafeLoader if _HAS_LIBYAML else yaml.SafeLoader):  # type: ignore[misc]
    pass


_Loader = _PythonLoader | _LibyamlLoader
LOADER: type[_PythonLoader] | type[_LibyamlLoader] = _LibyamlLoader if _HAS_LIBYAML else _PythonLoader


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    result = Located()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError(loader.name, key_node.start_mark.line + 1, f"keys must be strings, got {_kind(key)}")
        if key in result:
            raise ConfigError(loader.name, key_node.start_mark.line + 1, f"duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    result = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


for _cls in (_PythonLoader, _LibyamlLoader):
    _cls.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _cls.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
    # Timestamps stay strings: callers parse the formats they accept and name the line when they can't.
    _cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def loads(text: str, source: str) -> Any:
    """Parse one YAML document from ``text``; ``source`` names it in errors."""
    loader: _Loader | None = None
    try:
        loader = LOADER(text)  # checks the characters already
        loader.name = source
        data = loader.get_single_data()
    except ConfigError:
        raise
    except yaml.reader.ReaderError as error:
        # PyYAML's reader refuses in the constructor (loader is still None) and counts characters; libyaml bytes.
        libyaml = isinstance(loader, _LibyamlLoader) or (loader is None and LOADER is _LibyamlLoader)
        line = _line_at(text, max(error.position, 0), in_bytes=libyaml)
        what = f" (#x{error.character:04x})" if isinstance(error.character, int) else ""
        raise ConfigError(source, line, f"invalid YAML: {error.reason}{what}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(source, line, f"invalid YAML: {_problem(error, text)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(source, 0, f"invalid YAML: {error}") from None
    except UnicodeEncodeError:  # a lone surrogate: libyaml reads UTF-8, which cannot hold one
        raise ConfigError(source, 0, "invalid YAML: not valid Unicode text") from None
    except RecursionError:
        raise ConfigError(source, 0, "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if _expanded_size(data, {}, set()) > MAX_EXPANDED_VALUES:
        raise ConfigError(source, 0, f"over {MAX_EXPANDED_VALUES:,} values once its aliases are expanded")
    return data


def _problem(error: yaml.MarkedYAMLError, text: str) -> str:
    """The parser's problem; libyaml's "found character that cannot start any token" names the character, as
    PyYAML's does (a tab, most often)."""
    problem = str(error.problem or error)
    mark = error.problem_mark
    if problem == "found character that cannot start any token" and mark is not None:
        lines = text.split("\n")
        if mark.line < len(lines) and mark.column < len(lines[mark.line]):
            return f"found character {lines[mark.line][mark.column]!r} that cannot start any token"
    return problem


def _line_at(text: str, position: int, *, in_bytes: bool) -> int:
    """The 1-based line of a reader error's position (libyaml counts UTF-8 bytes, PyYAML characters)."""
    before = text.encode("utf-8", "surrogatepass")[:position] if in_bytes else text[:position].encode()
    return before.count(b"\n") + 1


def _expanded_size(value: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``value`` holds with every alias expanded; each shared list or mapping counted once."""
    if not isinstance(value, dict | list):
        return 1
    known = sizes.get(id(value))
    if known is not None:
        return known
    if id(value) in open_:  # an alias inside what it names: endless once expanded
        return MAX_EXPANDED_VALUES + 1
    open_.add(id(value))
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, sizes, open_)
        if total > MAX_EXPANDED_VALUES:
            break
    open_.discard(id(value))
    sizes[id(value)] = total
    return total


# A Kubernetes ConfigMap holds at most 1 MiB; no real policy or descriptor file comes near this.
MAX_FILE_BYTES = 16 * 1024 * 1024


def load(path: str | Path) -> Any:
    path = Path(path)
    return loads(read_text(path), str(path))


def read_text(path: Path) -> str:
    """A config file's text. Only a regular file of at most ``MAX_FILE_BYTES`` is read: a FIFO must not block the
    reader (open is non-blocking, then refused) and /dev/zero must not fill the memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(str(path), 0, "cannot read: not a regular file")
            with open(fd, "rb", closefd=False) as file:
                data = file.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(str(path), 0, f"cannot read: larger than {MAX_FILE_BYTES:,} bytes")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), 0, f"cannot read: {error}") from None


class Reader:
    """Strict, typed access to one ``Located`` mapping. Call ``done()`` to reject keys nobody asked for."""

    def __init__(self, data: Any, source: str, line: int = 0, what: str = "mapping") -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, getattr(data, "line", line), f"expected a {what}, got {_kind(data)}")
        self.data = data
        self.source = source
        self.line = getattr(data, "line", line)
        self._key_lines: dict[str, int] = getattr(data, "key_lines", {})
        self._used: set[str] = set()

    def line_of(self, key: str) -> int:
        return self._key_lines.get(key, self.line)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.line_of(key), f"{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type[T], default: T) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return self._check(key, self.data[key], kind)

    def require(self, key: str, kind: type[T]) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            raise ConfigError(self.source, self.line, f"missing required key {key!r}")
        return self._check(key, self.data[key], kind)

    def number(self, key: str, default: float, *, minimum: float | None = None) -> float:
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {_kind(value)}")
        number = self._finite(key, value)
        if minimum is not None and number < minimum:
            raise self.error(key, f"must be at least {minimum}, got {number:g}")
        return number

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of strings; a single string is accepted as a list of one."""
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(key, "expected a string or a list of strings")
        return tuple(value)

    def child(self, key: str) -> Reader | None:
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        return Reader(value, self.source, self.line_of(key), what=f"mapping under {key!r}")

    def children(self, key: str) -> Iterator[Reader]:
        """Each mapping in the list under ``key``."""
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        lines = getattr(value, "item_lines", [self.line_of(key)] * len(value))
        for item, line in zip(value, lines, strict=True):
            yield Reader(item, self.source, line, what=f"mapping in {key!r}")

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def convert(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        """Parse ``key`` with ``parse``; its ValueError becomes a ConfigError on that line."""
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        try:
            return parse(self.data[key])
        except (ValueError, TypeError) as error:
            raise self.error(key, str(error)) from None

    def done(self) -> None:
        unknown = [key for key in self.data if key not in self._used]
        if unknown:
            key = unknown[0]
            raise ConfigError(self.source, self.line_of(key), f"unknown key {key!r}")

    def _finite(self, key: str, value: float) -> float:
        """``value`` as a float; NaN, infinities and ints too large for a float are errors on ``key``'s line."""
        try:
            number = float(value)
        except OverflowError:
            raise self.error(key, "number too large") from None
        if not math.isfinite(number):
            raise self.error(key, f"must be a finite number, got {number}")
        return number

    def _check(self, key: str, value: Any, kind: type[T]) -> T:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return self._finite(key, value)  # type: ignore[return-value]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"expected {kind.__name__}, got {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 80 else shown[:77] + '...'}"
