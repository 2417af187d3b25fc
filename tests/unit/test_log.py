"""JSON log lines and the one redaction function."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from meshgate.log import REDACTED, configure_logging, get_audit_logger, redact_headers, redact_url


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    handler = configure_logging("info", stream=out)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)
    assert [h for h in root.handlers if h not in handlers] == []


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_extra_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("meshgate.test")
    log.info("listening", extra={"grpc_port": 9001, "path": "/x"})
    log.debug("hidden at info")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed")
    first, second = lines(stream)
    assert first["msg"] == "listening"
    assert first["level"] == "info"
    assert first["logger"] == "meshgate.test"
    assert first["grpc_port"] == 9001
    assert first["path"] == "/x"
    assert isinstance(first["time"], str) and first["time"].endswith("Z")
    assert second["level"] == "error"
    assert "ValueError" in str(second["exc"])


def test_configure_is_idempotent_and_sets_level(stream: io.StringIO) -> None:
    again = io.StringIO()
    handler = configure_logging("error", stream=again)
    try:
        logging.getLogger("meshgate.test").warning("dropped")
        get_audit_logger().info("decision", extra={"decision": "deny"})
        assert stream.getvalue() == ""
        (entry,) = lines(again)
        assert entry["logger"] == "meshgate.audit"
        assert entry["decision"] == "deny"
    finally:
        logging.getLogger().removeHandler(handler)


def test_values_that_json_cannot_encode_are_stringified(stream: io.StringIO) -> None:
    logging.getLogger("meshgate.test").info("odd", extra={"value": {1, 2}.__class__})
    assert lines(stream)[0]["value"] == "<class 'set'>"


def test_redact_headers() -> None:
    headers = {
        "authorization": "Bearer eyJ...",
        "Proxy-Authorization": "Basic x",
        "cookie": "session=1",
        "set-cookie": "a=b",
        "x-api-key": "k",
        "x-auth-token": "t",
        "x-client-secret": "s",
        "x-my-api-key-2": "k2",
        "x-db-password": "p",
        "accept": "application/json",
        "x-request-id": "r-1",
    }
    redacted = redact_headers(headers)
    assert redacted["accept"] == "application/json"
    assert redacted["x-request-id"] == "r-1"
    secret = set(headers) - {"accept", "x-request-id"}
    assert {redacted[name] for name in secret} == {REDACTED}
    assert headers["authorization"] == "Bearer eyJ..."  # the input is untouched


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/a/b?access_token=x", "/a/b"),
        ("https://h/p?x=1#frag", "https://h/p"),
        ("/p#token", "/p"),
        ("/plain", "/plain"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
