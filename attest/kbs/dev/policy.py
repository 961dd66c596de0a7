"""The dev KBS's resource policy: a small typed JSON document instead of Trustee's rego.

Trustee evaluates ``data.policy.allow`` in a rego policy with the token claims as ``input`` and
``{"plugin", "resource-path", "query"}`` as ``data``. kbs-dev takes an ordered list of rules::

    {"version": 1,
     "rules": [
       {"resource": "models/llama-3/*",           # glob per segment: repository/type/tag
        "tees": ["tdx", "snp"],                     # primary TEEs allowed ([] = any)
        "require_devices": ["nvidia"],              # device TEEs that must have been attested
        "claims": {"cpu0.mr_td": ["91eb2b44..."]},  # submod.claim[.sub...] -> allowed values
        "allow_sample": false}                       # sample / sampledevice evidence
     ]}

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from attest.kbs.token import TokenClaims

__all__ = ["INSECURE_TEES", "PolicyDenied", "PolicyRule", "ResourcePolicy"]

#: TEEs whose evidence proves nothing (``kbs-types`` ``Sample``/``SampleDevice``).
INSECURE_TEES = frozenset({"sample", "sampledevice"})

JsonScalar = str | int | bool


class PolicyDenied(Exception):
    """The policy refuses the request; ``str()`` is the reason, safe to show the client."""


class PolicyRule(BaseModel):
    """One rule: which resources it covers and what their release requires."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resource: str = "*/*/*"
    tees: tuple[str, ...] = ()
    require_devices: tuple[str, ...] = ()
    claims: dict[str, tuple[JsonScalar, ...]] = Field(default_factory=dict)
    allow_sample: bool = False

    @field_validator("resource")
    @classmethod
    def _three_segments(cls, value: str) -> str:
        if value != "*" and len(value.split("/")) != 3:
            raise ValueError("resource must be a repository/type/tag glob (or '*')")
        return value

    @field_validator("claims")
    @classmethod
    def _claim_names(cls, value: dict[str, tuple[JsonScalar, ...]]) -> dict[str, tuple[JsonScalar, ...]]:
        for name, allowed in value.items():
            if len(name.split(".")) < 2 or not allowed:
                raise ValueError(f"claim {name!r} must be <submod>.<claim> with at least one allowed value")
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
        for name, allowed in sorted(self.claims.items()):
            actual = _lookup(claims, name)
            if actual is None:
                raise PolicyDenied(f"claim {name} is absent")
            if not any(_same(actual, value) for value in allowed):
                raise PolicyDenied(f"claim {name} = {actual!s} is not among the allowed values")


def _lookup(claims: TokenClaims, name: str) -> JsonScalar | None:
    submod_name, *path = name.split(".")
    sub = claims.submods.get(submod_name)
    if sub is None:
        return None
    node: object = sub.tee_claims()
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, str | int | bool) else None


def _same(actual: JsonScalar, allowed: JsonScalar) -> bool:
    if isinstance(actual, str) and isinstance(allowed, str):
        return actual.lower() == allowed.lower()  # hex digests compare case-insensitively
    return type(actual) is type(allowed) and actual == allowed


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
            raise ValueError(
                "not a kbs-dev JSON resource policy (see docs/kbs.md; rego is not supported): "
                f"check {', '.join(fields)}"
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
