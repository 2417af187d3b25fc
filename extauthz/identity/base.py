"""The contract every identity provider keeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from extauthz.model import CheckInput, Identity, IdentityKind, Reason


class RefreshNeeded(Exception):
    """The synchronous path cannot decide without I/O (an unknown JWT ``kid``, an opaque token not introspected yet).

    The caller awaits ``refresh()`` (single-flight and rate limited by the provider) and then asks again, once. If
    the answer still needs I/O then (the refresh failed), the request is denied with ``status``/``reason``.
    """

    def __init__(
        self,
        refresh: Callable[[], Awaitable[None]],
        *,
        status: int = 401,
        reason: Reason = Reason.UNKNOWN_KEY,
        message: str = "token signed with an unknown key",
        credential_header: str = "",
    ) -> None:
        super().__init__("refresh needed")
        self.refresh = refresh
        self.status = status
        self.reason = reason
        self.message = message
        self.credential_header = credential_header  # where the credential being looked up came from


class Withdrawals:
    """Counts credentials withdrawn while the same policy serves, e.g. a signing key gone from its issuer's JWKS.

    Allows remembered before a withdrawal are decided afresh: the pipeline keeps the count it saw with each one.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def record(self) -> None:
        self.count += 1


WITHDRAWALS = Withdrawals()


class IdentityProvider(Protocol):
    kind: IdentityKind
    # Everything of the request this provider reads, besides ``source_principal``: the pipeline's decision cache
    # keys on exactly these (lower-case header names; the query string when ``reads_query``).
    request_headers: frozenset[str]
    reads_query: bool

    def authenticate(self, inp: CheckInput) -> Identity | None:
        """Return the identity, or None when the request carries no credential of this kind.

        Raise ``AuthenticationError`` when a credential is present but not acceptable, ``RefreshNeeded`` when the
        answer needs I/O first. Must not block: all network I/O happens in background tasks or in ``refresh``.
        """
        ...

    async def start(self) -> None:
        """Begin background work (key refresh). Called once before serving; idempotent."""
        ...

    async def close(self) -> None:
        """Stop background work."""
        ...
