"""The sample TEE: Trustee-compatible evidence with no hardware behind it (development only)."""

from __future__ import annotations

import logging
from typing import ClassVar

from attest.evidence import TeeKind
from attest.tee.attester import Attester, DeviceAttester
from attest.tee.sample.evidence import SAMPLE_INIT_DATA_SIZE, SampleDeviceEvidence, SampleEvidence
from foundation.errors import AttestationError

__all__ = ["UnsafeSampleAttester", "UnsafeSampleDeviceAttester", "sample_init_data_register"]

logger = logging.getLogger(__name__)

_WARNING = (
    "INSECURE: using the sample TEE. Its evidence is not signed by any hardware and proves "
    "nothing; never use it outside development."
)


class UnsafeSampleAttester(Attester):
    """Produce Trustee *sample* evidence ``{"svn": "1", "report_data": b64(report_data)}``.

    ``init_data`` is the register value the sample TEE claims (``--sample-init-data``), carried
    as an extra ``init_data`` member, the way TDX carries it in MRCONFIGID.

    .. warning::
       **Fundamentally insecure.** Anyone can produce this evidence for any report data. It
       exists so the whole chain can run on a machine without a TEE. It is never chosen by
       detection; constructing it requires ``allow_insecure=True`` and logs a warning on every
       use, and documents built from it are marked insecure.
    """

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE
    insecure: ClassVar[bool] = True

    def __init__(
        self, *, allow_insecure: bool = False, svn: str = "1", init_data: bytes | None = None
    ) -> None:
        if not allow_insecure:
            raise ValueError("the sample TEE is insecure; pass allow_insecure=True to use it")
        self._svn = svn
        self._init_data = init_data
        logger.warning(_WARNING)

    @classmethod
    def detect(cls) -> bool:
        # Never auto-detected: the sample TEE must be asked for explicitly.
        return False

    def collect(self, report_data: bytes) -> SampleEvidence:
        if len(report_data) > 64:
            raise ValueError("report data is longer than 64 bytes")
        logger.warning(_WARNING)
        # Trustee's sample attester encodes the report data as given (unpadded).
        return SampleEvidence(svn=self._svn, report_data=bytes(report_data), init_data=self._init_data)


class UnsafeSampleDeviceAttester(DeviceAttester):
    """Produce Trustee *sampledevice* evidence, to exercise the GPU path without a GPU.

    .. warning::
       Insecure, like :class:`UnsafeSampleAttester`.
    """

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE_DEVICE
    insecure: ClassVar[bool] = True

    def __init__(self, *, allow_insecure: bool = False) -> None:
        if not allow_insecure:
            raise ValueError("the sample device is insecure; pass allow_insecure=True to use it")
        logger.warning(_WARNING)

    @classmethod
    def detect(cls) -> bool:
        return False

    def collect(self, runtime_data: bytes) -> SampleDeviceEvidence:
        return SampleDeviceEvidence(report_data=bytes(runtime_data))


def sample_init_data_register(attester: Attester, nonce: bytes) -> bytes:
    """Return the init-data register the sample TEE was given (development only: it proves nothing).

    A sample TEE launched without one (no ``--sample-init-data``) holds zeros, like a VM launched
    without init-data.

    Raises:
        AttestationError: ``attester`` did not return sample evidence.
    """
    sample = attester.collect(nonce)
    if not isinstance(sample, SampleEvidence):
        raise AttestationError(f"the sample attester returned {type(sample).__name__}")
    if sample.init_data is None:
        return bytes(SAMPLE_INIT_DATA_SIZE)
    return sample.init_data
