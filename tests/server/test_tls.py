"""In-enclave TLS material: memory only, pinnable."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.tls import generate_enclave_tls


def test_key_lives_in_an_anonymous_memfd() -> None:
    tls = generate_enclave_tls(hostnames=("localhost", "127.0.0.1"))
    try:
        target = os.readlink(tls.keyfile)
        assert target.startswith("/memfd:"), target  # not a path on any filesystem
        assert b"PRIVATE KEY" in Path(tls.keyfile).read_bytes()
        cert = x509.load_pem_x509_certificate(Path(tls.certfile).read_bytes())
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert hashlib.sha256(spki).hexdigest() == tls.spki_sha256
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
    finally:
        tls.close()


def test_each_boot_gets_a_fresh_key() -> None:
    a, b = generate_enclave_tls(), generate_enclave_tls()
    assert a.spki_sha256 != b.spki_sha256
    a.close()
    b.close()


def test_certificate_does_not_expire_under_a_pinned_client() -> None:
    """Trust comes from the attested key: a long-running server must not break pinned clients."""
    tls = generate_enclave_tls()
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_pem)
        assert cert.not_valid_after_utc.year == 9999
    finally:
        tls.close()
