"""TLS for XMPP: configured certificates, or a self-signed one generated for development."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.store.files import private_dir, write_private


def ensure_self_signed(directory: Path, domain: str) -> tuple[Path, Path]:
    """A certificate for ``domain`` (and conference.<domain>) kept in ``directory``."""
    cert_path, key_path = directory / f"{domain}.crt", directory / f"{domain}.key"
    # Private whatever an older version left: the key in a 0700 directory, mode 0600.
    private_dir(directory)
    if key_path.exists():
        key_path.chmod(0o600)
    if cert_path.exists() and key_path.exists() and not _expires_soon(cert_path):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, domain),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portal Hub (self-signed)"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(domain), x509.DNSName(f"conference.{domain}")]
    with contextlib.suppress(ValueError):  # a domain that is an IP address gets an IP SAN
        alt_names.append(x509.IPAddress(ipaddress.ip_address(domain)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Written 0600 from the start (a write then a chmod left it readable for a moment).
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _expires_soon(cert_path: Path) -> bool:
    """A development certificate is replaced a month before it expires (or if unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return True
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return remaining < datetime.timedelta(days=30)


def fingerprint(cert_path: Path, algorithm: str = "sha256") -> str:
    """The certificate's fingerprint as clients show it: AB:CD:... (SHA-256, or SHA-1, which
    some clients such as Profanity and older Pidgin show instead)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.new(algorithm, der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.options |= ssl.OP_NO_COMPRESSION
    return context
