"""Throwaway TLS material for the stand-in: a private CA and a server certificate signed by it.

The certificate is built to pass strict verifiers (curl, httpx, Python's ssl with X509_STRICT,
mitmproxy's upstream verification), so it carries the extensions real certificates carry.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names a client may use to reach the stand-in: itself, and Qwen's real hosts (tests can map
# those names to 127.0.0.1 so that traffic addressed to Qwen lands here).
DNS_NAMES = (
    "localhost",
    "portal.qwen.ai",
    "chat.qwen.ai",
    "dashscope.aliyuncs.com",
    "dashscope-intl.aliyuncs.com",
)
IP_ADDRESSES = ("127.0.0.1",)


@dataclass(frozen=True)
class CertPaths:
    """Where the PEM files were written."""

    ca: Path
    cert: Path
    key: Path


def write_certificates(cert_dir: Path) -> CertPaths:
    """Write ca.pem, server.pem and server.key into `cert_dir` (created if missing)."""
    ca_pem, cert_pem, key_pem = _material()
    cert_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(cert_dir / "ca.pem", cert_dir / "server.pem", cert_dir / "server.key")
    paths.ca.write_bytes(ca_pem)
    paths.cert.write_bytes(cert_pem)
    paths.key.touch(mode=0o600)
    paths.key.write_bytes(key_pem)
    return paths


# One CA per process is enough: every stand-in is equally throwaway, and the test suite starts many.
@functools.cache
def _material() -> tuple[bytes, bytes, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little so that clocks slightly behind ours still accept the certificates.
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qwenproxy stand-in CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName(n) for n in DNS_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(enabled)
    return x509.KeyUsage(**flags)
