"""Reference values: what a verifier checks beyond signatures, chains and the binding.

kbs-dev's ``--reference-values`` JSON (docs/kbs.md) parses into :class:`ReferenceValues`, a pair
of :mod:`attest.verify.policy` objects (CPU and device) plus collateral. The workload policy of
both sides, which also pins the software, is :mod:`attest.verify.workload`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from attest.evidence import TeeKind
from attest.verify.policy import (
    AllOf,
    AllowedGpuVersions,
    AllowedSnpMeasurements,
    AllowedTdxMeasurements,
    AnyOf,
    Policy,
    RefuseInsecure,
)

__all__ = ["ReferenceValues"]


class _TdxValues(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mrtd: tuple[str, ...] | None = None
    rtmr0: tuple[str, ...] | None = None
    rtmr1: tuple[str, ...] | None = None
    rtmr2: tuple[str, ...] | None = None
    rtmr3: tuple[str, ...] | None = None
    mr_config_id: tuple[str, ...] | None = None


class _SnpValues(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    measurement: tuple[str, ...] | None = None
    host_data: tuple[str, ...] | None = None


class _NvidiaValues(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    driver_versions: tuple[str, ...] | None = None
    vbios_versions: tuple[str, ...] | None = None


class _ReferenceFile(BaseModel):
    """``--reference-values`` JSON: ``{"tdx": {...}, "snp": {...}, "nvidia": {...}}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tdx: _TdxValues | None = None
    snp: _SnpValues | None = None
    nvidia: _NvidiaValues | None = None
    sample_min_svn: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceValues:
    """What kbs-dev's attestation service checks beyond signatures and binding.

    ``cpu`` / ``device`` are :mod:`attest.verify.policy` objects (reference measurements, TCB,
    GPU versions); ``None`` means "verify signatures and binding only". ``collateral`` maps a
    TEE to its verification collateral (:class:`attest.verify.TdxCollateral`,
    :class:`attest.verify.SnpCollateral`).
    """

    cpu: Policy | None = None
    device: Policy | None = None
    collateral: Mapping[TeeKind, object] = field(default_factory=dict)
    sample_min_svn: int = 1

    @classmethod
    def from_json(cls, text: bytes | str) -> ReferenceValues:
        """Build reference values from kbs-dev's JSON file (docs/kbs.md).

        TDX and SNP values become one CPU policy (a TDX quote must match the TDX values, an
        SNP report the SNP values), always combined with :class:`attest.verify.RefuseInsecure`
        (no debug TDs/guests).

        Raises:
            ValueError: not JSON of that schema, or an empty section.
        """
        try:
            parsed = _ReferenceFile.model_validate_json(text)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) or "(document)" for e in exc.errors()})
            raise ValueError(f"invalid reference values: check {', '.join(fields)}") from None
        cpu: list[Policy] = []
        if parsed.tdx is not None:
            cpu.append(AllowedTdxMeasurements(**parsed.tdx.model_dump(exclude_none=True)))
        if parsed.snp is not None:
            cpu.append(AllowedSnpMeasurements(**parsed.snp.model_dump(exclude_none=True)))
        cpu_policy: Policy | None = None
        if cpu:
            cpu_policy = AllOf([RefuseInsecure(), cpu[0] if len(cpu) == 1 else AnyOf(cpu)])
        device_policy: Policy | None = None
        if parsed.nvidia is not None:
            device_policy = AllowedGpuVersions(**parsed.nvidia.model_dump(exclude_none=True))
        return cls(cpu=cpu_policy, device=device_policy, sample_min_svn=parsed.sample_min_svn)
