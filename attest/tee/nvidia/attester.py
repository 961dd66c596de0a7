"""The NVIDIA GPU attester: every GPU's SPDM attestation report and certificate chain via NVML.

Uses the ``pynvml`` module of ``nvidia-ml-py`` (or any object with the same functions, passed
as ``nvml``): NVML init, the system confidential-computing state and settings, then for every
GPU its UUID, architecture, PCI address, attestation report over a 32-byte nonce and
certificate chain.

Confidential computing must be on (``ccFeature`` enabled, or multi-GPU protected PCIe mode)
and developer-tools mode off. Outside CC mode the driver produces no attestation report at all
(``NV_ERR_OBJECT_NOT_FOUND``), so such GPUs cannot be attested: collection is refused, and
:func:`attest.tee.select.detect_devices` reports them "not attested" under the development flag
``--allow-insecure-gpu-cc-off``. ``allow_cc_off=True`` here tolerates developer-tools mode only
(development). NVLink encryption alone (``multiGpuMode`` NVLE) is not confidential computing.

The attester collects; it verifies nothing and imports no verifier. The local gate
(:func:`attest.tee.nvidia.gate.gate`, the descriptor's ``gate``) is what the runtime runs on it
before it asks for a key: it counts the
NVIDIA GPUs on the PCI bus (sysfs, independent of the driver), refuses when NVML cannot start
while GPUs are present, checks the CC state, collects every GPU's evidence over a fresh random
nonce and verifies it locally (chain, signature, nonce, FWID, one entry per device), checks the
count (NVML = PCI bus = the configured number), and only then sets the GPUs ready
(``nvmlSystemSetConfComputeGpusReadyState(1)``) if they are not, as nvtrust's local verifier
does. In Kata NVIDIA guests NVRC may have set them ready already; that proves nothing here.
Protected-PCIe systems (8 Hopper GPUs with NVSwitches) are refused: their switch evidence
comes from NSCQ, which this attester does not collect or verify.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from attest.evidence import TeeKind
from attest.tee.attester import DeviceAttester
from attest.tee.nvidia.pci import SYSFS_PCI_DEVICES, nvidia_pci_devices
from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence, expected_gpu_nonce
from foundation.errors import BackendUnavailable, EvidenceCollectionError

__all__ = ["CcState", "NvidiaAttester"]

logger = logging.getLogger(__name__)

# NVML constants (nvml.h, CUDA 12.x; same values in pynvml).
#: nvmlConfComputeSystemState_t.ccFeature
NVML_CC_SYSTEM_FEATURE_ENABLED = 1
#: nvmlConfComputeSystemState_t.devToolsMode
NVML_CC_SYSTEM_DEVTOOLS_MODE_ON = 1
#: nvmlSystemConfComputeSettings_t.multiGpuMode (NONE 0, PROTECTED_PCIE 1, NVLE 2)
NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE = 1
NVML_CC_SYSTEM_MULTIGPU_MODES = {0: "none", 1: "protected_pcie", 2: "nvle"}
#: nvmlSystemGet/SetConfComputeGpusReadyState
NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE = 1
#: nvmlDeviceGetArchitecture
NVML_DEVICE_ARCHITECTURES = {9: "HOPPER", 10: "BLACKWELL"}
#: NVML_CC_SYSTEM_ENVIRONMENT_*
NVML_CC_ENVIRONMENTS = {0: "unavailable", 1: "sim", 2: "prod"}


@dataclass(frozen=True, slots=True, kw_only=True)
class CcState:
    """The system-wide confidential-computing state NVML reports."""

    cc_feature: bool
    dev_tools_mode: bool
    multi_gpu_mode: str
    environment: str
    gpus_ready: bool

    @property
    def protected_pcie(self) -> bool:
        """Whether multi-GPU protected PCIe (PPCIe) mode is on."""
        return self.multi_gpu_mode == "protected_pcie"

    @property
    def enabled(self) -> bool:
        """Whether GPU confidential computing is on (CC feature, or multi-GPU protected PCIe).

        NVLink encryption (``nvle``) alone is not: it protects links, not GPU memory.
        """
        return self.cc_feature or self.protected_pcie

    def to_json(self) -> dict[str, object]:
        """Return the state as JSON."""
        return {
            "cc_feature": self.cc_feature,
            "dev_tools_mode": self.dev_tools_mode,
            "protected_pcie": self.protected_pcie,
            "multi_gpu_mode": self.multi_gpu_mode,
            "environment": self.environment,
            "gpus_ready": self.gpus_ready,
        }


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise BackendUnavailable("the NVIDIA provider needs nvidia-ml-py (pynvml)") from exc
    return pynvml


def _utcnow() -> datetime:
    return datetime.now(UTC)


class NvidiaAttester(DeviceAttester):
    """Collect :class:`~attest.tee.nvidia.report.NvidiaEvidence` for every GPU through NVML.

    .. warning::
       ``allow_cc_off=True`` collects from GPUs in CC developer-tools mode, which the host can
       debug. It exists for development; evidence from such GPUs must never release a key. GPUs
       with CC off give no evidence at all and are refused whatever the flag.
    """

    tee: ClassVar[TeeKind] = TeeKind.NVIDIA
    absent: ClassVar[str] = "no NVIDIA GPU is on the PCI bus or in NVML"

    def __init__(
        self,
        *,
        nvml: Any | None = None,
        allow_cc_off: bool = False,
        policy: object | None = None,
        set_ready: bool = True,
        clock: Callable[[], datetime] = _utcnow,
        pci_root: Path = SYSFS_PCI_DEVICES,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``policy`` (an :class:`attest.tee.verifier.Policy`), ``set_ready``, ``clock`` and
        ``nonce`` (its random source) are what the local gate (:mod:`attest.tee.nvidia.gate`)
        reads; ``pci_root``, ``clock`` and ``nonce`` are test hooks."""
        self._module = nvml
        self._allow_cc_off = allow_cc_off
        self.policy = policy
        self.set_ready = set_ready
        self.clock = clock
        self.pci_root = pci_root
        self.nonce = nonce

    def _nvml(self) -> Any:
        return self._module if self._module is not None else _import_pynvml()

    @contextmanager
    def session(self) -> Iterator[Any]:
        """Hold an NVML session (init, then shutdown). Raises BackendUnavailable: NVML cannot start."""
        nvml = self._nvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise BackendUnavailable(f"NVML could not start ({exc}); is the NVIDIA driver loaded?") from exc
        try:
            yield nvml
        finally:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.warning("nvmlShutdown failed: %s", exc)

    @classmethod
    def detect(cls, *, nvml: Any | None = None) -> bool:
        """Return whether NVML starts and sees at least one GPU (no exception escapes)."""
        try:
            module = nvml if nvml is not None else _import_pynvml()
            module.nvmlInit()
            try:
                return int(module.nvmlDeviceGetCount()) > 0
            finally:
                module.nvmlShutdown()
        except Exception:
            return False

    @classmethod
    def present(cls, *, pci_root: Path | None = None, nvml: Any | None = None) -> bool:
        """Return whether NVIDIA GPUs are here: on the PCI bus (sysfs, whatever the driver says) or
        seen by NVML. No exception escapes."""
        try:
            if any(d.is_gpu for d in nvidia_pci_devices(pci_root or SYSFS_PCI_DEVICES)):
                return True
        except Exception:  # detection must not fail the caller
            pass
        return cls.detect(nvml=nvml)

    @classmethod
    def for_machine(
        cls, *, allow_cc_off: bool = False, pci_root: Path | None = None, nvml: Any | None = None
    ) -> NvidiaAttester:
        """Return the attester for this machine's GPUs (``allow_cc_off``: developer-tools mode)."""
        return cls(allow_cc_off=allow_cc_off, pci_root=pci_root or SYSFS_PCI_DEVICES, nvml=nvml)

    def unattested_reason(self) -> str | None:
        """Why these GPUs give no evidence and may only run unattested (CC off), or None.

        None too when NVML cannot tell: the gate then decides (fail closed).
        """
        from foundation.errors import Error

        try:
            enabled = self.cc_state().enabled
        except Error:
            return None
        if enabled:
            return None
        return (
            "GPU confidential computing is off: the GPUs are NOT attested and the host can read "
            "their memory (--allow-insecure-gpu-cc-off)"
        )

    @staticmethod
    def _cc_state(nvml: Any) -> CcState:
        state = nvml.nvmlSystemGetConfComputeState()
        mode = "none"
        try:
            settings = nvml.c_nvmlSystemConfComputeSettings_v1_t()
            if nvml.nvmlSystemGetConfComputeSettings(ctypes.byref(settings)) == 0:
                raw = int(settings.multiGpuMode)
                mode = NVML_CC_SYSTEM_MULTIGPU_MODES.get(raw, f"unknown({raw})")
        except (AttributeError, nvml.NVMLError):
            # Older drivers lack the settings call; multi-GPU modes then cannot be on.
            mode = "none"
        try:
            ready = nvml.nvmlSystemGetConfComputeGpusReadyState() == NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE
        except nvml.NVMLError:
            ready = False
        return CcState(
            cc_feature=state.ccFeature == NVML_CC_SYSTEM_FEATURE_ENABLED,
            dev_tools_mode=state.devToolsMode == NVML_CC_SYSTEM_DEVTOOLS_MODE_ON,
            multi_gpu_mode=mode,
            environment=NVML_CC_ENVIRONMENTS.get(int(state.environment), str(state.environment)),
            gpus_ready=ready,
        )

    def cc_state(self) -> CcState:
        """Return the system confidential-computing state.

        Raises:
            BackendUnavailable: NVML is not available.
            EvidenceCollectionError: NVML failed to report the state.
        """
        with self.session() as nvml:
            try:
                return self._cc_state(nvml)
            except nvml.NVMLError as exc:
                raise EvidenceCollectionError(f"NVML could not report the CC state: {exc}") from exc

    def collect(self, runtime_data: bytes) -> NvidiaEvidence:
        """Return every GPU's evidence for the nonce ``runtime_data[:32]`` (zero-padded).

        Raises:
            BackendUnavailable: NVML is missing, sees no GPU, or CC is off (without
                ``allow_cc_off``).
            EvidenceCollectionError: NVML failed for a GPU.
        """
        nonce = expected_gpu_nonce(runtime_data)
        with self.session() as nvml:
            state = self.state(nvml)
            self.check_cc(state)
            devices, _ = self.collect_devices(nvml, nonce)
        return NvidiaEvidence(devices=devices)

    @staticmethod
    def state(nvml: Any) -> CcState:
        """Return the CC state within a :meth:`session`. Raises EvidenceCollectionError."""
        try:
            return NvidiaAttester._cc_state(nvml)
        except nvml.NVMLError as exc:
            raise EvidenceCollectionError(f"NVML could not report the CC state: {exc}") from exc

    def check_cc(self, state: CcState) -> None:
        """Refuse CC off, and developer-tools mode unless ``allow_cc_off``. Raises BackendUnavailable."""
        if not state.enabled:
            raise BackendUnavailable(
                "GPU confidential computing is off: the driver gives no attestation report outside "
                "CC mode. Enable CC mode on the GPUs (nvidia-smi conf-compute / the host's "
                "gpu-admin-tools); for development, --allow-insecure-gpu-cc-off runs on them "
                "unattested."
            )
        if not state.dev_tools_mode:
            return
        message = "GPU CC developer-tools mode is on (the host can debug the GPU)"
        if not self._allow_cc_off:
            raise BackendUnavailable(
                f"{message}. Turn developer-tools mode off (the host's gpu-admin-tools), or pass "
                "allow_cc_off=True for development only."
            )
        logger.warning("INSECURE: %s; collecting GPU evidence anyway (allow_cc_off)", message)

    @staticmethod
    def _pci_bus(nvml: Any, handle: Any) -> str | None:
        try:
            bus = nvml.nvmlDeviceGetPciInfo(handle).busId
        except (AttributeError, nvml.NVMLError):
            return None
        return bus.decode() if isinstance(bus, bytes) else str(bus)

    @staticmethod
    def collect_devices(nvml: Any, nonce: bytes) -> tuple[tuple[NvidiaDeviceEvidence, ...], list[str | None]]:
        """Return every GPU's evidence over ``nonce`` and its PCI address, within a :meth:`session`.

        Raises:
            BackendUnavailable: NVML sees no GPU.
            EvidenceCollectionError: NVML failed for a GPU.
        """
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise EvidenceCollectionError(f"NVML could not count GPUs: {exc}") from exc
        if count == 0:
            raise BackendUnavailable("NVML sees no NVIDIA GPU")
        devices = []
        buses: list[str | None] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                arch_id = int(nvml.nvmlDeviceGetArchitecture(handle))
                report = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                certs = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            except nvml.NVMLError as exc:
                raise EvidenceCollectionError(f"NVML failed to attest GPU {index}: {exc}") from exc
            buses.append(NvidiaAttester._pci_bus(nvml, handle))
            devices.append(
                NvidiaDeviceEvidence(
                    arch=NVML_DEVICE_ARCHITECTURES.get(arch_id, f"UNKNOWN({arch_id})"),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    evidence=bytes(report.attestationReport[: report.attestationReportSize]),
                    certificate=bytes(certs.attestationCertChain[: certs.attestationCertChainSize]),
                )
            )
        return tuple(devices), buses

    def describe(self) -> dict[str, object]:
        """Return the CC state and every GPU's UUID and architecture (errors as a string)."""
        out: dict[str, object] = {"tee": self.tee.value, "insecure": self.insecure}
        pci = nvidia_pci_devices(self.pci_root)
        out["pci"] = {"gpus": sum(d.is_gpu for d in pci), "switches": sum(d.is_switch for d in pci)}
        try:
            with self.session() as nvml:
                out["cc"] = self._cc_state(nvml).to_json()
                gpus = []
                for index in range(int(nvml.nvmlDeviceGetCount())):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = nvml.nvmlDeviceGetUUID(handle)
                    arch = int(nvml.nvmlDeviceGetArchitecture(handle))
                    gpus.append(
                        {
                            "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                            "arch": NVML_DEVICE_ARCHITECTURES.get(arch, f"UNKNOWN({arch})"),
                        }
                    )
                out["gpus"] = gpus
        except Exception as exc:  # describe() reports problems, it never raises
            out["error"] = str(exc)
        return out
