"""Verify a draft ACI ``aci/1`` report from enclave-serve, offline, against a workload policy.

:func:`verify_aci_report` is the ACI counterpart of :func:`attest.client.verdict.verify_document`:
a pure function over the report the server published (``GET /v1/aci/attestation``), the nonce
the client sent and the TLS key it saw. Steps, in order; each is reported with its outcome, and a
failed binding step stops the steps after it (their inputs are untrusted)::

    (1) report          parses as aci/1 with enclave-serve's keyset member
    (2) keyset          the stated digest is the embedded keyset's; within its not_after
    (3) nonce           report_data is the statement's digest for the keyset and our nonce
    (4) insecure_modes  the report's (unbound) list is the keyset's (bound) one
    (5) devices         the device evidence is exactly what the keyset's digests list
    (6) tls             the TLS key the client talked to is in the keyset
    (7) model, config   the expected ones, if given
    (8) tee             anything insecure only with the explicit development flag
    (9) evidence:<tee>  the CPU evidence verifies and its report data is report_data (padded)
    (10) device:<tee>   each device's evidence verifies with the keyset's device nonce
    (11) init_data      the keyset's init-data digest is what the hardware register holds
    (12) policy:<rule>  every rule of the workload policy

What an ACI report does not give, unlike our document: device evidence fresh for the client's
nonce (it is the keyset's, collected once when the keyset was made), and the run configuration's
bytes (only its digest, which the policy pins). Without a policy, step (12) refuses unless
``allow_unpinned_software``, as for the document.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from attest.aci import AciReport, aci_device_nonce
from attest.binding import pad_report_data
from attest.client.verdict import StepFailed, StepsVerdict, policy_steps, verify_hardware
from attest.document import DocumentCheck
from attest.evidence import TeeKind
from attest.tee import BACKENDS
from attest.verify import (
    collateral_from_json,
)
from attest.verify.workload import WorkloadFacts, WorkloadPolicy
from foundation.errors import AttestationError

__all__ = ["AciVerdict", "verify_aci_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class AciVerdict(StepsVerdict):
    """Every step of one ACI report's verification, and what was verified."""

    report: AciReport | None = None

    def to_json(self) -> dict[str, Any]:
        """Return ``{"verified", "steps", "warnings", ...}``."""
        report = self.report
        return {
            "verified": self.ok,
            "unpinned_software": self.unpinned,
            "tee": None if report is None else report.primary.tee.value,
            "insecure": None if report is None else report.insecure,
            "insecure_modes": None if report is None else list(report.workload.insecure_modes),
            "keyset_digest": None if report is None else report.stated_digest,
            "model_digest": None if report is None else report.workload.model,
            "config_sha256": None if report is None else report.workload.config_sha256,
            "init_data": None if report is None else report.workload.init_data,
            "steps": [s.to_json() for s in self.steps],
            "warnings": list(self.warnings),
        }


def verify_aci_report(
    report_json: Mapping[str, Any],
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
) -> AciVerdict:
    """Run every step of the module docstring and return the verdict (never raises for a refusal).

    ``nonce`` is the one sent (``None`` checks the unchallenged report, which proves no
    freshness); ``now`` (default: this machine's clock) is when the keyset, certificates and
    collateral must be valid.

    Raises:
        TypeError: collateral of the wrong type for its TEE (a caller bug).
    """
    steps: list[DocumentCheck] = []
    warnings: list[str] = []

    def failed(name: str, exc: Exception, **kw: Any) -> AciVerdict:
        steps.append(DocumentCheck(name=name, ok=False, detail=str(exc)))
        return AciVerdict(steps=tuple(steps), warnings=tuple(warnings), **kw)

    # (1) report
    try:
        report = AciReport.from_json(report_json)
    except AttestationError as exc:
        return failed("report", exc)
    steps.append(DocumentCheck(name="report", ok=True, detail="aci/1 with the enclave_serve keyset member"))
    # (2)-(8) binding: keyset, nonce, insecure modes, devices, TLS, model, config, insecure TEE
    try:
        steps += report.check_binding(
            nonce=nonce,
            observed_tls_spki_sha256=observed_tls_spki_sha256,
            expected_model_digest=expected_model_digest,
            expected_config_sha256=expected_config_sha256,
            allow_insecure=allow_insecure,
            allow_no_tls=allow_no_tls,
            now=None if now is None else now.timestamp(),
        )
    except AttestationError as exc:
        return failed(str(exc).split(":", 1)[0] if ":" in str(exc) else "binding", exc, report=report)
    try:
        collateral = {**collateral_from_json(report.collateral), **(collateral or {})}
    except AttestationError as exc:
        return failed("collateral", exc, report=report)
    # (9) CPU evidence, (10) device evidence over the nonce the keyset derives, (11) init-data
    try:
        hardware = verify_hardware(
            steps,
            primary=report.primary,
            report_data=pad_report_data(report.report_data),
            devices=report.devices,
            device_nonce=aci_device_nonce(report.keyset),
            claimed_init_data=report.workload.init_data,
            claimed_tee=report.primary.tee,
            collateral=collateral,
            refuse_insecure=policy is None and not BACKENDS[report.primary.tee].insecure,
            now=now,
            allow_insecure=allow_insecure,
        )
    except StepFailed as exc:
        return failed(exc.name, exc.error, report=report, primary=exc.primary, devices=exc.devices)
    # (12) the workload policy
    unpinned = policy_steps(
        steps,
        warnings,
        policy,
        lambda: WorkloadFacts(
            primary=hardware.primary,
            devices=hardware.devices,
            model_digest=report.workload.model,
            config_sha256=report.workload.config_sha256,
            # The configuration's bytes are not in an ACI report, but its pinned digest covers them.
            config_covers_runtime=True,
            init_data_register=hardware.register,
            allow_insecure=allow_insecure,
        ),
        allow_unpinned_software=allow_unpinned_software,
    )
    return AciVerdict(
        steps=tuple(steps),
        warnings=tuple(warnings),
        unpinned=unpinned,
        report=report,
        primary=hardware.primary,
        devices=hardware.devices,
    )
