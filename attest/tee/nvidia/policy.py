"""The ``[gpu]`` section of the workload policy (pure): how many GPUs, which architecture and firmware.

Applied to every device's verified claims: NVIDIA GPUs (:class:`~attest.tee.nvidia.claims.NvidiaClaims`)
and insecure sample devices, which count as GPUs only under ``insecure_development`` and the
caller's flag. Recorded from them (``policy record``) and written for Trustee (``policy trustee``,
claim paths of trustee's local NVIDIA verifier, ``deps/verifier/src/nvidia/mod.rs``).
:data:`SECTION` is what the descriptor carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attest.tee.nvidia.claims import NvidiaClaims
from attest.tee.policyparts import (
    PolicyFileError,
    RuleCheck,
    TrusteeRules,
    check_int,
    check_strings,
    known,
    rego_set,
    set_field,
    toml_list,
    toml_list_text,
    toml_value,
)
from attest.tee.result import VerificationResult
from foundation.errors import PolicyViolation

__all__ = ["SAMPLE_DEVICE_VERSION", "SECTION", "GpuRules", "GpuSection"]

#: The driver and VBIOS version a policy recorded from sample devices pins. Their evidence
#: (Trustee's *sampledevice*: an SVN and the report data) claims neither; no real GPU reports this
#: value, so such a policy is complete (``driver`` and ``vbios`` are required when ``count`` > 0)
#: and refuses every real GPU. Sample devices themselves are never checked against these rules.
SAMPLE_DEVICE_VERSION = "sample"


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuRules:
    """``[gpu]``: how many GPUs, which architecture and firmware (checked when constructed)."""

    count: int
    arch: tuple[str, ...] | None = None
    driver: tuple[str, ...] | None = None
    vbios: tuple[str, ...] | None = None

    KEYS = ("count", "arch", "driver", "vbios")

    def __post_init__(self) -> None:
        """Check every ``[gpu]`` rule (architectures upper case, VBIOS versions lower case).

        Raises PolicyFileError.
        """
        if self.count is None:
            raise PolicyFileError("[gpu] count is required (the number of GPUs the enclave must attest)")
        count = check_int(self.count, "gpu", "count")
        arch = check_strings(self.arch, "gpu", "arch", required=False)
        driver = check_strings(self.driver, "gpu", "driver", required=count > 0)
        vbios = check_strings(self.vbios, "gpu", "vbios", required=count > 0)
        set_field(self, "arch", None if arch is None else tuple(a.upper() for a in arch))
        set_field(self, "driver", driver)
        set_field(self, "vbios", None if vbios is None else tuple(v.lower() for v in vbios))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> GpuRules:
        """Parse ``[gpu]``. Raises PolicyFileError."""
        known(obj, "gpu", cls.KEYS)
        return cls(
            count=toml_value(obj, "count"),
            arch=toml_list(obj, "arch"),
            driver=toml_list(obj, "driver"),
            vbios=toml_list(obj, "vbios"),
        )


def _check(r: GpuRules | None, devices: Sequence[VerificationResult], allow_insecure: bool) -> str:
    gpus = [g for d in devices if isinstance(d.claims, NvidiaClaims) for g in d.claims.gpus]
    samples = [d for d in devices if d.insecure]
    if r is None:
        if gpus or samples:
            found = len(gpus) + len(samples)
            raise PolicyViolation(f"the enclave attests {found} device(s) but the policy has no [gpu] rules")
        return "no GPUs, none expected"
    if samples and not allow_insecure:
        raise PolicyViolation("sample device evidence proves nothing (insecure_development and the flag)")
    if len(gpus) + len(samples) != r.count:
        raise PolicyViolation(
            f"the enclave attests {len(gpus) + len(samples)} GPU(s), the policy expects {r.count}"
        )
    for gpu in gpus:
        if r.arch is not None and gpu.arch.upper() not in r.arch:
            raise PolicyViolation(f"GPU {gpu.uuid} is {gpu.arch}, not one of {', '.join(r.arch)}")
        if r.driver is not None and gpu.driver_version not in r.driver:
            raise PolicyViolation(
                f"GPU {gpu.uuid} runs driver {gpu.driver_version}, not one of {', '.join(r.driver)}"
            )
        if r.vbios is not None and (gpu.vbios_version or "").lower() not in r.vbios:
            raise PolicyViolation(
                f"GPU {gpu.uuid} has VBIOS {gpu.vbios_version}, not one of {', '.join(r.vbios)}"
            )
    versions = sorted({f"{g.arch} driver {g.driver_version} VBIOS {g.vbios_version}" for g in gpus})
    return f"{r.count} GPU(s)" + (f": {'; '.join(versions)}" if versions else " (sample devices)")


def _trustee(g: GpuRules) -> TrusteeRules:
    out = TrusteeRules(claims_key="nvidia", prefix="gpu", count=g.count)
    both = "attestation policy default_gpu (ear.status) and resource policy, every gpuN"
    # The local verifier only verifies Hopper; its claims: arch, uuid, measurements, config.
    if g.arch is not None:
        out.add("gpu.arch", "hardware", f"upper(c.arch) in {rego_set(g.arch)}", where=f"{both}: nvidia.arch")
    if g.driver is not None:
        out.add("gpu.driver", "configuration", f"c.config.driver_version in {rego_set(g.driver)}",
                where=f"{both}: nvidia.config.driver_version")  # fmt: skip
    if g.vbios is not None:
        out.add("gpu.vbios", "configuration", f"lower(c.config.vbios_version) in {rego_set(g.vbios)}",
                where=f"{both}: nvidia.config.vbios_version")  # fmt: skip
    out.add("gpu.affirming", "hardware", "c.arch", where=f"{both}: ear.status == affirming")
    return out


class GpuSection:
    """The ``[gpu]`` section (:class:`attest.tee.base.PolicySection`)."""

    table = "gpu"
    rules_type = GpuRules

    def parse(self, table: Mapping[str, Any]) -> GpuRules:
        """Parse ``[gpu]``. Raises PolicyFileError."""
        return GpuRules.parse(table)

    def evaluate(
        self,
        rule: RuleCheck,
        rules: object | None,
        results: Sequence[VerificationResult],
        *,
        allow_insecure: bool,
    ) -> None:
        """Apply ``[gpu]`` (or, not given, "no devices") to every device's verified claims."""
        r = rules if isinstance(rules, GpuRules) else None
        rule("gpu", lambda: _check(r, results, allow_insecure))

    def explain(self, rules: object | None) -> list[str]:
        """Return ``[gpu]`` as one sentence."""
        if not isinstance(rules, GpuRules):
            return ["GPUs: none"]
        g = rules
        parts = [f"{g.count} GPU(s)"]
        if g.arch:
            parts.append(f"architecture {', '.join(g.arch)}")
        if g.driver:
            parts.append(f"driver {', '.join(g.driver)}")
        if g.vbios:
            parts.append(f"VBIOS {', '.join(g.vbios)}")
        return ["GPUs: " + "; ".join(parts)]

    def to_toml(self, rules: object) -> list[str]:
        """Return ``[gpu]`` as TOML lines."""
        assert isinstance(rules, GpuRules)
        out = ["[gpu]", f"count = {rules.count}"]
        for key in ("arch", "driver", "vbios"):
            value = getattr(rules, key)
            if value is not None:
                out.append(f"{key} = {toml_list_text(value)}")
        return out

    def record(self, results: Sequence[VerificationResult], notes: list[str]) -> GpuRules | None:
        """Pin the GPUs' count, architectures, drivers and VBIOS versions, from their claims.

        Sample devices claim no driver or VBIOS: they are pinned as :data:`SAMPLE_DEVICE_VERSION`,
        which keeps the recorded policy valid (``driver`` and ``vbios`` are required when
        ``count`` > 0) and refuses any real GPU.
        """
        gpus = [g for d in results if isinstance(d.claims, NvidiaClaims) for g in d.claims.gpus]
        samples = [d for d in results if d.insecure]
        if not gpus and not samples:
            return None
        driver = {g.driver_version or "" for g in gpus}
        vbios = {(g.vbios_version or "").lower() for g in gpus}
        if samples:
            driver.add(SAMPLE_DEVICE_VERSION)
            vbios.add(SAMPLE_DEVICE_VERSION)
            notes.append("INSECURE: GPUs recorded from sample devices, whose evidence proves nothing")
        return GpuRules(
            count=len(gpus) + len(samples),  # what the check counts
            arch=tuple(sorted({g.arch.upper() for g in gpus})) or None,
            driver=tuple(sorted(driver)),
            vbios=tuple(sorted(vbios)),
        )

    def trustee(self, rules: object) -> TrusteeRules:
        """Return ``[gpu]`` as Rego conditions over Trustee's local NVIDIA verifier's claims."""
        assert isinstance(rules, GpuRules)
        return _trustee(rules)


#: The ``[gpu]`` section, as the descriptor carries it.
SECTION = GpuSection()
