"""The boot's GPU gate: before any key is requested, every GPU is verified locally; a failure stops
the boot at stage ``attest`` naming the GPU, and the key stage never runs.

Drives :class:`runtime.boot.Runtime` in-process through its seams (:class:`runtime.seams.BootSeams`)
with the NVIDIA attester over FakeNvml (a test double of pynvml, tests/attest/fake_nvml.py) and a
fake sysfs PCI tree: the real config stage on the packed demo model, the sample TEE standing in
for TDX/SNP, and a key-source double that records its fetch and ends the boot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from attest.keysource import KeySource, KeySourceSpec
from attest.keysource.registry import KeySourceFactory
from attest.tee.attester import Attester, DeviceAttester
from attest.tee.nvidia.attester import NvidiaAttester
from attest.tee.select import detect_devices
from runtime import boot
from runtime.config import RunConfig
from runtime.seams import BootSeams
from tests.attest.fake_nvml import FakeGpu, FakeNvml
from tests.attest.support import HOPPER_NONCE, NOW, vector
from tests.attest.test_nvidia_provider import fake_sysfs
from tests.runtime.conftest import KEY_ID
from tests.runtime.test_boot_seams import ARGS, KeySourceDouble, environment  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("environment")


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml(
        gpus=[
            FakeGpu(
                uuid="GPU-aaaa",
                arch=9,
                report=bytes.fromhex(vector("nvidia/hopperAttestationReport.txt").decode()),
                chain=vector("nvidia/hopperCertChain.txt"),
                pci="00000000:41:00.0",
            )
        ]
    )


def _runtime(model: Path, tmp_path: Path, seams: BootSeams, **overrides: Any) -> boot.Runtime:
    config = RunConfig(
        model=str(model),
        tee="sample",
        allow_insecure_sample_tee=True,
        key_source="file",
        key_file=tmp_path / "key",
        allow_insecure_key_file=True,
        tls=False,
        port=0,
        exit_on_failure=True,
        vllm_args=ARGS,
        private_dir=Path("/dev/shm"),
        allow_insecure_shared_private_dir=True,
        **overrides,
    )
    return boot.Runtime(config, seams=seams)


def _key_sources(calls: list[str]) -> KeySourceFactory:
    """The key-source factory as a test double: its source records the fetch and refuses."""

    def factory(
        spec: KeySourceSpec, *, attester: Attester | None, devices: Sequence[DeviceAttester]
    ) -> KeySource:
        return KeySourceDouble(calls)

    return factory


def _boot(
    model: Path,
    tmp_path: Path,
    devices: Callable[..., list[DeviceAttester]],
    gpus_present: Callable[[], bool] = lambda: False,
    **overrides: Any,
) -> tuple[boot.Runtime, int, list[str]]:
    """Run the boot up to the key stage, whose source records that it was asked and refuses."""
    calls: list[str] = []
    seams = BootSeams(devices=devices, gpus_present=gpus_present, key_sources=_key_sources(calls))
    runtime = _runtime(model, tmp_path, seams, **overrides)
    code = asyncio.run(runtime.run())
    return runtime, code, calls


def test_a_gpu_failing_local_verification_stops_the_boot_at_attest(
    packed_demo: Path, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW)  # random nonce: a replay
    runtime, code, calls = _boot(packed_demo, tmp_path, lambda **_: [attester])
    assert code == boot.EXIT_BOOT_FAILED and calls == []  # no key was ever requested
    ready = runtime.status.readiness()
    assert ready["stage"] == "attest"
    assert "GPU 0 (GPU-aaaa, 00000000:41:00.0) failed local verification" in ready["reason"]
    assert "gpu0.nonce" in ready["reason"]
    assert nvml.ready_writes == []


def test_a_gpu_hidden_from_nvml_stops_the_boot_at_attest(
    packed_demo: Path, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(
        tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200), ("0000:42:00.0", 0x10DE, 0x030200)
    )
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(packed_demo, tmp_path, lambda **_: [attester])
    assert code == boot.EXIT_BOOT_FAILED and calls == []
    ready = runtime.status.readiness()
    assert ready["stage"] == "attest" and "0000:42:00.0" in ready["reason"]


def test_the_configured_gpu_count_is_enforced(packed_demo: Path, tmp_path: Path, nvml: FakeNvml) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(packed_demo, tmp_path, lambda **_: [attester], expected_gpus=2)
    assert code == boot.EXIT_BOOT_FAILED and calls == []
    assert "expects 2" in runtime.status.readiness()["reason"]


def test_verified_gpus_pass_the_gate_and_the_boot_goes_on_to_the_key(
    packed_demo: Path, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(packed_demo, tmp_path, lambda **_: [attester], expected_gpus=1)
    assert calls == [f"fetch {KEY_ID}"] and code == boot.EXIT_BOOT_FAILED
    stages = {s["stage"]: s for s in runtime.status.to_json()["stages"]}
    assert "1 nvidia device(s) verified locally" in stages["attest"]["detail"]
    assert runtime.status.readiness()["stage"] == "key"
    assert nvml.ready_writes == [1]


def test_cc_off_gpus_under_the_development_flag_boot_unattested_and_say_so(
    packed_demo: Path, tmp_path: Path, nvml: FakeNvml
) -> None:
    """--allow-insecure-gpu-cc-off on a GPU with CC off: no evidence exists, so the boot goes on
    without a GPU attester and the status lists the GPUs as not attested (never a silent pass)."""
    nvml.cc_feature = 0
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))

    def detect(**kw: Any) -> list[DeviceAttester]:
        return detect_devices(**kw, pci_root=sysfs, nvml=nvml)

    runtime, _, calls = _boot(
        packed_demo, tmp_path, detect, gpus_present=lambda: True, allow_insecure_gpu_cc_off=True
    )
    assert calls == [f"fetch {KEY_ID}"] and nvml.nonces == []  # nothing collected from a CC-off GPU
    modes = runtime.status.to_json()["insecure_modes"]
    assert any("NVIDIA GPUs not attested: confidential computing is off" in m for m in modes)
