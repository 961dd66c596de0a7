"""The ``[tdx]`` section of the workload policy (pure): launch measurements, TCB and TD attributes.

Parsed from TOML, applied to verified :class:`~attest.tee.tdx.claims.TdxClaims`, recorded from
them (``policy record``) and written for Trustee (``policy trustee``, claim paths of trustee's
``deps/verifier/src/tdx/claims.rs``). :data:`SECTION` is what the descriptor carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attest.tee.policyparts import (
    PolicyFileError,
    RuleCheck,
    TrusteeRules,
    bool_text,
    check_bool,
    check_bytes,
    check_strings,
    flag_off,
    known,
    machine,
    register,
    rego_set,
    set_field,
    toml_given,
    toml_hexes,
    toml_list_text,
)
from attest.tee.result import VerificationResult
from attest.tee.tdx.claims import TCB_STATUS_UNKNOWN, TdxClaims
from foundation.errors import PolicyViolation

__all__ = [
    "SECTION",
    "TCB_STATUSES",
    "TDX_ATTR_DEBUG",
    "TDX_ATTR_MIGRATABLE",
    "TDX_ATTR_SEPT_VE_DISABLE",
    "TdxRules",
    "TdxSection",
]

# TDX module ABI, TDINFO.ATTRIBUTES (Intel TDX Module Base Spec, "TD Attributes").
TDX_ATTR_DEBUG = 1 << 0
TDX_ATTR_SEPT_VE_DISABLE = 1 << 28
TDX_ATTR_MIGRATABLE = 1 << 29

#: The TCB statuses of Intel's PCS (and "unknown": no DCAP collateral was given).
TCB_STATUSES = frozenset({
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", TCB_STATUS_UNKNOWN,
})  # fmt: skip

# TDX ATTRIBUTES.MIGRATABLE (bit 29) lives in byte 3 of the little-endian hex claim
# quote.body.td_attributes, as bit 1 of that byte's high nibble (hex character 6): the nibbles
# with that bit clear. Trustee's td_attributes object has no migratable flag.
_MIGRATABLE_CHAR = 6
_NOT_MIGRATABLE_NIBBLES = ("0", "1", "4", "5", "8", "9", "c", "d")
assert TDX_ATTR_MIGRATABLE == 1 << (8 * 3 + 4 + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxRules:
    """``[tdx]``: launch measurements, TCB and TD attributes (checked when constructed)."""

    mrtd: tuple[bytes, ...]
    rtmr: tuple[tuple[bytes, ...] | None, ...]  # rtmr0..rtmr3, None = not pinned
    tcb_status: tuple[str, ...] = ("UpToDate",)
    require_collateral: bool = True
    allow_migratable: bool = False
    require_sept_ve_disable: bool = True
    ppid: tuple[bytes, ...] | None = None

    KEYS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "tcb_status", "require_collateral",
            "allow_migratable", "require_sept_ve_disable", "ppid")  # fmt: skip

    def __post_init__(self) -> None:
        """Check every ``[tdx]`` rule. Raises PolicyFileError."""
        statuses = check_strings(self.tcb_status, "tdx", "tcb_status", required=True)
        assert statuses is not None
        bad = sorted(set(statuses) - TCB_STATUSES)
        if bad:
            raise PolicyFileError(f"[tdx] tcb_status: unknown status(es) {', '.join(bad)}")
        set_field(self, "tcb_status", statuses)
        set_field(self, "mrtd", check_bytes(self.mrtd, "tdx", "mrtd", 48, required=True))
        if not isinstance(self.rtmr, tuple | list) or len(self.rtmr) != 4:
            raise PolicyFileError("[tdx] rtmr must hold rtmr0, rtmr1, rtmr2 and rtmr3 (None: not pinned)")
        rtmr = tuple(check_bytes(v, "tdx", f"rtmr{i}", 48, required=i < 3) for i, v in enumerate(self.rtmr))
        set_field(self, "rtmr", rtmr)
        for key in ("require_collateral", "allow_migratable", "require_sept_ve_disable"):
            check_bool(getattr(self, key), "tdx", key)
        set_field(self, "ppid", check_bytes(self.ppid, "tdx", "ppid", 16, required=False))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> TdxRules:
        """Parse ``[tdx]``. Raises PolicyFileError."""
        known(obj, "tdx", cls.KEYS)
        return cls(
            mrtd=toml_hexes(obj, "mrtd", "tdx"),
            rtmr=tuple(toml_hexes(obj, f"rtmr{i}", "tdx") for i in range(4)),
            ppid=toml_hexes(obj, "ppid", "tdx"),
            **toml_given(
                obj, ("tcb_status", "require_collateral", "allow_migratable", "require_sept_ve_disable")
            ),
        )


def _evaluate(rule: RuleCheck, c: TdxClaims, r: TdxRules) -> None:
    attributes = int.from_bytes(c.td_attributes, "little")
    rule("tdx.mrtd", lambda: register("MRTD", c.mrtd, r.mrtd))
    for i, allowed in enumerate(r.rtmr):
        if allowed is not None:
            rule(f"tdx.rtmr{i}", lambda i=i, allowed=allowed: register(f"RTMR{i}", c.rtmrs[i], allowed))  # type: ignore[misc]

    def tcb() -> str:
        if c.tcb_status not in r.tcb_status:
            hint = (
                " (no DCAP collateral was given, so the TCB was not checked)"
                if c.tcb_status == TCB_STATUS_UNKNOWN
                else ""
            )
            raise PolicyViolation(
                f"TCB status {c.tcb_status} is not allowed (allowed: {', '.join(r.tcb_status)}){hint}"
            )
        advisories = f", advisories {', '.join(c.advisory_ids)}" if c.advisory_ids else ""
        return f"TCB status {c.tcb_status}{advisories}"

    def collateral() -> str:
        if r.require_collateral and c.tcb_status == TCB_STATUS_UNKNOWN:
            raise PolicyViolation(
                "DCAP collateral is required (revocation and TCB level are unchecked without it); "
                "pass --collateral tdx=FILE or set require_collateral = false"
            )
        return "TCB verified with DCAP collateral" if c.tcb_status != TCB_STATUS_UNKNOWN else "not required"

    rule("tdx.tcb_status", tcb)
    rule("tdx.collateral", collateral)
    rule(
        "tdx.debug",
        lambda: flag_off("the TD is debuggable (ATTRIBUTES.DEBUG)", attributes & TDX_ATTR_DEBUG),
    )

    def migratable() -> str:
        if attributes & TDX_ATTR_MIGRATABLE and not r.allow_migratable:
            raise PolicyViolation(
                "the TD is migratable (ATTRIBUTES.MIGRATABLE); set allow_migratable = true to accept"
            )
        return "not migratable" if not attributes & TDX_ATTR_MIGRATABLE else "migratable (allowed)"

    def sept() -> str:
        if r.require_sept_ve_disable and not attributes & TDX_ATTR_SEPT_VE_DISABLE:
            raise PolicyViolation(
                "the TD does not set ATTRIBUTES.SEPT_VE_DISABLE (EPT-violation #VE can be injected)"
            )
        return "SEPT_VE_DISABLE set" if attributes & TDX_ATTR_SEPT_VE_DISABLE else "not required"

    rule("tdx.migratable", migratable)
    rule("tdx.sept_ve_disable", sept)
    if r.ppid is not None:
        ppid = r.ppid
        rule("tdx.ppid", lambda: machine("PPID", c.ppid, ppid))


def _trustee(t: TdxRules) -> TrusteeRules:
    out = TrusteeRules(claims_key="tdx", prefix="tdx")
    both = "attestation policy default_cpu (ear.status) and resource policy"
    out.add("tdx.mrtd", "hardware", f"c.quote.body.mr_td in {rego_set(v.hex() for v in t.mrtd)}",
            where=f"{both}: tdx.quote.body.mr_td")  # fmt: skip
    for i, values in enumerate(t.rtmr):
        if values is not None:
            allowed = rego_set(v.hex() for v in values)
            out.add(f"tdx.rtmr{i}", "executables", f"c.quote.body.rtmr_{i} in {allowed}",
                    where=f"{both}: tdx.quote.body.rtmr_{i}")  # fmt: skip
    out.add("tdx.tcb_status", "hardware", f"c.tcb_status in {rego_set(t.tcb_status)}",
            where=f"{both}: tdx.tcb_status (DCAP)")  # fmt: skip
    if t.require_collateral:
        out.add("tdx.collateral", "hardware", 'c.collateral_expiration_status == "0"',
                where=f"{both}: tdx.collateral_expiration_status")  # fmt: skip
    else:
        out.place("tdx.collateral", "not required (Trustee always uses collateral)")
    out.add("tdx.debug", "configuration", "c.td_attributes.debug == false",
            where=f"{both}: tdx.td_attributes.debug")  # fmt: skip
    if not t.allow_migratable:
        nibble = f"substring(c.quote.body.td_attributes, {_MIGRATABLE_CHAR}, 1)"
        out.add("tdx.migratable", "configuration", f"{nibble} in {rego_set(_NOT_MIGRATABLE_NIBBLES)}",
                where=f"{both}: bit 29 of tdx.quote.body.td_attributes")  # fmt: skip
    else:
        out.place("tdx.migratable", "allowed: nothing to enforce")
    if t.require_sept_ve_disable:
        out.add("tdx.sept_ve_disable", "configuration", "c.td_attributes.septve_disable == true",
                where=f"{both}: tdx.td_attributes.septve_disable")  # fmt: skip
    else:
        out.place("tdx.sept_ve_disable", "not required: nothing to enforce")
    if t.ppid is not None:
        out.add("tdx.ppid", "hardware", f"c.platform_provider_id in {rego_set(v.hex() for v in t.ppid)}",
                where=f"{both}: tdx.platform_provider_id (the PCK PPID)")  # fmt: skip
    return out


class TdxSection:
    """The ``[tdx]`` section (:class:`attest.tee.base.PolicySection`)."""

    table = "tdx"
    rules_type = TdxRules

    def parse(self, table: Mapping[str, Any]) -> TdxRules:
        """Parse ``[tdx]``. Raises PolicyFileError."""
        return TdxRules.parse(table)

    def evaluate(
        self,
        rule: RuleCheck,
        rules: object | None,
        results: Sequence[VerificationResult],
        *,
        allow_insecure: bool,
    ) -> None:
        """Apply ``[tdx]`` to the TD's verified claims."""
        for result in results:
            if isinstance(result.claims, TdxClaims) and isinstance(rules, TdxRules):
                _evaluate(rule, result.claims, rules)

    def explain(self, rules: object | None) -> list[str]:
        """Return ``[tdx]`` as sentences."""
        if not isinstance(rules, TdxRules):
            return []
        t = rules
        lines = [f"TDX MRTD: one of {len(t.mrtd)} value(s); RTMRs pinned: "
                 + ", ".join(f"rtmr{i}" for i, v in enumerate(t.rtmr) if v is not None)]  # fmt: skip
        lines.append(f"TDX TCB status: {', '.join(t.tcb_status)}; collateral "
                     + ("required" if t.require_collateral else "optional"))  # fmt: skip
        migration = "migratable allowed" if t.allow_migratable else "not migratable"
        sept = "required" if t.require_sept_ve_disable else "optional"
        lines.append(f"TDX attributes: not debuggable; {migration}; SEPT_VE_DISABLE {sept}")
        if t.ppid is not None:
            lines.append(f"TDX machines (PPID): {len(t.ppid)} allowed")
        return lines

    def to_toml(self, rules: object) -> list[str]:
        """Return ``[tdx]`` as TOML lines."""
        assert isinstance(rules, TdxRules)
        t = rules
        out = ["[tdx]", f"mrtd = {toml_list_text(v.hex() for v in t.mrtd)}"]
        out += [
            f"rtmr{i} = {toml_list_text(v.hex() for v in vals)}"
            for i, vals in enumerate(t.rtmr)
            if vals is not None
        ]
        out.append(f"tcb_status = {toml_list_text(t.tcb_status)}")
        out.append(f"require_collateral = {bool_text(t.require_collateral)}")
        out.append(f"allow_migratable = {bool_text(t.allow_migratable)}")
        out.append(f"require_sept_ve_disable = {bool_text(t.require_sept_ve_disable)}")
        if t.ppid is not None:
            out.append(f"ppid = {toml_list_text(v.hex() for v in t.ppid)}")
        return out

    def record(self, results: Sequence[VerificationResult], notes: list[str]) -> TdxRules | None:
        """Pin the TD's MRTD and RTMR0-2 (RTMR3 changes at run time), with the secure defaults."""
        for result in results:
            c = result.claims
            if not isinstance(c, TdxClaims):
                continue
            notes.append("RTMR3 is not pinned: CoCo extends it at run time (init-data, containers)")
            if c.tcb_status != "UpToDate":
                notes.append(
                    f"the TCB status seen was {c.tcb_status}; the policy requires UpToDate verified with "
                    "DCAP collateral (give --collateral tdx=FILE when verifying)"
                )
            return TdxRules(mrtd=(c.mrtd,), rtmr=((c.rtmrs[0],), (c.rtmrs[1],), (c.rtmrs[2],), None))
        return None

    def trustee(self, rules: object) -> TrusteeRules:
        """Return ``[tdx]`` as Rego conditions over Trustee's TDX claims."""
        assert isinstance(rules, TdxRules)
        return _trustee(rules)


#: The ``[tdx]`` section, as the descriptor carries it.
SECTION = TdxSection()
