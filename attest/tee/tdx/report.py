"""Parse the Intel TDX TDREPORT (``TDREPORT_STRUCT``, 1024 bytes) into a typed dataclass.

A TDREPORT is what ``TDCALL[TDG.MR.REPORT]`` writes into the TD's private memory; Linux hands it
to user space through ``/dev/tdx_guest`` (``TDX_CMD_GET_REPORT0``, see
:mod:`attest.tee.tdx.attester`). The layout is the Intel TDX Module ABI Specification (Intel
document 733579), section 4.7 "Measurement and Attestation Types": 4.7.2 ``TDREPORT_STRUCT``,
4.7.3 ``REPORTMACSTRUCT``, 4.7.4 ``REPORTTYPE``, with ``TEE_TCB_INFO`` and ``TDINFO_STRUCT`` in
the same section; the size is ``TDX_REPORT_LEN`` of Linux ``include/uapi/linux/tdx-guest.h``.
Checked against guest-components ``attestation-agent/attester/src/tdx/report.rs`` and its real
TDX 1.5 fixture ``attester/test/tdx_report_1.bin`` (every offset below, and both digests)::

    off  size  field
      0   256  REPORTMACSTRUCT  REPORTTYPE 4 (type, subtype, version, reserved) | reserved 12
                                | CPUSVN 16 | TEE_TCB_INFO_HASH 48 | TEE_INFO_HASH 48
                                | REPORTDATA 64 | reserved 32 | MAC 32
    256   239  TEE_TCB_INFO     VALID 8 | TEE_TCB_SVN 16 | MRSEAM 48 | MRSIGNERSEAM 48
                                | ATTRIBUTES 8 | TEE_TCB_SVN2 16 (TDX 1.5) | reserved 95
    495    17  reserved
    512   512  TDINFO_STRUCT    ATTRIBUTES 8 | XFAM 8 | MRTD 48 | MRCONFIGID 48 | MROWNER 48
                                | MROWNERCONFIG 48 | RTMR0..3 4x48 | SERVTD_HASH 48 (TDX 1.5)
                                | reserved 64

This module only parses: it checks the length, REPORTTYPE.TYPE (0x81, TDX) and SUBTYPE (0).
:meth:`TdReport.digests_match` compares the two SHA-384 digests in REPORTMACSTRUCT with the
structures they cover: a consistency check (a truncated copy or a driver bug fails it), not an
authentication. The MAC is never checked: its key never leaves the CPU, and only the TDX module
can check it (``TDG.MR.VERIFYREPORT``, which Linux does not offer to user space). A TDREPORT is
therefore evidence only for code inside the same TD that read it itself, never for a remote
party.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from attest.tee._reader import Reader
from foundation.errors import MalformedEvidence

__all__ = [
    "REPORTTYPE_SUBTYPE_TDREPORT0",
    "REPORTTYPE_TDX",
    "TDREPORT_SIZE",
    "TDREPORT_TDINFO_OFFSET",
    "TDREPORT_TEE_TCB_INFO_OFFSET",
    "TdReport",
    "parse_tdreport",
]

#: Size of TDREPORT_STRUCT (ABI spec 4.7.2; Linux ``TDX_REPORT_LEN``).
TDREPORT_SIZE = 1024
#: REPORTTYPE.TYPE of a TDX report (ABI spec 4.7.4; 0x00 is an SGX report).
REPORTTYPE_TDX = 0x81
#: REPORTTYPE.SUBTYPE of TDREPORT0, the only subtype (ABI spec 4.7.4; Linux ``TDX_CMD_GET_REPORT0``).
REPORTTYPE_SUBTYPE_TDREPORT0 = 0
#: Offset of TEE_TCB_INFO (239 bytes) after REPORTMACSTRUCT (ABI spec 4.7.2).
TDREPORT_TEE_TCB_INFO_OFFSET = 256
#: Offset of TDINFO_STRUCT (512 bytes) after TEE_TCB_INFO and 17 reserved bytes (ABI spec 4.7.2).
TDREPORT_TDINFO_OFFSET = 512
_TEE_TCB_INFO_SIZE = 239
_TDINFO_SIZE = 512
_WHAT = "TDX TDREPORT"


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReport:
    """A parsed TDREPORT_STRUCT; field names follow :class:`~attest.tee.tdx.quote.TdReportBody`.

    ``tee_tcb_svn2`` and ``servtd_hash`` are all zeros on TDX 1.0 modules (REPORTTYPE.VERSION 0).
    """

    raw: bytes
    report_type: int
    report_subtype: int
    report_version: int
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    tee_tcb_svn2: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    servtd_hash: bytes

    @property
    def tee_tcb_info(self) -> bytes:
        """The 239 TEE_TCB_INFO bytes that TEE_TCB_INFO_HASH covers."""
        start = TDREPORT_TEE_TCB_INFO_OFFSET
        return self.raw[start : start + _TEE_TCB_INFO_SIZE]

    @property
    def td_info(self) -> bytes:
        """The 512 TDINFO_STRUCT bytes that TEE_INFO_HASH covers."""
        return self.raw[TDREPORT_TDINFO_OFFSET : TDREPORT_TDINFO_OFFSET + _TDINFO_SIZE]

    def digests_match(self) -> bool:
        """Return whether TEE_TCB_INFO_HASH and TEE_INFO_HASH are the SHA-384 of what they cover.

        A consistency check only: anyone who can write the bytes can also fix the digests; only
        the MAC (not checked here) authenticates the report.
        """
        return (
            hashlib.sha384(self.tee_tcb_info).digest() == self.tee_tcb_info_hash
            and hashlib.sha384(self.td_info).digest() == self.tee_info_hash
        )


def parse_tdreport(data: bytes) -> TdReport:
    """Parse a 1024-byte TDREPORT_STRUCT (see the module docstring for the layout).

    Checks the length, REPORTTYPE.TYPE and SUBTYPE; checks neither the MAC nor the digests
    (:meth:`TdReport.digests_match`).

    Raises:
        MalformedEvidence: not exactly 1024 bytes, or not a TDX TDREPORT0.
    """
    if len(data) != TDREPORT_SIZE:
        raise MalformedEvidence(f"{_WHAT}: {len(data)} bytes, expected exactly {TDREPORT_SIZE}")
    raw = bytes(data)
    r = Reader(raw, _WHAT)
    # REPORTMACSTRUCT (ABI spec 4.7.3).
    report_type = r.u8("reportmacstruct.reporttype.type")
    report_subtype = r.u8("reportmacstruct.reporttype.subtype")
    report_version = r.u8("reportmacstruct.reporttype.version")
    if report_type != REPORTTYPE_TDX:
        raise MalformedEvidence(
            f"{_WHAT}: REPORTTYPE.TYPE is {report_type:#x}, not TDX ({REPORTTYPE_TDX:#x})"
        )
    if report_subtype != REPORTTYPE_SUBTYPE_TDREPORT0:
        raise MalformedEvidence(f"{_WHAT}: REPORTTYPE.SUBTYPE is {report_subtype}, not TDREPORT0 (0)")
    r.skip(1 + 12, "reportmacstruct.reserved1")
    cpu_svn = r.take(16, "reportmacstruct.cpusvn")
    tee_tcb_info_hash = r.take(48, "reportmacstruct.tee_tcb_info_hash")
    tee_info_hash = r.take(48, "reportmacstruct.tee_info_hash")
    report_data = r.take(64, "reportmacstruct.reportdata")
    r.skip(32, "reportmacstruct.reserved2")
    mac = r.take(32, "reportmacstruct.mac")
    # TEE_TCB_INFO at 256, then 17 reserved bytes (ABI spec 4.7.2).
    r.skip(8, "tee_tcb_info.valid")
    tee_tcb_svn = r.take(16, "tee_tcb_info.tee_tcb_svn")
    mr_seam = r.take(48, "tee_tcb_info.mrseam")
    mr_signer_seam = r.take(48, "tee_tcb_info.mrsignerseam")
    seam_attributes = r.take(8, "tee_tcb_info.attributes")
    tee_tcb_svn2 = r.take(16, "tee_tcb_info.tee_tcb_svn2")
    r.skip(95 + 17, "tee_tcb_info.reserved")
    # TDINFO_STRUCT at 512.
    td_attributes = r.take(8, "tdinfo.attributes")
    xfam = r.take(8, "tdinfo.xfam")
    mrtd = r.take(48, "tdinfo.mrtd")
    mr_config_id = r.take(48, "tdinfo.mrconfigid")
    mr_owner = r.take(48, "tdinfo.mrowner")
    mr_owner_config = r.take(48, "tdinfo.mrownerconfig")
    rtmrs = (
        r.take(48, "tdinfo.rtmr0"),
        r.take(48, "tdinfo.rtmr1"),
        r.take(48, "tdinfo.rtmr2"),
        r.take(48, "tdinfo.rtmr3"),
    )
    servtd_hash = r.take(48, "tdinfo.servtd_hash")
    r.skip(64, "tdinfo.reserved")
    return TdReport(
        raw=raw,
        report_type=report_type,
        report_subtype=report_subtype,
        report_version=report_version,
        cpu_svn=cpu_svn,
        tee_tcb_info_hash=tee_tcb_info_hash,
        tee_info_hash=tee_info_hash,
        report_data=report_data,
        mac=mac,
        tee_tcb_svn=tee_tcb_svn,
        mr_seam=mr_seam,
        mr_signer_seam=mr_signer_seam,
        seam_attributes=seam_attributes,
        tee_tcb_svn2=tee_tcb_svn2,
        td_attributes=td_attributes,
        xfam=xfam,
        mrtd=mrtd,
        mr_config_id=mr_config_id,
        mr_owner=mr_owner,
        mr_owner_config=mr_owner_config,
        rtmrs=rtmrs,
        servtd_hash=servtd_hash,
    )
