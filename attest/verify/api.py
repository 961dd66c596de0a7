"""The two entry points: verify primary (CPU) evidence and verify device (GPU) evidence.

Both dispatch to the verifier registered for the evidence's TEE, then add the steps common
to every TEE: the insecure gate first (sample evidence is refused unless the caller allows
it) and the policy last.

The expected report data / runtime data is a *required* keyword argument: a caller cannot
forget it. Passing ``None`` is the explicit way to say "do not check the binding"; the result
then shows a skipped ``report_data`` (or ``gpu<i>.nonce``) step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from attest.errors import MalformedEvidence, PolicyViolation
from attest.evidence import Evidence, TeeKind, b64decode_strict
from attest.verify.base import get_verifier
from attest.verify.policy import Policy
from attest.verify.result import StepLog, VerificationResult, attach_result

__all__ = ["collateral_from_json", "verify_device_evidence", "verify_evidence"]

logger = logging.getLogger(__name__)


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
    at = _at(now)
    verifier = get_verifier(evidence.tee)
    log = StepLog(tee=evidence.tee, insecure=verifier.insecure)
    if verifier.insecure:
        if not allow_insecure:
            log.fail(
                "allow_insecure",
                f"{evidence.tee.value} evidence is not signed by any hardware and proves nothing",
                hint="use a real TEE, or pass allow_insecure=True (development only)",
                error=PolicyViolation,
            )
        logger.warning("INSECURE: accepting %s evidence, which proves nothing", evidence.tee.value)
        log.passed("allow_insecure", "the caller allowed insecure evidence (development only)")
    verifier.verify(evidence, expected=expected, now=at, collateral=collateral, log=log)
    if policy is None:
        log.skipped("policy", "no policy: reference values, TCB level and versions were not checked")
        return log.result()
    try:
        policy.verify(log.result())
    except PolicyViolation as exc:
        log.failed("policy", str(exc))
        raise attach_result(exc, log.result()) from None
    log.passed("policy", f"accepted by {type(policy).__name__}")
    return log.result()


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
    ``collateral`` is a :class:`~attest.verify.tdx.TdxCollateral` or
    :class:`~attest.verify.snp.SnpCollateral`. What each TEE verifies, and what it does not, is
    listed in :mod:`attest.verify.tdx`, :mod:`attest.verify.snp` and :mod:`attest.verify.sample`;
    reference values are only checked by ``policy``.

    .. warning::
       With ``policy=None`` any genuine TEE running *any* software passes. Apply the workload
       policy (:mod:`attest.verify.workload`) to the result before trusting it.

    Raises:
        MalformedEvidence: the evidence does not parse.
        VerificationError: a step failed; ``exc.result`` holds the partial result.
        PolicyViolation: sample evidence without ``allow_insecure``, or ``policy`` refused.
        TypeError: device evidence, or collateral of the wrong type.
    """
    if evidence.tee.is_device:
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
    See :mod:`attest.verify.nvidia` for what is and is not verified.

    Raises:
        MalformedEvidence: the evidence does not parse.
        VerificationError: a step failed; ``exc.result`` holds the partial result.
        PolicyViolation: sampledevice evidence without ``allow_insecure``, or ``policy`` refused.
        TypeError: primary evidence, or collateral given.
    """
    if not evidence.tee.is_device:
        raise TypeError(f"{evidence.tee.value} is primary evidence; use verify_evidence")
    return _run(
        evidence,
        expected_runtime_data,
        policy=policy,
        now=now,
        collateral=collateral,
        allow_insecure=allow_insecure,
    )


def collateral_from_json(items: Mapping[str, Any]) -> dict[TeeKind, object]:
    """Type collateral given as JSON by TEE name (an attestation document's ``collateral``).

    ``tdx``: dcap-qvl collateral JSON; ``snp``: ``{"vcek": <base64 DER or PEM>}``. The result is
    what :func:`verify_evidence` takes as ``collateral``. Nothing here is trusted yet: each item
    is checked against its own signatures (Intel's PCS chain, AMD's ARK/ASK) when used.

    Raises:
        MalformedEvidence: an item is not what its TEE expects, or the TEE is unknown.
    """
    from attest.verify.snp import SnpCollateral
    from attest.verify.tdx import TdxCollateral

    typed: dict[TeeKind, object] = {}
    for name, item in items.items():
        if name == TeeKind.TDX.value:
            typed[TeeKind.TDX] = TdxCollateral.from_json(item)
        elif name == TeeKind.SNP.value:
            if not isinstance(item, Mapping):
                raise MalformedEvidence("collateral: snp must be an object with a 'vcek'")
            typed[TeeKind.SNP] = SnpCollateral(vek=b64decode_strict(item.get("vcek"), "collateral snp.vcek"))
        else:
            raise MalformedEvidence(f"collateral: unknown TEE {name!r}")
    return typed
