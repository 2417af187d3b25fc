"""Service identity: the caller's SPIFFE ID (``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` under Istio mTLS).

gRPC mode gets it from Envoy's ``source.principal``. HTTP mode has no peer data, so it reads the URI SAN that Envoy
forwards in ``x-forwarded-client-cert`` (XFCC).

Security: XFCC is only trustworthy when the Envoy in front of extauthz overwrites whatever the client sent, i.e.
``forward_client_cert_details: SANITIZE_SET`` (or ``APPEND_FORWARD`` behind proxies you trust) together with
``set_current_client_cert_details: {uri: true}`` on an mTLS listener. With the default ``SANITIZE`` Envoy strips
the header, and on a listener without client certificates any client can forge it: turn ``from_xfcc`` off there.
"""

from __future__ import annotations

import re

from extauthz.config import SpiffeSettings
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason

XFCC_HEADER = "x-forwarded-client-cert"
MAX_XFCC_CHARS = 64 * 1024
_SPIFFE = "spiffe://"
# SPIFFE ID: lower-case trust domain, then a path of non-empty segments (SPIFFE spec, section 2).
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*)")
_NS_SA = re.compile(r"/ns/([^/]+)/sa/([^/]+)")


def _split_top_level(value: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes (XFCC quotes values holding ``,`` ``;`` or ``=``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def principal_from_xfcc(value: str) -> str:
    """The first ``spiffe://`` URI of the immediate client in an XFCC header, or "".

    Envoy appends one element per hop, so the immediate client (the one whose certificate the last Envoy checked)
    is the *last* ``,``-separated element; with ``SANITIZE_SET`` it is the only one.
    """
    if not value or len(value) > MAX_XFCC_CHARS:
        return ""
    last = _split_top_level(value, ",")[-1]
    for pair in _split_top_level(last, ";"):
        key, sep, raw = pair.partition("=")
        if sep and key.strip().lower() == "uri":
            uri = _unquote(raw)
            if uri.startswith(_SPIFFE):
                return uri
    return ""


class SpiffeProvider:
    kind = IdentityKind.SPIFFE

    def __init__(self, settings: SpiffeSettings) -> None:
        self.settings = settings
        self._trust_domains = frozenset(settings.trust_domains)
        self.request_headers = frozenset({XFCC_HEADER}) if settings.from_xfcc else frozenset()
        self.reads_query = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def principal(self, inp: CheckInput) -> str:
        if inp.source_principal:
            return inp.source_principal
        if self.settings.from_xfcc:
            return principal_from_xfcc(inp.headers.get(XFCC_HEADER, ""))
        return ""

    def authenticate(self, inp: CheckInput) -> Identity | None:
        principal = self.principal(inp)
        if not principal.startswith(_SPIFFE):
            return None  # no certificate, or a non-SPIFFE principal: not ours to judge
        match = _SPIFFE_ID.fullmatch(principal)
        if match is None:
            raise AuthenticationError(Reason.INVALID_PRINCIPAL, "peer principal is not a valid SPIFFE ID")
        if self._trust_domains and match.group(1) not in self._trust_domains:
            raise AuthenticationError(Reason.INVALID_PRINCIPAL, "peer trust domain is not trusted")
        workload = _NS_SA.fullmatch(match.group(2))
        return Identity(
            kind=IdentityKind.SPIFFE,
            subject=principal,
            principal=principal,
            client=f"{workload.group(1)}/{workload.group(2)}" if workload else "",
        )
