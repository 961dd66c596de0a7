"""The verification entry points, the sample verifiers and the policy combinators."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from attest.errors import PolicyViolation, VerificationError
from attest.evidence import SampleDeviceEvidence, SampleEvidence, TeeKind
from attest.formats import TdxEvidence
from attest.verify import (
    AllOf,
    AllowedGpuVersions,
    AllowedSnpMeasurements,
    AllowedTdxMeasurements,
    AllowedTdxTcbStatus,
    AnyOf,
    MinimumSampleSvn,
    MinimumSnpTcb,
    Outcome,
    RefuseInsecure,
    SampleClaims,
    TdxCollateral,
    UnsafeNoOp,
    VerificationResult,
    result_of,
    verify_device_evidence,
    verify_evidence,
)
from tests.attest.support import NOW


def _sample(report_data: bytes = b"digest", svn: str = "1") -> SampleEvidence:
    return SampleEvidence(svn=svn, report_data=report_data)


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


def test_sample_svn_must_be_a_number_and_policy_checks_it() -> None:
    with pytest.raises(VerificationError, match="svn"):
        verify_evidence(_sample(svn="one"), expected_report_data=b"digest", allow_insecure=True)
    verify_evidence(
        _sample(svn="3"), expected_report_data=b"digest", allow_insecure=True, policy=MinimumSampleSvn(3)
    )
    with pytest.raises(PolicyViolation, match="svn 1 is below 2"):
        verify_evidence(
            _sample(), expected_report_data=b"digest", allow_insecure=True, policy=MinimumSampleSvn(2)
        )


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


class _Refuse:
    def verify(self, result: VerificationResult) -> None:
        raise PolicyViolation("no")


class _Accept:
    def verify(self, result: VerificationResult) -> None:
        return None


def test_empty_all_of_refuses() -> None:
    with pytest.raises(PolicyViolation, match="no child policies"):
        AllOf([]).verify(_sample_result())


def test_empty_any_of_refuses() -> None:
    with pytest.raises(PolicyViolation):
        AnyOf([]).verify(_sample_result())


def test_combinators() -> None:
    result = _sample_result()
    AllOf([_Accept(), _Accept()]).verify(result)
    AnyOf([_Refuse(), _Accept()]).verify(result)
    with pytest.raises(PolicyViolation):
        AllOf([_Accept(), _Refuse()]).verify(result)
    with pytest.raises(PolicyViolation, match="no child policy accepted"):
        AnyOf([_Refuse(), _Refuse()]).verify(result)


def test_unsafe_noop_warns_on_every_use(caplog: pytest.LogCaptureFixture) -> None:
    result = _sample_result()
    with caplog.at_level(logging.WARNING):
        UnsafeNoOp().verify(result)
        UnsafeNoOp().verify(result)
    assert caplog.text.count("UnsafeNoOp") == 2


@pytest.mark.parametrize(
    "policy",
    [
        AllowedTdxMeasurements(mrtd=["00" * 48]),
        AllowedSnpMeasurements(measurement=["00" * 48]),
        AllowedTdxTcbStatus({"UpToDate"}),
        MinimumSnpTcb(),
        AllowedGpuVersions(driver_versions=["1"]),
    ],
)
def test_tee_specific_policies_refuse_other_tees(policy: object) -> None:
    assert hasattr(policy, "verify")
    with pytest.raises(PolicyViolation, match="applies to"):
        policy.verify(_sample_result())


@pytest.mark.parametrize(
    "make",
    [
        lambda: AllowedTdxMeasurements(),
        lambda: AllowedTdxMeasurements(mrtd=[]),
        lambda: AllowedSnpMeasurements(),
        lambda: AllowedTdxTcbStatus(()),
        lambda: AllowedGpuVersions(),
    ],
)
def test_policies_that_would_check_nothing_are_refused_at_construction(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_any_of_across_tees(tdx_evidence: TdxEvidence, tdx_collateral: TdxCollateral) -> None:
    policy = AnyOf([AllowedSnpMeasurements(measurement=["00" * 48]), AllowedTdxTcbStatus({"UpToDate"})])
    result = verify_evidence(
        tdx_evidence, expected_report_data=None, now=NOW, collateral=tdx_collateral, policy=policy
    )
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]


def test_result_json_shape() -> None:
    obj = _sample_result().to_json()
    assert set(obj) == {"tee", "insecure", "ok", "steps", "claims"}
    assert obj["tee"] == TeeKind.SAMPLE.value
    assert all(set(s) == {"name", "outcome", "detail"} for s in obj["steps"])
