"""Signing keys and tokens for tests, the demo and the bench: real keys, real JWKs, real (and deliberately bad) JWTs.

Keys are generated in memory; nothing here touches the network or the file system.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its ``kid`` and default algorithm (RS256, ES256 or EdDSA)."""

    kid: str
    alg: str
    private_key: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self)

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _new_kid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def generate_rsa_key(kid: str | None = None, *, bits: int = 2048, alg: str = "RS256") -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return SigningKey(kid or _new_kid("rsa"), alg, key)


def generate_ec_key(kid: str | None = None) -> SigningKey:
    """An EC P-256 key for ES256."""
    return SigningKey(kid or _new_kid("ec"), "ES256", ec.generate_private_key(ec.SECP256R1()))


def generate_ed25519_key(kid: str | None = None) -> SigningKey:
    return SigningKey(kid or _new_kid("ed"), "EdDSA", ed25519.Ed25519PrivateKey.generate())


def public_jwk(key: SigningKey, *, include_alg: bool = True) -> dict[str, Any]:
    """The public half as a JWK dict with ``kid``, ``use: sig`` and (by default) ``alg``."""
    public = key.private_key.public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk["kid"] = key.kid
    jwk["use"] = "sig"
    if include_alg:
        jwk["alg"] = key.alg
    return jwk


def jwks_document(keys: Iterable[SigningKey | Mapping[str, Any]]) -> dict[str, Any]:
    """``{"keys": [...]}`` from signing keys (public halves) or ready JWK dicts."""
    return {"keys": [public_jwk(k) if isinstance(k, SigningKey) else dict(k) for k in keys]}


def mint_token(
    key: SigningKey | PrivateKey | str | bytes,
    kid: str | None,
    claims: Mapping[str, Any],
    alg: str = "RS256",
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign ``claims`` with pyjwt. ``key`` may be a ``SigningKey`` (its private key is used), a private key, or an
    HMAC secret. ``kid=None`` leaves the header without a kid."""
    private = key.private_key if isinstance(key, SigningKey) else key
    header: dict[str, Any] = dict(headers or {})
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(dict(claims), private, algorithm=alg, headers=header or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(obj: Mapping[str, Any]) -> str:
    return _b64(json.dumps(dict(obj), separators=(",", ":")).encode())


def mint_unsigned_token(claims: Mapping[str, Any], kid: str | None = None, alg: str = "none") -> str:
    """An ``alg: none`` token (empty signature), as an attacker would send it."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return f"{_segment(header)}.{_segment(claims)}."


def mint_hs_with_public_key(key: SigningKey, claims: Mapping[str, Any], kid: str | None = None) -> str:
    """The classic key-confusion attack: HS256 with the issuer's *public* key PEM as the HMAC secret.

    pyjwt refuses to do this, so the token is assembled by hand.
    """
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT", "kid": kid if kid is not None else key.kid}
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tamper_signature(token: str) -> str:
    """The same header and claims with a signature that no longer matches."""
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0xFF
    return f"{head}.{payload}.{_b64(bytes(raw))}"


def tamper_claims(token: str, **changes: Any) -> str:
    """Swap claims while keeping the original signature (which then fails to verify)."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{head}.{_segment(claims)}.{signature}"
