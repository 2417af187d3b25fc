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


def test_extra_fields_pass_the_redaction_whoever_logs_them(stream: io.StringIO) -> None:
    log = logging.getLogger("meshgate.test")
    log.warning(
        "upstream said no",
        extra={
            "authorization": "Bearer eyJ.secret",
            "x_api_key": "mgk_live_k3y",
            "headers": {"Cookie": "sid=s3cr3t", "x-request-id": "r-1"},
            "jwks_url": "https://idp/keys?access_token=t0ken",
            "path": "/orders",
        },
    )
    (entry,) = lines(stream)
    assert entry["authorization"] == REDACTED
    assert entry["x_api_key"] == REDACTED  # snake_case names count as their header spelling
    assert entry["headers"] == {"Cookie": REDACTED, "x-request-id": "r-1"}
    assert entry["jwks_url"] == "https://idp/keys?access_token=***"
    assert entry["path"] == "/orders"
    assert not any(secret in stream.getvalue() for secret in ("eyJ.secret", "s3cr3t", "t0ken", "mgk_live_k3y"))


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
        ("/a/b?access_token=x", "/a/b?access_token=***"),
        ("https://h/p?x=1&api_key=k&code=c&sig=s#frag", "https://h/p?x=1&api_key=***&code=***&sig=***"),
        ("/p#token", "/p"),
        ("/plain", "/plain"),
        ("https://user:hunter2@idp/jwks?client_secret=s", "https://user:***@idp/jwks?client_secret=***"),
        # Redis URLs: the one function serves them too
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://alice:pw@h", "redis://alice:***@h"),
        ("redis://h:1", "redis://h:1"),
        (
            "redis+sentinel://:p@a,b/m?sentinel_password=x&ca_cert=/c",
            "redis+sentinel://:***@a,b/m?sentinel_password=***&ca_cert=/c",
        ),
        ("redis://:p@ss@h", "redis://:***@h"),  # an unencoded @ in the password: still masked
        ("unix://:pw@/r.sock?db=1", "unix://:***@/r.sock?db=1"),
        ("garbage:pw@h", "garbage:***@h"),
        ("", ""),
        # "://" in a query is no scheme; a # in a password is not a fragment
        ("/login?access_token=abc&next=https://x", "/login?access_token=***&next=https://x"),
        ("redis://:pa#ss@h/0", "redis://:***@h/0"),
        ("https://h/users/@me?token=t", "https://h/users/:***@me?token=***"),  # an @ in a path: masks more
        ("/users/@me", "/users/@me"),
        ("https://[::1]:8443/jwks?api-key=k", "https://[::1]:8443/jwks?api-key=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
