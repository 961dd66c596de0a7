"""The interface every per-TEE verifier implements, and their registry.

A verifier runs its TEE's checks as named steps on a :class:`~attest.verify.result.StepLog`,
recording claims as it goes; the entry points in :mod:`attest.verify.api` add the parts common
to every TEE (the insecure gate, the policy step) and build the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import ClassVar, TypeVar

from attest.binding import REPORT_DATA_SIZE
from attest.errors import MalformedEvidence, VerificationError
from attest.evidence import Evidence, TeeKind
from attest.verify.result import StepLog, attach_result

__all__ = ["Verifier", "check_padded_report_data", "get_verifier", "parse_logged", "register_verifier"]

_T = TypeVar("_T")


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


_VERIFIERS: dict[TeeKind, Verifier] = {}


def register_verifier(verifier: Verifier) -> None:
    """Register ``verifier`` for its TEE (replacing any previous one)."""
    _VERIFIERS[verifier.tee] = verifier


def get_verifier(tee: TeeKind) -> Verifier:
    """Return the verifier registered for ``tee``.

    Raises:
        VerificationError: no verifier is known for that TEE.
    """
    try:
        return _VERIFIERS[tee]
    except KeyError:
        raise VerificationError(f"no verifier is registered for TEE {tee.value!r}") from None


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
