"""A throwaway test CA that issues server certs (IP SAN 127.0.0.1) and SPIFFE client certs (URI SAN)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """EC P-256 CA in ``folder``; ``ca_file`` is its PEM certificate."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "meshgate test CA") -> None:
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, stem: str, cn: str, sans: list[x509.GeneralName], *usages: x509.ObjectIdentifier) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        files = CertFiles(self.folder / f"{stem}.pem", self.folder / f"{stem}-key.pem")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(_key_pem(key))
        return files

    def server(self, stem: str = "server") -> CertFiles:
        """A server cert for 127.0.0.1 and localhost."""
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
        return self._issue(stem, "localhost", sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def spiffe_client(self, spiffe_id: str, stem: str = "client") -> CertFiles:
        """A client cert whose only SAN is the URI ``spiffe_id`` (how Istio workload certs look)."""
        return self._issue(
            stem, "workload", [x509.UniformResourceIdentifier(spiffe_id)], ExtendedKeyUsageOID.CLIENT_AUTH
        )

    def workload(self, spiffe_id: str, stem: str) -> CertFiles:
        """An Istio-style workload cert: the SPIFFE ID as URI SAN, for serving (127.0.0.1) and for calling out."""
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        return self._issue(stem, "workload", sans, ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
