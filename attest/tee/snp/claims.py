"""Claims of a verified SEV-SNP report, with SNP ABI field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attest.tee.result import hexdict
from attest.tee.snp.report import TcbVersion

__all__ = ["SnpClaims"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpClaims:
    """Claims of a verified SEV-SNP report (``reported_tcb`` is the TCB the VEK certifies)."""

    version: int
    guest_svn: int
    policy: int
    debug_allowed: bool
    vmpl: int
    product: str | None
    signing_key: str
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    chip_id: bytes
    platform_info: int
    current_tcb: TcbVersion
    reported_tcb: TcbVersion
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    firmware_version: str

    def to_json(self) -> dict[str, Any]:
        """Return the claims with SNP ABI field names (``measurement``, ``chip_id``, ...)."""
        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy,
            "debug_allowed": self.debug_allowed,
            "vmpl": self.vmpl,
            "product": self.product,
            "signing_key": self.signing_key,
            "platform_info": self.platform_info,
            "firmware_version": self.firmware_version,
        }
        out.update(
            hexdict(
                {
                    "report_data": self.report_data,
                    "measurement": self.measurement,
                    "host_data": self.host_data,
                    "id_key_digest": self.id_key_digest,
                    "author_key_digest": self.author_key_digest,
                    "chip_id": self.chip_id,
                }
            )
        )
        for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
            out[name] = getattr(self, name).to_sev_json()
        return out
