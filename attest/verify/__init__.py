"""Verify TEE evidence: one verifier per TEE behind one interface.

Entry points: :func:`verify_evidence` (TDX, SNP, sample) and :func:`verify_device_evidence`
(NVIDIA, sampledevice); the verifier of each kind is its backend's (:mod:`attest.tee`). Both return
a :class:`VerificationResult` listing every step and the typed claims, or raise
:class:`~foundation.errors.VerificationError` / :class:`~foundation.errors.PolicyViolation` naming the
failed step, with the partial result as ``exc.result`` (see :func:`result_of`). Nothing here
touches the network. What the verified evidence must measure is the workload policy's to say
(:mod:`attest.verify.workload`).
"""

from __future__ import annotations

from attest.tee import (
    GpuClaims,
    NvidiaClaims,
    SampleClaims,
    SnpClaims,
    SnpCollateral,
    TdxClaims,
    TdxCollateral,
    fetch_vcek,
)
from attest.tee.result import Outcome, Step, VerificationResult, result_of
from attest.verify.api import collateral_from_json, verify_device_evidence, verify_evidence
from attest.verify.policy import Policy, RefuseInsecure

__all__ = [
    "GpuClaims",
    "NvidiaClaims",
    "Outcome",
    "Policy",
    "RefuseInsecure",
    "SampleClaims",
    "SnpClaims",
    "SnpCollateral",
    "Step",
    "TdxClaims",
    "TdxCollateral",
    "VerificationResult",
    "collateral_from_json",
    "fetch_vcek",
    "result_of",
    "verify_device_evidence",
    "verify_evidence",
]
