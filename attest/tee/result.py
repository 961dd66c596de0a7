"""The one result type of every verifier: which steps ran, how each ended, and the claims.

A :class:`VerificationResult` is returned only when every step passed or was explicitly
skipped. When a step fails, the verifier raises :class:`~foundation.errors.VerificationError` (or
:class:`~foundation.errors.PolicyViolation`) whose message names the step, and attaches the partial
result as ``exc.result`` (read it with :func:`result_of`) so a caller can print what was
checked before the failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

from attest.evidence import TeeKind
from foundation.errors import AttestationError, VerificationError

__all__ = [
    "Claims",
    "Outcome",
    "Step",
    "StepLog",
    "VerificationResult",
    "attach_result",
    "hexdict",
    "result_of",
]


class Outcome(StrEnum):
    """How one verification step ended."""

    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One verification step: its name, outcome and a human-readable detail."""

    name: str
    outcome: Outcome
    detail: str

    @property
    def ok(self) -> bool:
        """True unless the step failed (a skipped step is not a failure, but see ``skipped``)."""
        return self.outcome is not Outcome.FAILED

    def to_json(self) -> dict[str, str]:
        """Return ``{"name", "outcome", "detail"}``."""
        return {"name": self.name, "outcome": self.outcome.value, "detail": self.detail}


@runtime_checkable
class Claims(Protocol):
    """Typed, per-TEE claims extracted from verified evidence."""

    def to_json(self) -> dict[str, Any]:
        """Return the claims as JSON (bytes as lower-case hex)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationResult:
    """The outcome of verifying one evidence object.

    ``insecure`` is True for evidence that proves nothing (sample TEEs). ``claims`` is None
    only in a partial result attached to an error raised before the evidence was parsed.
    """

    tee: TeeKind
    insecure: bool
    steps: tuple[Step, ...]
    claims: Claims | None

    @property
    def ok(self) -> bool:
        """True when no step failed."""
        return all(s.ok for s in self.steps)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Names of the steps that were skipped (not checked)."""
        return tuple(s.name for s in self.steps if s.outcome is Outcome.SKIPPED)

    def step(self, name: str) -> Step | None:
        """Return the step called ``name``, or None if it did not run."""
        return next((s for s in self.steps if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """Return ``{"tee", "insecure", "ok", "steps", "claims"}``."""
        return {
            "tee": self.tee.value,
            "insecure": self.insecure,
            "ok": self.ok,
            "steps": [s.to_json() for s in self.steps],
            "claims": None if self.claims is None else self.claims.to_json(),
        }


def result_of(exc: BaseException) -> VerificationResult | None:
    """Return the partial result a verifier attached to ``exc`` (None if there is none)."""
    found = getattr(exc, "result", None)
    return found if isinstance(found, VerificationResult) else None


@dataclass(slots=True)
class StepLog:
    """Record steps as a verifier runs them; build the result, or raise with the partial one."""

    tee: TeeKind
    insecure: bool = False
    claims: Claims | None = None
    steps: list[Step] = field(default_factory=list)

    def passed(self, name: str, detail: str) -> None:
        """Record a passed step."""
        self.steps.append(Step(name=name, outcome=Outcome.PASSED, detail=detail))

    def skipped(self, name: str, detail: str) -> None:
        """Record a step that was deliberately not checked, and why."""
        self.steps.append(Step(name=name, outcome=Outcome.SKIPPED, detail=detail))

    def fail(
        self, name: str, detail: str, *, hint: str, error: type[VerificationError] = VerificationError
    ) -> NoReturn:
        """Record a failed step and raise ``error`` carrying the partial result.

        Raises:
            VerificationError: always (or the subclass given as ``error``).
        """
        self.failed(name, detail)
        advice = hint[:1].upper() + hint[1:]
        exc = error(f"{self.tee.value} evidence failed step '{name}': {detail}. {advice}.")
        raise attach_result(exc, self.result())

    def failed(self, name: str, detail: str) -> None:
        """Record a failed step without raising (the caller raises its own error)."""
        self.steps.append(Step(name=name, outcome=Outcome.FAILED, detail=detail))

    def check(self, ok: bool, name: str, *, passed: str, failed: str, hint: str) -> None:
        """Record ``name`` as passed when ``ok``; otherwise fail it.

        Raises:
            VerificationError: ``ok`` is false.
        """
        if not ok:
            self.fail(name, failed, hint=hint)
        self.passed(name, passed)

    def result(self) -> VerificationResult:
        """Return the result of the steps recorded so far."""
        return VerificationResult(
            tee=self.tee, insecure=self.insecure, steps=tuple(self.steps), claims=self.claims
        )

    def update_claims(self, **changes: Any) -> None:
        """Replace fields of the (dataclass) claims recorded so far."""
        if self.claims is not None:
            self.claims = replace(self.claims, **changes)  # type: ignore[type-var]


_E = TypeVar("_E", bound=AttestationError)


def attach_result(exc: _E, result: VerificationResult) -> _E:
    """Attach ``result`` to ``exc`` as ``exc.result`` and return ``exc``."""
    exc.result = result  # type: ignore[attr-defined]
    return exc


def hexdict(values: Mapping[str, bytes | None]) -> dict[str, str | None]:
    """Hex-encode byte values for JSON."""
    return {k: None if v is None else v.hex() for k, v in values.items()}
