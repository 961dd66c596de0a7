"""Choose this machine's attesters through the registry (:mod:`attest.tee`): I/O, at boot.

Detection order (primary) is the registry's: TDX, then SNP. An insecure TEE (sample) is never
detected: it must be asked for by name *and* allowed with an insecure flag. Devices are detected
separately, by the attester classes of the registry's device backends; each device's local gate
(the backend's ``gate``, beside its attester) is attached to it here and run by
:func:`gate_device`.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from attest.tee import BACKENDS, TeeBackend
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from foundation.errors import AttestationError, BackendUnavailable, ConfigError

__all__ = [
    "Attester",
    "DeviceAttester",
    "detect_devices",
    "detected_tees",
    "device_choices",
    "devices_present",
    "gate_device",
    "init_data_register",
    "insecure_choices",
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
    return ("auto", "none", *(_device_choice(b) for b in BACKENDS.values() if b.device))


def insecure_choices(*, device: bool = False) -> frozenset[str]:
    """Return the ``--tee`` choices (with ``device``: the ``--gpus`` choices) whose evidence proves
    nothing: the backends the registry marks insecure (the sample TEE and the sample device)."""
    return frozenset(
        _device_choice(b) if device else b.name
        for b in BACKENDS.values()
        if b.insecure and b.device == device
    )


def _device_choice(found: TeeBackend) -> str:
    """``--gpus``'s name for a device backend (``sample`` for the insecure sample device)."""
    return "sample" if found.insecure else found.name


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


def _devices(gpus: str) -> list[TeeBackend]:
    """The device backends ``--gpus`` names (``auto``: every detectable secure one, in order)."""
    devices = [b for b in BACKENDS.values() if b.device]
    if gpus == "auto":
        return [b for b in devices if b.detectable and not b.insecure]
    return [b for b in devices if _device_choice(b) == gpus]


def _device_class(found: TeeBackend) -> type[DeviceAttester]:
    cls = found.attester()
    assert issubclass(cls, DeviceAttester)
    return cls


def devices_present(pci_root: Path | None = None) -> bool:
    """Return whether devices of a detectable kind are present (NVIDIA: on the PCI bus or in NVML)."""
    for found in _devices("auto"):
        try:
            if _device_class(found).present(pci_root=pci_root):
                return True
        except ImportError:
            continue
    return False


def nvidia_gpus_present(pci_root: Path | None = None) -> bool:
    """Return whether GPUs are present (the detectable device kinds: NVIDIA on the PCI bus or in NVML).

    The name of :func:`devices_present` that ``runtime.boot`` imports.
    """
    return devices_present(pci_root)


def detect_devices(
    *,
    gpus: str = "auto",
    allow_insecure: bool = False,
    allow_gpu_cc_off: bool = False,
    pci_root: Path | None = None,
    nvml: Any | None = None,
) -> list[DeviceAttester]:
    """Return device attesters for the devices present, each with its local gate attached.

    ``gpus`` is ``auto`` (every detectable device kind present: NVIDIA when GPUs are on the PCI
    bus or NVML sees them), ``none``, a device kind by name (``nvidia``: required), or ``sample``
    (the insecure sample device, development only). The registry says which kinds there are
    (``device``, ``detectable``, ``insecure``); each attester class says whether its devices are
    here (:meth:`~attest.tee.attester.DeviceAttester.present`) and builds itself
    (:meth:`~attest.tee.attester.DeviceAttester.for_machine`). ``allow_gpu_cc_off`` (development
    only): devices that give no evidence (GPUs with CC off; the driver refuses) get **no**
    attester and run unattested (the caller records that as an insecure mode); GPUs in CC
    developer-tools mode are attested with a warning. Otherwise devices present always get an
    attester, even when NVML is missing: its gate then refuses them (fail closed) rather than
    letting the model run on GPUs nobody attested. ``pci_root`` and ``nvml`` are test seams.

    Raises:
        ConfigError: unknown value, or ``sample`` without ``allow_insecure``.
        BackendUnavailable: a named kind was required but no device is visible, or its provider
            is not in this build.
    """
    if gpus == "none":
        if devices_present(pci_root):
            logger.warning(
                "INSECURE: NVIDIA GPUs are present but --gpus none was given: the model will run "
                "on GPUs that are not attested"
            )
        return []
    chosen = _devices(gpus)
    if not chosen and gpus != "auto":
        choices = [c for c in device_choices() if c != "auto"]
        raise ConfigError(
            f"unknown GPU setting {gpus!r}; choose auto, {', '.join(choices[:-1])} or {choices[-1]}"
        )
    out: list[DeviceAttester] = []
    for found in chosen:
        required = gpus != "auto"
        try:
            cls = _device_class(found)
        except ImportError as exc:
            if required:
                raise BackendUnavailable(
                    f"--gpus {gpus} was given but the {found.name} provider is not in this build"
                ) from exc
            logger.warning(
                "the %s provider is not in this build: %s devices not detected", found.name, found.title
            )
            continue
        if found.insecure:
            if not allow_insecure:
                raise ConfigError("the sample device is insecure; it needs --allow-insecure-sample-tee")
            attester = cls(allow_insecure=True)  # type: ignore[call-arg]
        elif cls.present(pci_root=pci_root, nvml=nvml):
            attester = cls.for_machine(allow_cc_off=allow_gpu_cc_off, pci_root=pci_root, nvml=nvml)
            reason = attester.unattested_reason() if allow_gpu_cc_off else None
            if reason is not None:
                logger.warning("INSECURE: %s", reason)
                continue
        elif required:
            raise BackendUnavailable(f"--gpus {gpus} was given but {cls.absent}")
        else:
            continue
        if found.gate is not None:
            attester.attach_gate(found.gate)
        out.append(attester)
    return out


def gate_device(
    device: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False
) -> DeviceGate:
    """Run ``device``'s local gate (its backend's ``gate``): before any key release, and with
    ``recheck`` in every watchdog round.

    Raises:
        VerificationError: the evidence does not verify (the message names the device).
        EvidenceCollectionError: a device failed to produce evidence.
        AttestationError: the device's kind has no local gate.
    """
    runner = BACKENDS[device.tee].gate
    if runner is None:
        raise AttestationError(f"the {device.tee.value} device has no local gate")
    return runner(device, expected_count=expected_count, recheck=recheck)
