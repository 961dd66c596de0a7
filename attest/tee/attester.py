"""The interface every evidence provider implements.

A provider is one TEE's attester: :meth:`Attester.detect` says whether this machine has it,
:meth:`Attester.collect` produces fresh evidence over caller-chosen report data. CPU TEEs
(TDX, SNP, sample) are *primary* attesters; GPUs are *device* attesters whose evidence travels
as Trustee's ``additional_evidence``. Providers do the I/O (configfs, NVML) and call the pure
parsers of their own folder under :mod:`attest.tee`; they never decide policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

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

    @classmethod
    @abstractmethod
    def detect(cls) -> bool:
        """Return whether such devices are present (cheap, no side effects)."""

    @abstractmethod
    def collect(self, runtime_data: bytes) -> Evidence:
        """Return fresh evidence for all devices, bound to ``runtime_data``.

        Each device kind takes what its hardware can hold (NVIDIA: the first 32 bytes).

        Raises:
            EvidenceCollectionError: a device failed to produce evidence.
        """

    def gate(self, *, expected_count: int | None = None) -> DeviceGate:
        """Collect fresh evidence over a random nonce and verify it locally, before any key release.

        Each device kind implements it with its own folder's verifier (an attester never imports
        :mod:`attest.verify`) and adds its own checks (NVIDIA: confidential-computing mode, the
        count on the PCI bus). ``expected_count`` is the number of devices the configuration
        requires.

        Raises:
            VerificationError: the evidence does not verify (the message names the device).
            EvidenceCollectionError: a device failed to produce evidence.
        """
        raise NotImplementedError(f"{type(self).__name__} has no local gate")

    def recheck(self, *, expected_count: int | None = None) -> DeviceGate:
        """The watchdog's round after ready: the devices are still there, in CC mode, and fresh
        evidence still verifies locally. Device kinds check more (NVIDIA: still ready).

        Raises: as :meth:`gate`.
        """
        return self.gate(expected_count=expected_count)

    def describe(self) -> dict[str, object]:
        """Return a JSON-able description of the devices (for ``enclave-serve evidence``)."""
        return {"tee": self.tee.value, "insecure": self.insecure}
