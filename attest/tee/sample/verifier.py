"""Verify Trustee *sample* and *sampledevice* evidence, which proves nothing.

Steps::

    (1) allow_insecure  refused unless the caller passed ``allow_insecure=True`` (in the api)
    (2) svn             the ``svn`` string is a decimal integer
    (3) report_data     ``report_data`` equals the expected bytes *exactly* (sample attesters do
                        not pad)

.. warning::
   Nothing here is signed: anyone can produce sample evidence for any report data. The result
   is always marked ``insecure``; use :class:`~attest.verify.policy.RefuseInsecure` to refuse it.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from attest.evidence import Evidence, TeeKind
from attest.tee.result import StepLog
from attest.tee.sample.claims import SampleClaims
from attest.tee.sample.evidence import SampleDeviceEvidence, SampleEvidence
from attest.tee.verifier import Verifier

__all__ = ["SampleDeviceVerifier", "SampleVerifier"]


class _SampleVerifier(Verifier):
    """Check sample-style evidence's svn and report data (no signature exists to check)."""

    insecure: ClassVar[bool] = True
    evidence_type: ClassVar[type[SampleEvidence] | type[SampleDeviceEvidence]]
    expected_name: ClassVar[str]

    def verify(
        self,
        evidence: Evidence,
        *,
        expected: bytes | None,
        now: datetime,
        collateral: object | None,
        log: StepLog,
    ) -> None:
        """Run steps (2)-(3).

        Raises:
            VerificationError: the svn is not a number or the report data differs.
            TypeError: wrong evidence type.
        """
        if not isinstance(evidence, self.evidence_type):
            raise TypeError(
                f"{type(self).__name__} needs {self.evidence_type.__name__}, not {type(evidence).__name__}"
            )
        svn_text = evidence.svn
        if not (svn_text.isascii() and svn_text.isdigit()):
            log.fail(
                "svn", f"svn {svn_text!r} is not a decimal integer", hint="the sample evidence is malformed"
            )
        log.claims = SampleClaims(
            svn=int(svn_text),
            report_data=evidence.report_data,
            init_data=getattr(evidence, "init_data", None),
        )
        log.passed("svn", f"svn {int(svn_text)}")
        if expected is None:
            log.skipped("report_data", f"not checked: the caller passed {self.expected_name}=None")
            return
        log.check(
            evidence.report_data == expected,
            "report_data",
            passed="report data equals the expected bytes",
            failed=f"report data {evidence.report_data.hex()} is not the expected {expected.hex()}",
            hint="the evidence was made for another nonce/key; collect fresh evidence",
        )


class SampleVerifier(_SampleVerifier):
    """Verify Trustee *sample* evidence (primary)."""

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE
    evidence_type = SampleEvidence
    expected_name = "expected_report_data"


class SampleDeviceVerifier(_SampleVerifier):
    """Verify Trustee *sampledevice* evidence (device)."""

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE_DEVICE
    evidence_type = SampleDeviceEvidence
    expected_name = "expected_runtime_data"
