"""The interface every evidence provider implements.

A provider is one TEE's attester: :meth:`Attester.detect` says whether this machine has it,
:meth:`Attester.collect` produces fresh evidence over caller-chosen report data. CPU TEEs
(TDX, SNP, sample) are *primary* attesters; GPUs are *device* attesters whose evidence travels
as Trustee's ``additional_evidence``. Providers do the I/O (configfs, NVML) and call the pure
parsers in :mod:`attest.formats`; they never decide policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from attest.evidence import Evidence, TeeKind

__all__ = ["Attester", "DeviceAttester"]


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

    def describe(self) -> dict[str, object]:
        """Return a JSON-able description of the devices (for ``enclave-serve evidence``)."""
        return {"tee": self.tee.value, "insecure": self.insecure}
