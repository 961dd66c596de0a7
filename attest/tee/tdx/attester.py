"""The Intel TDX attester: a DCAP quote from configfs-tsm, plus the CCEL event log; and the
TD's own TDREPORT from ``/dev/tdx_guest``, from which the init-data register (MRCONFIGID) is read.

The quote is requested from the ``tdx_guest`` configfs-tsm provider (the kernel asks the host's
quoting service); the CCEL ACPI table data, when the firmware exposes it, travels with it as
``cc_eventlog``. Nothing is verified here beyond the quote parsing and carrying the report data.

The TDREPORT (:func:`read_tdreport`) comes straight from the TDX module through
``TDCALL[TDG.MR.REPORT]``; the host is not on that path.
:func:`attest.tee.tdx.register.tdx_init_data_register` reads MRCONFIGID from it, or, where the
device is absent, from a quote that verifies offline.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from attest.binding import REPORT_DATA_SIZE, pad_report_data
from attest.evidence import TeeKind
from attest.tee.attester import Attester
from attest.tee.tdx.quote import TdxEvidence, parse_tdx_quote
from attest.tee.tdx.report import TDREPORT_SIZE, TdReport, parse_tdreport
from attest.tee.tsm import DEFAULT_TSM_REPORT_ROOT, ConfigfsTsm, guest_present
from foundation.errors import BackendUnavailable, EvidenceCollectionError, MalformedEvidence

__all__ = [
    "DEFAULT_CCEL_PATH",
    "TDX_CMD_GET_REPORT0",
    "TDX_DEVICE_PATHS",
    "TDX_GUEST_DEVICE",
    "TDX_TSM_PROVIDER",
    "TdxAttester",
    "read_tdreport",
]

logger = logging.getLogger(__name__)

#: configfs-tsm provider name of the TDX guest driver (drivers/virt/coco/tdx-guest).
TDX_TSM_PROVIDER = "tdx_guest"
#: CCEL event log data exported by the ACPI driver (Intel TDX GHCI spec, "CCEL" table).
DEFAULT_CCEL_PATH = Path("/sys/firmware/acpi/tables/data/CCEL")
#: The TDX guest driver's misc device (drivers/virt/coco/tdx-guest, named after the module).
TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
#: Present in TDX guests (guest-components ``tdx::detect_platform``).
TDX_DEVICE_PATHS = (TDX_GUEST_DEVICE, Path("/sys/devices/virtual/misc/tdx_guest"))
#: ``TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req)`` (Linux
#: include/uapi/linux/tdx-guest.h; ``struct tdx_report_req { __u8 reportdata[64]; __u8
#: tdreport[1024]; }``): _IOC_READ|_IOC_WRITE (3) << 30 | sizeof (1088) << 16 | 'T' << 8 | 1,
#: i.e. 0xC4405401 (asm-generic/ioctl.h encoding, used by x86).
TDX_CMD_GET_REPORT0 = (3 << 30) | ((REPORT_DATA_SIZE + TDREPORT_SIZE) << 16) | (ord("T") << 8) | 1
#: errno values of ``open`` that mean "no TDX guest device here" (no node, or no driver behind it).
_DEVICE_ABSENT = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO})

#: ``fcntl.ioctl``'s shape, for :func:`read_tdreport`'s test seam.
_Ioctl = Callable[[int, int, bytearray], object]


class TdxAttester(Attester):
    """Collect :class:`~attest.tee.tdx.quote.TdxEvidence` through configfs-tsm."""

    tee: ClassVar[TeeKind] = TeeKind.TDX

    def __init__(self, *, tsm: ConfigfsTsm | None = None, ccel_path: Path | None = DEFAULT_CCEL_PATH) -> None:
        self._tsm = tsm if tsm is not None else ConfigfsTsm()
        self._ccel_path = ccel_path

    @classmethod
    def detect(
        cls, *, tsm_root: Path = DEFAULT_TSM_REPORT_ROOT, device_paths: Sequence[Path] = TDX_DEVICE_PATHS
    ) -> bool:
        """Return whether this is a TDX guest with configfs-tsm (checks paths only)."""
        return guest_present(tsm_root, device_paths)

    def collect(self, report_data: bytes) -> TdxEvidence:
        """Return a fresh quote whose REPORTDATA is ``report_data`` zero-padded to 64 bytes.

        Raises:
            ValueError: ``report_data`` is longer than 64 bytes.
            BackendUnavailable: no configfs-tsm TDX provider.
            EvidenceCollectionError: the kernel failed, or returned something that is not a
                quote over our report data.
        """
        padded = pad_report_data(report_data)
        report = self._tsm.report(padded, provider=TDX_TSM_PROVIDER)
        try:
            quote = parse_tdx_quote(report.outblob)
        except MalformedEvidence as exc:
            raise EvidenceCollectionError(f"tdx_guest returned a quote that does not parse: {exc}") from exc
        if quote.body.report_data != padded:
            raise EvidenceCollectionError("tdx_guest returned a quote over other report data; retry")
        return TdxEvidence(quote=report.outblob, cc_eventlog=self._read_ccel())

    def _read_ccel(self) -> bytes | None:
        if self._ccel_path is None:
            return None
        try:
            return self._ccel_path.read_bytes() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("could not read the CCEL event log at %s: %s", self._ccel_path, exc)
            return None

    def describe(self) -> dict[str, object]:
        """Return the TEE, the configfs-tsm root and whether a CCEL event log is present."""
        return {
            "tee": self.tee.value,
            "insecure": self.insecure,
            "tsm_root": str(self._tsm.root),
            "tsm_available": self._tsm.available(),
            "ccel": self._ccel_path is not None and self._ccel_path.exists(),
        }


def read_tdreport(
    report_data: bytes, *, device: Path = TDX_GUEST_DEVICE, ioctl: _Ioctl | None = None
) -> TdReport:
    """Return this TD's TDREPORT over ``report_data`` (zero-padded to 64 bytes), from ``device``.

    Steps:

    1. Open ``device`` (``/dev/tdx_guest``) read-write.
    2. ``TDX_CMD_GET_REPORT0``: the kernel runs ``TDCALL[TDG.MR.REPORT]`` and copies the
       1024-byte TDREPORT_STRUCT back. The TDX module writes it into the TD's private memory;
       the host (VMM, quoting service) is not on this path and cannot alter it.
    3. Parse it (:func:`~attest.tee.tdx.report.parse_tdreport`).
    4. Check that REPORTDATA is the padded ``report_data`` we sent.
    5. Check that TEE_TCB_INFO_HASH and TEE_INFO_HASH match the structures they cover.

    What is *not* verified: the MAC (only the TDX module can, see
    :mod:`attest.tee.tdx.report`). The value is trusted because it arrives from the TDX
    module through this TD's own kernel, which is part of the TD's measured TCB; it is local
    evidence, never something to send to a remote party. ``ioctl`` (default ``fcntl.ioctl``) is
    a test seam.

    Raises:
        ValueError: ``report_data`` is longer than 64 bytes.
        BackendUnavailable: ``device`` does not exist or has no driver behind it (ENOENT,
            ENODEV, ENXIO): the one condition a caller may treat as "no TDREPORT here".
        EvidenceCollectionError: the device exists but could not be opened, the ioctl failed,
            or what came back is not a consistent TDREPORT over our report data.
    """
    padded = pad_report_data(report_data)
    call = ioctl if ioctl is not None else fcntl.ioctl
    # (1) Open the device; only its absence is the distinguishable "not here" condition.
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        detail = f"{device}: {exc.strerror or exc}"
        if exc.errno in _DEVICE_ABSENT:
            raise BackendUnavailable(
                "no TDX guest device (tdx_guest): this TD cannot read its TDREPORT",
                log_detail=detail,
            ) from exc
        raise EvidenceCollectionError(
            "the TDX guest device (tdx_guest) exists but could not be opened; give the runtime "
            "read-write access to it",
            log_detail=detail,
        ) from exc
    # (2) TDX_CMD_GET_REPORT0 fills tdreport[1024] after reportdata[64], in place.
    request = bytearray(padded + bytes(TDREPORT_SIZE))
    try:
        call(fd, TDX_CMD_GET_REPORT0, request)
    except OSError as exc:
        raise EvidenceCollectionError(
            "TDX_CMD_GET_REPORT0 on the TDX guest device failed (the TDCALL or the driver refused); "
            "check the kernel log",
            log_detail=f"{device}: {exc.strerror or exc}",
        ) from exc
    finally:
        os.close(fd)
    # (3) Parse.
    try:
        report = parse_tdreport(bytes(request[REPORT_DATA_SIZE:]))
    except MalformedEvidence as exc:
        raise EvidenceCollectionError(f"the TDX guest device returned an unusable TDREPORT: {exc}") from exc
    # (4) Over our report data.
    if report.report_data != padded:
        raise EvidenceCollectionError("the TDX guest device returned a TDREPORT over other report data")
    # (5) Internally consistent.
    if not report.digests_match():
        raise EvidenceCollectionError(
            "the TDX guest device returned a TDREPORT whose TEE_TCB_INFO/TDINFO digests do not match"
        )
    return report
