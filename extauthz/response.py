"""Turn an authorization outcome into what Envoy should do (pure functions, no I/O, no protobuf)."""

from __future__ import annotations

import json

from extauthz.config import ResponseSettings
from extauthz.model import CheckInput, Decision, Identity, Reason

JSON_CONTENT_TYPE = ("content-type", "application/json")


def identity_header_names(settings: ResponseSettings) -> tuple[str, ...]:
    return (
        settings.subject_header,
        settings.kind_header,
        settings.client_header,
        settings.roles_header,
        settings.tier_header,
        settings.issuer_header,
    )


def header_safe(value: str) -> str:
    """``value`` without control characters, so that no claim (a JWT ``sub`` with CR/LF) can split a header, in
    either transport, and without lone surrogates (JSON's ``"\\ud800"``), which no UTF-8 encoder takes."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(ch for ch in value if ch >= " " and ch != "\x7f" and not "\ud800" <= ch <= "\udfff")


def roles_value(identity: Identity) -> str:
    """The roles as one comma-separated value. A role that itself holds a comma is left out: an upstream that
    splits the value would read it as several roles (``"dev,admin"`` as ``admin``)."""
    return ",".join(sorted(role for role in identity.roles if "," not in role))


def identity_metadata(identity: Identity, keys: tuple[str, ...]) -> dict[str, str]:
    """String-valued metadata for Envoy's rate-limit ``metadata`` actions (only strings match there): the
    non-empty ones of ``keys`` (the policy's ``response.metadata``), in that order, header-safe."""
    values = {
        "kind": identity.kind.value,
        "sub": identity.subject,
        "issuer": identity.issuer,
        "client": identity.client,
        "principal": identity.principal,
        "tier": identity.tier,
        "roles": roles_value(identity),
    }
    return {key: header_safe(values[key]) for key in keys if values[key]}


def allow(identity: Identity | None, rule: str, reason: Reason, settings: ResponseSettings) -> Decision:
    """Allow, overwriting every identity header (a client may have forged one) and stripping the credential.

    The result depends only on identity, rule and reason (not on the request), so the pipeline may reuse it.
    """
    to_set: list[tuple[str, str]] = []
    to_remove: list[str] = []
    if identity is None:
        to_remove.extend(identity_header_names(settings))
    else:
        values = (
            identity.subject,
            identity.kind.value,
            identity.client,
            roles_value(identity),
            identity.tier,
            identity.issuer,
        )
        for name, value in zip(identity_header_names(settings), values, strict=True):
            safe = header_safe(value)
            if safe:
                to_set.append((name, safe))
            else:
                to_remove.append(name)
        if settings.strip_credentials and identity.credential_header:
            to_remove.append(identity.credential_header)
    return Decision(
        allowed=True,
        status=200,
        reason=reason,
        identity=identity,
        rule=rule,
        headers_to_set=tuple(to_set),
        headers_to_remove=tuple(to_remove),
        metadata=identity_metadata(identity, settings.metadata_keys) if identity is not None else {},
    )


def _quoted(text: str) -> str:
    """A value safe inside an RFC 6750 quoted-string: printable ASCII without quote or backslash."""
    return "".join(ch for ch in text if " " <= ch <= "~" and ch not in '"\\')


def deny(
    inp: CheckInput,
    status: int,
    reason: Reason,
    message: str,
    settings: ResponseSettings,
    *,
    identity: Identity | None = None,
    rule: str = "",
) -> Decision:
    """Deny with a JSON body ``{"error": {code, message, request_id}}`` and, on 401, an RFC 6750 challenge."""
    body = json.dumps(
        {"error": {"code": reason.value, "message": message, "request_id": inp.request_id}},
        separators=(",", ":"),
    ).encode()
    headers = [JSON_CONTENT_TYPE, (settings.reason_header, reason.value)]
    if status == 401:
        challenge = f'Bearer realm="{_quoted(settings.realm)}"'
        if reason is not Reason.MISSING_CREDENTIAL:
            challenge += f', error="invalid_token", error_description="{_quoted(message)}"'
        headers.append(("www-authenticate", challenge))
    return Decision(
        allowed=False,
        status=status,
        reason=reason,
        message=message,
        identity=identity,
        rule=rule,
        request_id=inp.request_id,
        response_headers=tuple(headers),
        body=body,
    )
