"""Typed claims per TEE, as extracted from *verified* evidence, with JSON using spec field names.

Claims are only as trustworthy as the steps of the :class:`~attest.verify.result.VerificationResult`
that carries them: a claim whose check was skipped (e.g. ``tcb_status == "unknown"`` without
collateral) must be judged by a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attest.formats.snp_report import TcbVersion
from attest.verify.result import hexdict

__all__ = [
    "TCB_STATUS_UNKNOWN",
    "GpuClaims",
    "NvidiaClaims",
    "SampleClaims",
    "SnpClaims",
    "TdxClaims",
]

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


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuClaims:
    """Claims of one verified GPU attestation report."""

    uuid: str
    arch: str
    nonce: bytes
    driver_version: str | None
    vbios_version: str | None
    project: str | None
    project_sku: str | None
    chip_sku: str | None
    fwid: bytes | None
    feature_flag: str | None
    measurements: tuple[tuple[int, bytes], ...]
    leaf_subject: str

    def to_json(self) -> dict[str, Any]:
        """Return the claims with nvtrust field names (``driver_version``, ``vbios_version``, ...)."""
        return {
            "uuid": self.uuid,
            "arch": self.arch,
            "nonce": self.nonce.hex(),
            "driver_version": self.driver_version,
            "vbios_version": self.vbios_version,
            "project": self.project,
            "project_sku": self.project_sku,
            "chip_sku": self.chip_sku,
            "fwid": None if self.fwid is None else self.fwid.hex(),
            "feature_flag": self.feature_flag,
            "measurements": {str(i): v.hex() for i, v in self.measurements},
            "leaf_subject": self.leaf_subject,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaClaims:
    """Claims of every GPU in one NVIDIA evidence object."""

    gpus: tuple[GpuClaims, ...]

    def to_json(self) -> dict[str, Any]:
        """Return ``{"gpus": [...]}``."""
        return {"gpus": [g.to_json() for g in self.gpus]}


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleClaims:
    """Claims of sample / sampledevice evidence. They prove nothing."""

    svn: int
    report_data: bytes
    init_data: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Return ``{"svn", "report_data", "init_data"}``."""
        return {
            "svn": self.svn,
            "report_data": self.report_data.hex(),
            "init_data": None if self.init_data is None else self.init_data.hex(),
        }
