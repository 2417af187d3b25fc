"""Structured JSON logs (one object per line on stderr) and THE one place where credentials are redacted."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

REDACTED = "[redacted]"
AUDIT_LOGGER = "meshgate.audit"

# Exact names that always carry credentials, and fragments that make any header name suspicious.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"},
)
_SECRET_FRAGMENTS = ("token", "secret", "api-key", "apikey", "password")

# Attributes every LogRecord has; everything else came in through ``extra=`` and goes into the JSON object.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def is_secret_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_HEADERS or any(fragment in lowered for fragment in _SECRET_FRAGMENTS)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` that is safe to log: credential-bearing values replaced by ``[redacted]``."""
    return {name: (REDACTED if is_secret_header(name) else value) for name, value in headers.items()}


URL_MASK = "***"
# Query parameters that carry credentials, beyond the header-like names (``access_token``, ``sentinel_password``).
_SECRET_PARAMS = frozenset({"code", "key", "sig", "signature", "auth"})


def redact_url(url: str) -> str:
    """``url`` safe to log; never raises. The password in its userinfo and the values of credential-looking query
    parameters (``access_token=``, ``sentinel_password=``, ``api_key=`` ...) become ``***``; the fragment is
    dropped. When in doubt (an ``@`` in a path) it masks more, never less."""
    scheme, sep, rest = url.partition("://")
    if not sep or any(mark in scheme for mark in "/?#@"):  # no scheme (a path; "://" in a query is no scheme)
        scheme, sep, rest = "", "", url
    query_at = rest.find("?")
    at = rest.rfind("@", 0, query_at if query_at >= 0 else len(rest))  # the last @ before any query: userinfo
    if at >= 0 and (sep or "/" not in rest[:at]):
        rest = f"{rest[:at].partition(':')[0]}:{URL_MASK}@{rest[at + 1 :]}"
    rest = rest.partition("#")[0]
    base, qmark, query = rest.partition("?")
    if qmark:
        parts = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            lowered = name.lower().replace("_", "-")
            secret = eq and (is_secret_header(lowered) or lowered in _SECRET_PARAMS)
            parts.append(f"{name}={URL_MASK}" if secret else item)
        rest = f"{base}?{'&'.join(parts)}"
    return f"{scheme}{sep}{rest}"


def _format_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "msg", ...extra}``; an exception adds ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _format_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = _safe_extra(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


_PLAIN, _SECRET, _URL = 0, 1, 2
_SCALARS = (str, int, float, bool, type(None))


@functools.lru_cache(maxsize=1024)
def _field_kind(key: str) -> int:
    """How an ``extra=`` field is redacted, by its name (snake_case names count as their header spelling)."""
    if is_secret_header(key.replace("_", "-")):
        return _SECRET
    return _URL if key.endswith(("url", "uri")) else _PLAIN


def _safe_extra(key: str, value: Any) -> Any:
    """Every ``extra=`` field passes the redaction here, whoever logs it: a credential-named field, a mapping of
    headers, a URL. Plain scalars (all of an audit line) take the first test only."""
    kind = _field_kind(key)
    if kind == _PLAIN:
        if type(value) in _SCALARS or not isinstance(value, Mapping):
            return value
        return {name: (REDACTED if is_secret_header(str(name)) else item) for name, item in value.items()}
    if kind == _SECRET:
        return REDACTED
    return redact_url(value) if isinstance(value, str) else value


_HANDLER_MARK = "_meshgate_json"


def configure_logging(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger (root) to one JSON-lines handler on ``stream`` (stderr). Idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The audit stream is always on: its volume is governed by sampling, not by the log level.
    get_audit_logger().setLevel(logging.INFO)
    return handler


def get_audit_logger() -> logging.Logger:
    return logging.getLogger(AUDIT_LOGGER)
