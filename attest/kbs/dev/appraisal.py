"""Appraise the evidence of a KBS ``/attest`` as Trustee's attestation service does.

For each piece of evidence: parse it as its TEE's typed evidence, verify it with
:mod:`attest.verify` against the runtime data Trustee would compute (``attest.binding``;
reference §1.5) and the configured reference values, and turn the result into EAR submodule
claims (``cpu0`` for the primary TEE, ``gpu0``, ``gpu1``, ... for devices).

* The primary evidence must bind ``H(JCS({additional-evidence, nonce, tee-pubkey}))``
  (zero-padded for TDX/SNP, exact for sample); device evidence ``H(JCS({nonce, tee-pubkey}))``
  (NVIDIA: the first 32 bytes).
* sample / sampledevice evidence is *appraised* (binding, ``svn >= sample_min_svn``) but proves
  nothing; as in Trustee, the resource policy is what refuses it (unless kbs-dev runs with its
  insecure flag). Its EAR status is ``warning``.
* Hardware evidence is ``affirming`` when reference values were configured and accepted it,
  ``warning`` when none were configured (``attest.verify`` then checks signatures, chains and the
  binding only).

Not decided here: whether the claims are *acceptable* for a given resource; that is the
resource policy's job (:mod:`attest.kbs.dev.policy`), as in Trustee.
"""

from __future__ import annotations

import base64
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import JsonValue

from attest.binding import HashAlgorithm
from attest.errors import AttestationError, MalformedEvidence
from attest.evidence import Evidence, TeeKind, evidence_from_json
from attest.initdata import InitData
from attest.kbs.token import RUNTIME_DATA_CLAIMS, SubmodClaims
from attest.kbs.wire import Attestation, WireFormatError
from attest.verify import (
    MinimumSampleSvn,
    Outcome,
    Policy,
    RefuseInsecure,
    VerificationResult,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.reference import ReferenceValues
from attest.verify.workload import init_data_register_of

__all__ = ["Appraisal", "AppraisalFailed", "EvidenceAppraiser"]


class AppraisalFailed(Exception):
    """The evidence does not verify or does not bind the session; ``str()`` is the reason."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Appraisal:
    """What one ``/attest`` established: the EAR submodules and the verified results behind them."""

    submods: dict[str, SubmodClaims]
    primary: VerificationResult
    devices: tuple[VerificationResult, ...] = ()
    #: The init-data sent with the request, checked against the primary evidence's register.
    init_data: InitData | None = None
    init_data_register: bytes | None = None


def _init_data_claims(init: InitData) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {}
    for name, text in init.data.items():
        if name in ("aa.toml", "cdh.toml"):
            try:
                out[name] = _jsonable(tomllib.loads(text))
                continue
            except tomllib.TOMLDecodeError:
                pass
        out[name] = text
    return out


class EvidenceAppraiser:
    """Check an ``/attest`` body against its session and return the EAR submodules."""

    def __init__(
        self, *, reference: ReferenceValues | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._reference = reference or ReferenceValues()
        self._clock = clock

    def appraise(self, attestation: Attestation, *, tee: str, hash_alg: HashAlgorithm) -> Appraisal:
        """Verify every piece of evidence in ``attestation`` for a session opened for ``tee``.

        The caller has already checked that the nonce is the session's. Init-data sent with the
        request must be what the primary evidence's register holds (as Trustee's verifiers
        check); its ``data`` becomes ``init_data_claims`` of ``cpu0``.

        Raises:
            AppraisalFailed: malformed, unbound, unverifiable or refused evidence, or init-data
                that is not the evidence's.
        """
        runtime = attestation.runtime_data
        additional = attestation.tee_evidence.additional_evidence
        primary = self._parse(tee, attestation.tee_evidence.primary_evidence, device=False)
        result = self._verify(
            primary, runtime.primary_digest(additional, hash_alg), self._policy(primary, self._reference.cpu)
        )
        init, register = self._init_data(attestation, result)
        runtime_claims: dict[str, JsonValue] = {
            "nonce": runtime.nonce,
            "tee-pubkey": runtime.tee_pubkey.to_json(),
        }
        annotated: dict[str, JsonValue] = {tee: _claims(result), RUNTIME_DATA_CLAIMS: runtime_claims}
        if init is not None and register is not None:
            # Trustee: "init_data" is the register value (hex; sample: base64), "init_data_claims"
            # the data table (aa.toml and cdh.toml parsed, other entries as strings).
            shown = base64.b64encode(register).decode() if primary.tee is TeeKind.SAMPLE else register.hex()
            annotated["init_data"] = shown
            annotated["init_data_claims"] = _init_data_claims(init)
        submods = {"cpu0": SubmodClaims(status=_status(result), annotated_evidence=annotated)}
        try:
            devices = attestation.tee_evidence.additional_map()
        except WireFormatError as exc:
            raise AppraisalFailed(str(exc)) from None
        device_digest = runtime.device_digest(hash_alg)
        device_results: list[VerificationResult] = []
        for index, (device_tee, obj) in enumerate(sorted(devices.items())):
            evidence = self._parse(device_tee, obj, device=True)
            device_result = self._verify(
                evidence, device_digest, self._policy(evidence, self._reference.device), device=True
            )
            device_results.append(device_result)
            submods[f"gpu{index}"] = SubmodClaims(
                status=_status(device_result), annotated_evidence={device_tee: _claims(device_result)}
            )
        return Appraisal(
            submods=submods,
            primary=result,
            devices=tuple(device_results),
            init_data=init,
            init_data_register=register,
        )

    @staticmethod
    def _init_data(
        attestation: Attestation, result: VerificationResult
    ) -> tuple[InitData | None, bytes | None]:
        register = init_data_register_of(result)
        sent = attestation.init_data
        if sent is None:
            return None, register
        if sent.format != "toml":
            raise AppraisalFailed(f"init-data format {sent.format!r} is not supported (only toml)")
        try:
            init = InitData.from_bytes(sent.body.encode("utf-8"))
        except MalformedEvidence as exc:
            raise AppraisalFailed(f"init-data: {exc}") from None
        if register is None or not init.matches(result.tee, register):
            raise AppraisalFailed(
                "the init-data is not what the evidence carries (its digest differs from the "
                f"{result.tee.value} register)"
            )
        return init, register

    def _policy(self, evidence: Evidence, configured: Policy | None) -> Policy | None:
        if evidence.tee is TeeKind.SAMPLE:
            return MinimumSampleSvn(self._reference.sample_min_svn)
        if evidence.tee.is_insecure:
            return None
        if configured is None and not evidence.tee.is_device:
            # Even without reference values, never release to a debuggable TD / SNP guest.
            return RefuseInsecure()
        return configured

    @staticmethod
    def _parse(tee: str, obj: object, *, device: bool) -> Evidence:
        try:
            kind = TeeKind(tee)
        except ValueError:
            raise AppraisalFailed(f"kbs-dev has no verifier for TEE {tee!r}") from None
        if kind.is_device != device:
            role = "an additional (device)" if kind.is_device else "a primary"
            raise AppraisalFailed(f"{tee} is {role} TEE and cannot be used here")
        try:
            return evidence_from_json(kind, obj)
        except AttestationError as exc:
            raise AppraisalFailed(f"{tee} evidence: {exc}") from None

    def _verify(
        self, evidence: Evidence, expected: bytes, policy: Policy | None, *, device: bool = False
    ) -> VerificationResult:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        collateral = self._reference.collateral.get(evidence.tee)
        try:
            # allow_insecure: sample evidence is appraised here and refused by the resource
            # policy unless kbs-dev runs with --allow-insecure-sample-evidence (as in Trustee).
            if device:
                return verify_device_evidence(
                    evidence,
                    expected_runtime_data=expected,
                    policy=policy,
                    now=now,
                    collateral=collateral,
                    allow_insecure=True,
                )
            return verify_evidence(
                evidence,
                expected_report_data=expected,
                policy=policy,
                now=now,
                collateral=collateral,
                allow_insecure=True,
            )
        except AttestationError as exc:
            raise AppraisalFailed(f"{evidence.tee.value} evidence does not verify: {exc}") from None
        except TypeError as exc:
            raise AppraisalFailed(f"{evidence.tee.value} evidence cannot be verified here: {exc}") from None


def _status(result: VerificationResult) -> str:
    if result.insecure:
        return "warning"
    policy_ran = any(step.name == "policy" and step.outcome is Outcome.PASSED for step in result.steps)
    return "affirming" if policy_ran else "warning"


def _claims(result: VerificationResult) -> dict[str, JsonValue]:
    if result.claims is None:
        return {}
    raw: dict[str, Any] = result.claims.to_json()
    return {str(k): _jsonable(v) for k, v in raw.items()}


def _jsonable(value: object) -> JsonValue:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
