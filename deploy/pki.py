"""Certificates and keys for a deployment, made with the ``cryptography`` package.

Why these formats: Flower 1.41's SuperLink serves TLS from PEM files (``--ssl-ca-certfile``,
``--ssl-certfile``, ``--ssl-keyfile``) and SuperNode authentication uses an elliptic-curve key
pair on a NIST curve in OpenSSH format (``flower-supernode --auth-supernode-private-key``
loads it with ``load_ssh_private_key``; ``flwr supernode register`` reads the public key
with ``load_ssh_public_key`` and accepts only NIST curves).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # P-384: accepted by TLS stacks and by Flower's SuperNode registration
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")  # a DNS name
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedimaging deployment"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def validate_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a DNS name; raise ``ValueError`` otherwise."""
    host = host.strip()
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _HOST_RE.match(host):
        raise ValueError(f"--superlink-host {host!r} is neither an IP address nor a DNS name")
    return host.lower()


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """SANs for ``hosts`` plus the loopback names (the SuperLink's own ServerApp runtime connects there)."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, *LOOPBACK_NAMES]:
        host = validate_host(host)
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(days: int, common_name: str = "fedimaging deployment CA") -> tuple[Issued, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that signs only the SuperLink certificate (path length 0)."""
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key


def make_server_cert(
    ca_cert_pem: bytes, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], days: int
) -> Issued:
    """The SuperLink's TLS certificate, valid for ``hosts`` and the loopback names."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = _new_key()
    now = _now()
    sans = subject_alt_names(hosts)
    first = hosts[0] if hosts else "localhost"
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedimaging SuperLink {first}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_auth_keypair(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode("ascii")


def load_ca_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load the CA key written by :func:`make_ca` (to re-issue the SuperLink certificate)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an elliptic-curve key")
    return key
