"""The boot's GPU gate: before any key is requested, every GPU is verified locally; a failure stops
the boot at stage ``attest`` naming the GPU, and the key stage never runs.

Drives :class:`runtime.boot.Runtime` in-process with the NVIDIA attester over FakeNvml (a test
double of pynvml, tests/attest/fake_nvml.py) and a fake sysfs PCI tree; the config stage is
replaced by its result (the sample TEE stands in for TDX/SNP).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from attest.tee.nvidia.attester import NvidiaAttester
from attest.tee.nvidia.gate import gate
from attest.tee.select import detect_devices
from foundation.errors import KeyRetrievalError
from runtime import boot
from runtime.config import RunConfig
from runtime.record import ConfigResult
from runtime.seams import BootSeams
from tests.attest.fake_nvml import FakeGpu, FakeNvml
from tests.attest.support import HOPPER_NONCE, NOW, vector
from tests.attest.test_nvidia_provider import fake_sysfs


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


def _prepared() -> Any:
    prepared = SimpleNamespace(
        model=SimpleNamespace(digest="sha256:" + "0" * 64),
        configuration=SimpleNamespace(sha256="1" * 64),
        init_data=None,
    )
    return ConfigResult(prepared=prepared)  # type: ignore[arg-type]


def _runtime(tmp_path: Path, seams: BootSeams | None = None, **overrides: Any) -> boot.Runtime:
    config = RunConfig(
        model=str(tmp_path),
        tee="sample",
        allow_insecure_sample_tee=True,
        key_source="file",
        key_file=tmp_path / "key",
        allow_insecure_key_file=True,
        tls=False,
        **overrides,
    )
    return boot.Runtime(config, seams=seams)


def _boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, attester: NvidiaAttester, **overrides: Any
) -> tuple[boot.Runtime, int, list[str]]:
    """Run the boot up to the key stage, which records that it ran and refuses."""
    calls: list[str] = []
    attester.attach_gate(gate)  # what detect_devices attaches (the descriptor's gate)
    runtime = _runtime(tmp_path, seams=BootSeams(devices=lambda **_: [attester]), **overrides)
    monkeypatch.setattr(runtime, "_config_stage", _prepared)

    def key_stage(*_: object) -> None:
        calls.append("key")
        raise KeyRetrievalError("stopped by the test after the gate")

    monkeypatch.setattr(runtime, "_key_stage", key_stage)
    with socket.socket() as sock:
        code = asyncio.run(runtime._boot_and_serve(sock, None))  # type: ignore[arg-type]
    return runtime, code, calls


def test_a_gpu_failing_local_verification_stops_the_boot_at_attest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW)  # random nonce: a replay
    runtime, code, calls = _boot(monkeypatch, tmp_path, attester)
    assert code == boot.EXIT_BOOT_FAILED and calls == []  # no key was ever requested
    ready = runtime.status.readiness()
    assert ready["stage"] == "attest"
    assert "GPU 0 (GPU-aaaa, 00000000:41:00.0) failed local verification" in ready["reason"]
    assert "gpu0.nonce" in ready["reason"]
    assert nvml.ready_writes == []


def test_a_gpu_hidden_from_nvml_stops_the_boot_at_attest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(
        tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200), ("0000:42:00.0", 0x10DE, 0x030200)
    )
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(monkeypatch, tmp_path, attester)
    assert code == boot.EXIT_BOOT_FAILED and calls == []
    ready = runtime.status.readiness()
    assert ready["stage"] == "attest" and "0000:42:00.0" in ready["reason"]


def test_the_configured_gpu_count_is_enforced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(monkeypatch, tmp_path, attester, expected_gpus=2)
    assert code == boot.EXIT_BOOT_FAILED and calls == []
    assert "expects 2" in runtime.status.readiness()["reason"]


def test_verified_gpus_pass_the_gate_and_the_boot_goes_on_to_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> None:
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))
    attester = NvidiaAttester(nvml=nvml, pci_root=sysfs, clock=lambda: NOW, nonce=lambda n: HOPPER_NONCE)
    runtime, code, calls = _boot(monkeypatch, tmp_path, attester, expected_gpus=1)
    assert calls == ["key"] and code == boot.EXIT_BOOT_FAILED
    stages = {s["stage"]: s for s in runtime.status.to_json()["stages"]}
    assert "1 nvidia device(s) verified locally" in stages["attest"]["detail"]
    assert runtime.status.readiness()["stage"] == "key"
    assert nvml.ready_writes == [1]


def test_cc_off_gpus_under_the_development_flag_boot_unattested_and_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nvml: FakeNvml
) -> None:
    """--allow-insecure-gpu-cc-off on a GPU with CC off: no evidence exists, so the boot goes on
    without a GPU attester and the status lists the GPUs as not attested (never a silent pass)."""
    nvml.cc_feature = 0
    sysfs = fake_sysfs(tmp_path / "pci", ("0000:41:00.0", 0x10DE, 0x030200))

    def detect(**kw: Any) -> list[Any]:
        return detect_devices(**kw, pci_root=sysfs, nvml=nvml)

    seams = BootSeams(devices=detect, gpus_present=lambda: True)
    runtime = _runtime(tmp_path, seams=seams, allow_insecure_gpu_cc_off=True)
    calls: list[str] = []
    monkeypatch.setattr(runtime, "_config_stage", _prepared)

    def key_stage(*_: object) -> None:
        calls.append("key")
        raise KeyRetrievalError("stopped by the test after the gate")

    monkeypatch.setattr(runtime, "_key_stage", key_stage)
    with socket.socket() as sock:
        asyncio.run(runtime._boot_and_serve(sock, None))  # type: ignore[arg-type]
    assert calls == ["key"] and nvml.nonces == []  # nothing collected from a CC-off GPU
    modes = runtime.status.to_json()["insecure_modes"]
    assert any("NVIDIA GPUs not attested: confidential computing is off" in m for m in modes)
