"""What the compiled policy answers; the contract between ``policy.py`` and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from extauthz.model import AuthenticationError, CheckInput, Identity, Reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """``status`` is 200 when allowed, else 401 (authentication needed or failed) or 403 (policy refused)."""

    allowed: bool
    status: int
    reason: Reason
    rule: str = ""
    message: str = ""


class CompiledPolicy(Protocol):
    # Request headers the rules read (besides method, host and path), for the pipeline's decision cache.
    header_names: frozenset[str]

    def evaluate(self, inp: CheckInput, identity: Identity | None, auth_error: AuthenticationError | None) -> Verdict:
        """Decide. Deny rules win over allow rules; a ``public`` rule needs no identity; no match means deny.

        Without an identity (and no public rule), answer 401 with ``auth_error``'s reason when a credential was
        present but rejected, else ``missing_credential``. With an identity that no allow rule admits, 403.
        """
        ...

    def without_identity(self, inp: CheckInput) -> Verdict | None:
        """The verdict if no identity could change it (a deny rule needing none, or a public rule with no deny
        rule that needs an identity in the way), else None: lets the pipeline answer without identity I/O."""
        ...
