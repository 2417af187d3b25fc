"""Structured JSON logs (one object per line on stderr) and THE one place where credentials are redacted."""

from __future__ import annotations

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


def redact_url(url: str) -> str:
    """Drop the query string and fragment: they may carry tokens (``?access_token=``) and are never logged."""
    for mark in ("?", "#"):
        cut = url.find(mark)
        if cut >= 0:
            url = url[:cut]
    return url


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
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


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
