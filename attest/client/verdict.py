"""Verify an attestation document and its run configuration against a workload policy, offline.

:func:`verify_document` is the whole user-side check as a pure function: it takes the document
and configuration bytes the server published, the nonce the client sent, the TLS key the
client saw, and a :class:`~attest.verify.workload.WorkloadPolicy`; it opens no connection
(:mod:`attest.client.remote` fetches, then calls it). Steps, in order; each is reported with
its outcome, and a failed binding step stops the steps after it (their inputs are untrusted)::

    (1) document       parses as enclave-serve/attestation/v4
    (1a) age           only with ``max_age_s`` (``verify --offline``): issued at most that long
                       ago, by its ``issued_at`` (the enclave's clock) against ``now``
    (2) nonce          answers the client's nonce (freshness)
    (3) devices        the device evidence is what the claims list
    (4) tls            the attested TLS key is the one the client talked to
    (5) tee            an insecure (sample) TEE only with the explicit development flag
    (6) config         the published configuration hashes to the attested claim
    (7) evidence:<tee> the CPU evidence verifies (signature, chain, QE/VCEK) and its report
                       data is the digest of the claims, so every claim is the hardware's word
    (8) device:<tee>   each device's evidence verifies with the nonce derived from ours
    (9) init_data      the claimed init-data digest is what the hardware register holds
    (10) policy:<rule> every rule of the workload policy (measurements, TCB, attributes,
                       init-data, GPUs, model, configuration, runtime version)

A saved document's nonce proves freshness only as of when it was fetched, and nothing in it
names a URL: offline, step (1a) bounds its age and the caller must say that the URL is not
verified (``enclave-serve verify --offline`` does).

Without a policy, step (10) refuses: genuine hardware running *unpinned* software proves
nothing about the software (the host can boot its own VM). ``allow_unpinned_software`` turns
that refusal into a loud warning, for inspection only.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from attest.binding import document_device_nonce
from attest.client.wording import for_python
from attest.document import CLOCK_SKEW_S, DOCUMENT_FORMAT, AttestationDocument, DocumentCheck
from attest.evidence import Evidence, TeeKind
from attest.initdata import register_for_digest
from attest.runconfig import RunConfiguration
from attest.tee import BACKENDS
from attest.verify import (
    Outcome,
    RefuseInsecure,
    VerificationResult,
    collateral_from_json,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.workload import WorkloadFacts, WorkloadPolicy, init_data_register_of
from foundation.errors import AttestationError, MalformedEvidence, PolicyViolation, VerificationError

__all__ = [
    "Hardware",
    "ServerRefused",
    "StepFailed",
    "StepsVerdict",
    "Verdict",
    "document_age",
    "document_collateral",
    "duration_text",
    "evidence_summary",
    "init_data_binding",
    "policy_steps",
    "verify_document",
    "verify_hardware",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepsVerdict:
    """Every step of one verification, and the hardware evidence verified (shared by the verdicts)."""

    steps: tuple[DocumentCheck, ...]
    primary: VerificationResult | None = None
    devices: tuple[VerificationResult, ...] = ()
    unpinned: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every step passed."""
        return bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def failures(self) -> tuple[DocumentCheck, ...]:
        """The failed steps."""
        return tuple(s for s in self.steps if not s.ok)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict(StepsVerdict):
    """Every step of one document's verification, and what was verified."""

    document: AttestationDocument | None = None
    config: RunConfiguration | None = None

    def to_json(self) -> dict[str, Any]:
        """Return ``{"verified", "steps", "warnings", ...}``."""
        claims = None if self.document is None else self.document.claims
        return {
            "verified": self.ok,
            "unpinned_software": self.unpinned,
            "tee": None if claims is None else claims.tee.value,
            "insecure": None if claims is None else claims.insecure,
            "model_digest": None if claims is None else claims.model_digest,
            "config_sha256": None if claims is None else claims.config_sha256,
            "init_data": None if claims is None else claims.init_data,
            "issued_at": None if claims is None else claims.issued_at,
            "config": None if self.config is None else self.config.to_json(),
            "key_release": None if claims is None else claims.key_release,
            "steps": [s.to_json() for s in self.steps],
            "warnings": list(self.warnings),
        }


class ServerRefused(PolicyViolation):
    """The server did not verify; ``verdict`` holds every step.

    ``str()`` names the failed steps in Python's words (``allow_insecure=True``, for a caller of
    the Python API); :attr:`cli_message` is the same text with the command line's flags
    (``--allow-insecure-sample-tee``), which ``enclave-serve`` prints.
    """

    def __init__(self, verdict: Verdict) -> None:
        message = "; ".join(f"{s.name}: {s.detail}" for s in verdict.failures) or "not verified"
        super().__init__(for_python(message))
        self.verdict = verdict
        #: The message naming the CLI's flags (``str()`` names the Python arguments).
        self.cli_message = message


def evidence_summary(result: VerificationResult) -> str:
    """One line for a verified evidence step: what passed, and what was not checked."""
    passed = [s.name for s in result.steps if s.outcome is Outcome.PASSED]
    skipped = [s.name for s in result.steps if s.outcome is Outcome.SKIPPED and s.name != "policy"]
    text = "verified: " + ", ".join(passed) if passed else "verified"
    return text + (f"; not checked: {', '.join(skipped)}" if skipped else "")


def duration_text(seconds: float) -> str:
    """``seconds`` for people: ``42 s``, ``17 min``, ``5 h``, ``365 d``."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def document_age(document: AttestationDocument, *, max_age_s: int, now: float) -> str:
    """Check that ``document`` was issued at most ``max_age_s`` before ``now``; return the detail.

    The age is ``now - issued_at``: the verifier's clock against the enclave's (which the host
    influences), so it bounds how stale a *saved* document may be, not how fresh it is. A
    document issued more than :data:`~attest.document.CLOCK_SKEW_S` in the future is refused too.

    Raises:
        VerificationError: older than ``max_age_s``, or from the future.
    """
    issued_at = document.claims.issued_at
    age = now - issued_at
    when = datetime.fromtimestamp(issued_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if age < -CLOCK_SKEW_S:
        raise VerificationError(
            f"age: the document says it was issued {duration_text(age)} in the future ({when}); the "
            "enclave's clock or this machine's is wrong: check this machine's clock, or fetch a new one"
        )
    if age > max_age_s:
        raise VerificationError(
            f"age: the document was issued {duration_text(age)} ago ({when}, by the enclave's clock); "
            f"at most {duration_text(max_age_s)} is allowed: fetch a fresh one "
            "(enclave-serve verify URL --save FILE) or pass a larger --max-age"
        )
    return (
        f"issued {duration_text(max(age, 0))} ago ({when}, by the enclave's clock); "
        f"at most {duration_text(max_age_s)} allowed"
    )


def init_data_binding(claimed: str | None, tee: TeeKind, register: bytes | None) -> str:
    """Check that the ``claimed`` init-data digest (``"<alg>:<hex>"``) is what ``register`` holds.

    Returns the step's detail.

    Raises:
        MalformedEvidence: the claimed digest is not hex.
        VerificationError: the register holds something else (or nothing).
    """
    if claimed is None:
        return "no init-data claimed" + ("" if register is None else f" (register {register.hex()[:16]}…)")
    hexpart = claimed.partition(":")[2]
    try:
        digest = bytes.fromhex(hexpart)
    except ValueError:
        raise MalformedEvidence("claims: init_data digest is not hex") from None
    if register is None or register != register_for_digest(tee, digest):
        raise VerificationError(
            "init_data: the claimed init-data digest is not what the hardware register holds"
        )
    return f"{claimed} is what the register holds"


def document_collateral(document: AttestationDocument) -> dict[TeeKind, object]:
    """Return the collateral the document carries, typed for :func:`attest.verify.verify_evidence`.

    Collateral is not covered by the report data; it needs none: the TDX collateral is signed by
    Intel's PCS chain and the VCEK by AMD's, both checked against pinned roots when used.

    Raises:
        MalformedEvidence: a collateral item is not what its TEE expects.
    """
    return collateral_from_json(document.collateral)


class StepFailed(Exception):
    """A shared verification step failed: its name, the error, and what was verified before it."""

    def __init__(
        self,
        name: str,
        error: Exception,
        *,
        primary: VerificationResult | None = None,
        devices: tuple[VerificationResult, ...] = (),
    ) -> None:
        super().__init__(name)
        self.name, self.error, self.primary, self.devices = name, error, primary, devices


@dataclass(frozen=True, slots=True, kw_only=True)
class Hardware:
    """What the hardware steps established: verified CPU and device evidence, the init-data register."""

    primary: VerificationResult
    devices: tuple[VerificationResult, ...]
    register: bytes | None


def verify_hardware(
    steps: list[DocumentCheck],
    *,
    primary: Evidence,
    report_data: bytes,
    devices: Sequence[Evidence],
    device_nonce: bytes,
    claimed_init_data: str | None,
    claimed_tee: TeeKind,
    collateral: Mapping[TeeKind, object],
    refuse_insecure: bool,
    now: datetime | None,
    allow_insecure: bool,
) -> Hardware:
    """The hardware steps every statement shares (documents and ACI reports), appended to ``steps``.

    ``evidence:<tee>``: the CPU evidence verifies and its report data is ``report_data`` (with
    ``refuse_insecure``, a debug or otherwise insecure TEE is refused here, for verifiers without
    a policy); ``device:<tee>``: each device's evidence verifies over ``device_nonce``;
    ``init_data``: the claimed init-data digest is what the hardware register holds. Validation
    against measurements and TCB floors is the policy's (:func:`policy_steps`).

    Raises:
        StepFailed: naming the step, with what was verified before it.
    """
    tee = primary.tee
    try:
        result = verify_evidence(
            primary,
            expected_report_data=report_data,
            policy=RefuseInsecure() if refuse_insecure else None,
            now=now,
            collateral=collateral.get(tee),
            allow_insecure=allow_insecure,
        )
    except (AttestationError, ValueError) as exc:
        raise StepFailed(f"evidence:{tee.value}", exc) from None
    steps.append(DocumentCheck(name=f"evidence:{tee.value}", ok=True, detail=evidence_summary(result)))
    verified: list[VerificationResult] = []
    for device in devices:
        try:
            device_result = verify_device_evidence(
                device,
                expected_runtime_data=device_nonce,
                now=now,
                collateral=collateral.get(device.tee),
                allow_insecure=allow_insecure,
            )
        except AttestationError as exc:
            raise StepFailed(f"device:{device.tee.value}", exc, primary=result) from None
        verified.append(device_result)
        steps.append(
            DocumentCheck(name=f"device:{device.tee.value}", ok=True, detail=evidence_summary(device_result))
        )
    register = init_data_register_of(result)
    try:
        detail = init_data_binding(claimed_init_data, claimed_tee, register)
    except AttestationError as exc:
        raise StepFailed("init_data", exc, primary=result, devices=tuple(verified)) from None
    steps.append(DocumentCheck(name="init_data", ok=True, detail=detail))
    return Hardware(primary=result, devices=tuple(verified), register=register)


def policy_steps(
    steps: list[DocumentCheck],
    warnings: list[str],
    policy: WorkloadPolicy | None,
    facts: Callable[[], WorkloadFacts],
    *,
    allow_unpinned_software: bool,
) -> bool:
    """The workload policy's steps (``policy:<rule>``), appended to ``steps``; return whether unpinned.

    Without a policy the step fails, unless ``allow_unpinned_software``: then a loud warning.
    """
    if policy is None:
        if not allow_unpinned_software:
            steps.append(
                DocumentCheck(
                    name="policy",
                    ok=False,
                    detail="no policy: genuine hardware was verified but not WHICH software runs (the host "
                    "can boot its own VM); pass --policy FILE (enclave-serve policy record writes one)",
                )
            )
            return False
        warnings.append(
            "UNPINNED SOFTWARE: no policy was applied; this proves only that genuine hardware runs SOME "
            "software, which claims the model and configuration shown"
        )
        logger.warning("INSECURE: %s", warnings[-1])
        steps.append(DocumentCheck(name="policy", ok=True, detail="NOT APPLIED (--allow-unpinned-software)"))
        return True
    for outcome in policy.evaluate(facts()):
        steps.append(DocumentCheck(name=f"policy:{outcome.rule}", ok=outcome.ok, detail=outcome.detail))
    return False


def verify_document(
    document_json: Mapping[str, Any],
    config_bytes: bytes,
    *,
    nonce: bytes | None,
    observed_tls_spki_sha256: str | None,
    policy: WorkloadPolicy | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    now: datetime | None = None,
    max_age_s: int | None = None,
) -> Verdict:
    """Run every step of the module docstring and return the verdict (never raises for a refusal).

    ``max_age_s`` adds step (1a), for a saved document (``now``, default this machine's clock).

    Raises:
        TypeError: collateral of the wrong type for its TEE (a caller bug).
    """
    steps: list[DocumentCheck] = []
    warnings: list[str] = []

    def failed(name: str, exc: Exception, **kw: Any) -> Verdict:
        steps.append(DocumentCheck(name=name, ok=False, detail=str(exc)))
        return Verdict(steps=tuple(steps), warnings=tuple(warnings), **kw)

    # (1) document
    try:
        document = AttestationDocument.from_json(document_json)
    except AttestationError as exc:
        return failed("document", exc)
    steps.append(DocumentCheck(name="document", ok=True, detail=DOCUMENT_FORMAT))
    # (1a) age, for a saved document: its nonce proved freshness only when it was fetched
    if max_age_s is not None:
        at = time.time() if now is None else now.timestamp()
        try:
            steps.append(
                DocumentCheck(name="age", ok=True, detail=document_age(document, max_age_s=max_age_s, now=at))
            )
        except AttestationError as exc:
            return failed("age", exc, document=document)
    # (2)-(5) binding: nonce, devices, TLS, expected model/config, insecure TEE
    try:
        steps += document.check_binding(
            nonce=nonce,
            observed_tls_spki_sha256=observed_tls_spki_sha256,
            expected_model_digest=expected_model_digest,
            expected_config_sha256=expected_config_sha256,
            allow_insecure=allow_insecure,
            allow_no_tls=allow_no_tls,
            now=None if now is None else now.timestamp(),
        )
    except AttestationError as exc:
        # check_binding names the step first ("tee: the server runs ..."): the step, then the rest.
        name, sep, rest = str(exc).partition(": ")
        detail = rest if sep else str(exc)
        steps.append(DocumentCheck(name=name if sep else "binding", ok=False, detail=detail))
        return Verdict(steps=tuple(steps), warnings=tuple(warnings), document=document)
    # (6) the configuration the server publishes is the attested one
    try:
        if hashlib.sha256(config_bytes).hexdigest() != document.claims.config_sha256:
            raise VerificationError("the published configuration is not the one the attestation claims")
        config = RunConfiguration.from_bytes(config_bytes)
        if config.manifest_digest != document.claims.model_digest:
            raise VerificationError("the attested configuration names another model than the claims")
    except AttestationError as exc:
        return failed("config-bytes", exc, document=document)
    steps.append(DocumentCheck(name="config-bytes", ok=True, detail="the published bytes hash to the claim"))
    try:
        collateral = {**document_collateral(document), **(collateral or {})}
    except AttestationError as exc:
        return failed("collateral", exc, document=document, config=config)
    # (7) CPU evidence, (8) device evidence, (9) init-data: the hardware's word for the claims
    try:
        hardware = verify_hardware(
            steps,
            primary=document.primary,
            report_data=document.claims.report_data(),
            devices=document.devices,
            device_nonce=document_device_nonce(document.claims.nonces, document.claims.enclave_nonce),
            claimed_init_data=document.claims.init_data,
            claimed_tee=document.claims.tee,
            collateral=collateral,
            refuse_insecure=policy is None and not BACKENDS[document.primary.tee].insecure,
            now=now,
            allow_insecure=allow_insecure,
        )
    except StepFailed as exc:
        return failed(
            exc.name, exc.error, document=document, config=config, primary=exc.primary, devices=exc.devices
        )
    # (10) the workload policy
    unpinned = policy_steps(
        steps,
        warnings,
        policy,
        lambda: WorkloadFacts(
            primary=hardware.primary,
            devices=hardware.devices,
            model_digest=document.claims.model_digest,
            config_sha256=document.claims.config_sha256,
            runtime_version=str(config.to_json()["runtime"].get("version")),
            init_data_register=hardware.register,
            allow_insecure=allow_insecure,
        ),
        allow_unpinned_software=allow_unpinned_software,
    )
    return Verdict(
        steps=tuple(steps),
        warnings=tuple(warnings),
        unpinned=unpinned,
        document=document,
        config=config,
        primary=hardware.primary,
        devices=hardware.devices,
    )
