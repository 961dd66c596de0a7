"""The ``[snp]`` section of the workload policy (pure): launch measurement, TCB floor, guest policy.

Parsed from TOML, applied to verified :class:`~attest.tee.snp.claims.SnpClaims`, recorded from
them (``policy record``) and written for Trustee (``policy trustee``, claim paths of trustee's
``deps/verifier/src/snp/mod.rs`` ``parse_tee_evidence``). :data:`SECTION` is what the descriptor
carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attest.tee.policyparts import (
    ExportRefused,
    PolicyFileError,
    RuleCheck,
    TrusteeRules,
    bool_text,
    check_bool,
    check_bytes,
    check_int,
    flag_off,
    known,
    machine,
    register,
    rego_set,
    set_field,
    toml_given,
    toml_hexes,
    toml_list_text,
    toml_value,
)
from attest.tee.result import VerificationResult
from attest.tee.snp.claims import SnpClaims
from foundation.errors import PolicyViolation

__all__ = ["SECTION", "SNP_POLICY_DEBUG", "SNP_POLICY_MIGRATE_MA", "SNP_POLICY_SMT", "SnpRules", "SnpSection"]

# SEV-SNP ABI spec, Table 9 "Guest Policy Structure".
SNP_POLICY_SMT = 1 << 16
SNP_POLICY_MIGRATE_MA = 1 << 18
SNP_POLICY_DEBUG = 1 << 19


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpRules:
    """``[snp]``: launch measurement, TCB floor, guest policy and VMPL (checked when constructed)."""

    measurement: tuple[bytes, ...]
    min_tcb: Mapping[str, int]
    vmpl: int = 0
    allow_migration: bool = False
    allow_smt: bool = True
    chip_id: tuple[bytes, ...] | None = None

    KEYS = ("measurement", "min_tcb", "vmpl", "allow_migration", "allow_smt", "chip_id")
    TCB_KEYS = ("bootloader", "tee", "snp", "microcode", "fmc")

    def __post_init__(self) -> None:
        """Check every ``[snp]`` rule. Raises PolicyFileError."""
        set_field(self, "measurement", check_bytes(self.measurement, "snp", "measurement", 48, required=True))
        tcb = self.min_tcb
        if not isinstance(tcb, Mapping):
            raise PolicyFileError(
                "[snp] min_tcb is required, e.g. {bootloader = 10, tee = 0, snp = 23, microcode = 213}"
            )
        known(tcb, "snp.min_tcb", self.TCB_KEYS)
        if not {"bootloader", "tee", "snp", "microcode"} <= set(tcb):
            raise PolicyFileError("[snp] min_tcb needs bootloader, tee, snp and microcode")
        set_field(self, "min_tcb", {k: check_int(v, "snp.min_tcb", k) for k, v in tcb.items()})
        check_int(self.vmpl, "snp", "vmpl")
        for key in ("allow_migration", "allow_smt"):
            check_bool(getattr(self, key), "snp", key)
        set_field(self, "chip_id", check_bytes(self.chip_id, "snp", "chip_id", 64, required=False))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> SnpRules:
        """Parse ``[snp]``. Raises PolicyFileError."""
        known(obj, "snp", cls.KEYS)
        return cls(
            measurement=toml_hexes(obj, "measurement", "snp"),
            min_tcb=toml_value(obj, "min_tcb"),
            chip_id=toml_hexes(obj, "chip_id", "snp"),
            **toml_given(obj, ("vmpl", "allow_migration", "allow_smt")),
        )


def _evaluate(rule: RuleCheck, c: SnpClaims, r: SnpRules) -> None:
    rule("snp.measurement", lambda: register("MEASUREMENT", c.measurement, r.measurement))

    def tcb() -> str:
        low = []
        for name, floor in r.min_tcb.items():
            value = getattr(c.reported_tcb, name)
            if value is None or value < floor:
                low.append(f"{name} {value} < {floor}")
        if low:
            raise PolicyViolation(f"reported TCB below the floor: {', '.join(low)}")
        return "reported TCB " + ", ".join(f"{k} {getattr(c.reported_tcb, k)}" for k in r.min_tcb)

    rule("snp.min_tcb", tcb)
    rule("snp.debug", lambda: flag_off("the guest policy allows debugging", c.policy & SNP_POLICY_DEBUG))

    def migration() -> str:
        if c.policy & SNP_POLICY_MIGRATE_MA and not r.allow_migration:
            raise PolicyViolation("the guest policy allows a migration agent (MIGRATE_MA)")
        return "no migration agent"

    def smt() -> str:
        if c.policy & SNP_POLICY_SMT and not r.allow_smt:
            raise PolicyViolation("the guest policy allows SMT")
        return "SMT " + ("allowed" if c.policy & SNP_POLICY_SMT else "off")

    def vmpl() -> str:
        if c.vmpl != r.vmpl:
            raise PolicyViolation(f"the report comes from VMPL {c.vmpl}, not {r.vmpl}")
        return f"VMPL {c.vmpl}"

    rule("snp.migration", migration)
    rule("snp.smt", smt)
    rule("snp.vmpl", vmpl)
    if r.chip_id is not None:
        chip = r.chip_id
        rule("snp.chip_id", lambda: machine("CHIP_ID", c.chip_id, chip))


def _trustee(s: SnpRules) -> TrusteeRules:
    out = TrusteeRules(claims_key="snp", prefix="snp")
    both = "attestation policy default_cpu (ear.status) and resource policy"
    if "fmc" in s.min_tcb:
        raise ExportRefused(
            "snp.min_tcb",
            "Trustee's SNP claims carry no FMC SPL (reported_tcb_bootloader, _tee, _snp and _microcode "
            "only; deps/verifier/src/snp/mod.rs parse_tee_evidence), so the fmc floor cannot be "
            "enforced: remove fmc from min_tcb, or release with kbs-dev",
        )
    if s.vmpl != 0:
        raise ExportRefused(
            "snp.vmpl",
            f"Trustee's SNP verifier refuses every report not from VMPL 0, so vmpl = {s.vmpl} would "
            "never be released to",
        )
    out.add("snp.measurement", "executables", f"c.measurement in {rego_set(v.hex() for v in s.measurement)}",
            where=f"{both}: snp.measurement")  # fmt: skip
    out.add("snp.min_tcb", "hardware",
            *(f"c.reported_tcb_{k} >= {v}" for k, v in s.min_tcb.items()),
            where=f"{both}: snp.reported_tcb_*")  # fmt: skip
    out.add("snp.debug", "configuration", "c.policy_debug_allowed == false",
            where=f"{both}: snp.policy_debug_allowed")  # fmt: skip
    if not s.allow_migration:
        out.add("snp.migration", "configuration", "c.policy_migrate_ma == false",
                where=f"{both}: snp.policy_migrate_ma")  # fmt: skip
    else:
        out.place("snp.migration", "allowed: nothing to enforce")
    if not s.allow_smt:
        out.add("snp.smt", "configuration", "c.policy_smt_allowed == false",
                where=f"{both}: snp.policy_smt_allowed")  # fmt: skip
    else:
        out.place("snp.smt", "allowed: nothing to enforce")
    out.place("snp.vmpl", "Trustee's SNP verifier (refuses VMPL != 0)")
    if s.chip_id is not None:
        out.add("snp.chip_id", "hardware", f"c.chip_id in {rego_set(v.hex() for v in s.chip_id)}",
                where=f"{both}: snp.chip_id")  # fmt: skip
    return out


class SnpSection:
    """The ``[snp]`` section (:class:`attest.tee.base.PolicySection`)."""

    table = "snp"
    rules_type = SnpRules

    def parse(self, table: Mapping[str, Any]) -> SnpRules:
        """Parse ``[snp]``. Raises PolicyFileError."""
        return SnpRules.parse(table)

    def evaluate(
        self,
        rule: RuleCheck,
        rules: object | None,
        results: Sequence[VerificationResult],
        *,
        allow_insecure: bool,
    ) -> None:
        """Apply ``[snp]`` to the guest's verified claims."""
        for result in results:
            if isinstance(result.claims, SnpClaims) and isinstance(rules, SnpRules):
                _evaluate(rule, result.claims, rules)

    def explain(self, rules: object | None) -> list[str]:
        """Return ``[snp]`` as sentences."""
        if not isinstance(rules, SnpRules):
            return []
        s = rules
        lines = [f"SNP MEASUREMENT: one of {len(s.measurement)} value(s)"]
        lines.append("SNP minimum reported TCB: " + ", ".join(f"{k} {v}" for k, v in s.min_tcb.items()))
        agent = "migration agent allowed" if s.allow_migration else "no migration agent"
        lines.append(f"SNP guest: not debuggable; VMPL {s.vmpl}; {agent}")
        if s.chip_id is not None:
            lines.append(f"SNP machines (CHIP_ID): {len(s.chip_id)} allowed")
        return lines

    def to_toml(self, rules: object) -> list[str]:
        """Return ``[snp]`` as TOML lines."""
        assert isinstance(rules, SnpRules)
        s = rules
        out = ["[snp]", f"measurement = {toml_list_text(v.hex() for v in s.measurement)}"]
        out.append("min_tcb = { " + ", ".join(f"{k} = {v}" for k, v in s.min_tcb.items()) + " }")
        out.append(f"vmpl = {s.vmpl}")
        out.append(f"allow_migration = {bool_text(s.allow_migration)}")
        out.append(f"allow_smt = {bool_text(s.allow_smt)}")
        if s.chip_id is not None:
            out.append(f"chip_id = {toml_list_text(v.hex() for v in s.chip_id)}")
        return out

    def record(self, results: Sequence[VerificationResult], notes: list[str]) -> SnpRules | None:
        """Pin the guest's MEASUREMENT and VMPL, with the observed reported TCB as the floor."""
        for result in results:
            c = result.claims
            if not isinstance(c, SnpClaims):
                continue
            t = c.reported_tcb
            floors = {"bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode}
            if t.fmc is not None:
                floors["fmc"] = t.fmc
            return SnpRules(measurement=(c.measurement,), min_tcb=floors, vmpl=c.vmpl)
        return None

    def trustee(self, rules: object) -> TrusteeRules:
        """Return ``[snp]`` as Rego conditions over Trustee's SNP claims. Raises ExportRefused."""
        assert isinstance(rules, SnpRules)
        return _trustee(rules)


#: The ``[snp]`` section, as the descriptor carries it.
SECTION = SnpSection()
