"""What makes a URL from a policy or a discovery document one meshgate may fetch."""

from __future__ import annotations

from urllib.parse import urlsplit


def http_url_problem(value: str) -> str | None:
    """Why ``value`` is not a fetchable http(s) URL, or None. Never quotes a URL that carries credentials."""
    if not value.startswith(("https://", "http://")):
        return "must be an http(s) URL"
    try:
        parts = urlsplit(value)
        host, _port = parts.hostname, parts.port  # .port raises ValueError when it is not a number in range
    except ValueError:
        return "is not a valid URL (host or port)"
    if "@" in parts.netloc:
        # urllib would take "user:password@host" for a host name and ask DNS for it; nothing would send them.
        return "must not carry credentials (user:password@host): they would not be sent, and would be logged"
    if not host:
        return "has no host"
    return None
