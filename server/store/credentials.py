"""The embedded database's own login, and the throw-away TLS identity used to create it.

SecantusDB checks passwords (SCRAM-SHA-256) only when started with ``--auth``, and creates
users only through ``createUser`` on a running server. A server started without ``--auth``
to create the first user would let any local user in for that moment. So that first run
listens with TLS and requires a client certificate (mutual TLS) from a key pair made here for
that run alone and kept in the private data directory: nobody else can complete a connection,
and the hub, checking the server's certificate, cannot be fooled into sending the password to
an impostor on the port either. The key pair is deleted after the run.

The password is random (256 bits), made at the first start and kept in
``<db_dir>/credentials.json`` (mode 0600, the directory 0700): the hub and the ``portalhub``
CLI of the same user read it; ``endpoint.json`` never carries it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.store.files import private_dir, write_private

CREDENTIALS_FILE = "credentials.json"
PROVISIONING_DIR = "provisioning"
USERNAME = "portalhub"


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started or reached."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never in a log or a traceback
        return f"Credentials(username={self.username!r}, password='***')"

    def client_options(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self.password,
            "authSource": "admin",
            "authMechanism": "SCRAM-SHA-256",
        }


def new_credentials() -> Credentials:
    return Credentials(USERNAME, secrets.token_urlsafe(32))


def read_credentials(db_dir: Path) -> Credentials | None:
    """The stored credentials; None when there are none yet (a new or an old data directory)."""
    path = db_dir / CREDENTIALS_FILE
    try:
        data = json.loads(path.read_text())
        return Credentials(str(data["username"]), str(data["password"]))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise EmbeddedDatabaseError(
            f"cannot read {path}: run this as the user that owns the hub's data directory"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbeddedDatabaseError(
            f"{path} is damaged ({exc.__class__.__name__}); delete it and start the hub, "
            "which then sets a new password"
        ) from None


def save_credentials(db_dir: Path, credentials: Credentials) -> None:
    body = {"username": credentials.username, "password": credentials.password}
    write_private(db_dir / CREDENTIALS_FILE, json.dumps(body).encode())


@dataclass(frozen=True)
class ProvisioningTls:
    """Files of a one-run TLS identity: the server's certificate and key, which also serve as
    the client certificate (the server trusts exactly that certificate)."""

    directory: Path
    cert: Path
    key: Path
    cert_and_key: Path

    def server_args(self) -> tuple[str, ...]:
        return (
            "--tls-cert-file",
            str(self.cert),
            "--tls-key-file",
            str(self.key),
            "--tls-ca-file",
            str(self.cert),
            "--tls-require-client-cert",
        )

    def client_options(self) -> dict[str, Any]:
        return {
            "tls": True,
            "tlsCAFile": str(self.cert),
            "tlsCertificateKeyFile": str(self.cert_and_key),
        }

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def provisioning_tls(db_dir: Path, host: str) -> ProvisioningTls:
    """A fresh key pair and self-signed certificate for ``host``, valid for an hour, in a
    private directory under ``db_dir``."""
    directory = private_dir(db_dir / PROVISIONING_DIR)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portalhub-provisioning")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    files = ProvisioningTls(
        directory, directory / "cert.pem", directory / "key.pem", directory / "client.pem"
    )
    write_private(files.key, key_pem)
    write_private(files.cert, cert_pem)
    write_private(files.cert_and_key, cert_pem + key_pem)
    return files
