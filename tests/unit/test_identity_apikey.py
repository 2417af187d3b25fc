"""API keys: the keys file (strict, with lines) and the provider (lookup, rotation, expiry, revocation)."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.config import ApiKeySettings
from extauthz.identity.apikey import (
    KEY_PREFIX,
    ApiKeyProvider,
    ApiKeyStore,
    generate_api_key,
    hash_api_key,
    load_api_keys,
)
from extauthz.model import AuthenticationError, CheckInput, IdentityKind, Reason
from meshgate.yamlconf import ConfigError

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
NEW, OLD, EXPIRED, REVOKED, OTHER = (generate_api_key() for _ in range(5))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEYS_YAML = f"""
clients:
  - client: billing
    tier: gold
    roles: [reports.read, invoices.write]
    keys:
      - id: billing-2025
        sha256: {hash_api_key(NEW)}
      - id: billing-2024
        sha256: {hash_api_key(OLD).upper()}
        expires: 2025-07-01T00:00:00Z
      - id: billing-2023
        sha256: {hash_api_key(EXPIRED)}
        expires: "2025-01-01"
      - id: billing-leaked
        sha256: {hash_api_key(REVOKED)}
        revoked: true
  - client: reports
    keys:
      - id: reports-1
        sha256: {hash_api_key(OTHER)}
"""


@pytest.fixture
def store(tmp_path: Path) -> ApiKeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS_YAML)
    return load_api_keys(path)


@pytest.fixture
def provider(store: ApiKeyStore) -> ApiKeyProvider:
    return ApiKeyProvider(ApiKeySettings(), store, clock=FakeClock(NOW))


def request(**headers: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/", headers=headers)


def reason_of(provider: ApiKeyProvider, inp: CheckInput) -> Reason:
    with pytest.raises(AuthenticationError) as caught:
        provider.authenticate(inp)
    assert caught.value.message  # safe message, never the key
    for key in (NEW, OLD, EXPIRED, REVOKED, OTHER):
        assert key not in caught.value.message
    return caught.value.reason


def test_generate_and_hash() -> None:
    key = generate_api_key()
    assert key.startswith(KEY_PREFIX)
    assert len(key) > 40
    assert key != generate_api_key()
    assert hash_api_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_store_contents(store: ApiKeyStore) -> None:
    assert len(store) == 5
    entries = {entry.key_id: entry for entry in store}
    assert entries["billing-2025"].roles == {"reports.read", "invoices.write"}
    assert entries["billing-2025"].expires is None
    assert entries["billing-2024"].expires == 1_751_328_000.0
    assert entries["billing-2023"].expires == 1_735_689_600.0  # date without zone: UTC midnight
    assert entries["billing-leaked"].revoked
    assert entries["reports-1"].tier == ""
    assert store.source.endswith("keys.yaml")
    assert len(ApiKeyStore()) == 0


async def test_valid_keys_from_header_and_authorization(provider: ApiKeyProvider) -> None:
    await provider.start()
    identity = provider.authenticate(request(**{"x-api-key": NEW}))
    assert identity is not None
    assert identity.kind is IdentityKind.API_KEY
    assert (identity.subject, identity.client, identity.tier) == ("billing", "billing", "gold")
    assert identity.roles == {"reports.read", "invoices.write"}
    assert identity.credential_header == "x-api-key"
    identity = provider.authenticate(request(authorization=f"apikey  {OTHER} "))
    assert identity is not None
    assert (identity.client, identity.credential_header) == ("reports", "authorization")
    await provider.close()


def test_rotation_overlap_old_key_still_valid_until_it_expires(provider: ApiKeyProvider) -> None:
    assert provider.authenticate(request(**{"x-api-key": OLD})).client == "billing"  # type: ignore[union-attr]
    provider._clock = FakeClock(1_751_328_000.0)  # the old key's expiry
    assert reason_of(provider, request(**{"x-api-key": OLD})) is Reason.API_KEY_EXPIRED
    assert provider.authenticate(request(**{"x-api-key": NEW})) is not None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"x-api-key": EXPIRED}, Reason.API_KEY_EXPIRED),
        ({"x-api-key": REVOKED}, Reason.API_KEY_REVOKED),
        ({"x-api-key": "mgk_unknown"}, Reason.INVALID_API_KEY),
        ({"x-api-key": ""}, Reason.INVALID_API_KEY),
        ({"x-api-key": "k" * 2000}, Reason.INVALID_API_KEY),
        ({"authorization": "ApiKey"}, Reason.INVALID_API_KEY),
    ],
)
def test_rejected_keys(provider: ApiKeyProvider, headers: dict[str, str], reason: Reason) -> None:
    assert reason_of(provider, request(**headers)) is reason


def test_no_api_key_is_not_an_error(provider: ApiKeyProvider) -> None:
    assert provider.authenticate(request()) is None
    assert provider.authenticate(request(authorization=f"Bearer {NEW}")) is None


def test_header_and_scheme_can_be_turned_off(store: ApiKeyStore) -> None:
    only_header = ApiKeyProvider(ApiKeySettings(header="X-Key", authorization_scheme=""), store)
    assert only_header.authenticate(request(authorization=f"ApiKey {NEW}")) is None
    assert only_header.authenticate(request(**{"x-key": NEW})) is not None
    only_scheme = ApiKeyProvider(ApiKeySettings(header="", authorization_scheme="Key"), store)
    assert only_scheme.authenticate(request(**{"x-api-key": NEW})) is None
    assert only_scheme.authenticate(request(authorization=f"KEY {NEW}")) is not None


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n        color: red\n",
            6,
            "unknown key",
        ),
        ("clients:\n  - client: a\n    extra: 1\n", 3, "unknown key 'extra'"),
        ("clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: abc\n", 5, "64 hex digits"),
        ("clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {z}\n", 5, "64 hex digits"),
        ("clients:\n  - client: a\n    keys:\n      - id: k\n", 4, "missing required key 'sha256'"),
        ("clients:\n  - client: a\n    keys:\n      - sha256: {h}\n", 4, "missing required key 'id'"),
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n        expires: soon\n",
            6,
            "not an ISO-8601 timestamp",
        ),
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n        expires: 5\n",
            6,
            "expected an ISO-8601 timestamp",
        ),
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n        revoked: maybe\n",
            6,
            "expected bool",
        ),
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n"
            "      - id: k\n        sha256: {h2}\n",
            6,
            "duplicate key id 'k'",
        ),
        (
            "clients:\n  - client: a\n    keys:\n      - id: k\n        sha256: {h}\n"
            "  - client: b\n    keys:\n      - id: k2\n        sha256: {h}\n",
            9,
            "same key as 'k'",
        ),
        ("clients:\n  - client: a\n  - client: a\n", 3, "duplicate client 'a'"),
        ("clients:\n  - client: ''\n", 2, "must not be empty"),
        ("clients:\n  - tier: x\n", 2, "missing required key 'client'"),
        ("clients: 5\n", 1, "expected a list"),
        ("[]\n", 1, "expected a mapping"),
        ("other: 1\n", 1, "unknown key 'other'"),
    ],
)
def test_keys_file_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text.format(h=hash_api_key("a"), h2=hash_api_key("b"), z="z" * 64))
    with pytest.raises(ConfigError) as caught:
        load_api_keys(path)
    assert caught.value.line == line, str(caught.value)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}:")


def test_empty_clients_list(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("clients: []\n")
    assert len(load_api_keys(path)) == 0


@settings(max_examples=300)
@given(key=st.text(max_size=200), scheme=st.sampled_from(["ApiKey ", "apikey", "Bearer ", ""]))
def test_fuzz_keys(key: str, scheme: str) -> None:
    provider = ApiKeyProvider(ApiKeySettings(), ApiKeyStore(), clock=FakeClock(NOW))
    for headers in ({"x-api-key": key}, {"authorization": scheme + key}):
        try:
            outcome: object = provider.authenticate(request(**headers))
        except AuthenticationError as error:
            outcome = error.reason
        assert outcome in (None, Reason.INVALID_API_KEY)


def test_identity_object_is_reused_per_key_and_header() -> None:
    """The pipeline reuses allow answers per identity object: a key must map to one object per header."""
    from extauthz.config import ApiKeySettings
    from extauthz.identity.apikey import ApiKeyEntry, ApiKeyProvider, ApiKeyStore, hash_api_key

    digest = bytes.fromhex(hash_api_key("mgk_reuse"))
    store = ApiKeyStore({digest: ApiKeyEntry(key_id="k", client="svc", digest=digest)})
    provider = ApiKeyProvider(ApiKeySettings(), store)
    via_header = CheckInput(method="GET", host="h", path="/", headers={"x-api-key": "mgk_reuse"})
    via_scheme = CheckInput(method="GET", host="h", path="/", headers={"authorization": "ApiKey mgk_reuse"})
    first = provider.authenticate(via_header)
    assert provider.authenticate(via_header) is first
    other = provider.authenticate(via_scheme)
    assert other is not first and other is not None and other.credential_header == "authorization"
