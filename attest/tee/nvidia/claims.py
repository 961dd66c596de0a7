"""Claims of verified NVIDIA GPU attestation reports, with nvtrust field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GpuClaims", "NvidiaClaims"]


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
