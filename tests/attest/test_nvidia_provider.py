"""The NVIDIA attester and its gate above NVML, driven through FakeNvml (tests/attest/fake_nvml.py)
and a fake sysfs PCI tree, plus one ``gpu``-marked test of the real NVML path (skipped without a GPU).

The double replays real reports (nvtrust's Hopper sample, NVIDIA's GB100 sample; both answered
nonce ``931d8dd0…``), so the gate's random source is pinned to that nonce where a test needs the
verification to pass, and left random where it must fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attest.tee.nvidia.attester import NvidiaAttester
from attest.tee.nvidia.gate import GpuGateError
from attest.tee.nvidia.gate import gate as nvidia_gate
from attest.tee.nvidia.pci import nvidia_pci_devices
from attest.tee.select import detect_devices, nvidia_gpus_present
from attest.verify import NvidiaClaims, VerificationResult, verify_device_evidence
from foundation.errors import BackendUnavailable, EvidenceCollectionError, PolicyViolation, VerificationError
from tests.attest.fake_nvml import FakeGpu, FakeNvml
from tests.attest.support import HOPPER_NONCE, NOW
from tests.vector_files import vector

HOPPER, BLACKWELL = 9, 10
BUSES = ("00000000:41:00.0", "00000000:C1:00.0")


def _hex(name: str) -> bytes:
    return bytes.fromhex(vector(f"nvidia/{name}").decode().strip())


def fake_sysfs(root: Path, *functions: tuple[str, int, int]) -> Path:
    """A /sys/bus/pci/devices tree: (address, vendor, class) per function."""
    root.mkdir(parents=True, exist_ok=True)
    for address, vendor, class_code in functions:
        d = root / address
        d.mkdir()
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "class").write_text(f"0x{class_code:06x}\n")
        (d / "device").write_text("0x2335\n")
    return root


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Two NVIDIA GPUs (3D controllers), an Intel host bridge and a virtio NIC."""
    return fake_sysfs(
        tmp_path / "pci",
        ("0000:00:00.0", 0x8086, 0x060000),
        ("0000:00:03.0", 0x1AF4, 0x020000),
        ("0000:41:00.0", 0x10DE, 0x030200),
        ("0000:c1:00.0", 0x10DE, 0x030200),
    )


@pytest.fixture
def nvml(nvidia_report: bytes, nvidia_chain: bytes) -> FakeNvml:
    """Two distinct real GPUs: the nvtrust Hopper sample and NVIDIA's GB100 sample."""
    return FakeNvml(
        gpus=[
            FakeGpu(uuid="GPU-0", arch=HOPPER, report=nvidia_report, chain=nvidia_chain, pci=BUSES[0]),
            FakeGpu(
                uuid="GPU-1",
                arch=BLACKWELL,
                report=_hex("nvat_blackwell_report.txt"),
                chain=vector("nvidia/nvat_blackwell_certs.txt"),
                pci=BUSES[1],
            ),
        ]
    )


def _attester(
    nvml: FakeNvml, sysfs: Path, *, nonce: bytes | None = HOPPER_NONCE, **kwargs: object
) -> NvidiaAttester:
    hooks: dict[str, object] = {"nonce": (lambda n: nonce)} if nonce is not None else {}
    attester = NvidiaAttester(nvml=nvml, clock=lambda: NOW, pci_root=sysfs, **hooks, **kwargs)  # type: ignore[arg-type]
    attester.attach_gate(nvidia_gate)  # what detect_devices attaches (the descriptor's gate)
    return attester


# -- collection --------------------------------------------------------------------------------


def test_collects_every_gpu_with_the_first_32_bytes_as_nonce(
    nvml: FakeNvml, sysfs: Path, nvidia_report: bytes
) -> None:
    evidence = _attester(nvml, sysfs).collect(HOPPER_NONCE + b"\xee" * 16)
    assert [(d.uuid, d.arch) for d in evidence.devices] == [("GPU-0", "HOPPER"), ("GPU-1", "BLACKWELL")]
    assert evidence.devices[0].evidence == nvidia_report  # NVML's oversized buffer is cut to size
    assert nvml.nonces == [HOPPER_NONCE, HOPPER_NONCE]
    assert nvml.open_sessions == 0
    assert nvml.ready_writes == []  # collection never changes the ready state
    assert verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW).ok


def test_short_runtime_data_is_zero_padded(nvml: FakeNvml, sysfs: Path) -> None:
    _attester(nvml, sysfs).collect(b"\x01\x02")
    assert nvml.nonces[0] == b"\x01\x02" + b"\0" * 30


@pytest.mark.parametrize("allow_cc_off", [False, True])
def test_cc_off_is_refused_whatever_the_flag(nvml: FakeNvml, sysfs: Path, allow_cc_off: bool) -> None:
    """The driver gives no report outside CC mode: nothing to collect, even for development."""
    nvml.cc_feature = 0
    with pytest.raises(BackendUnavailable, match=r"confidential computing is off.*no attestation report"):
        _attester(nvml, sysfs, allow_cc_off=allow_cc_off).collect(HOPPER_NONCE)
    with pytest.raises(GpuGateError, match=r"confidential computing is off"):
        _attester(nvml, sysfs, allow_cc_off=allow_cc_off).gate()
    assert nvml.nonces == [] and nvml.open_sessions == 0


def test_devtools_mode_allowed_for_development(
    nvml: FakeNvml, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nvml.dev_tools_mode = 1
    evidence = _attester(nvml, sysfs, allow_cc_off=True).collect(HOPPER_NONCE)
    assert len(evidence.devices) == 2
    assert "INSECURE" in caplog.text


def test_cc_off_gpus_run_unattested_under_the_development_flag(
    nvml: FakeNvml, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--allow-insecure-gpu-cc-off on a CC-off GPU: no attester (so nothing is collected or
    sent), a loud warning; without the flag the GPUs get an attester whose gate refuses."""
    nvml.cc_feature = 0
    assert detect_devices(gpus="auto", allow_gpu_cc_off=True, pci_root=sysfs, nvml=nvml) == []
    assert "NOT attested" in caplog.text
    (attester,) = detect_devices(gpus="auto", pci_root=sysfs, nvml=nvml)
    with pytest.raises(GpuGateError, match="confidential computing is off"):
        attester.gate()
    nvml.cc_feature = 1  # CC on: the flag changes nothing, the GPUs are attested
    (attester,) = detect_devices(gpus="auto", allow_gpu_cc_off=True, pci_root=sysfs, nvml=nvml)
    assert isinstance(attester, NvidiaAttester)


def test_devtools_mode_is_refused(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.dev_tools_mode = 1
    with pytest.raises(BackendUnavailable, match="developer-tools"):
        _attester(nvml, sysfs).collect(HOPPER_NONCE)


def test_multi_gpu_modes(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.cc_feature, nvml.multi_gpu_mode = 0, 1
    state = _attester(nvml, sysfs).cc_state()
    assert state.protected_pcie and state.enabled and state.multi_gpu_mode == "protected_pcie"
    nvml.multi_gpu_mode = 2  # NVLink encryption alone is not confidential computing
    state = _attester(nvml, sysfs).cc_state()
    assert state.multi_gpu_mode == "nvle" and not state.enabled
    nvml.cc_feature = 1  # Blackwell multi-GPU: CC on, NVLink encrypted
    assert _attester(nvml, sysfs).cc_state().enabled


def test_nvml_errors_become_collection_errors(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.fail_report = True
    with pytest.raises(EvidenceCollectionError, match=r"GPU 0.*Not Supported"):
        _attester(nvml, sysfs).collect(HOPPER_NONCE)
    assert nvml.open_sessions == 0


def test_no_gpus(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.gpus = []
    with pytest.raises(BackendUnavailable, match="no NVIDIA GPU"):
        _attester(nvml, sysfs).collect(HOPPER_NONCE)


def test_detect_is_cheap_and_never_raises(nvml: FakeNvml) -> None:
    assert NvidiaAttester.detect(nvml=nvml)
    assert nvml.open_sessions == 0 and nvml.nonces == []
    nvml.gpus = []
    assert not NvidiaAttester.detect(nvml=nvml)
    nvml.fail_init = True
    assert not NvidiaAttester.detect(nvml=nvml)
    assert not NvidiaAttester.detect(nvml=object())


def test_init_failure_is_backend_unavailable(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.fail_init = True
    with pytest.raises(BackendUnavailable, match="NVML could not start"):
        _attester(nvml, sysfs).collect(HOPPER_NONCE)


def test_describe(nvml: FakeNvml, sysfs: Path) -> None:
    info = _attester(nvml, sysfs).describe()
    assert info["gpus"] == [{"uuid": "GPU-0", "arch": "HOPPER"}, {"uuid": "GPU-1", "arch": "BLACKWELL"}]
    assert info["pci"] == {"gpus": 2, "switches": 0}
    assert info["cc"] == {
        "cc_feature": True,
        "dev_tools_mode": False,
        "protected_pcie": False,
        "multi_gpu_mode": "none",
        "environment": "prod",
        "gpus_ready": False,
    }
    nvml.fail_init = True
    assert "error" in _attester(nvml, sysfs).describe()


# -- the gate ------------------------------------------------------------------------------------


def test_gate_verifies_every_gpu_then_sets_them_ready(nvml: FakeNvml, sysfs: Path) -> None:
    gate = _attester(nvml, sysfs).gate(expected_count=2)
    assert gate.devices == 2 and gate.steps > 10
    assert gate.facts["gpus"] == [
        {"uuid": "GPU-0", "arch": "HOPPER", "pci": BUSES[0]},
        {"uuid": "GPU-1", "arch": "BLACKWELL", "pci": BUSES[1]},
    ]
    assert gate.facts["set_ready"] is True and nvml.ready_writes == [1]
    assert nvml.open_sessions == 0
    assert "2 nvidia device(s) verified locally" in gate.summary()


def test_gate_leaves_ready_gpus_alone(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.ready = 1  # e.g. NVRC set them ready at boot: that proves nothing, so verify anyway
    gate = _attester(nvml, sysfs).gate()
    assert gate.devices == 2 and gate.facts["set_ready"] is False and nvml.ready_writes == []
    assert len(nvml.nonces) == 2


def test_gate_uses_a_fresh_nonce_so_a_replayed_report_is_refused(nvml: FakeNvml, sysfs: Path) -> None:
    with pytest.raises(
        GpuGateError, match=r"GPU 0 \(GPU-0, 00000000:41:00.0\) failed local verification.*gpu0\.nonce"
    ):
        _attester(nvml, sysfs, nonce=None).gate()
    assert nvml.nonces[0] != HOPPER_NONCE  # the gate asked with a random nonce
    assert nvml.ready_writes == [] and nvml.open_sessions == 0


def test_gate_refuses_one_gpu_reported_twice(nvml: FakeNvml, sysfs: Path) -> None:
    first = nvml.gpus[0]
    nvml.gpus[1] = FakeGpu(uuid="GPU-1", arch=HOPPER, report=first.report, chain=first.chain, pci=BUSES[1])
    with pytest.raises(VerificationError, match=r"GPU 1 \(GPU-1.*gpu1\.distinct"):
        _attester(nvml, sysfs).gate()
    assert nvml.ready_writes == []


class _Drivers:
    """A policy hook allowing these GPU drivers (what the workload policy's [gpu] driver pins)."""

    def __init__(self, *drivers: str) -> None:
        self.drivers = drivers

    def verify(self, result: VerificationResult) -> None:
        assert isinstance(result.claims, NvidiaClaims)
        for gpu in result.claims.gpus:
            if gpu.driver_version not in self.drivers:
                raise PolicyViolation(f"GPU {gpu.uuid} runs driver {gpu.driver_version!r}")


def test_gate_applies_the_policy_and_names_the_gpu(nvml: FakeNvml, sysfs: Path) -> None:
    with pytest.raises(PolicyViolation, match=r"driver '575.32'"):  # GPU-1 runs 575.32
        _attester(nvml, sysfs, policy=_Drivers("550.90.07")).gate()
    assert nvml.ready_writes == []
    _attester(nvml, sysfs, policy=_Drivers("550.90.07", "575.32")).gate()
    assert nvml.ready_writes == [1]


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("cc_feature", 0, "confidential computing is off"),
        ("dev_tools_mode", 1, "developer-tools"),
    ],
)
def test_gate_refuses_gpus_outside_cc_mode(
    nvml: FakeNvml, sysfs: Path, knob: str, value: int, message: str
) -> None:
    setattr(nvml, knob, value)
    with pytest.raises(GpuGateError, match=message):
        _attester(nvml, sysfs).gate()
    assert nvml.nonces == [] and nvml.ready_writes == []


def test_gate_refuses_nvlink_encryption_without_cc(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.cc_feature, nvml.multi_gpu_mode = 0, 2
    with pytest.raises(GpuGateError, match="confidential computing is off"):
        _attester(nvml, sysfs).gate()


def test_gate_refuses_protected_pcie_without_switch_attestation(nvml: FakeNvml, tmp_path: Path) -> None:
    sysfs = fake_sysfs(
        tmp_path / "pci",
        ("0000:41:00.0", 0x10DE, 0x030200),
        ("0000:c1:00.0", 0x10DE, 0x030200),
        ("0000:05:00.0", 0x10DE, 0x068000),  # an NVSwitch
    )
    assert [d.is_switch for d in nvidia_pci_devices(sysfs)] == [True, False, False]
    nvml.cc_feature, nvml.multi_gpu_mode = 0, 1
    with pytest.raises(GpuGateError, match=r"protected-PCIe.*1 switch"):
        _attester(nvml, sysfs).gate()


def test_gate_refuses_gpus_nvml_does_not_report(nvml: FakeNvml, sysfs: Path) -> None:
    fake_sysfs(sysfs, ("0000:e1:00.0", 0x10DE, 0x030000))  # a third GPU, hidden from the driver
    with pytest.raises(
        GpuGateError, match=r"3 NVIDIA GPU\(s\) are on the PCI bus but NVML reports 2.*0000:e1:00.0"
    ):
        _attester(nvml, sysfs).gate()
    assert nvml.ready_writes == []


def test_gate_refuses_a_gpu_that_is_not_on_the_bus(nvml: FakeNvml, tmp_path: Path) -> None:
    sysfs = fake_sysfs(
        tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200), ("0000:81:00.0", 0x10DE, 0x030200)
    )
    with pytest.raises(GpuGateError, match=r"0000:81:00.0|GPU 1 .* is not on the guest's PCI bus"):
        _attester(nvml, sysfs).gate()


def test_gate_checks_the_configured_count(nvml: FakeNvml, sysfs: Path) -> None:
    with pytest.raises(GpuGateError, match=r"NVML reports 2 GPU\(s\) but the configuration expects 4"):
        _attester(nvml, sysfs).gate(expected_count=4)


def test_gate_fails_closed_when_nvml_is_unusable_with_gpus_present(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.fail_init = True
    with pytest.raises(GpuGateError, match=r"2 NVIDIA GPU\(s\) are on the PCI bus .*NVML is unusable"):
        _attester(nvml, sysfs).gate()
    empty = fake_sysfs(sysfs.parent / "empty")
    with pytest.raises(BackendUnavailable):  # no GPU anywhere: nothing to protect, nothing to gate
        _attester(nvml, empty).gate()


def test_gate_without_a_pci_bus_counts_with_nvml_alone(
    nvml: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = _attester(nvml, tmp_path / "absent").gate()
    assert gate.devices == 2 and "no PCI bus in sysfs" in caplog.text


def test_gate_ready_state_failure(nvml: FakeNvml, sysfs: Path) -> None:
    nvml.fail_set_ready = True
    with pytest.raises(EvidenceCollectionError, match=r"could not be set ready.*root"):
        _attester(nvml, sysfs).gate()


def test_set_ready_false_leaves_the_state_alone(nvml: FakeNvml, sysfs: Path) -> None:
    _attester(nvml, sysfs, set_ready=False).gate()
    assert nvml.ready_writes == []


# -- detection ---------------------------------------------------------------------------------


def test_gpus_on_the_bus_always_get_an_attester(sysfs: Path, tmp_path: Path) -> None:
    """Without NVML (as on this machine) GPUs on the bus still get an attester: its gate refuses."""
    assert nvidia_gpus_present(sysfs)
    (attester,) = detect_devices(gpus="auto", pci_root=sysfs)
    assert isinstance(attester, NvidiaAttester)
    empty = fake_sysfs(tmp_path / "empty")
    if not NvidiaAttester.detect():
        assert detect_devices(gpus="auto", pci_root=empty) == []
        with pytest.raises(BackendUnavailable, match="no NVIDIA GPU"):
            detect_devices(gpus="nvidia", pci_root=empty)


def test_pci_scan_reads_vendor_and_class(tmp_path: Path) -> None:
    root = fake_sysfs(
        tmp_path / "pci",
        ("0000:41:00.0", 0x10DE, 0x030000),  # VGA
        ("0000:41:00.1", 0x10DE, 0x040300),  # the GPU's audio function: not a GPU
        ("0000:42:00.0", 0x10DE, 0x030200),  # 3D controller
    )
    (root / "0000:43:00.0").mkdir()  # unreadable entry: skipped
    found = nvidia_pci_devices(root)
    assert [(d.address, d.is_gpu) for d in found] == [("0000:41:00.0", True), ("0000:42:00.0", True)]
    assert nvidia_pci_devices(tmp_path / "absent") == ()


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
def test_real_nvml_path() -> None:
    """On a real GPU: the PCI scan and NVML agree; outside CC mode the gate refuses, naming why."""
    attester = NvidiaAttester(set_ready=False)
    assert NvidiaAttester.detect()
    assert sum(d.is_gpu for d in nvidia_pci_devices()) == _nvml_gpu_count()
    state = attester.cc_state()
    nonce = os.urandom(32)
    if not state.enabled:
        with pytest.raises(BackendUnavailable, match="confidential computing is off"):
            attester.collect(nonce)
        with pytest.raises(GpuGateError, match="confidential computing is off"):
            attester.gate()
        assert detect_devices(gpus="nvidia")  # detected, even though collection is refused
        assert detect_devices(gpus="auto", allow_gpu_cc_off=True) == []  # runs unattested
        import pynvml

        pynvml.nvmlInit()
        try:  # the driver itself: no attestation report outside CC mode (NV_ERR_OBJECT_NOT_FOUND)
            with pytest.raises(pynvml.NVMLError):
                pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(
                    pynvml.nvmlDeviceGetHandleByIndex(0), nonce
                )
        finally:
            pynvml.nvmlShutdown()
        return
    gate = attester.gate()
    assert gate.devices == _nvml_gpu_count()
    evidence = attester.collect(nonce)
    result = verify_device_evidence(evidence, expected_runtime_data=nonce)
    assert result.ok
