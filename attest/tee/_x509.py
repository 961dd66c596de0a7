"""Certificate helpers shared by the verifiers: pinned roots, loading, one-link chain checks.

Every check returns an error string (or None when it passed) instead of raising, so each
verifier can record it as a named step with its own advice.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

__all__ = [
    "SHA256",
    "SHA384",
    "check_link",
    "check_validity",
    "common_name",
    "load_certificates",
    "load_pinned",
    "same_certificate",
]

#: Hash names as cryptography reports them.
SHA256 = hashes.SHA256.name
SHA384 = hashes.SHA384.name


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Load one DER certificate or a PEM bundle (trailing NULs after PEM tolerated).

    Raises:
        ValueError: the bytes are neither.
    """
    data = bytes(data)
    with warnings.catch_warnings():
        # Vendor certificates carry non-positive serial numbers (NVIDIA) that cryptography
        # warns about; the warning says nothing about their validity.
        warnings.simplefilter("ignore")
        if b"-----BEGIN CERTIFICATE-----" in data:
            # PEM from fixed-size buffers (NVML, quotes) may end in NULs; DER never is stripped.
            return x509.load_pem_x509_certificates(data.rstrip(b"\0"))
        return [x509.load_der_x509_certificate(data)]


def load_pinned(name: str) -> list[x509.Certificate]:
    """Load a pinned certificate file shipped in ``attest/roots/``."""
    data = resources.files("attest").joinpath("roots", name).read_bytes()
    return load_certificates(data)


def common_name(cert: x509.Certificate) -> str:
    """Return the subject CN, or "" when there is none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def same_certificate(a: x509.Certificate, b: x509.Certificate) -> bool:
    """Return whether two certificates are byte-identical."""
    return a.tbs_certificate_bytes == b.tbs_certificate_bytes and a.signature == b.signature


def check_validity(cert: x509.Certificate, now: datetime) -> str | None:
    """Return why ``cert`` is not valid at ``now``, or None."""
    if now < cert.not_valid_before_utc:
        return f"'{common_name(cert)}' is not valid before {cert.not_valid_before_utc.isoformat()}"
    if now > cert.not_valid_after_utc:
        return f"'{common_name(cert)}' expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def check_link(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    hash_name: str,
    rsa_pss: bool = False,
    require_ca: bool = True,
) -> str | None:
    """Return why ``issuer`` did not sign ``cert`` as required, or None.

    Checks the issuer/subject names, that the issuer is a CA (basicConstraints, when
    ``require_ca``), the signature algorithm (the hash ``hash_name``, and RSASSA-PSS when
    ``rsa_pss``) and the signature itself. Revocation is not checked.
    """
    name = common_name(cert)
    if require_ca:
        try:
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            return f"issuer '{common_name(issuer)}' has no basicConstraints extension"
        if not bc.ca:
            return f"issuer '{common_name(issuer)}' is not a CA"
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return f"'{name}' uses an unsupported signature algorithm"
    if algorithm is None or algorithm.name != hash_name:
        return f"'{name}' is not signed with {hash_name}"
    if rsa_pss and cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"'{name}' is not signed with RSASSA-PSS"
    key = issuer.public_key()
    if rsa_pss and not isinstance(key, rsa.RSAPublicKey):
        return f"issuer '{common_name(issuer)}' does not hold an RSA key"
    if not rsa_pss and not isinstance(key, ec.EllipticCurvePublicKey):
        return f"issuer '{common_name(issuer)}' does not hold an EC key"
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"'{name}' is not signed by '{common_name(issuer)}' ({type(exc).__name__})"
    return None
