"""Claims of a verified TDX quote, with DCAP field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attest.tee.result import hexdict

__all__ = ["TCB_STATUS_UNKNOWN", "TdxClaims"]

#: TCB status of TDX evidence verified without collateral.
TCB_STATUS_UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxClaims:
    """Claims of a verified TDX quote."""

    quote_version: int
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    debug: bool
    tcb_status: str = TCB_STATUS_UNKNOWN
    advisory_ids: tuple[str, ...] = ()
    fmspc: str | None = None
    pck_ca: str | None = None
    #: The platform's PPID from the PCK certificate (encrypted by Intel's key on most platforms).
    ppid: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the claims with DCAP field names (``mrtd``, ``rtmr0``..``rtmr3``, ...)."""
        out: dict[str, Any] = {"quote_version": self.quote_version}
        out.update(
            hexdict(
                {
                    "tee_tcb_svn": self.tee_tcb_svn,
                    "mr_seam": self.mr_seam,
                    "mr_signer_seam": self.mr_signer_seam,
                    "td_attributes": self.td_attributes,
                    "xfam": self.xfam,
                    "mrtd": self.mrtd,
                    "mr_config_id": self.mr_config_id,
                    "mr_owner": self.mr_owner,
                    "mr_owner_config": self.mr_owner_config,
                    "rtmr0": self.rtmrs[0],
                    "rtmr1": self.rtmrs[1],
                    "rtmr2": self.rtmrs[2],
                    "rtmr3": self.rtmrs[3],
                    "report_data": self.report_data,
                }
            )
        )
        out.update(
            debug=self.debug,
            tcb_status=self.tcb_status,
            advisory_ids=list(self.advisory_ids),
            fmspc=self.fmspc,
            pck_ca=self.pck_ca,
            ppid=None if self.ppid is None else self.ppid.hex(),
        )
        return out
