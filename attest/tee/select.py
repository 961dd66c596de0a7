"""Choose this machine's attesters through the registry (:mod:`attest.tee`): I/O, at boot.

Detection order (primary) is the registry's: TDX, then SNP. An insecure TEE (sample) is never
detected: it must be asked for by name *and* allowed with an insecure flag. Devices are detected
separately (NVIDIA GPUs).
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attest.evidence import TeeKind
from attest.tee import BACKENDS, TeeBackend
from attest.tee.attester import Attester, DeviceAttester
from foundation.errors import AttestationError, BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from attest.tee.nvidia.attester import NvidiaAttester

__all__ = [
    "Attester",
    "DeviceAttester",
    "detect_devices",
    "detected_tees",
    "device_choices",
    "init_data_register",
    "nvidia_gpus_present",
    "primary_choices",
    "select_attester",
]

logger = logging.getLogger(__name__)


def primary_choices() -> tuple[str, ...]:
    """Return ``--tee``'s choices: ``auto`` and every primary backend, in registry order."""
    return ("auto", *(b.name for b in BACKENDS.values() if not b.device))


def device_choices() -> tuple[str, ...]:
    """Return ``--gpus``'s choices: ``auto``, ``none`` and every device backend (``sample`` for the
    insecure sample device), in registry order."""
    return ("auto", "none", *("sample" if b.insecure else b.name for b in BACKENDS.values() if b.device))


def _primary(name: str) -> TeeBackend:
    for b in BACKENDS.values():
        if not b.device and b.name == name:
            return b
    raise ConfigError(f"unknown TEE {name!r}; choose one of {', '.join(primary_choices())}")


def _load(found: TeeBackend) -> type[Attester]:
    try:
        cls = found.attester()
    except ImportError as exc:
        raise BackendUnavailable(f"the {found.name} provider is not available in this build") from exc
    assert issubclass(cls, Attester)
    return cls


def _detectable() -> list[TeeBackend]:
    return [b for b in BACKENDS.values() if b.detectable and not b.device and not b.insecure]


def detected_tees() -> dict[str, bool]:
    """Return, for each auto-detectable primary TEE, whether this machine provides it.

    Cheap and side-effect free; a provider that cannot be loaded counts as not detected.
    """
    found: dict[str, bool] = {}
    for b in _detectable():
        try:
            found[b.name] = bool(_load(b).detect())
        except Exception:  # detection must not fail the caller
            found[b.name] = False
    return found


def select_attester(
    name: str, *, allow_insecure: bool = False, sample_init_data: bytes | None = None
) -> Attester:
    """Return the primary attester called ``name``, or detect one for ``"auto"``.

    ``sample_init_data`` is the init-data register the sample TEE claims (development only).

    Raises:
        ConfigError: unknown name, or ``sample`` without ``allow_insecure``.
        BackendUnavailable: the named TEE is not present, or ``auto`` found none.
    """
    if name == "auto":
        for candidate in _detectable():
            cls = _load(candidate)
            if cls.detect():
                logger.info("detected TEE: %s", candidate.name)
                return cls()
        raise BackendUnavailable(
            "no TEE found (no TDX or SEV-SNP configfs-tsm provider). On a development machine "
            "use --tee sample --allow-insecure-sample-tee."
        )
    found = _primary(name)
    cls = _load(found)
    if found.insecure:
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
    tdx_guest_device: Path | None = None,
    now: datetime | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Return this TEE's init-data register, read from a source the host cannot forge.

    The boot compares it with the digest of the init-data file the host handed over; the
    register is worth nothing if the host can choose it too. Each backend reads its own
    (:attr:`attest.tee.base.InitDataRegister.read`):

    1. **TDX** (MRCONFIGID): from the TDREPORT of ``tdx_guest_device``, which the TDX module
       writes through a TDCALL without the host on the path; only if that device is absent,
       from a configfs-tsm quote over a fresh ``nonce`` that verifies offline to the pinned
       Intel root (:func:`attest.tee.tdx.register.tdx_init_data_register` lists the steps and
       what that fallback does not verify).
    2. **SEV-SNP** (HOST_DATA): from a fresh configfs-tsm report over ``nonce``, which the PSP
       returns encrypted and authenticated with this guest's VMPCK
       (:func:`attest.tee.snp.attester.snp_init_data_register` says why the VCEK is not checked).
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
    register = BACKENDS[attester.tee].init_data
    if register is None:
        raise AttestationError(f"the {attester.tee.value} TEE has no init-data register")
    report_data = nonce if nonce is not None else secrets.token_bytes(64)
    return register.read(attester, report_data, now=now, guest_device=tdx_guest_device)


def nvidia_gpus_present(pci_root: Path | None = None) -> bool:
    """Return whether NVIDIA GPUs are present: on the PCI bus (sysfs) or seen by NVML."""
    from attest.tee.nvidia.pci import SYSFS_PCI_DEVICES, nvidia_pci_devices

    if any(d.is_gpu for d in nvidia_pci_devices(pci_root or SYSFS_PCI_DEVICES)):
        return True
    try:
        from attest.tee.nvidia.attester import NvidiaAttester
    except ImportError:
        return False
    return NvidiaAttester.detect()


def _cc_off(attester: NvidiaAttester) -> bool:
    """Whether NVML reports CC off (False when NVML cannot tell: the gate then decides)."""
    from foundation.errors import Error

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
    from attest.tee.nvidia.pci import SYSFS_PCI_DEVICES, nvidia_pci_devices

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
        sample = BACKENDS[TeeKind.SAMPLE_DEVICE].attester()
        assert issubclass(sample, DeviceAttester)
        return [sample(allow_insecure=True)]  # type: ignore[call-arg]
    if gpus not in ("auto", "nvidia"):
        raise ConfigError(f"unknown GPU setting {gpus!r}; choose auto, none, nvidia or sample")
    try:
        from attest.tee.nvidia.attester import NvidiaAttester
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
