"""The NVIDIA GPU attester: every GPU's SPDM attestation report and certificate chain via NVML.

Uses the ``pynvml`` module of ``nvidia-ml-py`` (or any object with the same functions, passed
as ``nvml``): NVML init, the system confidential-computing state and settings, then for every
GPU its UUID, architecture, attestation report over a 32-byte nonce and certificate chain.

Confidential computing must be on (``ccFeature`` enabled, or multi-GPU protected PCIe mode);
otherwise collection is refused unless ``allow_cc_off=True`` (development only). If the GPUs
are not yet accepting work, each GPU's evidence is first verified locally
(:func:`attest.verify.verify_device_evidence`, with the caller's policy if given), and only then
are they set ready (``nvmlSystemSetConfComputeGpusReadyState(1)``), as nvtrust's local verifier
does. In Kata NVIDIA guests NVRC usually sets them ready at boot; then nothing is changed here.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from attest.errors import BackendUnavailable, EvidenceCollectionError
from attest.evidence import TeeKind
from attest.formats.nvidia_report import NvidiaDeviceEvidence, NvidiaEvidence
from attest.providers.base import DeviceAttester
from attest.verify.nvidia import expected_gpu_nonce
from attest.verify.policy import Policy

__all__ = ["CcState", "NvidiaAttester"]

logger = logging.getLogger(__name__)

# NVML constants (nvml.h, CUDA 12.x; same values in pynvml).
#: nvmlConfComputeSystemState_t.ccFeature
NVML_CC_SYSTEM_FEATURE_ENABLED = 1
#: nvmlConfComputeSystemState_t.devToolsMode
NVML_CC_SYSTEM_DEVTOOLS_MODE_ON = 1
#: nvmlSystemConfComputeSettings_t.multiGpuMode
NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE = 1
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
    protected_pcie: bool
    environment: str
    gpus_ready: bool

    @property
    def enabled(self) -> bool:
        """Whether GPU confidential computing is on (CC feature, or multi-GPU protected PCIe)."""
        return self.cc_feature or self.protected_pcie

    def to_json(self) -> dict[str, object]:
        """Return the state as JSON."""
        return {
            "cc_feature": self.cc_feature,
            "dev_tools_mode": self.dev_tools_mode,
            "protected_pcie": self.protected_pcie,
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
    """Collect :class:`~attest.formats.nvidia_report.NvidiaEvidence` for every GPU through NVML.

    .. warning::
       ``allow_cc_off=True`` collects from GPUs whose memory the host can read. It exists for
       development on non-CC machines; evidence from such GPUs must never release a key.
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
    ) -> None:
        self._module = nvml
        self._allow_cc_off = allow_cc_off
        self._policy = policy
        self._set_ready = set_ready
        self._clock = clock

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
        protected_pcie = False
        try:
            settings = nvml.c_nvmlSystemConfComputeSettings_v1_t()
            if nvml.nvmlSystemGetConfComputeSettings(ctypes.byref(settings)) == 0:
                protected_pcie = settings.multiGpuMode == NVML_CC_SYSTEM_MULTIGPU_PROTECTED_PCIE
        except (AttributeError, nvml.NVMLError):
            # Older drivers lack the settings call; multi-GPU PPCIe then cannot be on.
            protected_pcie = False
        try:
            ready = nvml.nvmlSystemGetConfComputeGpusReadyState() == NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE
        except nvml.NVMLError:
            ready = False
        return CcState(
            cc_feature=state.ccFeature == NVML_CC_SYSTEM_FEATURE_ENABLED,
            dev_tools_mode=state.devToolsMode == NVML_CC_SYSTEM_DEVTOOLS_MODE_ON,
            protected_pcie=protected_pcie,
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

        Sets the GPUs ready after verifying each one locally, if they are not ready yet.

        Raises:
            BackendUnavailable: NVML is missing, sees no GPU, or CC is off (without
                ``allow_cc_off``).
            EvidenceCollectionError: NVML failed for a GPU, or setting the ready state failed.
            VerificationError: a GPU's evidence did not verify before setting ready.
        """
        nonce = expected_gpu_nonce(runtime_data)
        with self._session() as nvml:
            try:
                state = self._cc_state(nvml)
            except nvml.NVMLError as exc:
                raise EvidenceCollectionError(f"NVML could not report the CC state: {exc}") from exc
            self._check_cc(state)
            evidence = NvidiaEvidence(devices=self._collect_devices(nvml, nonce))
            if state.enabled and not state.gpus_ready and self._set_ready:
                self._verify_then_set_ready(nvml, evidence, nonce)
        return evidence

    def _check_cc(self, state: CcState) -> None:
        problems = []
        if not state.enabled:
            problems.append("GPU confidential computing is off")
        if state.dev_tools_mode:
            problems.append("GPU CC developer-tools mode is on (the host can debug the GPU)")
        if not problems:
            return
        message = "; ".join(problems)
        if not self._allow_cc_off:
            raise BackendUnavailable(
                f"{message}. Enable CC mode on the GPUs (nvidia-smi conf-compute / the host's "
                "gpu-admin-tools), or pass allow_cc_off=True for development only."
            )
        logger.warning("INSECURE: %s; collecting GPU evidence anyway (allow_cc_off)", message)

    @staticmethod
    def _collect_devices(nvml: Any, nonce: bytes) -> tuple[NvidiaDeviceEvidence, ...]:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise EvidenceCollectionError(f"NVML could not count GPUs: {exc}") from exc
        if count == 0:
            raise BackendUnavailable("NVML sees no NVIDIA GPU")
        devices = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                arch_id = int(nvml.nvmlDeviceGetArchitecture(handle))
                report = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                certs = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            except nvml.NVMLError as exc:
                raise EvidenceCollectionError(f"NVML failed to attest GPU {index}: {exc}") from exc
            devices.append(
                NvidiaDeviceEvidence(
                    arch=NVML_DEVICE_ARCHITECTURES.get(arch_id, f"UNKNOWN({arch_id})"),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    evidence=bytes(report.attestationReport[: report.attestationReportSize]),
                    certificate=bytes(certs.attestationCertChain[: certs.attestationCertChainSize]),
                )
            )
        return tuple(devices)

    def _verify_then_set_ready(self, nvml: Any, evidence: NvidiaEvidence, nonce: bytes) -> None:
        from attest.verify import verify_device_evidence

        result = verify_device_evidence(
            evidence, expected_runtime_data=nonce, policy=self._policy, now=self._clock()
        )
        logger.info("verified %d GPU(s) locally; setting them ready", len(evidence.devices))
        try:
            nvml.nvmlSystemSetConfComputeGpusReadyState(NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE)
        except nvml.NVMLError as exc:
            raise EvidenceCollectionError(
                f"GPUs verified ({len(result.steps)} steps) but could not be set ready: {exc} "
                "(needs root; 'Invalid Argument' means a reboot is needed)"
            ) from exc

    def describe(self) -> dict[str, object]:
        """Return the CC state and every GPU's UUID and architecture (errors as a string)."""
        out: dict[str, object] = {"tee": self.tee.value, "insecure": self.insecure}
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
