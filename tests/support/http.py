"""One blocking HTTP(S) GET for tests that talk to Envoy on loopback."""

from __future__ import annotations

import http.client
import ssl


def get(
    port: int, path: str, headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET 127.0.0.1:port/path; returns status, lower-cased response headers and the raw body."""
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()
