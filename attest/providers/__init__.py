"""Evidence providers, one per TEE, and the explicit, ordered selection among them.

Detection order (primary): TDX, then SNP. The sample TEE is never detected: it must be asked
for by name *and* allowed with an insecure flag. Devices are detected separately (NVIDIA GPUs).
"""

from __future__ import annotations

import importlib
import logging
import secrets
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attest.errors import AttestationError, BackendUnavailable, ConfigError, EvidenceCollectionError
from attest.evidence import TeeKind
from attest.providers.base import Attester, DeviceAttester
from attest.providers.tdx import TDX_GUEST_DEVICE

if TYPE_CHECKING:
    from attest.providers.nvidia import NvidiaAttester

__all__ = [
    "PRIMARY_TEES",
    "Attester",
    "DeviceAttester",
    "detect_devices",
    "detected_tees",
    "init_data_register",
    "nvidia_gpus_present",
    "select_attester",
]

logger = logging.getLogger(__name__)

#: Primary attesters by name, in detection order (module path, class name).
PRIMARY_TEES: dict[str, tuple[str, str]] = {
    "tdx": ("attest.providers.tdx", "TdxAttester"),
    "snp": ("attest.providers.snp", "SnpAttester"),
    "sample": ("attest.providers.sample", "UnsafeSampleAttester"),
}

_DETECTABLE = ("tdx", "snp")


def _load(name: str) -> type[Attester]:
    module, cls = PRIMARY_TEES[name]
    try:
        found: type[Attester] = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailable(f"the {name} provider is not available in this build") from exc
    return found


def detected_tees() -> dict[str, bool]:
    """Return, for each auto-detectable primary TEE, whether this machine provides it.

    Cheap and side-effect free; a provider that cannot be loaded counts as not detected.
    """
    found: dict[str, bool] = {}
    for name in _DETECTABLE:
        try:
            found[name] = bool(_load(name).detect())
        except Exception:  # detection must not fail the caller
            found[name] = False
    return found


def select_attester(
    name: str, *, allow_insecure: bool = False, sample_init_data: bytes | None = None
) -> Attester:
    """Return the primary attester called ``name``, or detect one for ``"auto"``.

    Raises:
        ConfigError: unknown name, or ``sample`` without ``allow_insecure``.

    ``sample_init_data`` is the init-data register the sample TEE claims (development only).
        BackendUnavailable: the named TEE is not present, or ``auto`` found none.
    """
    if name == "auto":
        for candidate in _DETECTABLE:
            cls = _load(candidate)
            if cls.detect():
                logger.info("detected TEE: %s", candidate)
                return cls()
        raise BackendUnavailable(
            "no TEE found (no TDX or SEV-SNP configfs-tsm provider). On a development machine "
            "use --tee sample --allow-insecure-sample-tee."
        )
    if name not in PRIMARY_TEES:
        raise ConfigError(f"unknown TEE {name!r}; choose one of auto, {', '.join(PRIMARY_TEES)}")
    cls = _load(name)
    if cls.insecure:
        if not allow_insecure:
            raise ConfigError(
                f"the {name} TEE is insecure and proves nothing; it needs an explicit "
                "--allow-insecure-sample-tee flag (development only)"
            )
        return cls(allow_insecure=True, init_data=sample_init_data)  # type: ignore[call-arg]
    if not cls.detect():
        raise BackendUnavailable(f"{name} was requested but this machine does not provide it")
    return cls()


def init_data_register(
    attester: Attester,
    *,
    tdx_guest_device: Path = TDX_GUEST_DEVICE,
    now: datetime | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Return this TEE's init-data register, read from a source the host cannot forge.

    The boot compares it with the digest of the init-data file the host handed over; the
    register is worth nothing if the host can choose it too. Per TEE:

    1. **TDX** (MRCONFIGID): from the TDREPORT of ``tdx_guest_device``, which the TDX module
       writes through a TDCALL without the host on the path; only if that device is absent,
       from a configfs-tsm quote over a fresh ``nonce`` that verifies offline to the pinned
       Intel root (:func:`attest.providers.tdx.tdx_init_data_register` lists the steps and what
       that fallback does not verify).
    2. **SEV-SNP** (HOST_DATA): from a fresh configfs-tsm report over ``nonce``. The PSP builds
       the report and returns it in an SNP guest message encrypted and authenticated (AES-GCM)
       with this guest's VMPCK, a key the PSP placed in the guest's encrypted secrets page at
       launch and the host cannot read; the sev-guest driver checks the tag and the message
       sequence number, so the host can withhold the report but neither forge, alter nor
       replay it. Its signature (VCEK) is therefore not checked here, and the certificates the
       host supplies in ``auxblob`` are not used.
    3. **sample**: the value the sample TEE was given (development only: it proves nothing).

    ``nonce`` (default: 64 random bytes) is the report data of the report read; it is never
    sent anywhere. ``now`` (default: the current time, timezone aware) is when a TDX quote's
    PCK chain must be valid. Both are seams for tests.

    Raises:
        AttestationError: the register could not be read from anything the host cannot forge
            (a TDX guest without the device whose quote does not verify), the report does not
            parse or is over other report data, the sample TEE was given no register, or this
            TEE has no init-data register.
        EvidenceCollectionError: the TEE did not produce a report (a subclass of the above).
        ValueError: ``nonce`` is longer than 64 bytes, or ``now`` is naive.
    """
    from attest.binding import pad_report_data
    from attest.evidence import SampleEvidence
    from attest.formats.snp_report import SnpEvidence, parse_snp_report
    from attest.providers.tdx import tdx_init_data_register

    report_data = nonce if nonce is not None else secrets.token_bytes(64)
    if attester.tee is TeeKind.TDX:
        return tdx_init_data_register(attester, report_data, device=tdx_guest_device, now=now)
    if attester.tee is TeeKind.SNP:
        evidence = attester.collect(report_data)
        if not isinstance(evidence, SnpEvidence):
            raise AttestationError(f"the snp attester returned {type(evidence).__name__}, not SNP evidence")
        report = parse_snp_report(evidence.report)
        if report.report_data != pad_report_data(report_data):
            raise EvidenceCollectionError("sev_guest returned a report over other report data; retry")
        return report.host_data
    if attester.tee is TeeKind.SAMPLE:
        sample = attester.collect(report_data)
        if not isinstance(sample, SampleEvidence):
            raise AttestationError(f"the sample attester returned {type(sample).__name__}")
        if sample.init_data is None:  # launched without init-data (no --sample-init-data): zeros
            from attest.initdata import REGISTER_SIZES

            return bytes(REGISTER_SIZES[TeeKind.SAMPLE])
        return sample.init_data
    raise AttestationError(f"the {attester.tee.value} TEE has no init-data register")


def nvidia_gpus_present(pci_root: Path | None = None) -> bool:
    """Return whether NVIDIA GPUs are present: on the PCI bus (sysfs) or seen by NVML."""
    from attest.providers.pci import SYSFS_PCI_DEVICES, nvidia_pci_devices

    if any(d.is_gpu for d in nvidia_pci_devices(pci_root or SYSFS_PCI_DEVICES)):
        return True
    try:
        from attest.providers.nvidia import NvidiaAttester
    except ImportError:
        return False
    return NvidiaAttester.detect()


def _cc_off(attester: NvidiaAttester) -> bool:
    """Whether NVML reports CC off (False when NVML cannot tell: the gate then decides)."""
    from attest.errors import Error

    try:
        return not attester.cc_state().enabled
    except Error:
        return False


def detect_devices(
    *,
    gpus: str = "auto",
    allow_insecure: bool = False,
    allow_gpu_cc_off: bool = False,
    pci_root: Path | None = None,
    nvml: Any | None = None,
) -> list[DeviceAttester]:
    """Return device attesters for the GPUs present.

    ``gpus`` is ``auto`` (NVIDIA when GPUs are on the PCI bus or NVML sees them), ``none``,
    ``nvidia`` (required), or ``sample`` (insecure sample device, development only).
    ``allow_gpu_cc_off`` (development only): GPUs whose confidential-computing mode is off give
    no evidence (the driver refuses), so they get **no** attester and run unattested (the caller
    records that as an insecure mode); GPUs in CC developer-tools mode are attested with a
    warning. Otherwise GPUs on the PCI bus always get an attester, even when NVML is missing:
    its gate then refuses them (fail closed) rather than letting the model run on GPUs nobody
    attested. ``nvml`` is a test seam.

    Raises:
        ConfigError: unknown value, or ``sample`` without ``allow_insecure``.
        BackendUnavailable: ``nvidia`` was required but no GPU is visible, or GPUs are on the
            PCI bus and this build lacks the NVIDIA provider.
    """
    from attest.providers.pci import SYSFS_PCI_DEVICES, nvidia_pci_devices

    root = pci_root or SYSFS_PCI_DEVICES
    on_bus = any(d.is_gpu for d in nvidia_pci_devices(root))
    if gpus == "none":
        if nvidia_gpus_present(root):
            logger.warning(
                "INSECURE: NVIDIA GPUs are present but --gpus none was given: the model will run "
                "on GPUs that are not attested"
            )
        return []
    if gpus == "sample":
        if not allow_insecure:
            raise ConfigError("the sample device is insecure; it needs --allow-insecure-sample-tee")
        from attest.providers.sample import UnsafeSampleDeviceAttester

        return [UnsafeSampleDeviceAttester(allow_insecure=True)]
    if gpus not in ("auto", "nvidia"):
        raise ConfigError(f"unknown GPU setting {gpus!r}; choose auto, none, nvidia or sample")
    try:
        from attest.providers.nvidia import NvidiaAttester
    except ImportError as exc:
        if gpus == "nvidia" or on_bus:
            raise BackendUnavailable(
                "NVIDIA GPUs are present but the NVIDIA provider needs nvidia-ml-py"
            ) from exc
        return []
    if on_bus or NvidiaAttester.detect(nvml=nvml):
        attester = NvidiaAttester(allow_cc_off=allow_gpu_cc_off, pci_root=root, nvml=nvml)
        if allow_gpu_cc_off and _cc_off(attester):
            logger.warning(
                "INSECURE: GPU confidential computing is off: the GPUs are NOT attested and the host "
                "can read their memory (--allow-insecure-gpu-cc-off)"
            )
            return []
        return [attester]
    if gpus == "nvidia":
        raise BackendUnavailable("--gpus nvidia was given but no NVIDIA GPU is on the PCI bus or in NVML")
    return []
