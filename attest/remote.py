"""Verify a running enclave-serve server before sending it anything.

:func:`verify_server` sends a fresh random nonce to ``/.well-known/enclave-serve/attestation``,
records the TLS public key the connection actually used, and checks, step by step:

1. the document parses and answers our nonce (freshness);
2. the device (GPU) evidence is what the claims list, and each device's evidence verifies with
   the nonce derived from ours;
3. the CPU evidence verifies (signatures, chains, TCB per policy) and its report data equals
   the digest of the claims — so every claim below is vouched for by the hardware;
4. the attested TLS key is the key this connection talked to (no interception);
5. the model is the expected one; the TEE is not the insecure sample (unless allowed).

The server's certificate is not checked against any CA: its trust comes from step 4. A caller
that continues talking to the server must pin :attr:`VerifiedServer.tls_spki_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest.binding import document_device_nonce
from attest.document import NONCE_SIZE, AttestationDocument, DocumentCheck
from attest.errors import MalformedEvidence, VerificationError
from attest.verify import Outcome, Policy, VerificationResult, verify_device_evidence, verify_evidence

__all__ = ["ATTESTATION_PATH", "VerifiedServer", "verify_server"]

ATTESTATION_PATH = "/.well-known/enclave-serve/attestation"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedServer:
    """The outcome of a successful :func:`verify_server`."""

    base_url: str
    document: AttestationDocument
    checks: list[DocumentCheck] = field(default_factory=list)
    tls_spki_sha256: str | None = None
    #: The server's certificate (PEM) whose key was attested: pin it as the only trust anchor.
    tls_certificate_pem: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "verified": True,
            "tee": self.document.claims.tee.value,
            "insecure": self.document.claims.insecure,
            "model_digest": self.document.claims.model_digest,
            "tls_spki_sha256": self.tls_spki_sha256,
            "key_release": self.document.claims.key_release,
            "runtime": dict(self.document.claims.runtime),
            "checks": [c.to_json() for c in self.checks],
        }


def _unverified_tls_context() -> ssl.SSLContext:
    # Trust is established by the attestation binding of the TLS key, not by a CA.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _peer_certificate(response: httpx.Response) -> x509.Certificate | None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(True)
    return None if der is None else x509.load_der_x509_certificate(der)


def _spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def verify_server(
    base_url: str,
    *,
    expected_model_digest: str | None = None,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    policy: Policy | None = None,
    now: datetime | None = None,
    nonce: bytes | None = None,
    timeout: float = 60.0,
    http_client: httpx.Client | None = None,
) -> VerifiedServer:
    """Fetch and verify the attestation of the server at ``base_url``.

    ``policy`` is an :mod:`attest.verify` policy applied to the CPU evidence (reference values,
    minimum TCB); without one only the cryptographic checks and the binding are made.

    Raises:
        VerificationError: the server is unreachable, or a check failed (the message names it).
        PolicyViolation: insecure TEE, unbound TLS or unexpected model.
        MalformedEvidence: the document does not parse.
    """
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
    url = base_url.rstrip("/") + ATTESTATION_PATH
    client = http_client or httpx.Client(verify=_unverified_tls_context(), timeout=timeout)
    try:
        try:
            response = client.get(url, params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            raise VerificationError(f"cannot fetch the attestation document from {url}: {exc}") from exc
        if response.status_code != 200:
            detail = response.text[:500]
            raise VerificationError(f"the server answered {response.status_code} for {url}: {detail}")
        peer_cert = _peer_certificate(response)
        observed_spki = _spki_sha256(peer_cert) if peer_cert is not None else None
        try:
            document = AttestationDocument.from_json(json.loads(response.content))
        except ValueError as exc:
            raise MalformedEvidence("the attestation document is not JSON") from exc
    finally:
        if http_client is None:
            client.close()

    checks = document.check_binding(
        nonce=nonce,
        observed_tls_spki_sha256=observed_spki,
        expected_model_digest=expected_model_digest,
        allow_insecure=allow_insecure,
        allow_no_tls=allow_no_tls,
    )
    device_nonce = document_device_nonce(nonce)
    for device in document.devices:
        result = verify_device_evidence(
            device, expected_runtime_data=device_nonce, now=now, allow_insecure=allow_insecure
        )
        checks.append(DocumentCheck(name=f"device:{device.tee.value}", ok=True, detail=_summary(result)))
    result = verify_evidence(
        document.primary,
        expected_report_data=document.claims.report_data(),
        policy=policy,
        now=now,
        allow_insecure=allow_insecure,
    )
    checks.append(
        DocumentCheck(name=f"evidence:{document.primary.tee.value}", ok=True, detail=_summary(result))
    )
    return VerifiedServer(
        base_url=base_url,
        document=document,
        checks=checks,
        tls_spki_sha256=observed_spki,
        tls_certificate_pem=None if peer_cert is None else peer_cert.public_bytes(serialization.Encoding.PEM),
    )


def _summary(result: VerificationResult) -> str:
    passed = [s.name for s in result.steps if s.outcome is Outcome.PASSED]
    skipped = [s.name for s in result.steps if s.outcome is Outcome.SKIPPED]
    text = "verified: " + ", ".join(passed) if passed else "verified"
    return text + (f"; not checked: {', '.join(skipped)}" if skipped else "")
