"""Verify a running enclave-serve server before sending it anything.

:func:`verify_server` sends a fresh random nonce to ``/.well-known/enclave-serve/attestation``,
records the TLS public key the connection actually used, and checks, step by step:

1. the document parses and answers our nonce (freshness);
2. the device (GPU) evidence is what the claims list, and each device's evidence verifies with
   the nonce derived from ours;
3. the CPU evidence verifies (signatures, chains, TCB per policy) and its report data equals
   the digest of the claims — so every claim below is vouched for by the hardware;
4. the attested TLS key is the key this connection talked to (no interception);
5. the model is the expected one; the TEE is not the insecure sample (unless allowed);
6. the run configuration served at ``/.well-known/enclave-serve/config`` hashes to the attested
   claim (so its contents, shown to the user, are what runs) and, if given, to the expected one.

The server's certificate is not checked against any CA: its trust comes from step 4. A caller
that continues talking to the server must pin :attr:`VerifiedServer.tls_spki_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest.binding import document_device_nonce
from attest.document import NONCE_SIZE, AttestationDocument, DocumentCheck
from attest.errors import MalformedEvidence, VerificationError
from attest.evidence import TeeKind
from attest.runconfig import RunConfiguration
from attest.verify import (
    AllOf,
    Outcome,
    Policy,
    RefuseInsecure,
    VerificationResult,
    verify_device_evidence,
    verify_evidence,
)

__all__ = ["ATTESTATION_PATH", "CONFIG_PATH", "VerifiedServer", "verify_server"]

ATTESTATION_PATH = "/.well-known/enclave-serve/attestation"
CONFIG_PATH = "/.well-known/enclave-serve/config"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedServer:
    """The outcome of a successful :func:`verify_server`."""

    base_url: str
    document: AttestationDocument
    #: The run configuration, checked against the attested digest.
    config: RunConfiguration
    checks: list[DocumentCheck] = field(default_factory=list)
    tls_spki_sha256: str | None = None
    #: The server's certificate (PEM) whose key was attested: pin it as the only trust anchor.
    tls_certificate_pem: bytes | None = None
    #: What was *not* checked (for example: no reference measurements were given).
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "verified": True,
            "tee": self.document.claims.tee.value,
            "insecure": self.document.claims.insecure,
            "model_digest": self.document.claims.model_digest,
            "config_sha256": self.document.claims.config_sha256,
            "config": self.config.to_json(),
            "tls_spki_sha256": self.tls_spki_sha256,
            "key_release": self.document.claims.key_release,
            "runtime": dict(self.document.claims.runtime),
            "checks": [c.to_json() for c in self.checks],
            "warnings": list(self.warnings),
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
    expected_config_sha256: str | None = None,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    policy: Policy | None = None,
    device_policy: Policy | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    now: datetime | None = None,
    nonce: bytes | None = None,
    timeout: float = 60.0,
    http_client: httpx.Client | None = None,
) -> VerifiedServer:
    """Fetch and verify the attestation of the server at ``base_url``.

    ``policy`` is an :mod:`attest.verify` policy for the CPU evidence (reference measurements,
    minimum TCB), ``device_policy`` one for the GPU evidence (allowed driver/VBIOS);
    :class:`attest.verify.RefuseInsecure` (no debug TD/guest) always applies to hardware
    evidence. ``collateral`` maps a TEE to its verification collateral (TDX: DCAP collateral,
    giving the TCB status). Without a policy, which software runs is *not* checked: the result's
    ``warnings`` say so.

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
        config_url = base_url.rstrip("/") + CONFIG_PATH
        try:
            config_response = client.get(config_url)
        except httpx.HTTPError as exc:
            raise VerificationError(f"cannot fetch the run configuration from {config_url}: {exc}") from exc
        if config_response.status_code != 200:
            raise VerificationError(
                f"the server answered {config_response.status_code} for {config_url}: "
                f"{config_response.text[:500]}"
            )
    finally:
        if http_client is None:
            client.close()

    checks = document.check_binding(
        nonce=nonce,
        observed_tls_spki_sha256=observed_spki,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        allow_insecure=allow_insecure,
        allow_no_tls=allow_no_tls,
    )
    # The configuration bytes may come from anyone: only their digest against the claim counts.
    if hashlib.sha256(config_response.content).hexdigest() != document.claims.config_sha256:
        raise VerificationError(
            "config: the configuration the server publishes is not the one its attestation claims"
        )
    config = RunConfiguration.from_bytes(config_response.content)
    if config.manifest_digest != document.claims.model_digest:
        raise VerificationError("config: the attested configuration names another model than the claims")
    collateral = collateral or {}
    warnings: list[str] = []
    device_nonce = document_device_nonce(nonce)
    for device in document.devices:
        result = verify_device_evidence(
            device,
            expected_runtime_data=device_nonce,
            policy=None if device.tee.is_insecure else device_policy,
            now=now,
            collateral=collateral.get(device.tee),
            allow_insecure=allow_insecure,
        )
        checks.append(DocumentCheck(name=f"device:{device.tee.value}", ok=True, detail=_summary(result)))
    primary_tee = document.primary.tee
    if primary_tee.is_insecure:
        cpu_policy = policy  # allowed above only with allow_insecure; RefuseInsecure would refuse it
    else:
        cpu_policy = RefuseInsecure() if policy is None else AllOf([RefuseInsecure(), policy])
        if policy is None:
            warnings.append(
                "no reference values: the hardware and the binding were verified, but not WHICH "
                "software runs (pass reference measurements to check it)"
            )
    try:
        report_data = document.claims.report_data()
    except ValueError as exc:
        raise MalformedEvidence("the attestation claims cannot be canonicalised") from exc
    result = verify_evidence(
        document.primary,
        expected_report_data=report_data,
        policy=cpu_policy,
        now=now,
        collateral=collateral.get(primary_tee),
        allow_insecure=allow_insecure,
    )
    checks.append(
        DocumentCheck(name=f"evidence:{document.primary.tee.value}", ok=True, detail=_summary(result))
    )
    return VerifiedServer(
        base_url=base_url,
        document=document,
        config=config,
        checks=checks,
        tls_spki_sha256=observed_spki,
        tls_certificate_pem=None if peer_cert is None else peer_cert.public_bytes(serialization.Encoding.PEM),
        warnings=warnings,
    )


def _summary(result: VerificationResult) -> str:
    passed = [s.name for s in result.steps if s.outcome is Outcome.PASSED]
    skipped = [s.name for s in result.steps if s.outcome is Outcome.SKIPPED]
    text = "verified: " + ", ".join(passed) if passed else "verified"
    return text + (f"; not checked: {', '.join(skipped)}" if skipped else "")
