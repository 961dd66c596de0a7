"""The user-facing attestation document: typed claims, building, and pure verification.

The server publishes it at ``GET /.well-known/enclave-serve/attestation?nonce=<hex>``. A
client sends a fresh random nonce; the server answers with fresh hardware evidence whose report
data commits (see :mod:`attest.binding`) to :class:`AttestationClaims`:

* the client's nonce (freshness),
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

Verification here is pure: it takes the document, the nonce the client sent and what the client
observed (the TLS key), and returns the checks it made. It never opens a connection, so it can
be imported without the server or vLLM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attest.binding import DOCUMENT_PURPOSE, canonical_json, document_report_data
from attest.errors import MalformedEvidence, PolicyViolation, VerificationError
from attest.evidence import Evidence, TeeKind, evidence_from_json

__all__ = [
    "DOCUMENT_FORMAT",
    "NONCE_SIZE",
    "AttestationClaims",
    "AttestationDocument",
    "DeviceClaim",
    "DocumentCheck",
    "device_evidence_digest",
    "spki_sha256",
]

#: Format identifier of the attestation document (bumped on any incompatible change).
DOCUMENT_FORMAT = "enclave-serve/attestation/v2"
#: Size of the client nonce, in bytes (hex-encoded on the wire).
NONCE_SIZE = 32


def spki_sha256(public_key_der: bytes) -> str:
    """Return the hex SHA-256 of a DER SubjectPublicKeyInfo (what TLS pinning compares)."""
    return hashlib.sha256(public_key_der).hexdigest()


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

    nonce: bytes
    tee: TeeKind
    insecure_modes: tuple[str, ...]
    model_digest: str
    config_sha256: str
    tls_spki_sha256: str | None
    #: ``"<algorithm>:<hex>"`` of the CoCo init-data the runtime was launched with, or None.
    init_data: str | None = None
    devices: tuple[DeviceClaim, ...] = ()
    key_release: Mapping[str, Any] | None = None
    runtime: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        if len(self.config_sha256) != 64 or self.config_sha256.strip("0123456789abcdef"):
            raise ValueError("config_sha256 must be 64 lowercase hex digits")

    @property
    def insecure(self) -> bool:
        """Whether anything insecure is in effect (an insecure mode or an insecure TEE)."""
        return bool(self.insecure_modes) or self.tee.is_insecure

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": DOCUMENT_PURPOSE,
            "nonce": self.nonce.hex(),
            "tee": self.tee.value,
            "insecure": self.insecure,
            "insecure_modes": list(self.insecure_modes),
            "model": {"manifest_digest": self.model_digest},
            "config": {"sha256": self.config_sha256},
            "init_data": None if self.init_data is None else {"digest": self.init_data},
            "tls": None if self.tls_spki_sha256 is None else {"spki_sha256": self.tls_spki_sha256},
            "devices": [d.to_json() for d in self.devices],
            "key_release": None if self.key_release is None else dict(self.key_release),
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
            tls = obj["tls"]
            key_release = obj["key_release"]
            modes = obj["insecure_modes"]
            if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
                raise MalformedEvidence("claims: 'insecure_modes' must be a list of strings")
            claims = cls(
                nonce=bytes.fromhex(obj["nonce"]),
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
        if tee.is_device:
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
            if not dev_tee.is_device:
                raise MalformedEvidence(f"attestation document: {dev_tee.value} is not a device TEE")
            devices.append(evidence_from_json(dev_tee, item.get("evidence")))
        try:
            claims.report_data()  # claims that cannot be canonicalised (huge ints, NaN) are refused here
        except ValueError as exc:
            raise MalformedEvidence("attestation document: the claims cannot be canonicalised") from exc
        return cls(claims=claims, primary=primary, devices=tuple(devices))

    def check_binding(
        self,
        *,
        nonce: bytes,
        observed_tls_spki_sha256: str | None,
        expected_model_digest: str | None,
        expected_config_sha256: str | None = None,
        allow_insecure: bool = False,
        allow_no_tls: bool = False,
    ) -> list[DocumentCheck]:
        """Check what the claims say against what the client knows, step by step.

        Verified: (1) the nonce is the one the client sent; (2) the claimed device digests are
        the digests of the device evidence included; (3) the TLS key the client talked to is
        the one claimed; (4) the model is the expected one; (5) the run configuration is the
        expected one, if one is given; (6) an insecure TEE is refused unless allowed.

        Not verified here: the hardware evidence itself and that its report data equals
        :meth:`AttestationClaims.report_data` — :func:`attest.verify.verify_evidence` does that
        with the digest this method's caller passes it.

        Raises:
            VerificationError: a binding check failed (the message names the step).
            PolicyViolation: insecure TEE, missing TLS binding or other model than expected.
        """
        checks: list[DocumentCheck] = []
        claims = self.claims
        # (1) Freshness: the nonce must be ours.
        if claims.nonce != nonce:
            raise VerificationError("nonce: the document answers a different nonce (replayed or stale)")
        checks.append(DocumentCheck(name="nonce", ok=True, detail="matches the nonce sent"))
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
        insecure = claims.insecure or any(d.tee.is_insecure for d in self.devices)
        if insecure and not allow_insecure:
            modes = "; ".join(claims.insecure_modes) or "sample TEE"
            raise PolicyViolation(
                f"tee: the server runs in INSECURE development mode ({modes}); its attestation proves "
                "nothing. Pass --allow-insecure-sample-tee only for development."
            )
        detail = claims.tee.value + (f" (INSECURE: {'; '.join(claims.insecure_modes)})" if insecure else "")
        checks.append(DocumentCheck(name="tee", ok=True, detail=detail))
        return checks
