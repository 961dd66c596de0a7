"""The NVIDIA attester above NVML, driven through FakeNvml (tests/attest/fake_nvml.py), plus one
``gpu``-marked test of the real NVML path (skipped without a GPU)."""

from __future__ import annotations

import os

import pytest

from attest.errors import BackendUnavailable, EvidenceCollectionError, PolicyViolation, VerificationError
from attest.providers import detect_devices
from attest.providers.nvidia import NvidiaAttester
from attest.verify import AllowedGpuVersions, verify_device_evidence
from tests.attest.fake_nvml import FakeGpu, FakeNvml
from tests.attest.support import HOPPER_NONCE, NOW

HOPPER = 9


@pytest.fixture
def nvml(nvidia_report: bytes, nvidia_chain: bytes) -> FakeNvml:
    return FakeNvml(
        gpus=[
            FakeGpu(uuid="GPU-0", arch=HOPPER, report=nvidia_report, chain=nvidia_chain),
            FakeGpu(uuid="GPU-1", arch=HOPPER, report=nvidia_report, chain=nvidia_chain),
        ]
    )


def _attester(nvml: FakeNvml, **kwargs: object) -> NvidiaAttester:
    return NvidiaAttester(nvml=nvml, clock=lambda: NOW, **kwargs)  # type: ignore[arg-type]


def test_collects_every_gpu_with_the_first_32_bytes_as_nonce(nvml: FakeNvml, nvidia_report: bytes) -> None:
    nvml.ready = 1
    evidence = _attester(nvml).collect(HOPPER_NONCE + b"\xee" * 16)
    assert [d.uuid for d in evidence.devices] == ["GPU-0", "GPU-1"]
    assert all(d.arch == "HOPPER" and d.evidence == nvidia_report for d in evidence.devices)
    assert nvml.nonces == [HOPPER_NONCE, HOPPER_NONCE]
    assert nvml.open_sessions == 0
    assert nvml.ready_writes == []  # already ready: nothing changed


def test_short_runtime_data_is_zero_padded(nvml: FakeNvml) -> None:
    nvml.ready = 1
    _attester(nvml).collect(b"\x01\x02")
    assert nvml.nonces[0] == b"\x01\x02" + b"\0" * 30


def test_not_ready_gpus_are_verified_then_set_ready(nvml: FakeNvml) -> None:
    evidence = _attester(nvml).collect(HOPPER_NONCE)
    assert nvml.ready_writes == [1]
    assert verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW).ok


def test_unverifiable_gpus_are_not_set_ready(nvml: FakeNvml) -> None:
    # The double replays the sample report, so any other nonce fails local verification.
    with pytest.raises(VerificationError, match=r"gpu0.nonce"):
        _attester(nvml).collect(os.urandom(32))
    assert nvml.ready_writes == [] and nvml.open_sessions == 0


def test_policy_gates_the_ready_state(nvml: FakeNvml) -> None:
    with pytest.raises(PolicyViolation, match="driver"):
        _attester(nvml, policy=AllowedGpuVersions(driver_versions=["999.0"])).collect(HOPPER_NONCE)
    assert nvml.ready_writes == []
    _attester(nvml, policy=AllowedGpuVersions(driver_versions=["550.90.07"])).collect(HOPPER_NONCE)
    assert nvml.ready_writes == [1]


def test_set_ready_false_leaves_the_state_alone(nvml: FakeNvml) -> None:
    _attester(nvml, set_ready=False).collect(HOPPER_NONCE)
    assert nvml.ready_writes == []


def test_cc_off_is_refused(nvml: FakeNvml) -> None:
    nvml.cc_feature = 0
    with pytest.raises(BackendUnavailable, match=r"confidential computing is off.*allow_cc_off"):
        _attester(nvml).collect(HOPPER_NONCE)
    assert nvml.nonces == [] and nvml.open_sessions == 0


def test_cc_off_allowed_for_development(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    nvml.cc_feature = 0
    evidence = _attester(nvml, allow_cc_off=True).collect(HOPPER_NONCE)
    assert len(evidence.devices) == 2
    assert nvml.ready_writes == []  # no ready state outside CC mode
    assert "INSECURE" in caplog.text


def test_devtools_mode_is_refused(nvml: FakeNvml) -> None:
    nvml.dev_tools_mode = 1
    with pytest.raises(BackendUnavailable, match="developer-tools"):
        _attester(nvml).collect(HOPPER_NONCE)


def test_protected_pcie_mode_counts_as_cc(nvml: FakeNvml) -> None:
    nvml.cc_feature = 0
    nvml.multi_gpu_mode = 1
    nvml.ready = 1
    assert len(_attester(nvml).collect(HOPPER_NONCE).devices) == 2
    assert _attester(nvml).cc_state().protected_pcie


def test_nvml_errors_become_collection_errors(nvml: FakeNvml) -> None:
    nvml.fail_report = True
    with pytest.raises(EvidenceCollectionError, match=r"GPU 0.*Not Supported"):
        _attester(nvml).collect(HOPPER_NONCE)
    assert nvml.open_sessions == 0


def test_ready_state_failure(nvml: FakeNvml) -> None:
    nvml.fail_set_ready = True
    with pytest.raises(EvidenceCollectionError, match=r"could not be set ready.*root"):
        _attester(nvml).collect(HOPPER_NONCE)


def test_no_gpus(nvml: FakeNvml) -> None:
    nvml.gpus = []
    with pytest.raises(BackendUnavailable, match="no NVIDIA GPU"):
        _attester(nvml).collect(HOPPER_NONCE)


def test_detect_is_cheap_and_never_raises(nvml: FakeNvml) -> None:
    assert NvidiaAttester.detect(nvml=nvml)
    assert nvml.open_sessions == 0 and nvml.nonces == []
    nvml.gpus = []
    assert not NvidiaAttester.detect(nvml=nvml)
    nvml.fail_init = True
    assert not NvidiaAttester.detect(nvml=nvml)
    assert not NvidiaAttester.detect(nvml=object())


def test_init_failure_is_backend_unavailable(nvml: FakeNvml) -> None:
    nvml.fail_init = True
    with pytest.raises(BackendUnavailable, match="NVML could not start"):
        _attester(nvml).collect(HOPPER_NONCE)


def test_describe(nvml: FakeNvml) -> None:
    info = _attester(nvml).describe()
    assert info["gpus"] == [{"uuid": "GPU-0", "arch": "HOPPER"}, {"uuid": "GPU-1", "arch": "HOPPER"}]
    assert info["cc"] == {
        "cc_feature": True,
        "dev_tools_mode": False,
        "protected_pcie": False,
        "environment": "prod",
        "gpus_ready": False,
    }
    nvml.fail_init = True
    assert "error" in _attester(nvml).describe()


def _nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
@pytest.mark.skipif(_nvml_gpu_count() == 0, reason="needs an NVIDIA GPU and driver (NVML)")
def test_real_nvml_path() -> None:
    attester = NvidiaAttester(set_ready=False)
    assert NvidiaAttester.detect()
    state = attester.cc_state()
    nonce = os.urandom(32)
    if not state.enabled:
        with pytest.raises(BackendUnavailable, match="confidential computing is off"):
            attester.collect(nonce)
        assert detect_devices(gpus="nvidia")  # detected, even though collection is refused
        return
    evidence = attester.collect(nonce)
    result = verify_device_evidence(evidence, expected_runtime_data=nonce)
    assert result.ok
