"""The NVIDIA local gate (I/O): every GPU genuine, in CC mode and counted, before any key release.

:func:`gate` is what the runtime runs on an :class:`~attest.tee.nvidia.attester.NvidiaAttester`
before it asks for a key (the descriptor's ``gate``; :func:`attest.tee.select.gate_device`), and
again in every watchdog round (``recheck=True``). It lives beside the attester, not in it, so
that the attester, which collects, never imports the verifier:

1. count the NVIDIA GPUs on the PCI bus (sysfs, independent of the driver); refuse when NVML
   cannot start while GPUs are present;
2. check the CC state (on, developer-tools mode off unless allowed, no protected PCIe; in a
   watchdog round the GPUs must still be ready);
3. collect every GPU's evidence over a fresh random nonce;
4. check the count (NVML = PCI bus = the configured number);
5. verify the evidence locally with :class:`~attest.tee.nvidia.verifier.NvidiaVerifier` (chain,
   signature, nonce, FWID, one entry per device) and the attester's ``policy``;
6. only then set the GPUs ready (``nvmlSystemSetConfComputeGpusReadyState(1)``) if they are not,
   as nvtrust's local verifier does (never in a watchdog round).

Not verified here: NVSwitch evidence (protected PCIe is refused), and anything NVML cannot see.
"""

from __future__ import annotations

import logging
import re
from typing import Any, cast

from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.nvidia.attester import NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE, NvidiaAttester
from attest.tee.nvidia.pci import PciDevice, nvidia_pci_devices
from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence
from attest.tee.nvidia.verifier import NvidiaVerifier
from attest.tee.result import result_of
from attest.tee.verifier import Policy, run_verifier
from foundation.errors import BackendUnavailable, EvidenceCollectionError, PolicyViolation, VerificationError

__all__ = ["GpuGateError", "gate"]

logger = logging.getLogger(__name__)


class GpuGateError(VerificationError):
    """A GPU is not fit to receive the model: CC state, count, or local verification failed."""


def _pci_key(address: str) -> str:
    """Normalise a PCI address (sysfs ``0000:41:00.0``, NVML ``00000000:41:00.0``)."""
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])", address.strip())
    if not match:
        return address.strip().lower()
    domain, bus, dev, fn = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"


def gate(attester: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False) -> DeviceGate:
    """Establish that every GPU is genuine, in CC mode and counted (the module docstring's steps).

    ``expected_count`` is the number of GPUs the configuration requires; ``recheck`` is the
    watchdog's round (the GPUs must still be ready; the ready state is never set).

    Raises:
        GpuGateError: a check failed; the message names the GPU (index, UUID, PCI address), or
            (``recheck``) the GPUs stopped accepting client requests (a driver reload or reset).
        PolicyViolation: the attester's policy refused a GPU's versions.
        EvidenceCollectionError: NVML failed for a GPU, or setting the ready state failed.
        TypeError: ``attester`` is not an NVIDIA attester.
    """
    if not isinstance(attester, NvidiaAttester):
        raise TypeError(f"the NVIDIA gate runs on an NvidiaAttester, not {type(attester).__name__}")
    return _gated(attester, expected_count, recheck=recheck)


def _gated(attester: NvidiaAttester, expected_count: int | None, *, recheck: bool) -> DeviceGate:
    pci = nvidia_pci_devices(attester.pci_root)
    pci_gpus = [d for d in pci if d.is_gpu]
    switches = [d for d in pci if d.is_switch]
    try:
        session = attester.session()
        nvml = session.__enter__()
    except BackendUnavailable as exc:
        if pci_gpus:
            raise GpuGateError(
                f"{len(pci_gpus)} NVIDIA GPU(s) are on the PCI bus ({pci_gpus[0].address}, ...) but "
                f"NVML is unusable ({exc}): refusing to run on GPUs that cannot be attested"
            ) from None
        raise
    try:
        return _gate(attester, nvml, expected_count, pci_gpus, switches, recheck=recheck)
    finally:
        session.__exit__(None, None, None)


def _gate(
    attester: NvidiaAttester,
    nvml: Any,
    expected_count: int | None,
    pci_gpus: list[PciDevice],
    switches: list[PciDevice],
    *,
    recheck: bool = False,
) -> DeviceGate:
    state = attester.state(nvml)
    if recheck and state.enabled and not state.gpus_ready:
        raise GpuGateError(
            "the GPUs no longer accept client requests (ready state off: reset or driver reload)"
        )
    try:
        attester.check_cc(state)
    except BackendUnavailable as exc:
        raise GpuGateError(str(exc)) from None
    if state.protected_pcie:
        raise GpuGateError(
            "the GPUs are in multi-GPU protected-PCIe (PPCIe) mode: that needs NVSwitch evidence "
            f"({len(switches)} switch(es) on the PCI bus), which enclave-serve does not collect or "
            "verify; refusing"
        )
    nonce = attester.nonce(32)
    devices, buses = attester.collect_devices(nvml, nonce)
    names = [f"GPU {i} ({', '.join(filter(None, (d.uuid, buses[i])))})" for i, d in enumerate(devices)]
    _check_count(attester, devices, buses, names, pci_gpus, expected_count)
    evidence = NvidiaEvidence(devices=devices)
    try:
        result = run_verifier(
            NvidiaVerifier(),
            evidence,
            nonce,
            policy=cast("Policy | None", attester.policy),
            now=attester.clock(),
            collateral=None,
            allow_insecure=False,
        )
    except VerificationError as exc:
        partial = result_of(exc)
        failed = partial.steps[-1].name if partial is not None and partial.steps else ""
        match = re.match(r"gpu(\d+)\.", failed)
        who = names[int(match.group(1))] if match and int(match.group(1)) < len(names) else "a GPU"
        kind: type[VerificationError] = PolicyViolation if isinstance(exc, PolicyViolation) else GpuGateError
        error = kind(f"{who} failed local verification: {exc}")
        error.result = partial  # type: ignore[attr-defined]  # what attest.verify.result_of reads
        raise error from None
    ready_set = False
    if state.enabled and not state.gpus_ready and attester.set_ready and not recheck:
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
        tee=attester.tee,
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
    attester: NvidiaAttester,
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
    if not attester.pci_root.is_dir():
        logger.warning("no PCI bus in sysfs (%s): the GPU count is NVML's alone", attester.pci_root)
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
