"""The dev KBS's resource policy: a small typed JSON document instead of Trustee's rego.

Trustee evaluates ``data.policy.allow`` in a rego policy with the token claims as ``input`` and
``{"plugin", "resource-path", "query"}`` as ``data``. kbs-dev takes an ordered list of rules::

    {"version": 1,
     "rules": [
       {"resource": "models/llama-3/*",           # glob per segment: repository/type/tag
        "tees": ["tdx", "snp"],                     # primary TEEs allowed ([] = any)
        "require_devices": ["nvidia"],              # device TEEs that must have been attested
        "allow_sample": false}                       # sample / sampledevice evidence
     ]}

It says *who may ask* for a resource, never *what must run*: measurements, TCB floors, GPUs,
init-data and software are pinned by one vocabulary, the workload policy
(``--resource-policy``, :mod:`attest.verify.workload`); a rule that tries (``claims``, as
earlier versions had) is refused.

The first rule whose ``resource`` matches decides: every condition must hold or the request is
refused with the failed condition as the reason. No matching rule, or no rules at all, refuses
(an empty policy never passes). Sample evidence is refused unless the rule allows it *and* the
KBS was started with ``--allow-insecure-sample-evidence``, whatever the rule says.

docs/kbs.md shows the rego equivalent of each condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from attest.kbs.token import TokenClaims
from attest.tee import insecure_kinds

__all__ = ["INSECURE_TEES", "PolicyDenied", "PolicyRule", "ResourcePolicy"]

#: TEEs whose evidence proves nothing (``kbs-types`` ``Sample``/``SampleDevice``; the registry's
#: insecure backends).
INSECURE_TEES = frozenset(kind.value for kind in insecure_kinds())


class PolicyDenied(Exception):
    """The policy refuses the request; ``str()`` is the reason, safe to show the client."""


class PolicyRule(BaseModel):
    """One rule: which resources it covers and what their release requires."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resource: str = "*/*/*"
    tees: tuple[str, ...] = ()
    require_devices: tuple[str, ...] = ()
    allow_sample: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_measurement_pins(cls, value: object) -> object:
        if isinstance(value, dict) and "claims" in value:
            raise ValueError(
                "'claims' would pin measurements in a second vocabulary: pin them in a workload policy "
                "(kbs-dev --resource-policy REPO/TYPE/TAG=policy.toml, docs/policy.md)"
            )
        return value

    @field_validator("resource")
    @classmethod
    def _three_segments(cls, value: str) -> str:
        if value != "*" and len(value.split("/")) != 3:
            raise ValueError("resource must be a repository/type/tag glob (or '*')")
        return value

    def matches(self, path: str) -> bool:
        """Return whether this rule covers resource ``path`` (``repository/type/tag``)."""
        if self.resource == "*":
            return True
        return all(
            fnmatchcase(seg, pat) for seg, pat in zip(path.split("/"), self.resource.split("/"), strict=False)
        )

    def check(self, path: str, claims: TokenClaims, *, sample_permitted: bool) -> None:
        """Raise :class:`PolicyDenied` unless ``claims`` satisfy this rule for ``path``."""
        cpu = claims.submods.get("cpu0")
        if cpu is None or not cpu.tees:
            raise PolicyDenied("the token carries no primary (cpu0) TEE claims")
        attested = {tee for sub in claims.submods.values() for tee in sub.tees}
        insecure = sorted(attested & INSECURE_TEES)
        if insecure:
            if not sample_permitted:
                raise PolicyDenied(
                    f"{'/'.join(insecure)} evidence is refused: this KBS was not started with "
                    "--allow-insecure-sample-evidence"
                )
            if not self.allow_sample:
                raise PolicyDenied(f"the rule for {self.resource} does not allow sample evidence")
        primary = cpu.tees[0]
        if self.tees and primary not in self.tees:
            raise PolicyDenied(f"primary TEE {primary} is not one of {', '.join(self.tees)}")
        devices = {tee for name, sub in claims.submods.items() if name != "cpu0" for tee in sub.tees}
        missing = [d for d in self.require_devices if d not in devices]
        if missing:
            raise PolicyDenied(f"required device evidence missing: {', '.join(missing)}")


class ResourcePolicy(BaseModel):
    """An ordered list of :class:`PolicyRule`; the first rule matching a path decides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    rules: tuple[PolicyRule, ...] = ()

    @classmethod
    def allow_all_attested(cls, *, allow_sample: bool = False) -> ResourcePolicy:
        """Return the policy releasing every resource to any attested TEE.

        With ``allow_sample=False`` it is Trustee's ``default.rego``; with ``True`` it is
        ``allow_all.rego`` (sample evidence still needs the KBS's insecure flag).
        """
        return cls(rules=(PolicyRule(resource="*", allow_sample=allow_sample),))

    @classmethod
    def from_json(cls, text: bytes | str) -> ResourcePolicy:
        """Parse a policy document.

        Raises:
            ValueError: not JSON of this schema (the message names the offending fields).
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) or "(document)" for e in exc.errors()})
            why = [
                str(e["ctx"]["error"])
                for e in exc.errors()
                if "claims" in str(e.get("ctx", {}).get("error", ""))
            ]
            raise ValueError(
                "not a kbs-dev JSON resource policy (see docs/kbs.md; rego is not supported): "
                f"check {', '.join(fields)}" + (f" ({why[0]})" if why else "")
            ) from None

    def to_json_text(self) -> str:
        """Return the policy as JSON text."""
        return self.model_dump_json(indent=2)

    def evaluate(self, path: str, claims: TokenClaims, *, sample_permitted: bool) -> None:
        """Allow ``path`` for ``claims`` or raise :class:`PolicyDenied` with the reason.

        Verified: the rule conditions above against the (already verified) token claims. Not
        verified: the token itself; the caller checks it before.
        """
        rule = self.first_match(path, self.rules)
        if rule is None:
            raise PolicyDenied(f"no rule of the resource policy covers {path}")
        rule.check(path, claims, sample_permitted=sample_permitted)

    @staticmethod
    def first_match(path: str, rules: Sequence[PolicyRule]) -> PolicyRule | None:
        """Return the first rule covering ``path``, if any."""
        return next((rule for rule in rules if rule.matches(path)), None)
