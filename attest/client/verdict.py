"""Verify an attestation document and its run configuration against a workload policy, offline.

:func:`verify_document` is the whole user-side check as a pure function: it takes the document
and configuration bytes the server published, the nonce the client sent, the TLS key the
client saw, and a :class:`~attest.verify.workload.WorkloadPolicy`; it opens no connection
(:mod:`attest.client.remote` fetches, then calls it). Steps, in order; each is reported with
its outcome, and a failed binding step stops the steps after it (their inputs are untrusted)::

    (1) document       parses as enclave-serve/attestation/v3
    (2) nonce          answers the client's nonce (freshness)
    (3) devices        the device evidence is what the claims list
    (4) tls            the attested TLS key is the one the client talked to
    (5) tee            an insecure (sample) TEE only with the explicit development flag
    (6) config         the published configuration hashes to the attested claim
    (7) evidence:<tee> the CPU evidence verifies (signature, chain, QE/VCEK) and its report
                       data is the digest of the claims, so every claim is the hardware's word
    (8) device:<tee>   each device's evidence verifies with the nonce derived from ours
    (9) init_data      the claimed init-data digest is what the hardware register holds
    (10) policy:<rule> every rule of the workload policy (measurements, TCB, attributes,
                       init-data, GPUs, model, configuration, runtime version)

Without a policy, step (10) refuses: genuine hardware running *unpinned* software proves
nothing about the software (the host can boot its own VM). ``allow_unpinned_software`` turns
that refusal into a loud warning, for inspection only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from attest.binding import document_device_nonce
from attest.document import DOCUMENT_FORMAT, AttestationDocument, DocumentCheck
from attest.errors import AttestationError, MalformedEvidence, PolicyViolation, VerificationError
from attest.evidence import TeeKind
from attest.initdata import register_for_digest
from attest.runconfig import RunConfiguration
from attest.verify import (
    Outcome,
    RefuseInsecure,
    VerificationResult,
    collateral_from_json,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.workload import WorkloadFacts, WorkloadPolicy, init_data_register_of

__all__ = ["ServerRefused", "Verdict", "document_collateral", "verify_document"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """Every step of one verification, and what was verified."""

    steps: tuple[DocumentCheck, ...]
    document: AttestationDocument | None = None
    config: RunConfiguration | None = None
    primary: VerificationResult | None = None
    devices: tuple[VerificationResult, ...] = ()
    unpinned: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every step passed."""
        return bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def failures(self) -> tuple[DocumentCheck, ...]:
        """The failed steps."""
        return tuple(s for s in self.steps if not s.ok)

    def to_json(self) -> dict[str, Any]:
        """Return ``{"verified", "steps", "warnings", ...}``."""
        claims = None if self.document is None else self.document.claims
        return {
            "verified": self.ok,
            "unpinned_software": self.unpinned,
            "tee": None if claims is None else claims.tee.value,
            "insecure": None if claims is None else claims.insecure,
            "model_digest": None if claims is None else claims.model_digest,
            "config_sha256": None if claims is None else claims.config_sha256,
            "init_data": None if claims is None else claims.init_data,
            "config": None if self.config is None else self.config.to_json(),
            "key_release": None if claims is None else claims.key_release,
            "steps": [s.to_json() for s in self.steps],
            "warnings": list(self.warnings),
        }


class ServerRefused(PolicyViolation):
    """The server did not verify; ``verdict`` holds every step (``str()`` names the failures)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__("; ".join(f"{s.name}: {s.detail}" for s in verdict.failures) or "not verified")
        self.verdict = verdict


def _summary(result: VerificationResult) -> str:
    passed = [s.name for s in result.steps if s.outcome is Outcome.PASSED]
    skipped = [s.name for s in result.steps if s.outcome is Outcome.SKIPPED and s.name != "policy"]
    text = "verified: " + ", ".join(passed) if passed else "verified"
    return text + (f"; not checked: {', '.join(skipped)}" if skipped else "")


def _init_data_binding(document: AttestationDocument, register: bytes | None) -> str:
    claimed = document.claims.init_data
    if claimed is None:
        return "no init-data claimed" + ("" if register is None else f" (register {register.hex()[:16]}…)")
    hexpart = claimed.partition(":")[2]
    try:
        digest = bytes.fromhex(hexpart)
    except ValueError:
        raise MalformedEvidence("claims: init_data digest is not hex") from None
    if register is None or register != register_for_digest(document.claims.tee, digest):
        raise VerificationError(
            "init_data: the claimed init-data digest is not what the hardware register holds"
        )
    return f"{claimed} is what the register holds"


def document_collateral(document: AttestationDocument) -> dict[TeeKind, object]:
    """Return the collateral the document carries, typed for :func:`attest.verify.verify_evidence`.

    Collateral is not covered by the report data; it needs none: the TDX collateral is signed by
    Intel's PCS chain and the VCEK by AMD's, both checked against pinned roots when used.

    Raises:
        MalformedEvidence: a collateral item is not what its TEE expects.
    """
    return collateral_from_json(document.collateral)


def verify_document(
    document_json: Mapping[str, Any],
    config_bytes: bytes,
    *,
    nonce: bytes | None,
    observed_tls_spki_sha256: str | None,
    policy: WorkloadPolicy | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Run every step of the module docstring and return the verdict (never raises for a refusal).

    Raises:
        TypeError: collateral of the wrong type for its TEE (a caller bug).
    """
    steps: list[DocumentCheck] = []
    warnings: list[str] = []

    def failed(name: str, exc: Exception, **kw: Any) -> Verdict:
        steps.append(DocumentCheck(name=name, ok=False, detail=str(exc)))
        return Verdict(steps=tuple(steps), warnings=tuple(warnings), **kw)

    # (1) document
    try:
        document = AttestationDocument.from_json(document_json)
    except AttestationError as exc:
        return failed("document", exc)
    steps.append(DocumentCheck(name="document", ok=True, detail=DOCUMENT_FORMAT))
    # (2)-(5) binding: nonce, devices, TLS, expected model/config, insecure TEE
    try:
        steps += document.check_binding(
            nonce=nonce,
            observed_tls_spki_sha256=observed_tls_spki_sha256,
            expected_model_digest=expected_model_digest,
            expected_config_sha256=expected_config_sha256,
            allow_insecure=allow_insecure,
            allow_no_tls=allow_no_tls,
            now=None if now is None else now.timestamp(),
        )
    except AttestationError as exc:
        return failed(str(exc).split(":", 1)[0] if ":" in str(exc) else "binding", exc, document=document)
    # (6) the configuration the server publishes is the attested one
    try:
        if hashlib.sha256(config_bytes).hexdigest() != document.claims.config_sha256:
            raise VerificationError("the published configuration is not the one the attestation claims")
        config = RunConfiguration.from_bytes(config_bytes)
        if config.manifest_digest != document.claims.model_digest:
            raise VerificationError("the attested configuration names another model than the claims")
    except AttestationError as exc:
        return failed("config-bytes", exc, document=document)
    steps.append(DocumentCheck(name="config-bytes", ok=True, detail="the published bytes hash to the claim"))
    try:
        collateral = {**document_collateral(document), **(collateral or {})}
    except AttestationError as exc:
        return failed("collateral", exc, document=document, config=config)
    # (7) CPU evidence: cryptography and binding; validation is the policy's job (step 10)
    primary_tee = document.primary.tee
    cpu_policy = RefuseInsecure() if (policy is None and not primary_tee.is_insecure) else None
    try:
        primary = verify_evidence(
            document.primary,
            expected_report_data=document.claims.report_data(),
            policy=cpu_policy,
            now=now,
            collateral=collateral.get(primary_tee),
            allow_insecure=allow_insecure,
        )
    except (AttestationError, ValueError) as exc:
        return failed(f"evidence:{primary_tee.value}", exc, document=document, config=config)
    steps.append(DocumentCheck(name=f"evidence:{primary_tee.value}", ok=True, detail=_summary(primary)))
    # (8) device evidence
    device_nonce = document_device_nonce(document.claims.nonces, document.claims.enclave_nonce)
    devices: list[VerificationResult] = []
    for device in document.devices:
        try:
            result = verify_device_evidence(
                device,
                expected_runtime_data=device_nonce,
                now=now,
                collateral=collateral.get(device.tee),
                allow_insecure=allow_insecure,
            )
        except AttestationError as exc:
            return failed(
                f"device:{device.tee.value}", exc, document=document, config=config, primary=primary
            )
        devices.append(result)
        steps.append(DocumentCheck(name=f"device:{device.tee.value}", ok=True, detail=_summary(result)))
    kw: dict[str, Any] = {
        "document": document,
        "config": config,
        "primary": primary,
        "devices": tuple(devices),
    }
    # (9) the claimed init-data is the register's
    register = init_data_register_of(primary)
    try:
        steps.append(DocumentCheck(name="init_data", ok=True, detail=_init_data_binding(document, register)))
    except AttestationError as exc:
        return failed("init_data", exc, **kw)
    # (10) the workload policy
    if policy is None:
        if not allow_unpinned_software:
            steps.append(
                DocumentCheck(
                    name="policy",
                    ok=False,
                    detail="no policy: genuine hardware was verified but not WHICH software runs (the host "
                    "can boot its own VM); pass --policy FILE (enclave-serve policy record writes one)",
                )
            )
            return Verdict(steps=tuple(steps), warnings=tuple(warnings), **kw)
        warnings.append(
            "UNPINNED SOFTWARE: no policy was applied; this proves only that genuine hardware runs SOME "
            "software, which claims the model and configuration shown"
        )
        logger.warning("INSECURE: %s", warnings[-1])
        steps.append(DocumentCheck(name="policy", ok=True, detail="NOT APPLIED (--allow-unpinned-software)"))
        return Verdict(steps=tuple(steps), warnings=tuple(warnings), unpinned=True, **kw)
    facts = WorkloadFacts(
        primary=primary,
        devices=tuple(devices),
        model_digest=document.claims.model_digest,
        config_sha256=document.claims.config_sha256,
        runtime_version=str(config.to_json()["runtime"].get("version")),
        init_data_register=register,
        allow_insecure=allow_insecure,
    )
    for outcome in policy.evaluate(facts):
        steps.append(DocumentCheck(name=f"policy:{outcome.rule}", ok=outcome.ok, detail=outcome.detail))
    return Verdict(steps=tuple(steps), warnings=tuple(warnings), **kw)
