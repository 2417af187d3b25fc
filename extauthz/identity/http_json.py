"""Blocking HTTP(S) calls that return a JSON document, for identity providers' worker threads (JWKS, discovery,
token introspection). Bounded in size and time; every error is one ``FetchError`` whose message is safe to log."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

from meshgate.log import redact_url

USER_AGENT = "meshgate"


class FetchError(Exception):
    """The call failed or its answer is not JSON; the message names the URL (redacted), never a credential."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx answer is then an HTTPError


_FOLLOWING = urllib.request.build_opener()
_NOT_FOLLOWING = urllib.request.build_opener(_NoRedirects)


def fetch_json(
    url: str,
    *,
    timeout_s: float,
    max_bytes: int,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    follow_redirects: bool = True,
) -> tuple[Any, Message]:
    """GET (or POST ``data``) ``url``; the JSON document and the answer's headers.

    Calls that carry a credential pass ``follow_redirects=False``: urllib would send every header, Authorization
    included, on to wherever a redirect points.
    """
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"unsupported URL scheme in {redact_url(url)!r}")
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, headers={"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    )
    opener = _FOLLOWING if follow_redirects else _NOT_FOLLOWING
    what = f"{request.get_method()} {redact_url(url)}"
    try:
        with opener.open(request, timeout=timeout_s) as answer:
            body = answer.read(max_bytes + 1)
            answer_headers = answer.headers
    except urllib.error.HTTPError as error:
        error.close()
        raise FetchError(f"{what}: {error}") from None
    except OSError as error:  # URLError, timeouts, refused connections
        raise FetchError(f"{what}: {error}") from None
    if len(body) > max_bytes:
        raise FetchError(f"{what}: document larger than {max_bytes} bytes")
    try:
        return json.loads(body), answer_headers
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise FetchError(f"{what}: not JSON: {error}") from None
