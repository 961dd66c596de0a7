"""What every TEE's workload-policy section shares (pure): checks, TOML values, rule wording.

A TEE's section of the workload policy (``[tdx]``, ``[snp]``, ``[gpu]``; ``docs/policy.md``)
lives in that TEE's folder (``attest/tee/<tee>/policy.py``) and is reached through its
descriptor (:attr:`attest.tee.base.TeeBackend.policy`). The sections and
:mod:`attest.verify.workload` build on the helpers here, so that a policy file and a policy built
in Python refuse the same things with the same :class:`PolicyFileError`, and every rule fails with
the same wording. The Trustee export's per-section parts (:class:`TrusteeRules`) and its
refusal (:class:`ExportRefused`) live here too, for the same reason.

Nothing here reads a file or verifies a signature: the constructors check values, the rule
helpers compare verified claims with allowed values and raise
:class:`~foundation.errors.PolicyViolation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foundation.errors import ConfigError, PolicyViolation

__all__ = [
    "REQUIRED",
    "ExportRefused",
    "PolicyFileError",
    "RuleCheck",
    "RulePlacement",
    "TrusteeRules",
    "bool_text",
    "check_bool",
    "check_bytes",
    "check_int",
    "check_strings",
    "flag_off",
    "hex_in",
    "known",
    "listed",
    "machine",
    "register",
    "rego_set",
    "set_field",
    "toml_given",
    "toml_hexes",
    "toml_list",
    "toml_list_text",
    "toml_value",
]

#: ``rule(name, check)``: apply one rule; ``check`` returns the detail or raises PolicyViolation.
RuleCheck = Callable[[str, Callable[[], str]], None]

REQUIRED = "is required (a partial policy refuses everything)"


class PolicyFileError(ConfigError, ValueError):
    """Not a valid, complete policy (a file or a policy built in Python); ``str()`` says what to fix."""


class ExportRefused(ConfigError, ValueError):
    """A rule the export cannot enforce in Trustee, or an allowed init-data the policy refuses.

    ``rule`` names the workload-policy rule (as :meth:`WorkloadPolicy.evaluate` does).
    """

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(f"{rule}: {reason}")
        self.rule = rule


@dataclass(frozen=True, slots=True)
class RulePlacement:
    """Where in Trustee one rule of the workload policy is enforced."""

    rule: str
    where: str


@dataclass
class TrusteeRules:
    """One section's Rego conditions per trust claim, over a claims object ``c``, and where each
    rule is enforced.

    ``claims_key`` is the key of the section's claims in Trustee's annotated evidence (``tdx``,
    ``snp``, ``nvidia``); ``prefix`` names the section's Rego functions (``tdx_hardware(c)``);
    ``count`` (device sections) is how many submodules of this kind the release requires.
    """

    claims_key: str
    prefix: str
    conditions: dict[str, list[str]] = field(default_factory=dict)
    placements: list[RulePlacement] = field(default_factory=list)
    count: int = 0

    def add(self, rule: str, claim: str, *conditions: str, where: str) -> None:
        """Enforce ``rule`` with ``conditions`` on the trust claim ``claim`` (placed ``where``)."""
        self.conditions.setdefault(claim, []).extend(conditions)
        self.placements.append(RulePlacement(rule, where))

    def place(self, rule: str, where: str) -> None:
        """Record where ``rule`` is enforced (or why nothing is) without a condition."""
        self.placements.append(RulePlacement(rule, where))


def rego_set(values: Iterable[object]) -> str:
    """Return ``values`` as a Rego set literal."""
    return "{" + ", ".join(json.dumps(v) for v in values) + "}"


# -- checks (constructors) ---------------------------------------------------------------------


def set_field(obj: object, name: str, value: object) -> None:
    """Store the checked (normalised) value of a field of a frozen dataclass in __post_init__."""
    object.__setattr__(obj, name, value)


def listed(value: object, where: str, key: str, what: str) -> tuple[Any, ...]:
    """Return ``value`` as a tuple. Raises PolicyFileError: not a non-empty list."""
    if not isinstance(value, tuple | list) or not value:
        raise PolicyFileError(f"[{where}] {key} must be a non-empty list of {what}")
    return tuple(value)


def check_strings(value: object, where: str, key: str, *, required: bool) -> tuple[str, ...] | None:
    """Check a list of non-empty strings (None: not given). Raises PolicyFileError."""
    if value is None:
        if required:
            raise PolicyFileError(f"[{where}] {key} {REQUIRED}")
        return None
    values = listed(value, where, key, "strings")
    if not all(isinstance(v, str) and v for v in values):
        raise PolicyFileError(f"[{where}] {key} must be a non-empty list of strings")
    return values


def check_bytes(
    value: object, where: str, key: str, size: int, *, required: bool
) -> tuple[bytes, ...] | None:
    """Check a list of ``size``-byte values (None: not given). Raises PolicyFileError."""
    if value is None:
        if required:
            raise PolicyFileError(f"[{where}] {key} {REQUIRED}")
        return None
    values = listed(value, where, key, f"{size}-byte values")
    for v in values:
        if not isinstance(v, bytes):
            raise PolicyFileError(f"[{where}] {key}: {v!r} is not bytes (a policy file gives it in hex)")
        if len(v) != size:
            raise PolicyFileError(f"[{where}] {key}: {v.hex()!r} is {len(v)} bytes, expected {size}")
    return values


def check_bool(value: object, where: str, key: str) -> bool:
    """Check a boolean. Raises PolicyFileError."""
    if not isinstance(value, bool):
        raise PolicyFileError(f"[{where}] {key} must be true or false")
    return value


def check_int(value: object, where: str, key: str) -> int:
    """Check a non-negative integer. Raises PolicyFileError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyFileError(f"[{where}] {key} must be a non-negative integer")
    return value


def known(obj: Mapping[str, Any], where: str, keys: Iterable[str]) -> None:
    """Refuse keys of ``obj`` not in ``keys``. Raises PolicyFileError."""
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise PolicyFileError(f"[{where}] has unknown key(s) {', '.join(unknown)} (typo?)")


# -- TOML values to Python values (no rules here) ----------------------------------------------


def toml_value(obj: Mapping[str, Any], key: str) -> Any:
    """Return the value of ``key``; None when not given (the constructor says it is required)."""
    return obj.get(key)


def toml_list(obj: Mapping[str, Any], key: str) -> Any:
    """Return the value of ``key``; a single string is a list of one."""
    value = obj.get(key)
    return [value] if isinstance(value, str) else value


def toml_hexes(obj: Mapping[str, Any], key: str, where: str) -> Any:
    """Return the list of hex strings under ``key`` as bytes. Raises PolicyFileError: not hex."""
    value = toml_list(obj, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value  # None (not given), or not a list: the constructor says what is wrong
    out = []
    for v in value:
        try:
            out.append(bytes.fromhex(v))
        except ValueError:
            raise PolicyFileError(f"[{where}] {key}: {v!r} is not hex") from None
    return out


def toml_given(obj: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Return the keys with a default that the file gives (the others keep their default)."""
    return {k: toml_list(obj, k) for k in keys if k in obj}


def toml_list_text(values: Iterable[str]) -> str:
    """Return ``values`` as a TOML list of strings."""
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def bool_text(value: bool) -> str:
    """Return ``value`` as TOML."""
    return "true" if value else "false"


# -- rules (claims against allowed values) -----------------------------------------------------


def hex_in(value: bytes, allowed: Sequence[bytes]) -> bool:
    """Return whether ``value`` is one of ``allowed``."""
    return any(value == a for a in allowed)


def register(name: str, value: bytes, allowed: Sequence[bytes]) -> str:
    """A measurement register is one of ``allowed``. Raises PolicyViolation."""
    if not hex_in(value, allowed):
        raise PolicyViolation(f"{name} {value.hex()} is not one of the {len(allowed)} allowed value(s)")
    return f"{name} {value.hex()[:16]}… matches"


def machine(name: str, value: bytes | None, allowed: Sequence[bytes]) -> str:
    """A machine identity (PPID, CHIP_ID) is one of ``allowed``. Raises PolicyViolation."""
    if value is None or not hex_in(value, allowed):
        shown = "unknown" if value is None else value.hex()
        raise PolicyViolation(f"{name} {shown} is not an allowed machine")
    return f"{name} {value.hex()[:16]}… is allowed"


def flag_off(problem: str, bit: int) -> str:
    """A flag that must be off is off. Raises PolicyViolation naming ``problem``."""
    if bit:
        raise PolicyViolation(problem)
    return "off"
