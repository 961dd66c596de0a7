"""The interface every per-TEE verifier implements, and the steps common to every TEE.

A verifier runs its TEE's checks as named steps on a :class:`~attest.tee.result.StepLog`,
recording claims as it goes; :func:`run_verifier` adds the parts common to every TEE (the
insecure gate first, the policy step last) and builds the result. Which verifier a kind of
evidence gets is the registry's to say (:func:`attest.tee.backend`); the entry points are in
:mod:`attest.verify.api`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from attest.binding import REPORT_DATA_SIZE
from attest.evidence import Evidence, TeeKind
from attest.tee.result import StepLog, VerificationResult, attach_result
from foundation.errors import MalformedEvidence, PolicyViolation

__all__ = ["Policy", "Verifier", "check_padded_report_data", "parse_logged", "run_verifier"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@runtime_checkable
class Policy(Protocol):
    """Decide whether a verified result is acceptable (the last step of every verification)."""

    def verify(self, result: VerificationResult) -> None:
        """Return None if ``result`` is acceptable.

        Raises:
            PolicyViolation: it is not.
        """
        ...


class Verifier(ABC):
    """One TEE's verifier."""

    tee: ClassVar[TeeKind]
    #: True for verifiers of evidence that proves nothing (sample TEEs).
    insecure: ClassVar[bool] = False

    @abstractmethod
    def verify(
        self,
        evidence: Evidence,
        *,
        expected: bytes | None,
        now: datetime,
        collateral: object | None,
        log: StepLog,
    ) -> None:
        """Run this TEE's steps on ``evidence``, recording each step and the claims on ``log``.

        ``expected`` is the caller's report data / runtime data, or None when the caller chose
        not to check the binding (recorded as a skipped step).

        Raises:
            MalformedEvidence: the evidence does not parse.
            VerificationError: a step failed (via ``log.fail``).
            TypeError: ``evidence`` or ``collateral`` is of the wrong type for this TEE.
        """


def check_padded_report_data(log: StepLog, actual: bytes, expected: bytes | None) -> None:
    """Compare a 64-byte report data field with ``expected`` zero-padded to 64 bytes.

    This is Trustee's ``regularize_data``: the attester zero-pads the binding digest.

    Raises:
        VerificationError: they differ, or ``expected`` is longer than 64 bytes.
    """
    if expected is None:
        log.skipped("report_data", "not checked: the caller passed expected_report_data=None")
        return
    if len(expected) > REPORT_DATA_SIZE:
        log.fail(
            "report_data",
            f"expected report data is {len(expected)} bytes, longer than the {REPORT_DATA_SIZE}-byte field",
            hint="pass the unpadded binding digest from attest.binding",
        )
    padded = expected.ljust(REPORT_DATA_SIZE, b"\0")
    log.check(
        actual == padded,
        "report_data",
        passed=f"report data equals the expected {len(expected)}-byte value (zero-padded)",
        failed=f"report data {actual.hex()} is not the expected {padded.hex()}",
        hint="the evidence was made for another nonce/key (replay or wrong session); collect fresh evidence",
    )


def parse_logged(log: StepLog, parse: Callable[[bytes], _T], raw: bytes) -> _T:
    """Run the pure parser ``parse`` on ``raw``; on failure record step "parse" and re-raise.

    Raises:
        MalformedEvidence: the bytes do not parse (with ``.result``, the partial result).
    """
    try:
        return parse(raw)
    except MalformedEvidence as exc:
        log.failed("parse", str(exc))
        raise attach_result(exc, log.result()) from None


def run_verifier(
    verifier: Verifier,
    evidence: Evidence,
    expected: bytes | None,
    *,
    policy: Policy | None,
    now: datetime,
    collateral: object | None,
    allow_insecure: bool,
) -> VerificationResult:
    """Run ``verifier`` on ``evidence`` between the steps common to every TEE.

    1. ``allow_insecure``: evidence of an insecure verifier (sample TEEs) is refused unless the
       caller allowed it.
    2. The verifier's own steps (parse, signatures, chains, binding), recorded with the claims.
    3. ``policy``: skipped (recorded) when None, else it must accept the result.

    ``now`` must be timezone aware (the caller's clock).

    Raises:
        MalformedEvidence: the evidence does not parse.
        VerificationError: a step failed; ``exc.result`` holds the partial result.
        PolicyViolation: insecure evidence without ``allow_insecure``, or ``policy`` refused.
        TypeError: evidence or collateral of the wrong type for ``verifier``.
    """
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
    verifier.verify(evidence, expected=expected, now=now, collateral=collateral, log=log)
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
