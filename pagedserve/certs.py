"""A throwaway certificate authority for local clusters and tests (``pagedserve up --tls``).

Built on the ``cryptography`` library. ``LocalCA`` makes a self-signed CA and issues leaf
certificates that are valid both as server and as client certificates (each service presents
the same certificate on its port and to the services it calls). ``write_local_pki`` writes one
per role, named as the services check each other (``pagedserve-router``,
``pagedserve-scheduler``, ``pagedserve-worker``, ``pagedserve-client``), each also valid for
``localhost`` and ``127.0.0.1``. Not for production: the CA key sits next to the certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pagedserve.core.grpc_util import TlsConfig

ROLES = ("router", "scheduler", "worker", "client")
LOCAL_NAMES = ("localhost", "127.0.0.1")
VALIDITY = datetime.timedelta(days=7)


def identity(role: str) -> str:
    """The name a role's certificate carries (its CN and first DNS SAN)."""
    return f"pagedserve-{role}"


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class LocalCA:
    """A self-signed CA (EC P-256) that issues leaf certificates for ``VALIDITY``."""

    def __init__(self, common_name: str = "pagedserve local CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, names: tuple[str, ...] = ()) -> IssuedCert:
        """A certificate for ``common_name`` whose SANs are ``common_name`` and ``names``
        (IP addresses become IP SANs), usable for both server and client authentication."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san((common_name, *names)), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def write(self, directory: Path, stem: str, common_name: str,
              names: tuple[str, ...] = LOCAL_NAMES) -> TlsConfig:
        """Issues a certificate and writes ``<stem>.crt``, ``<stem>.key`` (mode 0600) and
        ``ca.crt`` under ``directory``; the ``TlsConfig`` that uses them."""
        issued = self.issue(common_name, names)
        directory.mkdir(parents=True, exist_ok=True)
        ca_path = directory / "ca.crt"
        ca_path.write_bytes(self.cert_pem)
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(issued.cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(issued.key_pem)
        return TlsConfig(str(cert_path), str(key_path), str(ca_path))


def write_local_pki(directory: Path) -> dict[str, TlsConfig]:
    """A fresh CA and one certificate per role in ``ROLES`` under ``directory``:
    ``{"router": TlsConfig, ...}``."""
    ca = LocalCA()
    return {role: ca.write(directory, role, identity(role)) for role in ROLES}
