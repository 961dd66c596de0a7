"""The Intel TDX attester: a DCAP quote from configfs-tsm, plus the CCEL event log; and the
TD's own TDREPORT from ``/dev/tdx_guest``, from which the init-data register (MRCONFIGID) is read.

The quote is requested from the ``tdx_guest`` configfs-tsm provider (the kernel asks the host's
quoting service); the CCEL ACPI table data, when the firmware exposes it, travels with it as
``cc_eventlog``. Nothing is verified here beyond the quote parsing and carrying the report data.

The TDREPORT (:func:`read_tdreport`) comes straight from the TDX module through
``TDCALL[TDG.MR.REPORT]``; the host is not on that path. :func:`tdx_init_data_register` reads
MRCONFIGID from it, or, where the device is absent, from a quote that verifies offline.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from attest.binding import REPORT_DATA_SIZE, pad_report_data
from attest.errors import AttestationError, BackendUnavailable, EvidenceCollectionError, MalformedEvidence
from attest.evidence import TeeKind
from attest.formats.tdx_quote import TdxEvidence, parse_tdx_quote
from attest.formats.tdx_report import TDREPORT_SIZE, TdReport, parse_tdreport
from attest.providers.base import Attester
from attest.providers.tsm import DEFAULT_TSM_REPORT_ROOT, ConfigfsTsm, guest_present

__all__ = [
    "DEFAULT_CCEL_PATH",
    "TDX_CMD_GET_REPORT0",
    "TDX_DEVICE_PATHS",
    "TDX_GUEST_DEVICE",
    "TDX_TSM_PROVIDER",
    "TdxAttester",
    "read_tdreport",
    "tdx_init_data_register",
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
    """Collect :class:`~attest.formats.tdx_quote.TdxEvidence` through configfs-tsm."""

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
    3. Parse it (:func:`~attest.formats.tdx_report.parse_tdreport`).
    4. Check that REPORTDATA is the padded ``report_data`` we sent.
    5. Check that TEE_TCB_INFO_HASH and TEE_INFO_HASH match the structures they cover.

    What is *not* verified: the MAC (only the TDX module can, see
    :mod:`attest.formats.tdx_report`). The value is trusted because it arrives from the TDX
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


def tdx_init_data_register(
    attester: Attester, nonce: bytes, *, device: Path = TDX_GUEST_DEVICE, now: datetime | None = None
) -> bytes:
    """Return MRCONFIGID, the TDX init-data register, from a source the host cannot forge.

    Steps:

    1. Read the TDREPORT from ``device`` over ``nonce`` (:func:`read_tdreport`) and return its
       MRCONFIGID. The TDX module writes it through a TDCALL; the host is not on the path.
    2. Only if ``device`` is absent (:func:`read_tdreport` raised ``BackendUnavailable``):
       collect a quote over ``nonce`` through ``attester`` (configfs-tsm). The host's quoting
       service assembles that quote, so it is trusted only if it verifies offline
       (:func:`attest.verify.verify_evidence`, no policy, no collateral): the quote signature, the
       QE report's binding of the attestation key, the PCK chain to the pinned Intel SGX Root CA
       valid at ``now``, the PCK signature over the QE report, Intel's TD Quoting Enclave
       identity, and REPORTDATA equal to ``nonce`` (so the quote is fresh). Then return its
       MRCONFIGID.

    A device that exists but fails is an error, not a reason to fall back.

    What is *not* verified on the fallback path: without collateral, neither revocation (a
    host holding the keys of a compromised, revoked platform could still sign a quote) nor the
    TCB level; and nothing ties the quote to *this* TD beyond the fresh nonce, which the host
    sees: a host that runs a TD of its own could have that TD quote our nonce with the
    MRCONFIGID it wants. A verifier that checks MRCONFIGID in this TD's own quotes (the KBS,
    the user's ``verify``) still catches such a substitution; the TDREPORT path has neither gap.

    ``nonce`` is at most 64 bytes (zero-padded). ``now`` (default: the current time, timezone
    aware) is when the PCK chain must be valid.

    Raises:
        AttestationError: the device is absent and the quote could not be collected or does not
            verify (the message says why; the cause is chained), or ``attester`` returned
            something that is not TDX evidence.
        EvidenceCollectionError: the device exists but did not give a usable TDREPORT.
        ValueError: ``nonce`` is longer than 64 bytes, or ``now`` is naive.
    """
    # (1) The TDREPORT, straight from the TDX module.
    try:
        report = read_tdreport(nonce, device=device)
    except BackendUnavailable as exc:
        absent = exc
    else:
        logger.info("init-data register: MRCONFIGID read from the TDREPORT (tdx_guest)")
        return report.mr_config_id
    # (2) No device: only a quote that verifies offline to Intel's root will do.
    logger.warning(
        "no TDX guest device (%s): reading MRCONFIGID from a configfs-tsm quote verified offline "
        "(no collateral: revocation and TCB level are not checked)",
        absent.log_detail,
    )
    return _register_from_verified_quote(attester, nonce, now)


def _register_from_verified_quote(attester: Attester, nonce: bytes, now: datetime | None) -> bytes:
    from attest.verify import TdxClaims, verify_evidence

    why = (
        "the TDX init-data register (MRCONFIGID) could not be read from anything the host cannot "
        "forge: there is no TDX guest device (tdx_guest) to read the TDREPORT from, and the "
        "configfs-tsm quote, which the host's quoting service assembles"
    )
    advice = "Give the runtime /dev/tdx_guest, or check the platform's quoting service"
    try:
        evidence = attester.collect(nonce)
    except AttestationError as exc:
        raise AttestationError(f"{why}, could not be collected: {exc}. {advice}.") from exc
    if not isinstance(evidence, TdxEvidence):
        raise AttestationError(
            f"{why}, is missing: the {attester.tee.value} attester returned "
            f"{type(evidence).__name__}, not TDX evidence"
        )
    try:
        result = verify_evidence(evidence, expected_report_data=nonce, now=now)
    except AttestationError as exc:
        raise AttestationError(
            f"{why}, does not verify offline to the pinned Intel root: {exc} {advice}."
        ) from exc
    claims = result.claims
    if not isinstance(claims, TdxClaims):  # the TDX verifier always records TdxClaims
        raise AttestationError(f"{why}, verified without TDX claims")
    logger.info("init-data register: MRCONFIGID read from a quote that verified offline")
    return claims.mr_config_id
