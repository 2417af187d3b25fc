"""API keys: stored only as SHA-256 digests in a keys file, looked up by digest (no scans), several per client.

Keys file (YAML, strict: unknown keys are errors with file:line)::

    clients:
      - client: billing
        tier: gold                     # optional
        roles: [reports.read]          # optional
        keys:
          - id: billing-2024           # unique across the file; names the key in logs and audits
            sha256: 9f86d081...        # hex digest of the key (``meshgate`` prints it when it generates one)
            expires: 2025-06-30T00:00:00Z   # optional ISO-8601; without a zone it is UTC
          - id: billing-2023
            sha256: 60303ae2...
            revoked: true

Several unexpired keys per client give rotation with overlap: hand out the new one, then revoke the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from extauthz.config import ApiKeySettings
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from meshgate.yamlconf import ConfigError, Reader, load

KEY_PREFIX = "mgk_"
MAX_KEY_CHARS = 1024


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    key_id: str
    client: str
    digest: bytes
    tier: str = ""
    roles: frozenset[str] = frozenset()
    expires: float | None = None  # epoch seconds
    revoked: bool = False


class ApiKeyStore:
    """Digest -> entry. Immutable once loaded; a reload builds a new store."""

    def __init__(self, entries: Mapping[bytes, ApiKeyEntry] | None = None, source: str = "") -> None:
        self._entries = dict(entries or {})
        self.source = source

    def lookup(self, digest: bytes) -> ApiKeyEntry | None:
        return self._entries.get(digest)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ApiKeyEntry]:
        return iter(self._entries.values())


def hash_api_key(key: str) -> str:
    """Hex SHA-256 of a key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def generate_api_key() -> str:
    """A new random key with a recognisable prefix (so secret scanners and humans can spot it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _parse_expiry(value: object) -> float:
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 timestamp string, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_digest(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError("expected 64 hex digits (the SHA-256 of the key)")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError("expected 64 hex digits (the SHA-256 of the key)") from None


def load_api_keys(path: str | Path) -> ApiKeyStore:
    """Parse and check a keys file; raises ``ConfigError`` naming file and line."""
    source = str(path)
    root = Reader(load(path), source, what="mapping with 'clients'")
    entries: dict[bytes, ApiKeyEntry] = {}
    seen_ids: set[str] = set()
    seen_clients: set[str] = set()
    for client_reader in root.children("clients"):
        client = client_reader.require("client", str)
        if not client:
            raise client_reader.error("client", "must not be empty")
        if client in seen_clients:
            raise client_reader.error("client", f"duplicate client {client!r}")
        seen_clients.add(client)
        tier = client_reader.get("tier", str, "")
        roles = frozenset(client_reader.strings("roles"))
        for key_reader in client_reader.children("keys"):
            key_id = key_reader.require("id", str)
            if key_id in seen_ids:
                raise key_reader.error("id", f"duplicate key id {key_id!r}")
            seen_ids.add(key_id)
            digest = key_reader.convert("sha256", _parse_digest, b"")
            if not digest:
                raise ConfigError(source, key_reader.line, "missing required key 'sha256'")
            if digest in entries:
                raise key_reader.error("sha256", f"same key as {entries[digest].key_id!r}")
            entries[digest] = ApiKeyEntry(
                key_id=key_id,
                client=client,
                digest=digest,
                tier=tier,
                roles=roles,
                expires=key_reader.convert("expires", _parse_expiry, None),
                revoked=key_reader.get("revoked", bool, False),
            )
            key_reader.done()
        client_reader.done()
    root.done()
    return ApiKeyStore(entries, source)


class ApiKeyProvider:
    kind = IdentityKind.API_KEY

    def __init__(self, settings: ApiKeySettings, store: ApiKeyStore, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self._header = settings.header.lower()
        self._scheme = settings.authorization_scheme.lower()
        self._identities: dict[tuple[str, str], Identity] = {}
        self.request_headers = frozenset({self._header} - {""} | ({"authorization"} if self._scheme else set()))
        self.reads_query = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def find_key(self, inp: CheckInput) -> tuple[str, str] | None:
        """(key, header it came from), or None when the request carries no API key."""
        if self._header:
            value = inp.headers.get(self._header)
            if value is not None:
                return value.strip(), self._header
        if self._scheme:
            value = inp.headers.get("authorization")
            if value is not None:
                scheme, _, key = value.strip().partition(" ")
                if scheme.lower() == self._scheme:
                    return key.strip(), "authorization"
        return None

    def authenticate(self, inp: CheckInput) -> Identity | None:
        found = self.find_key(inp)
        if found is None:
            return None
        key, header = found
        if not key or len(key) > MAX_KEY_CHARS:
            raise AuthenticationError(Reason.INVALID_API_KEY, "API key is not valid", credential_header=header)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        entry = self.store.lookup(digest)
        # The dict lookup already matched; compare_digest keeps the final check constant-time regardless.
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise AuthenticationError(Reason.INVALID_API_KEY, "API key is not valid", credential_header=header)
        if entry.revoked:
            raise AuthenticationError(Reason.API_KEY_REVOKED, "API key has been revoked", credential_header=header)
        if entry.expires is not None and entry.expires <= self._clock():
            raise AuthenticationError(Reason.API_KEY_EXPIRED, "API key has expired", credential_header=header)
        # One identity object per (key, header): bounded by the keys file, and lets the pipeline reuse answers.
        identity = self._identities.get((entry.key_id, header))
        if identity is None:
            identity = Identity(
                kind=IdentityKind.API_KEY,
                subject=entry.client,
                client=entry.client,
                roles=entry.roles,
                tier=entry.tier,
                credential_header=header,
                expires_at=entry.expires if entry.expires is not None else math.inf,
            )
            self._identities[(entry.key_id, header)] = identity
        return identity
