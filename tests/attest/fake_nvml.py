"""FakeNvml: a test double of the small part of the ``pynvml`` module the NVIDIA attester uses.

**Not NVML.** It answers with canned GPUs (by default the nvtrust Hopper sample report and
chain, whatever nonce is asked for — like a GPU replaying an old report) and records what the
attester did (nonces requested, ready-state writes, init/shutdown balance). Its functions have
pynvml's names and calling conventions, so the attester code above NVML runs unchanged.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml


class FakeNVMLError(Exception):
    """Test double of ``pynvml.NVMLError``."""


@dataclass
class FakeGpu:
    """One GPU the double reports."""

    uuid: str
    arch: int
    report: bytes
    chain: bytes
    pci: str | None = None  # NVML's bus id, e.g. "00000000:41:00.0"; None: the call fails


@dataclass
class FakeNvml:
    """Test double: a ``pynvml``-shaped object; knobs set the CC state and faults."""

    gpus: list[FakeGpu]
    cc_feature: int = 1
    dev_tools_mode: int = 0
    multi_gpu_mode: int = 0
    environment: int = 2
    ready: int = 0
    fail_init: bool = False
    fail_report: bool = False
    fail_set_ready: bool = False
    nonces: list[bytes] = field(default_factory=list)
    ready_writes: list[int] = field(default_factory=list)
    open_sessions: int = 0

    NVMLError = FakeNVMLError
    c_nvmlSystemConfComputeSettings_v1_t = pynvml.c_nvmlSystemConfComputeSettings_v1_t

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        self.open_sessions += 1

    def nvmlShutdown(self) -> None:
        self.open_sessions -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetArchitecture(self, handle: FakeGpu) -> int:
        return handle.arch

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.pci is None:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(busId=handle.pci.encode())

    def nvmlSystemGetConfComputeState(self) -> SimpleNamespace:
        return SimpleNamespace(
            environment=self.environment, ccFeature=self.cc_feature, devToolsMode=self.dev_tools_mode
        )

    def nvmlSystemGetConfComputeSettings(self, settings_ref: Any) -> int:
        settings = settings_ref._obj
        assert isinstance(settings, ctypes.Structure)
        settings.ccFeature = self.cc_feature
        settings.devToolsMode = self.dev_tools_mode
        settings.multiGpuMode = self.multi_gpu_mode
        return 0

    def nvmlSystemGetConfComputeGpusReadyState(self) -> int:
        return self.ready

    def nvmlSystemSetConfComputeGpusReadyState(self, state: int) -> int:
        if self.fail_set_ready:
            raise FakeNVMLError("Insufficient Permissions")
        self.ready_writes.append(state)
        self.ready = state
        return 0

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle: FakeGpu, nonce: bytes) -> SimpleNamespace:
        if self.fail_report:
            raise FakeNVMLError("Not Supported")
        if not self.cc_feature and self.multi_gpu_mode != 1:
            # As the driver: no attestation report outside CC or protected-PCIe mode
            # (NV_ERR_OBJECT_NOT_FOUND, NVML_ERROR_NOT_FOUND).
            raise FakeNVMLError("Not Found")
        self.nonces.append(bytes(nonce))
        buf = handle.report + b"\0" * 64  # NVML's buffer is larger than the report
        return SimpleNamespace(attestationReport=buf, attestationReportSize=len(handle.report))

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle: FakeGpu) -> SimpleNamespace:
        buf = handle.chain + b"\0" * 64
        return SimpleNamespace(attestationCertChain=buf, attestationCertChainSize=len(handle.chain))
