"""Service identity: the caller's SPIFFE ID (``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` under Istio mTLS).

gRPC mode gets it from Envoy's ``source.principal``. HTTP mode has no peer data, so it reads the URI SAN that Envoy
forwards in ``x-forwarded-client-cert`` (XFCC).

Security: XFCC is only trustworthy when the Envoy in front of extauthz overwrites whatever the client sent, i.e.
``forward_client_cert_details: SANITIZE_SET`` (or ``APPEND_FORWARD`` behind proxies you trust) together with
``set_current_client_cert_details: {uri: true}`` on an mTLS listener. With the default ``SANITIZE`` Envoy strips
the header, and on a listener without client certificates any client can forge it: turn ``from_xfcc`` off there.

Under Istio, extauthz's own sidecar appends one more element (``By=`` extauthz's ID, ``URI=`` the workload whose
sidecar asked) after the one that names the real caller; ``xfcc_skip_by`` lists such proxies' IDs so that their
elements are passed over. The caller's sidecar drops XFCC on a connection without a client certificate, so a
plaintext caller leaves only skipped elements: no SPIFFE identity.
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


class _Unbalanced(ValueError):
    """A quote opened and never closed: the header's structure is not to be trusted."""


def _split_top_level(value: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes (XFCC quotes values holding ``,`` ``;`` or ``=``).
    An unclosed quote raises ``_Unbalanced``: it would swallow every element appended after it."""
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
    if quoted:
        raise _Unbalanced(value[:64])
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def principal_from_xfcc(value: str, skip_by: frozenset[str] = frozenset()) -> str:
    """The first ``spiffe://`` URI of the immediate client in an XFCC header, or "".

    Envoy appends one element per hop, so the immediate client (the one whose certificate the last Envoy checked)
    is the *last* ``,``-separated element; with ``SANITIZE_SET`` it is the only one. Trailing elements whose ``By``
    is in ``skip_by`` are passed over (only trailing ones: earlier elements may come from the client).
    """
    if not value or len(value) > MAX_XFCC_CHARS:
        return ""
    try:
        for element in reversed(_split_top_level(value, ",")):
            by, uri = _by_and_spiffe_uri(element)
            if by not in skip_by:
                return uri
    except _Unbalanced:  # e.g. a client's element opening a quote to hide the ones Envoy appended
        return ""
    return ""


def _by_and_spiffe_uri(element: str) -> tuple[str, str]:
    """One XFCC element's ``By`` and its first ``spiffe://`` ``URI`` ("" when absent)."""
    by = uri = ""
    for pair in _split_top_level(element, ";"):
        key, sep, raw = pair.partition("=")
        name = key.strip().lower()
        if not sep:
            continue
        if name == "by" and not by:
            by = _unquote(raw)
        elif name == "uri" and not uri:
            value = _unquote(raw)
            if value.startswith(_SPIFFE):
                uri = value
    return by, uri


def is_spiffe_id(value: str) -> bool:
    """A well-formed SPIFFE ID (lower-case trust domain, non-empty path segments), as Envoy writes one."""
    return _SPIFFE_ID.fullmatch(value) is not None


class SpiffeProvider:
    kind = IdentityKind.SPIFFE

    def __init__(self, settings: SpiffeSettings) -> None:
        self.settings = settings
        self._trust_domains = frozenset(settings.trust_domains)
        self.request_headers = frozenset({XFCC_HEADER}) if settings.from_xfcc else frozenset()
        self._skip_by = frozenset(settings.xfcc_skip_by)
        self.reads_query = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def principal(self, inp: CheckInput) -> str:
        if inp.source_principal:
            return inp.source_principal
        if self.settings.from_xfcc:
            return principal_from_xfcc(inp.headers.get(XFCC_HEADER, ""), self._skip_by)
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
