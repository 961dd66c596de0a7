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

:meth:`NvidiaAttester.gate` is what the runtime runs before it asks for a key: it counts the
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
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from attest.evidence import TeeKind
from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.nvidia.pci import SYSFS_PCI_DEVICES, PciDevice, nvidia_pci_devices
from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence
from attest.tee.nvidia.verifier import NvidiaVerifier, expected_gpu_nonce
from attest.tee.result import result_of
from attest.tee.verifier import Policy, run_verifier
from foundation.errors import BackendUnavailable, EvidenceCollectionError, PolicyViolation, VerificationError

__all__ = ["CcState", "GpuGateError", "NvidiaAttester"]

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


class GpuGateError(VerificationError):
    """A GPU is not fit to receive the model: CC state, count, or local verification failed."""


def _pci_key(address: str) -> str:
    """Normalise a PCI address (sysfs ``0000:41:00.0``, NVML ``00000000:41:00.0``)."""
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])", address.strip())
    if not match:
        return address.strip().lower()
    domain, bus, dev, fn = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"


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

    def __init__(
        self,
        *,
        nvml: Any | None = None,
        allow_cc_off: bool = False,
        policy: Policy | None = None,
        set_ready: bool = True,
        clock: Callable[[], datetime] = _utcnow,
        pci_root: Path = SYSFS_PCI_DEVICES,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``pci_root``, ``clock`` and ``nonce`` (the gate's random source) are test hooks."""
        self._module = nvml
        self._allow_cc_off = allow_cc_off
        self._policy = policy
        self._set_ready = set_ready
        self._clock = clock
        self._pci_root = pci_root
        self._nonce = nonce

    def _nvml(self) -> Any:
        return self._module if self._module is not None else _import_pynvml()

    @contextmanager
    def _session(self) -> Iterator[Any]:
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
        with self._session() as nvml:
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
        with self._session() as nvml:
            state = self._state(nvml)
            self._check_cc(state)
            devices, _ = self._collect_devices(nvml, nonce)
        return NvidiaEvidence(devices=devices)

    @staticmethod
    def _state(nvml: Any) -> CcState:
        try:
            return NvidiaAttester._cc_state(nvml)
        except nvml.NVMLError as exc:
            raise EvidenceCollectionError(f"NVML could not report the CC state: {exc}") from exc

    def recheck(self, *, expected_count: int | None = None) -> DeviceGate:
        """The watchdog's round: the gate's checks again; the GPUs must still be ready (never set).

        Raises: as :meth:`gate`, and :class:`GpuGateError` when the GPUs stopped accepting
        client requests (a driver reload or a GPU reset).
        """
        return self._gated(expected_count, recheck=True)

    def gate(self, *, expected_count: int | None = None) -> DeviceGate:
        """Establish that every GPU is genuine, in CC mode and counted, before any key release.

        See the module docstring for the checks. Sets the GPUs ready afterwards if they are not.

        Raises:
            GpuGateError: a check failed; the message names the GPU (index, UUID, PCI address).
            PolicyViolation: the caller's policy refused a GPU's versions.
            EvidenceCollectionError: NVML failed for a GPU, or setting the ready state failed.
        """
        return self._gated(expected_count, recheck=False)

    def _gated(self, expected_count: int | None, *, recheck: bool) -> DeviceGate:
        pci = nvidia_pci_devices(self._pci_root)
        pci_gpus = [d for d in pci if d.is_gpu]
        switches = [d for d in pci if d.is_switch]
        try:
            session = self._session()
            nvml = session.__enter__()
        except BackendUnavailable as exc:
            if pci_gpus:
                raise GpuGateError(
                    f"{len(pci_gpus)} NVIDIA GPU(s) are on the PCI bus ({pci_gpus[0].address}, ...) but "
                    f"NVML is unusable ({exc}): refusing to run on GPUs that cannot be attested"
                ) from None
            raise
        try:
            return self._gate(nvml, expected_count, pci_gpus, switches, recheck=recheck)
        finally:
            session.__exit__(None, None, None)

    def _gate(
        self,
        nvml: Any,
        expected_count: int | None,
        pci_gpus: list[PciDevice],
        switches: list[PciDevice],
        *,
        recheck: bool = False,
    ) -> DeviceGate:
        state = self._state(nvml)
        if recheck and state.enabled and not state.gpus_ready:
            raise GpuGateError(
                "the GPUs no longer accept client requests (ready state off: reset or driver reload)"
            )
        try:
            self._check_cc(state)
        except BackendUnavailable as exc:
            raise GpuGateError(str(exc)) from None
        if state.protected_pcie:
            raise GpuGateError(
                "the GPUs are in multi-GPU protected-PCIe (PPCIe) mode: that needs NVSwitch evidence "
                f"({len(switches)} switch(es) on the PCI bus), which enclave-serve does not collect or "
                "verify; refusing"
            )
        nonce = self._nonce(32)
        devices, buses = self._collect_devices(nvml, nonce)
        names = [f"GPU {i} ({', '.join(filter(None, (d.uuid, buses[i])))})" for i, d in enumerate(devices)]
        self._check_count(devices, buses, names, pci_gpus, expected_count)
        evidence = NvidiaEvidence(devices=devices)
        try:
            result = run_verifier(
                NvidiaVerifier(),
                evidence,
                nonce,
                policy=self._policy,
                now=self._clock(),
                collateral=None,
                allow_insecure=False,
            )
        except VerificationError as exc:
            partial = result_of(exc)
            failed = partial.steps[-1].name if partial is not None and partial.steps else ""
            match = re.match(r"gpu(\d+)\.", failed)
            who = names[int(match.group(1))] if match and int(match.group(1)) < len(names) else "a GPU"
            kind: type[VerificationError] = (
                PolicyViolation if isinstance(exc, PolicyViolation) else GpuGateError
            )
            error = kind(f"{who} failed local verification: {exc}")
            error.result = partial  # type: ignore[attr-defined]  # what attest.verify.result_of reads
            raise error from None
        ready_set = False
        if state.enabled and not state.gpus_ready and self._set_ready and not recheck:
            try:
                nvml.nvmlSystemSetConfComputeGpusReadyState(NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE)
            except nvml.NVMLError as exc:
                raise EvidenceCollectionError(
                    f"GPUs verified ({len(result.steps)} steps) but could not be set ready: {exc} "
                    "(needs root; 'Invalid Argument' means a reboot is needed)"
                ) from exc
            ready_set = True
        logger.info(
            "verified %d GPU(s) locally (%s); %s",
            len(devices), ", ".join(names), "set them ready" if ready_set else "ready state unchanged",
        )  # fmt: skip
        return DeviceGate(
            tee=self.tee,
            devices=len(devices),
            steps=len(result.steps),
            facts={
                "cc": state.to_json(),
                "gpus": [{"uuid": d.uuid, "arch": d.arch, "pci": buses[i]} for i, d in enumerate(devices)],
                "pci_gpus": len(pci_gpus),
                "pci_switches": len(switches),
                "set_ready": ready_set,
            },
        )

    def _check_count(
        self,
        devices: tuple[NvidiaDeviceEvidence, ...],
        buses: list[str | None],
        names: list[str],
        pci_gpus: list[PciDevice],
        expected_count: int | None,
    ) -> None:
        if expected_count is not None and len(devices) != expected_count:
            raise GpuGateError(
                f"NVML reports {len(devices)} GPU(s) but the configuration expects {expected_count}"
            )
        if not self._pci_root.is_dir():
            logger.warning("no PCI bus in sysfs (%s): the GPU count is NVML's alone", self._pci_root)
            return
        on_bus = {_pci_key(d.address): d.address for d in pci_gpus}
        reported = {_pci_key(b) for b in buses if b}
        hidden = sorted(address for key, address in on_bus.items() if key not in reported)
        if len(pci_gpus) != len(devices) or (len(reported) == len(devices) and hidden):
            detail = f" (not reported: {', '.join(hidden)})" if hidden else ""
            raise GpuGateError(
                f"{len(pci_gpus)} NVIDIA GPU(s) are on the PCI bus but NVML reports {len(devices)}"
                f"{detail}: every GPU must be attested"
            )
        extra = [names[i] for i, b in enumerate(buses) if b and _pci_key(b) not in on_bus]
        if extra:
            raise GpuGateError(f"{extra[0]} is not on the guest's PCI bus")

    def _check_cc(self, state: CcState) -> None:
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
    def _collect_devices(
        nvml: Any, nonce: bytes
    ) -> tuple[tuple[NvidiaDeviceEvidence, ...], list[str | None]]:
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
        pci = nvidia_pci_devices(self._pci_root)
        out["pci"] = {"gpus": sum(d.is_gpu for d in pci), "switches": sum(d.is_switch for d in pci)}
        try:
            with self._session() as nvml:
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
