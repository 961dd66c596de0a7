"""The interface every evidence provider implements.

A provider is one TEE's attester: :meth:`Attester.detect` says whether this machine has it,
:meth:`Attester.collect` produces fresh evidence over caller-chosen report data. CPU TEEs
(TDX, SNP, sample) are *primary* attesters; GPUs are *device* attesters whose evidence travels
as Trustee's ``additional_evidence``. Providers do the I/O (configfs, NVML) and call the pure
parsers of their own folder under :mod:`attest.tee`; they never decide policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attest.evidence import Evidence, TeeKind

__all__ = ["Attester", "DeviceAttester", "DeviceGate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceGate:
    """What the local device gate established before any key was requested."""

    tee: TeeKind
    devices: int
    steps: int
    facts: Mapping[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the boot stage."""
        return f"{self.devices} {self.tee.value} device(s) verified locally ({self.steps} steps)"

    def to_json(self) -> dict[str, object]:
        """Return the gate's outcome as JSON."""
        return {"tee": self.tee.value, "devices": self.devices, "steps": self.steps, **self.facts}


class Attester(ABC):
    """A primary (CPU) TEE: evidence over up to 64 bytes of report data."""

    tee: ClassVar[TeeKind]
    #: True for providers whose evidence proves nothing (sample). Never auto-detected.
    insecure: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def detect(cls) -> bool:
        """Return whether this TEE is available on this machine (cheap, no side effects)."""

    @abstractmethod
    def collect(self, report_data: bytes) -> Evidence:
        """Return fresh evidence whose report data field commits to ``report_data``.

        ``report_data`` is at most 64 bytes; hardware providers zero-pad it (as Trustee does).

        Raises:
            EvidenceCollectionError: the hardware or kernel interface failed.
            ValueError: ``report_data`` is longer than 64 bytes.
        """

    def describe(self) -> dict[str, object]:
        """Return a JSON-able description of what this provider can attest (for ``evidence``)."""
        return {"tee": self.tee.value, "insecure": self.insecure}


class DeviceAttester(ABC):
    """An additional (device) TEE, e.g. every NVIDIA GPU in CC mode, as one evidence object."""

    tee: ClassVar[TeeKind]
    insecure: ClassVar[bool] = False
    #: The local gate attached by the selection (:func:`attest.tee.select.detect_devices`, from the
    #: descriptor's ``gate``); the attester never imports its verifier itself.
    _attached_gate: Callable[..., DeviceGate] | None = None
    #: What is missing when this kind is required but :meth:`present` is false (a message part).
    absent: ClassVar[str] = "no such device is present"

    @classmethod
    @abstractmethod
    def detect(cls) -> bool:
        """Return whether such devices are present (cheap, no side effects)."""

    @classmethod
    def present(cls, *, pci_root: Path | None = None, nvml: Any | None = None) -> bool:
        """Return whether such devices are here, for ``--gpus auto`` (cheap; no exception escapes).

        ``pci_root`` and ``nvml`` are test seams a device kind may use. By default :meth:`detect`;
        NVIDIA also looks at the PCI bus, so that GPUs the driver hides still get an attester
        (whose gate then refuses them).
        """
        try:
            return bool(cls.detect())
        except Exception:  # detection must not fail the caller
            return False

    @classmethod
    def for_machine(
        cls, *, allow_cc_off: bool = False, pci_root: Path | None = None, nvml: Any | None = None
    ) -> DeviceAttester:
        """Return the attester for this machine's devices (``allow_cc_off``: development only)."""
        return cls()

    def unattested_reason(self) -> str | None:
        """Why these devices give no evidence and may run only unattested (GPU CC off), or None.

        Asked only under the development flag ``--allow-insecure-gpu-cc-off``.
        """
        return None

    def attach_gate(self, runner: Callable[..., DeviceGate]) -> None:
        """Attach the local gate ``runner(attester, expected_count=..., recheck=...)`` that
        :meth:`gate` and :meth:`recheck` run (the selection attaches the descriptor's)."""
        self._attached_gate = runner

    @abstractmethod
    def collect(self, runtime_data: bytes) -> Evidence:
        """Return fresh evidence for all devices, bound to ``runtime_data``.

        Each device kind takes what its hardware can hold (NVIDIA: the first 32 bytes).

        Raises:
            EvidenceCollectionError: a device failed to produce evidence.
        """

    def gate(self, *, expected_count: int | None = None) -> DeviceGate:
        """Run the attached local gate: fresh evidence over a random nonce, verified locally.

        The gate is the device kind's (``attest/tee/<tee>/gate.py``, the descriptor's ``gate``):
        it verifies with its folder's verifier, which no attester imports, and adds its own checks
        (NVIDIA: confidential-computing mode, the count on the PCI bus). ``expected_count`` is the
        number of devices the configuration requires. Callers may run
        :func:`attest.tee.select.gate_device` instead, which needs nothing attached.

        Raises:
            VerificationError: the evidence does not verify (the message names the device).
            EvidenceCollectionError: a device failed to produce evidence.
            NotImplementedError: no gate is attached.
        """
        if self._attached_gate is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no local gate attached (attest.tee.select.gate_device runs it)"
            )
        return self._attached_gate(self, expected_count=expected_count, recheck=False)

    def recheck(self, *, expected_count: int | None = None) -> DeviceGate:
        """The watchdog's round after ready: the devices are still there, in CC mode, and fresh
        evidence still verifies locally. Device kinds check more (NVIDIA: still ready).

        Raises: as :meth:`gate`.
        """
        if self._attached_gate is None:
            return self.gate(expected_count=expected_count)
        return self._attached_gate(self, expected_count=expected_count, recheck=True)

    def describe(self) -> dict[str, object]:
        """Return a JSON-able description of the devices (for ``enclave-serve evidence``)."""
        return {"tee": self.tee.value, "insecure": self.insecure}
