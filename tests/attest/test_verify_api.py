"""The verification entry points, the sample verifiers and the policy hook."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from attest.evidence import TeeKind
from attest.tee.sample.evidence import SampleDeviceEvidence, SampleEvidence
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import (
    Outcome,
    RefuseInsecure,
    SampleClaims,
    TdxClaims,
    TdxCollateral,
    VerificationResult,
    result_of,
    verify_device_evidence,
    verify_evidence,
)
from foundation.errors import PolicyViolation, VerificationError
from tests.attest.support import NOW


def _sample(report_data: bytes = b"digest", svn: str = "1") -> SampleEvidence:
    return SampleEvidence(svn=svn, report_data=report_data)


class _Refuse:
    def verify(self, result: VerificationResult) -> None:
        raise PolicyViolation("no")


class _Accept:
    def verify(self, result: VerificationResult) -> None:
        return None


def test_sample_refused_without_allow_insecure() -> None:
    with pytest.raises(PolicyViolation, match="allow_insecure") as info:
        verify_evidence(_sample(), expected_report_data=b"digest")
    partial = result_of(info.value)
    assert partial is not None and partial.insecure
    assert partial.steps[0].outcome is Outcome.FAILED


def test_sampledevice_refused_without_allow_insecure() -> None:
    with pytest.raises(PolicyViolation, match="allow_insecure"):
        verify_device_evidence(SampleDeviceEvidence(report_data=b"x"), expected_runtime_data=b"x")


def test_sample_allowed_is_marked_insecure_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = verify_evidence(_sample(), expected_report_data=b"digest", allow_insecure=True)
    assert result.insecure and result.ok
    assert isinstance(result.claims, SampleClaims) and result.claims.svn == 1
    assert "INSECURE" in caplog.text
    assert result.to_json()["insecure"] is True


def test_sample_report_data_is_compared_exactly() -> None:
    # Sample attesters do not pad: the zero-padded digest is *not* accepted.
    with pytest.raises(VerificationError, match="report_data"):
        verify_evidence(_sample(b"digest"), expected_report_data=b"digest\0\0", allow_insecure=True)
    with pytest.raises(VerificationError, match="report_data"):
        verify_evidence(_sample(b"digest"), expected_report_data=b"other", allow_insecure=True)


def test_sampledevice_runtime_data() -> None:
    ev = SampleDeviceEvidence(report_data=b"runtime")
    assert verify_device_evidence(ev, expected_runtime_data=b"runtime", allow_insecure=True).insecure
    with pytest.raises(VerificationError, match="report_data"):
        verify_device_evidence(ev, expected_runtime_data=b"nope", allow_insecure=True)


def test_sample_svn_must_be_a_number_and_the_policy_hook_runs_last() -> None:
    with pytest.raises(VerificationError, match="svn"):
        verify_evidence(_sample(svn="one"), expected_report_data=b"digest", allow_insecure=True)
    result = verify_evidence(_sample(), expected_report_data=b"digest", allow_insecure=True, policy=_Accept())
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]
    with pytest.raises(PolicyViolation, match="no") as info:
        verify_evidence(_sample(), expected_report_data=b"digest", allow_insecure=True, policy=_Refuse())
    partial = result_of(info.value)
    assert partial is not None and partial.steps[-1].name == "policy"


def test_refuse_insecure_refuses_allowed_sample() -> None:
    with pytest.raises(PolicyViolation, match="RefuseInsecure"):
        verify_evidence(
            _sample(), expected_report_data=b"digest", allow_insecure=True, policy=RefuseInsecure()
        )


def test_expected_report_data_cannot_be_forgotten() -> None:
    with pytest.raises(TypeError):
        verify_evidence(_sample(), allow_insecure=True)  # type: ignore[call-arg]
    result = verify_evidence(_sample(), expected_report_data=None, allow_insecure=True)
    assert result.skipped == ("report_data", "policy")
    assert "expected_report_data=None" in result.step("report_data").detail  # type: ignore[union-attr]


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_evidence(_sample(), expected_report_data=None, allow_insecure=True, now=datetime(2025, 1, 1))


def test_wrong_collateral_type(tdx_evidence: TdxEvidence) -> None:
    with pytest.raises(TypeError, match="TdxCollateral"):
        verify_evidence(tdx_evidence, expected_report_data=None, now=NOW, collateral={"tcb_info": ""})


def test_primary_entry_point_refuses_device_evidence() -> None:
    with pytest.raises(TypeError):
        verify_evidence(SampleDeviceEvidence(report_data=b""), expected_report_data=None)
    with pytest.raises(TypeError):
        verify_device_evidence(_sample(), expected_runtime_data=None)


def _sample_result() -> VerificationResult:
    return verify_evidence(_sample(), expected_report_data=None, allow_insecure=True)


class _TcbUpToDate:
    def verify(self, result: VerificationResult) -> None:
        if not isinstance(result.claims, TdxClaims) or result.claims.tcb_status != "UpToDate":
            raise PolicyViolation("not an UpToDate TDX quote")


def test_the_policy_hook_sees_the_verified_tdx_claims(
    tdx_evidence: TdxEvidence, tdx_collateral: TdxCollateral
) -> None:
    result = verify_evidence(
        tdx_evidence, expected_report_data=None, now=NOW, collateral=tdx_collateral, policy=_TcbUpToDate()
    )
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]
    with pytest.raises(PolicyViolation, match="not an UpToDate"):
        verify_evidence(tdx_evidence, expected_report_data=None, now=NOW, policy=_TcbUpToDate())


def test_result_json_shape() -> None:
    obj = _sample_result().to_json()
    assert set(obj) == {"tee", "insecure", "ok", "steps", "claims"}
    assert obj["tee"] == TeeKind.SAMPLE.value
    assert all(set(s) == {"name", "outcome", "detail"} for s in obj["steps"])
