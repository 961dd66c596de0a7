"""The user-facing attestation document: typed claims, building, and pure verification.

The server publishes it at ``GET /.well-known/enclave-serve/attestation?nonce=<hex>``. A
client sends a fresh random nonce; the server answers with fresh hardware evidence whose report
data commits (see :mod:`attest.binding`) to :class:`AttestationClaims`:

* the client nonces it answers (freshness): the client's own, beside those of concurrent
  requests that shared the same evidence collection; none for the cached, unchallenged
  document, which states instead when it was issued and for how long it may be used,
* the outcome of the canary generation the runtime ran before becoming ready,
* the SHA-256 of the TLS public key the server is talking with (SPKI DER), if TLS is on,
* the SHA-384 of every device (GPU) evidence object, collected with a nonce derived from the
  client's nonce,
* the model identity (the encrypted model's manifest digest),
* the digest of the CoCo init-data the runtime was launched with (:mod:`attest.initdata`), which
  the verifier checks against the register the hardware evidence carries,
* the SHA-256 of the run configuration (:mod:`attest.runconfig`), whose exact bytes the server
  publishes at ``/.well-known/enclave-serve/config``: which options, environment and settings
  the runtime runs with,
* the key-release receipt (which broker released which resource, and a digest of the token),
* the runtime name/version, and every insecure development mode in effect (sample TEE, key
  from a file, GPUs with CC off or not attested, plain HTTP...): a user sees them in the
  document itself, covered by the hardware signature.

The full specification, with what each field means and what it does not prove, is
``docs/attestation.md``. Verification here is pure: it takes the document, the nonce the client
sent and what the client observed (the TLS key), and returns the checks it made. It never opens
a connection, so it can be imported without the server or vLLM.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attest.binding import DOCUMENT_PURPOSE, canonical_json, document_report_data
from attest.evidence import Evidence, TeeKind
from attest.tee import BACKENDS, evidence_from_json
from foundation.errors import MalformedEvidence, PolicyViolation, VerificationError

__all__ = [
    "DOCUMENT_FORMAT",
    "NONCE_SIZE",
    "AttestationClaims",
    "AttestationDocument",
    "DeviceClaim",
    "DocumentCheck",
    "device_evidence_digest",
]

#: Format identifier of the attestation document (bumped on any incompatible change; v4: an
#: unchallenged document may also answer client nonces, when its collection answered them too).
DOCUMENT_FORMAT = "enclave-serve/attestation/v4"
#: Size of the client nonce, in bytes (hex-encoded on the wire).
NONCE_SIZE = 32
#: Most client nonces one document answers (one evidence collection shared by a batch).
MAX_NONCES = 64
#: How far in the future a document's ``issued_at`` may be, against the verifier's clock.
CLOCK_SKEW_S = 300
#: The same for the cached, unchallenged document, whose only freshness is its age: a guest
#: clock running ahead must not stretch its use beyond ``max_age_s`` by more than this.
UNCHALLENGED_CLOCK_SKEW_S = 5
#: Outcomes the ``canary`` claim may state (a failed canary never yields a document).
CANARY_STATUSES = ("passed", "not-recorded")


def device_evidence_digest(evidence: Evidence) -> str:
    """Return the hex SHA-384 of a device evidence object's canonical JSON."""
    return hashlib.sha384(canonical_json(evidence.to_json())).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceClaim:
    """One device evidence object, by TEE and digest."""

    tee: str
    evidence_sha384: str

    def to_json(self) -> dict[str, Any]:
        return {"tee": self.tee, "evidence_sha384": self.evidence_sha384}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationClaims:
    """Everything the report data of an attestation document commits to."""

    #: The client nonces this evidence answers, in the order claimed; empty when unchallenged.
    nonces: tuple[bytes, ...]
    #: The enclave's own random value for this collection (mixed into the device nonce).
    enclave_nonce: bytes
    tee: TeeKind
    insecure_modes: tuple[str, ...]
    model_digest: str
    config_sha256: str
    tls_spki_sha256: str | None
    #: Unix time (seconds, the enclave's clock) at which the evidence was collected.
    issued_at: int = 0
    #: For the unchallenged (cached) document: how many seconds after ``issued_at`` it may be used
    #: without a nonce. Stated whenever ``nonces`` is empty; a cache refresh that answered the
    #: nonces waiting beside it states it too (the same evidence serves both).
    max_age_s: int | None = None
    #: ``"<algorithm>:<hex>"`` of the CoCo init-data the runtime was launched with, or None.
    init_data: str | None = None
    devices: tuple[DeviceClaim, ...] = ()
    key_release: Mapping[str, Any] | None = None
    #: The canary before ready: ``{"status": "passed", "tokens", "reference_sha256"}`` or
    #: ``{"status": "not-recorded"}`` (the model records no reference).
    canary: Mapping[str, Any] = field(default_factory=lambda: {"status": "not-recorded"})
    runtime: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(len(n) != NONCE_SIZE for n in (*self.nonces, self.enclave_nonce)):
            raise ValueError(f"every nonce must be {NONCE_SIZE} bytes")
        if len(self.nonces) > MAX_NONCES or len(set(self.nonces)) != len(self.nonces):
            raise ValueError(f"at most {MAX_NONCES} distinct nonces")
        if self.max_age_s is None and not self.nonces:
            raise ValueError("a document that answers no nonce must state max_age_s")
        if self.max_age_s is not None and not 0 < self.max_age_s <= 86400:
            raise ValueError("max_age_s must be between 1 and 86400")
        if len(self.config_sha256) != 64 or self.config_sha256.strip("0123456789abcdef"):
            raise ValueError("config_sha256 must be 64 lowercase hex digits")
        if self.canary.get("status") not in CANARY_STATUSES:
            raise ValueError(f"canary status must be one of {', '.join(CANARY_STATUSES)}")

    @property
    def insecure(self) -> bool:
        """Whether anything insecure is in effect (an insecure mode or an insecure TEE)."""
        return bool(self.insecure_modes) or BACKENDS[self.tee].insecure

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": DOCUMENT_PURPOSE,
            "nonces": [n.hex() for n in self.nonces],
            "enclave_nonce": self.enclave_nonce.hex(),
            "issued_at": self.issued_at,
            "max_age_s": self.max_age_s,
            "tee": self.tee.value,
            "insecure": self.insecure,
            "insecure_modes": list(self.insecure_modes),
            "model": {"manifest_digest": self.model_digest},
            "config": {"sha256": self.config_sha256},
            "init_data": None if self.init_data is None else {"digest": self.init_data},
            "tls": None if self.tls_spki_sha256 is None else {"spki_sha256": self.tls_spki_sha256},
            "devices": [d.to_json() for d in self.devices],
            "key_release": None if self.key_release is None else dict(self.key_release),
            "canary": dict(self.canary),
            "runtime": dict(self.runtime),
        }

    def report_data(self) -> bytes:
        """Return the digest the primary evidence's report data must carry."""
        return document_report_data(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> AttestationClaims:
        """Parse claims; raises :class:`MalformedEvidence`."""
        try:
            if not isinstance(obj, Mapping) or obj.get("purpose") != DOCUMENT_PURPOSE:
                raise MalformedEvidence("claims: missing or wrong 'purpose'")
            if set(obj) != _CLAIM_KEYS:
                extra, missing = sorted(set(obj) - _CLAIM_KEYS), sorted(_CLAIM_KEYS - set(obj))
                raise MalformedEvidence(f"claims: unknown members {extra} or missing members {missing}")
            tls = obj["tls"]
            key_release = obj["key_release"]
            modes = obj["insecure_modes"]
            if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
                raise MalformedEvidence("claims: 'insecure_modes' must be a list of strings")
            nonces, enclave_nonce = obj["nonces"], obj["enclave_nonce"]
            if not isinstance(nonces, list) or not all(_is_nonce_hex(n) for n in (*nonces, enclave_nonce)):
                raise MalformedEvidence(
                    "claims: 'nonces' and 'enclave_nonce' must be 64 lowercase hex digits"
                )
            issued_at, max_age = obj["issued_at"], obj["max_age_s"]
            if type(issued_at) is not int or not (max_age is None or type(max_age) is int):
                raise MalformedEvidence("claims: 'issued_at' and 'max_age_s' must be integers")
            canary = obj["canary"]
            if not isinstance(canary, Mapping):
                raise MalformedEvidence("claims: 'canary' must be an object")
            claims = cls(
                nonces=tuple(bytes.fromhex(n) for n in nonces),
                enclave_nonce=bytes.fromhex(enclave_nonce),
                issued_at=issued_at,
                max_age_s=max_age,
                canary=dict(canary),
                tee=TeeKind(obj["tee"]),
                insecure_modes=tuple(modes),
                model_digest=str(obj["model"]["manifest_digest"]),
                config_sha256=str(obj["config"]["sha256"]),
                init_data=None if obj["init_data"] is None else str(obj["init_data"]["digest"]),
                tls_spki_sha256=None if tls is None else str(tls["spki_sha256"]),
                devices=tuple(
                    DeviceClaim(tee=str(d["tee"]), evidence_sha384=str(d["evidence_sha384"]))
                    for d in obj["devices"]
                ),
                key_release=None if key_release is None else dict(key_release),
                runtime={str(k): str(v) for k, v in dict(obj["runtime"]).items()},
            )
            if obj["insecure"] is not claims.insecure:
                raise MalformedEvidence("claims: 'insecure' contradicts the TEE and the insecure modes")
            return claims
        except MalformedEvidence:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvidence(f"claims are malformed: {type(exc).__name__}") from exc


def _is_nonce_hex(value: object) -> bool:
    return isinstance(value, str) and _NONCE_HEX.fullmatch(value) is not None


_NONCE_HEX = re.compile(r"[0-9a-f]{64}")
_CLAIM_KEYS = frozenset(
    {"purpose", "nonces", "enclave_nonce", "issued_at", "max_age_s", "tee", "insecure", "insecure_modes",
     "model", "config", "init_data", "tls", "devices", "key_release", "canary", "runtime"}
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentCheck:
    """One verification step and its outcome."""

    name: str
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationDocument:
    """Claims plus the evidence that commits to them."""

    claims: AttestationClaims
    primary: Evidence
    devices: tuple[Evidence, ...] = ()
    #: Verification collateral by TEE (TDX: dcap-qvl collateral JSON; SNP: ``{"vcek": <b64 DER>}``).
    #: Not covered by the report data: each item is authenticated by its own signatures.
    collateral: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DOCUMENT_FORMAT,
            "report_data_algorithm": "sha384(jcs(claims))",
            "claims": self.claims.to_json(),
            "evidence": {
                "tee": self.primary.tee.value,
                "primary": self.primary.to_json(),
                "devices": [{"tee": d.tee.value, "evidence": d.to_json()} for d in self.devices],
            },
            "collateral": dict(self.collateral),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, obj: object) -> AttestationDocument:
        """Parse a document; raises :class:`MalformedEvidence` on anything unexpected."""
        if not isinstance(obj, Mapping):
            raise MalformedEvidence("attestation document must be a JSON object")
        if obj.get("format") != DOCUMENT_FORMAT:
            raise MalformedEvidence(
                f"unsupported attestation document format {obj.get('format')!r}; expected {DOCUMENT_FORMAT}"
            )
        claims = AttestationClaims.from_json(obj.get("claims"))
        evidence = obj.get("evidence")
        if not isinstance(evidence, Mapping):
            raise MalformedEvidence("attestation document: 'evidence' must be an object")
        try:
            tee = TeeKind(str(evidence.get("tee")))
        except ValueError as exc:
            raise MalformedEvidence("attestation document: unknown TEE") from exc
        if tee != claims.tee:
            raise MalformedEvidence("attestation document: evidence TEE differs from the claimed TEE")
        if BACKENDS[tee].device:
            raise MalformedEvidence(f"attestation document: {tee.value} is not a CPU TEE")
        primary = evidence_from_json(tee, evidence.get("primary"))
        devices_json = evidence.get("devices", [])
        if not isinstance(devices_json, Sequence):
            raise MalformedEvidence("attestation document: 'devices' must be a list")
        devices: list[Evidence] = []
        for item in devices_json:
            if not isinstance(item, Mapping):
                raise MalformedEvidence("attestation document: device entries must be objects")
            try:
                dev_tee = TeeKind(str(item.get("tee")))
            except ValueError as exc:
                raise MalformedEvidence("attestation document: unknown device TEE") from exc
            if not BACKENDS[dev_tee].device:
                raise MalformedEvidence(f"attestation document: {dev_tee.value} is not a device TEE")
            devices.append(evidence_from_json(dev_tee, item.get("evidence")))
        try:
            claims.report_data()  # claims that cannot be canonicalised (huge ints, NaN) are refused here
        except ValueError as exc:
            raise MalformedEvidence("attestation document: the claims cannot be canonicalised") from exc
        collateral = obj.get("collateral", {})
        if not isinstance(collateral, Mapping) or not all(isinstance(k, str) for k in collateral):
            raise MalformedEvidence("attestation document: 'collateral' must be an object keyed by TEE")
        return cls(claims=claims, primary=primary, devices=tuple(devices), collateral=dict(collateral))

    def check_binding(
        self,
        *,
        nonce: bytes | None,
        observed_tls_spki_sha256: str | None,
        expected_model_digest: str | None,
        expected_config_sha256: str | None = None,
        allow_insecure: bool = False,
        allow_no_tls: bool = False,
        now: float | None = None,
        max_age_s: int = 300,
    ) -> list[DocumentCheck]:
        """Check what the claims say against what the client knows, step by step.

        Verified: (1) the client's nonce is among those the document answers, or, with
        ``nonce=None`` (the cached, unchallenged document), that it is within its stated age and
        within ``max_age_s`` (the verifier's own bound) at ``now`` (default: this machine's
        clock) — which proves no freshness beyond what the enclave's clock says; (2) the claimed
        device digests are the digests of the device evidence included; (3) the TLS key the
        client talked to is the one claimed; (4) the model is the expected one; (5) the run
        configuration is the expected one, if one is given; (6) an insecure TEE is refused
        unless allowed; (7) the canary
        outcome is reported.

        Not verified here: the hardware evidence itself and that its report data equals
        :meth:`AttestationClaims.report_data` — :func:`attest.verify.verify_evidence` does that
        with the digest this method's caller passes it.

        Raises:
            VerificationError: a binding check failed (the message names the step).
            PolicyViolation: insecure TEE, missing TLS binding or other model than expected.
        """
        checks: list[DocumentCheck] = []
        claims = self.claims
        # (1) Freshness: our nonce must be answered, or the unchallenged document still in date.
        if nonce is not None:
            if nonce not in claims.nonces:
                raise VerificationError("nonce: the document answers other nonces (replayed or stale)")
            shared = f" (one collection for {len(claims.nonces)} requests)" if len(claims.nonces) > 1 else ""
            checks.append(DocumentCheck(name="nonce", ok=True, detail="answers the nonce sent" + shared))
        else:
            if claims.max_age_s is None:
                raise VerificationError(
                    "nonce: a challenged document was given where the cached one was asked"
                )
            at = time.time() if now is None else now
            age = at - claims.issued_at
            bound = min(claims.max_age_s, max_age_s)
            if age < -UNCHALLENGED_CLOCK_SKEW_S:
                raise VerificationError(
                    f"nonce: the cached document is dated {-age:.0f} s in the future: the enclave's or "
                    f"this machine's clock is off by more than {UNCHALLENGED_CLOCK_SKEW_S} s; ask with a "
                    "nonce instead"
                )
            if age > bound:
                raise VerificationError(
                    f"nonce: the cached document is {age:.0f} s old; it may be used for {bound} s "
                    f"(it states {claims.max_age_s} s, the verifier allows {max_age_s} s)"
                )
            checks.append(
                DocumentCheck(
                    name="nonce",
                    ok=True,
                    detail=f"unchallenged, {max(age, 0):.0f} s old of at most {bound} s",
                )
            )
        # (2) Device evidence digests.
        actual = [
            DeviceClaim(tee=d.tee.value, evidence_sha384=device_evidence_digest(d)) for d in self.devices
        ]
        if tuple(actual) != claims.devices:
            raise VerificationError("devices: the device evidence does not match the claimed digests")
        checks.append(
            DocumentCheck(name="devices", ok=True, detail=f"{len(actual)} device evidence object(s)")
        )
        # (3) TLS key binding.
        if claims.tls_spki_sha256 is None or observed_tls_spki_sha256 is None:
            if not allow_no_tls:
                raise PolicyViolation(
                    "tls: the attestation is not bound to a TLS key (plain HTTP or no TLS claim); "
                    "anyone on the path could relay it. Use TLS, or pass --allow-no-tls for development."
                )
            checks.append(DocumentCheck(name="tls", ok=True, detail="not bound to TLS (allowed by flag)"))
        elif claims.tls_spki_sha256 != observed_tls_spki_sha256:
            raise VerificationError(
                "tls: the server's TLS key is not the one the enclave attested (possible interception)"
            )
        else:
            checks.append(
                DocumentCheck(name="tls", ok=True, detail=f"spki sha256 {observed_tls_spki_sha256}")
            )
        # (4) Model identity.
        if expected_model_digest is not None and claims.model_digest != expected_model_digest:
            raise PolicyViolation(
                f"model: the server runs model {claims.model_digest}, "
                f"not the expected {expected_model_digest}"
            )
        checks.append(
            DocumentCheck(
                name="model",
                ok=True,
                detail=claims.model_digest + ("" if expected_model_digest else " (no expected digest given)"),
            )
        )
        # (5) Run configuration.
        if expected_config_sha256 is not None and claims.config_sha256 != expected_config_sha256:
            raise PolicyViolation(
                f"config: the server runs configuration sha256:{claims.config_sha256}, "
                f"not the expected sha256:{expected_config_sha256}"
            )
        checks.append(
            DocumentCheck(
                name="config",
                ok=True,
                detail="sha256:"
                + claims.config_sha256
                + ("" if expected_config_sha256 else " (no expected digest given)"),
            )
        )
        # (6) Insecure TEE.
        insecure = claims.insecure or any(BACKENDS[d.tee].insecure for d in self.devices)
        if insecure and not allow_insecure:
            modes = "; ".join(claims.insecure_modes) or "sample TEE"
            raise PolicyViolation(
                f"tee: the server runs in INSECURE development mode ({modes}); its attestation proves "
                "nothing. Pass --allow-insecure-sample-tee only for development."
            )
        detail = claims.tee.value + (f" (INSECURE: {'; '.join(claims.insecure_modes)})" if insecure else "")
        checks.append(DocumentCheck(name="tee", ok=True, detail=detail))
        # (7) Canary: a document exists only after it passed, or when the model records none.
        if claims.canary.get("status") == "passed":
            detail = f"{claims.canary.get('tokens')} tokens equal to the packer's reference"
        else:
            detail = "not run: the model records no canary reference (packed before canaries, or --no-canary)"
        checks.append(DocumentCheck(name="canary", ok=True, detail=detail))
        return checks
