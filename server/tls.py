"""TLS material generated inside the enclave and never written to a file.

The private key is created in memory at boot. The attestation document commits to the SHA-256
of its SubjectPublicKeyInfo, so a client that verified the document can pin the key it talks
to: the certificate itself may be self-signed, its trust comes from the attestation.

Python's ``ssl`` and uvicorn only load keys from *paths*. We hand them an anonymous
``memfd_create(2)`` file through ``/proc/self/fd/N``: memory-backed, unlinked from every
filesystem, closed-on-exec, and gone when the process exits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["NO_EXPIRY", "EnclaveTls", "generate_enclave_tls"]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass(frozen=True, slots=True)
class EnclaveTls:
    """An in-memory TLS key and certificate, exposed to uvicorn as ``/proc/self/fd`` paths."""

    cert_pem: bytes
    spki_sha256: str
    _key_fd: int
    _cert_fd: int

    @property
    def keyfile(self) -> str:
        """A path that reads the private key (valid in this process only)."""
        return f"/proc/self/fd/{self._key_fd}"

    @property
    def certfile(self) -> str:
        return f"/proc/self/fd/{self._cert_fd}"

    def close(self) -> None:
        for fd in (self._key_fd, self._cert_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


#: "No well-defined expiration date" (RFC 5280 §4.1.2.5): clients trust the certificate through the
#: attested key, which lives exactly as long as this process, not through its dates.
NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


def generate_enclave_tls(
    *, hostnames: tuple[str, ...] = ("localhost",), now: dt.datetime | None = None
) -> EnclaveTls:
    """Create a fresh P-256 key and a self-signed certificate for ``hostnames``.

    .. warning::
       The certificate is self-signed: a client must trust it through the attestation document
       (which binds its public key), never through a CA. ``enclave-serve verify`` does that.
    """
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave-serve")])
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(NO_EXPIRY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    tls = EnclaveTls(
        cert_pem=cert_pem,
        spki_sha256=hashlib.sha256(spki).hexdigest(),
        _key_fd=_memfd("enclave-serve-tls-key", key_pem),
        _cert_fd=_memfd("enclave-serve-tls-cert", cert_pem),
    )
    del key_pem
    return tls
