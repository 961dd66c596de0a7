"""The two entry points: verify primary (CPU) evidence and verify device (GPU) evidence.

Both dispatch to the verifier of the evidence's backend (:func:`attest.tee.backend`), between
the steps common to every TEE (:func:`attest.tee.verifier.run_verifier`): the insecure gate
first (sample evidence is refused unless the caller allows it) and the policy last.

The expected report data / runtime data is a *required* keyword argument: a caller cannot
forget it. Passing ``None`` is the explicit way to say "do not check the binding"; the result
then shows a skipped ``report_data`` (or ``gpu<i>.nonce``) step.
"""

from __future__ import annotations

from datetime import UTC, datetime

from attest.evidence import Evidence
from attest.tee import backend, collateral_from_json
from attest.tee.result import VerificationResult
from attest.tee.verifier import Policy, run_verifier
from foundation.errors import MalformedEvidence, VerificationError

__all__ = ["collateral_from_json", "verify_device_evidence", "verify_evidence"]


def _at(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    return now


def _run(
    evidence: Evidence,
    expected: bytes | None,
    *,
    policy: Policy | None,
    now: datetime | None,
    collateral: object | None,
    allow_insecure: bool,
) -> VerificationResult:
    try:
        verifier = backend(evidence.tee).verifier
    except MalformedEvidence:
        raise VerificationError(f"no verifier is registered for TEE {evidence.tee.value!r}") from None
    return run_verifier(
        verifier,
        evidence,
        expected,
        policy=policy,
        now=_at(now),
        collateral=collateral,
        allow_insecure=allow_insecure,
    )


def verify_evidence(
    evidence: Evidence,
    *,
    expected_report_data: bytes | None,
    policy: Policy | None = None,
    now: datetime | None = None,
    collateral: object | None = None,
    allow_insecure: bool = False,
) -> VerificationResult:
    """Verify primary (CPU TEE) evidence and its binding to ``expected_report_data``.

    ``expected_report_data`` is the *unpadded* binding digest (at most 64 bytes, as computed by
    :mod:`attest.binding`): TDX and SNP compare it zero-padded to 64 bytes with the report
    field, sample evidence compares it exactly. ``None`` skips that check (recorded). ``now``
    (default: the current time) is when certificates and collateral must be valid.
    ``collateral`` is a :class:`~attest.tee.tdx.verifier.TdxCollateral` or
    :class:`~attest.tee.snp.verifier.SnpCollateral`. What each TEE verifies, and what it does
    not, is listed in :mod:`attest.tee.tdx.verifier`, :mod:`attest.tee.snp.verifier` and
    :mod:`attest.tee.sample.verifier`; reference values are only checked by ``policy``.

    .. warning::
       With ``policy=None`` any genuine TEE running *any* software passes. Apply the workload
       policy (:mod:`attest.verify.workload`) to the result before trusting it.

    Raises:
        MalformedEvidence: the evidence does not parse.
        VerificationError: a step failed; ``exc.result`` holds the partial result.
        PolicyViolation: sample evidence without ``allow_insecure``, or ``policy`` refused.
        TypeError: device evidence, or collateral of the wrong type.
    """
    if backend(evidence.tee).device:
        raise TypeError(f"{evidence.tee.value} is device evidence; use verify_device_evidence")
    return _run(
        evidence,
        expected_report_data,
        policy=policy,
        now=now,
        collateral=collateral,
        allow_insecure=allow_insecure,
    )


def verify_device_evidence(
    evidence: Evidence,
    *,
    expected_runtime_data: bytes | None,
    policy: Policy | None = None,
    now: datetime | None = None,
    collateral: object | None = None,
    allow_insecure: bool = False,
) -> VerificationResult:
    """Verify device (GPU) evidence and its binding to ``expected_runtime_data``.

    NVIDIA compares the first 32 bytes of ``expected_runtime_data`` (zero-padded) with every
    GPU's request nonce; sampledevice compares it exactly. ``None`` skips that check (recorded).
    See :mod:`attest.tee.nvidia.verifier` for what is and is not verified.

    Raises:
        MalformedEvidence: the evidence does not parse.
        VerificationError: a step failed; ``exc.result`` holds the partial result.
        PolicyViolation: sampledevice evidence without ``allow_insecure``, or ``policy`` refused.
        TypeError: primary evidence, or collateral given.
    """
    if not backend(evidence.tee).device:
        raise TypeError(f"{evidence.tee.value} is primary evidence; use verify_evidence")
    return _run(
        evidence,
        expected_runtime_data,
        policy=policy,
        now=now,
        collateral=collateral,
        allow_insecure=allow_insecure,
    )
