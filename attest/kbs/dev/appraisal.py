"""Appraise the evidence of a KBS ``/attest`` as Trustee's attestation service does.

For each piece of evidence: parse it as its TEE's typed evidence, verify it with
:mod:`attest.verify` (signatures, certificate chains, collateral when given, freshness) against
the runtime data Trustee would compute (``attest.binding``; reference §1.5), and turn the result
into EAR submodule claims (``cpu0`` for the primary TEE, ``gpu0``, ``gpu1``, ... for devices).

* The primary evidence must bind ``H(JCS({additional-evidence, nonce, tee-pubkey}))``
  (zero-padded for TDX/SNP, exact for sample); device evidence ``H(JCS({nonce, tee-pubkey}))``
  (NVIDIA: the first 32 bytes).
* A debuggable TD or SNP guest is refused here (:class:`attest.verify.RefuseInsecure`).
* sample / sampledevice evidence is *appraised* (binding) but proves nothing; as in Trustee, the
  resource policy is what refuses it (unless kbs-dev runs with its insecure flag).
* No reference values: kbs-dev compares no measurement here, so every submodule's EAR status is
  ``warning`` (as Trustee rates evidence whose measurements match no registered reference value).

Not decided here: whether the claims are *acceptable* for a given resource. The workload policy
of the resource (``--resource-policy``, :mod:`attest.verify.workload`) pins the measurements,
TCB, init-data and software at release, and the JSON resource policy
(:mod:`attest.kbs.dev.policy`) which TEEs may ask, as in Trustee.
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
from attest.evidence import Evidence, TeeKind
from attest.initdata import InitData
from attest.kbs.token import RUNTIME_DATA_CLAIMS, SubmodClaims
from attest.kbs.wire import Attestation, WireFormatError
from attest.tee import BACKENDS, evidence_from_json
from attest.verify import (
    Policy,
    RefuseInsecure,
    VerificationResult,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.workload import init_data_register_of
from foundation.errors import AttestationError, MalformedEvidence

__all__ = ["EAR_STATUS", "Appraisal", "AppraisalFailed", "EvidenceAppraiser"]

#: The EAR status of every submodule kbs-dev appraises: it has no reference values (the workload
#: policy pins measurements at release), so it never affirms them.
EAR_STATUS = "warning"


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
    """Check an ``/attest`` body against its session and return the EAR submodules.

    ``collateral`` maps a TEE to its verification collateral (:class:`attest.verify.TdxCollateral`,
    :class:`attest.verify.SnpCollateral`); without it a TDX quote's TCB status is ``unknown``,
    which a workload policy refuses unless it sets ``require_collateral = false``.
    """

    def __init__(
        self,
        *,
        collateral: Mapping[TeeKind, object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._collateral = dict(collateral or {})
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
        result = self._verify(primary, runtime.primary_digest(additional, hash_alg), self._policy(primary))
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
        submods = {"cpu0": SubmodClaims(status=EAR_STATUS, annotated_evidence=annotated)}
        try:
            devices = attestation.tee_evidence.additional_map()
        except WireFormatError as exc:
            raise AppraisalFailed(str(exc)) from None
        device_digest = runtime.device_digest(hash_alg)
        device_results: list[VerificationResult] = []
        for index, (device_tee, obj) in enumerate(sorted(devices.items())):
            evidence = self._parse(device_tee, obj, device=True)
            device_result = self._verify(evidence, device_digest, None, device=True)
            device_results.append(device_result)
            submods[f"gpu{index}"] = SubmodClaims(
                status=EAR_STATUS, annotated_evidence={device_tee: _claims(device_result)}
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

    @staticmethod
    def _policy(evidence: Evidence) -> Policy | None:
        # Never release to a debuggable TD / SNP guest; sample evidence is the resource policy's.
        return None if BACKENDS[evidence.tee].insecure else RefuseInsecure()

    @staticmethod
    def _parse(tee: str, obj: object, *, device: bool) -> Evidence:
        try:
            kind = TeeKind(tee)
        except ValueError:
            raise AppraisalFailed(f"kbs-dev has no verifier for TEE {tee!r}") from None
        if BACKENDS[kind].device != device:
            role = "an additional (device)" if BACKENDS[kind].device else "a primary"
            raise AppraisalFailed(f"{tee} is {role} TEE and cannot be used here")
        try:
            return evidence_from_json(kind, obj)
        except AttestationError as exc:
            raise AppraisalFailed(f"{tee} evidence: {exc}") from None

    def _verify(
        self, evidence: Evidence, expected: bytes, policy: Policy | None, *, device: bool = False
    ) -> VerificationResult:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        collateral = self._collateral.get(evidence.tee)
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
