"""The draft Attested Confidential Inference report (``aci/1``): its binding, typed, and pure checks.

ACI (dstack's draft spec, ``Dstack-TEE/private-ai-gateway spec/aci.md``) binds a *workload
keyset* to the TEE evidence through one statement with exact bytes (§3.1-3.2)::

    keyset_digest = "sha256:" + hex(sha256(JCS(keyset)))
    statement     = {"keyset_digest":"sha256:<hex>","nonce":"<64 hex>"|null,"purpose":"aci.report_data.v1"}
    report_data   = sha256(statement)          # zero-padded to 64 bytes in the TEE field

The statement has no room for anything else, so whatever must be bound goes *inside the
keyset*. enclave-serve adds an ``enclave_serve`` member (its own, so bound by the digest) with
what ACI lacks: the model identity, the run configuration's SHA-256, the init-data digest, the
canary outcome, every insecure development mode in effect, and the device (GPU) evidence::

    "enclave_serve": {"model": "sha256:…", "config_sha256": "sha256:…", "init_data": "sha384:…"|null,
                      "canary": "passed"|"not-recorded", "insecure_modes": ["…"],
                      "enclave_nonce": "<64 hex>",
                      "devices": [{"tee": "nvidia", "evidence_sha384": "<hex>"}]}

The device evidence is collected once per keyset, over a nonce derived from the keyset itself
with its ``devices`` list empty (:func:`aci_device_nonce`; ``enclave_nonce`` is the enclave's
random value, so the nonce was unknown before the keyset existed), and the SHA-384 of each
evidence object's JCS form is listed in ``devices``. Every report carries that same device
evidence: a relay that strips, adds or swaps device evidence, or strips the insecure modes from
the report's unbound ``evidence.insecure_modes``, no longer matches the keyset the CPU evidence
binds. What this does not give: GPU evidence fresh for the client's nonce (only the CPU evidence
is; the runtime's watchdog re-attests the GPUs while serving), and that the GPUs are wired to
this CPU (GPU evidence is relayable until TDISP/TEE-IO). Our own document
(:mod:`attest.document`) binds fresh GPU evidence per nonce.

:class:`AciReport` parses a report strictly; :meth:`AciReport.check_binding` checks the
bindings step by step. Neither verifies the hardware evidence itself: the user's side does
(:func:`attest.client.aci.verify_aci_report`). Pure: nothing here opens a connection.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from attest.binding import canonical_json
from attest.document import DeviceClaim, DocumentCheck, device_evidence_digest
from attest.evidence import Evidence, TeeKind
from attest.tee import BACKENDS, evidence_from_json
from foundation.errors import MalformedEvidence, PolicyViolation, VerificationError

__all__ = [
    "ACI_DEVICE_PURPOSE",
    "ACI_PURPOSE",
    "ACI_TEE_TYPES",
    "ACI_VERSION",
    "MAX_KEYSET_LIFETIME_S",
    "AciReport",
    "AciWorkload",
    "aci_device_nonce",
    "aci_report_data",
    "aci_statement",
    "device_claims",
    "keyset_digest",
]

#: ``api_version`` of the report (aci.md §4.1).
ACI_VERSION = "aci/1"
#: The statement's ``purpose`` (aci.md §3.2).
ACI_PURPOSE = "aci.report_data.v1"
#: Domain separator of the device nonce derived from the keyset (enclave-serve's own).
ACI_DEVICE_PURPOSE = "enclave-serve/aci/device-nonce/v1"
#: ACI ``tee_type`` by our TEE kind (aci.md §4.2), from the backends (:mod:`attest.tee`); the
#: sample TEE needs a verifier extension.
ACI_TEE_TYPES: Mapping[TeeKind, str] = MappingProxyType(
    {kind: b.aci_tee_type for kind, b in BACKENDS.items() if b.aci_tee_type is not None}
)
#: A keyset whose ``not_after`` lies further ahead is refused (aci.md §3.1: "SHOULD reject an
#: implausibly distant not_after"); the runtime's keysets live 7 days.
MAX_KEYSET_LIFETIME_S = 31 * 86400

_EXTENSION = "enclave_serve"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX96 = re.compile(r"[0-9a-f]{96}")
_KEYSET_KEYS = frozenset(
    {"subject", "not_after", "receipt_signing_keys", "e2ee_public_keys", "tls_public_keys"}
)
_WORKLOAD_KEYS = frozenset(
    {"model", "config_sha256", "init_data", "canary", "insecure_modes", "enclave_nonce", "devices"}
)


def keyset_digest(keyset: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the keyset's JCS form (aci.md §3.1).

    Raises:
        ValueError: the keyset cannot be canonicalised (NaN, integers beyond 2^53).
    """
    return "sha256:" + hashlib.sha256(canonical_json(dict(keyset))).hexdigest()


def aci_statement(digest: str, nonce: bytes | None) -> bytes:
    """The exact statement bytes for ``digest`` and a 32-byte ``nonce`` (None: unchallenged)."""
    if _DIGEST.fullmatch(digest) is None:
        raise ValueError("keyset digest must be sha256:<64 lowercase hex>")
    if nonce is not None and len(nonce) != 32:
        raise ValueError("an ACI nonce is 32 bytes")
    nonce_json = "null" if nonce is None else f'"{nonce.hex()}"'
    return f'{{"keyset_digest":"{digest}","nonce":{nonce_json},"purpose":"{ACI_PURPOSE}"}}'.encode()


def aci_report_data(digest: str, nonce: bytes | None) -> bytes:
    """The 32-byte ``report_data``: SHA-256 of the statement (the TEE field holds it zero-padded)."""
    return hashlib.sha256(aci_statement(digest, nonce)).digest()


def aci_device_nonce(keyset: Mapping[str, Any]) -> bytes:
    """The 32-byte nonce the devices sign once per keyset.

    ``SHA-256(JCS({"purpose": ACI_DEVICE_PURPOSE, "keyset_digest": <digest of the keyset with
    enclave_serve.devices = []>}))``: the same for the keyset before and after its device digests
    are filled in, so the server derives it before collecting and a verifier from the full keyset.

    Raises:
        ValueError: the keyset has no ``enclave_serve`` object, or cannot be canonicalised.
    """
    workload = keyset.get(_EXTENSION)
    if not isinstance(workload, Mapping):
        raise ValueError(f"the keyset has no {_EXTENSION!r} object")
    base = {**keyset, _EXTENSION: {**workload, "devices": []}}
    body = {"purpose": ACI_DEVICE_PURPOSE, "keyset_digest": keyset_digest(base)}
    return hashlib.sha256(canonical_json(body)).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class AciWorkload:
    """The keyset's ``enclave_serve`` member: what enclave-serve binds beside ACI's keys."""

    #: The model identity (``"sha256:<hex>"``, the manifest digest).
    model: str
    #: 64 lowercase hex digits (on the wire: ``"sha256:<hex>"``).
    config_sha256: str
    init_data: str | None
    canary: str
    insecure_modes: tuple[str, ...]
    enclave_nonce: bytes
    devices: tuple[DeviceClaim, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config_sha256": "sha256:" + self.config_sha256,
            "init_data": self.init_data,
            "canary": self.canary,
            "insecure_modes": list(self.insecure_modes),
            "enclave_nonce": self.enclave_nonce.hex(),
            "devices": [d.to_json() for d in self.devices],
        }

    @classmethod
    def from_json(cls, obj: object) -> AciWorkload:
        """Parse the member strictly; raises :class:`MalformedEvidence`."""
        if not isinstance(obj, Mapping) or set(obj) != _WORKLOAD_KEYS:
            raise MalformedEvidence(
                f"aci: the keyset's {_EXTENSION!r} member must be an object with exactly "
                f"{sorted(_WORKLOAD_KEYS)}"
            )
        model, config, init_data, canary = obj["model"], obj["config_sha256"], obj["init_data"], obj["canary"]
        modes, nonce, devices = obj["insecure_modes"], obj["enclave_nonce"], obj["devices"]
        if not isinstance(model, str) or not isinstance(canary, str):
            raise MalformedEvidence(f"aci: {_EXTENSION}.model and .canary must be strings")
        if not isinstance(config, str) or _DIGEST.fullmatch(config) is None:
            raise MalformedEvidence(f"aci: {_EXTENSION}.config_sha256 must be sha256:<64 lowercase hex>")
        if init_data is not None and not isinstance(init_data, str):
            raise MalformedEvidence(f"aci: {_EXTENSION}.init_data must be a string or null")
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise MalformedEvidence(f"aci: {_EXTENSION}.insecure_modes must be a list of strings")
        if not isinstance(nonce, str) or _HEX64.fullmatch(nonce) is None:
            raise MalformedEvidence(f"aci: {_EXTENSION}.enclave_nonce must be 64 lowercase hex digits")
        if not isinstance(devices, list):
            raise MalformedEvidence(f"aci: {_EXTENSION}.devices must be a list")
        claims = []
        for item in devices:
            if (
                not isinstance(item, Mapping)
                or set(item) != {"tee", "evidence_sha384"}
                or not isinstance(item["tee"], str)
                or not isinstance(item["evidence_sha384"], str)
                or _HEX96.fullmatch(item["evidence_sha384"]) is None
            ):
                raise MalformedEvidence(
                    f"aci: {_EXTENSION}.devices entries must be {{tee, evidence_sha384: 96 hex}}"
                )
            claims.append(DeviceClaim(tee=item["tee"], evidence_sha384=item["evidence_sha384"]))
        return cls(
            model=model,
            config_sha256=config.removeprefix("sha256:"),
            init_data=init_data,
            canary=canary,
            insecure_modes=tuple(modes),
            enclave_nonce=bytes.fromhex(nonce),
            devices=tuple(claims),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AciReport:
    """A parsed ``GET /v1/aci/attestation`` answer: the keyset as sent, and the evidence."""

    #: The keyset exactly as parsed: it is hashed as the verifier received it.
    keyset: Mapping[str, Any]
    #: The top-level ``workload_keyset_digest`` (a hint until :meth:`check_binding` recomputes it).
    stated_digest: str
    workload: AciWorkload
    not_after: int
    tls_spki_sha256: tuple[str, ...]
    tee_type: str
    report_data: bytes
    primary: Evidence
    devices: tuple[Evidence, ...] = ()
    #: Not bound (each item is authenticated by its own signatures when used).
    collateral: Mapping[str, Any] = field(default_factory=dict)
    #: The report's *unbound* copy of the insecure modes (``evidence.insecure_modes``).
    listed_insecure_modes: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: object) -> AciReport:
        """Parse a report strictly; raises :class:`MalformedEvidence` on anything unexpected."""
        try:
            return cls._parse(obj)
        except MalformedEvidence:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvidence(f"aci: the report is malformed ({type(exc).__name__})") from None

    @classmethod
    def _parse(cls, obj: object) -> AciReport:
        if not isinstance(obj, Mapping) or obj.get("api_version") != ACI_VERSION:
            raise MalformedEvidence(f"aci: not an {ACI_VERSION} report")
        attestation = obj["attestation"]
        if not isinstance(attestation, Mapping):
            raise MalformedEvidence("aci: 'attestation' must be an object")
        keyset = attestation["workload_keyset"]
        if not isinstance(keyset, Mapping) or set(keyset) != _KEYSET_KEYS | {_EXTENSION}:
            raise MalformedEvidence(
                f"aci: the workload keyset must have exactly {sorted(_KEYSET_KEYS | {_EXTENSION})}"
            )
        workload = AciWorkload.from_json(keyset[_EXTENSION])
        not_after = keyset["not_after"]
        if type(not_after) is not int:
            raise MalformedEvidence("aci: the keyset's not_after must be an integer")
        tls = keyset["tls_public_keys"]
        if not isinstance(tls, list) or not all(
            isinstance(k, Mapping) and isinstance(k.get("spki_sha256"), str) for k in tls
        ):
            raise MalformedEvidence("aci: tls_public_keys must be a list of {spki_sha256}")
        stated = obj["workload_keyset_digest"]
        if not isinstance(stated, str):
            raise MalformedEvidence("aci: workload_keyset_digest must be a string")
        report_data = attestation["report_data"]
        if not isinstance(report_data, str) or _HEX64.fullmatch(report_data) is None:
            raise MalformedEvidence("aci: report_data must be 64 lowercase hex digits")
        evidence = attestation["evidence"]
        if not isinstance(evidence, Mapping):
            raise MalformedEvidence("aci: 'evidence' must be an object")
        primary_json = evidence["primary"]
        if not isinstance(primary_json, Mapping):
            raise MalformedEvidence("aci: evidence.primary must be an object")
        tee = TeeKind(str(primary_json["tee"]))
        if BACKENDS[tee].device:
            raise MalformedEvidence(f"aci: {tee.value} is not a CPU TEE")
        if attestation["tee_type"] != ACI_TEE_TYPES.get(tee, tee.value):
            raise MalformedEvidence("aci: tee_type does not name the primary evidence's TEE")
        primary = evidence_from_json(tee, primary_json["evidence"])
        devices: list[Evidence] = []
        devices_json = evidence["devices"]
        if not isinstance(devices_json, list):
            raise MalformedEvidence("aci: evidence.devices must be a list")
        for item in devices_json:
            if not isinstance(item, Mapping):
                raise MalformedEvidence("aci: device entries must be objects")
            dev_tee = TeeKind(str(item["tee"]))
            if not BACKENDS[dev_tee].device:
                raise MalformedEvidence(f"aci: {dev_tee.value} is not a device TEE")
            devices.append(evidence_from_json(dev_tee, item["evidence"]))
        modes = evidence.get("insecure_modes", [])
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise MalformedEvidence("aci: evidence.insecure_modes must be a list of strings")
        collateral = evidence.get("collateral", {})
        if not isinstance(collateral, Mapping) or not all(isinstance(k, str) for k in collateral):
            raise MalformedEvidence("aci: evidence.collateral must be an object keyed by TEE")
        return cls(
            keyset=dict(keyset),
            stated_digest=stated,
            workload=workload,
            not_after=not_after,
            tls_spki_sha256=tuple(str(k["spki_sha256"]) for k in tls),
            tee_type=str(attestation["tee_type"]),
            report_data=bytes.fromhex(report_data),
            primary=primary,
            devices=tuple(devices),
            collateral=dict(collateral),
            listed_insecure_modes=tuple(modes),
        )

    @property
    def insecure(self) -> bool:
        """Whether anything insecure is in effect: a bound insecure mode, or sample evidence."""
        return (
            bool(self.workload.insecure_modes)
            or BACKENDS[self.primary.tee].insecure
            or any(BACKENDS[d.tee].insecure for d in self.devices)
        )

    def check_binding(
        self,
        *,
        nonce: bytes | None,
        observed_tls_spki_sha256: str | None,
        expected_model_digest: str | None = None,
        expected_config_sha256: str | None = None,
        allow_insecure: bool = False,
        allow_no_tls: bool = False,
        now: float | None = None,
    ) -> list[DocumentCheck]:
        """Check what the report binds against what the client knows, step by step.

        Verified: (1) ``keyset``: the keyset digest, recomputed from the embedded keyset, is the
        stated one, and the keyset is within its ``not_after`` (and that is not implausibly
        distant) at ``now`` (default: this machine's clock); (2) ``nonce``: ``report_data`` is
        the statement's digest for that digest and the client's nonce (``None``: the
        unchallenged form, which proves no freshness); (3) ``insecure_modes``: the report's
        unbound list is the keyset's; (4) ``devices``: the device evidence's digests are the
        keyset's list, in order; (5) ``tls``: the TLS key the client talked to is listed;
        (6) ``model`` and (7) ``config``: the expected ones, if given; (8) ``tee``: anything
        insecure is refused unless allowed.

        Not verified here: the hardware evidence, that its report data is ``report_data``, and
        that the device evidence answers :func:`aci_device_nonce` —
        :func:`attest.client.aci.verify_aci_report` does that.

        Raises:
            VerificationError: a binding check failed (the message names the step).
            PolicyViolation: anything insecure without ``allow_insecure``, no TLS binding, or
                another model or configuration than expected.
        """
        checks: list[DocumentCheck] = []
        at = time.time() if now is None else now
        # (1) The keyset: its digest, and its lifetime.
        try:
            digest = keyset_digest(self.keyset)
        except ValueError:
            raise VerificationError("keyset: the keyset cannot be canonicalised (JCS)") from None
        if digest != self.stated_digest:
            raise VerificationError(
                "keyset: workload_keyset_digest is not the digest of the embedded keyset (altered in transit)"
            )
        if at >= self.not_after:
            raise VerificationError(
                f"keyset: expired {at - self.not_after:.0f} s ago (not_after {self.not_after}); "
                "the server restarts with a fresh keyset: fetch the report again"
            )
        if self.not_after - at > MAX_KEYSET_LIFETIME_S:
            raise VerificationError(
                f"keyset: not_after lies {(self.not_after - at) / 86400:.0f} days ahead, beyond the "
                f"{MAX_KEYSET_LIFETIME_S // 86400} days a verifier accepts"
            )
        checks.append(DocumentCheck(name="keyset", ok=True, detail=f"{digest}, valid until {self.not_after}"))
        # (2) The statement: report_data commits to the keyset digest and our nonce.
        if self.report_data != aci_report_data(digest, nonce):
            raise VerificationError(
                "nonce: report_data is not the statement's digest for this keyset and the nonce sent "
                "(replayed, stale, or another keyset)"
            )
        detail = "answers the nonce sent" if nonce is not None else "unchallenged (proves no freshness)"
        checks.append(DocumentCheck(name="nonce", ok=True, detail=detail))
        # (3) The insecure modes: the report's copy is not bound; the keyset's is.
        if self.listed_insecure_modes != self.workload.insecure_modes:
            raise VerificationError(
                "insecure_modes: the report's list differs from the one its keyset binds (stripped or "
                "altered in transit)"
            )
        checks.append(
            DocumentCheck(
                name="insecure_modes",
                ok=True,
                detail="; ".join(self.workload.insecure_modes) or "none bound in the keyset",
            )
        )
        # (4) The device evidence: exactly the evidence whose digests the keyset lists.
        actual = device_claims(self.devices)
        if actual != self.workload.devices:
            raise VerificationError(
                f"devices: the report carries {len(actual)} device evidence object(s) that are not the "
                f"{len(self.workload.devices)} its keyset binds (stripped, added or swapped in transit)"
            )
        checks.append(
            DocumentCheck(name="devices", ok=True, detail=f"{len(actual)} device evidence object(s) bound")
        )
        # (5) TLS: the key the client talked to is in the keyset.
        if not self.tls_spki_sha256 or observed_tls_spki_sha256 is None:
            if not allow_no_tls:
                raise PolicyViolation(
                    "tls: the report is not bound to a TLS key (plain HTTP or no TLS key in the keyset); "
                    "anyone on the path could relay it. Use TLS, or pass --allow-no-tls for development."
                )
            checks.append(DocumentCheck(name="tls", ok=True, detail="not bound to TLS (allowed by flag)"))
        elif observed_tls_spki_sha256 not in self.tls_spki_sha256:
            raise VerificationError(
                "tls: the server's TLS key is not one the keyset lists (possible interception)"
            )
        else:
            checks.append(
                DocumentCheck(name="tls", ok=True, detail=f"spki sha256 {observed_tls_spki_sha256}")
            )
        # (6) Model and (7) configuration.
        if expected_model_digest is not None and self.workload.model != expected_model_digest:
            raise PolicyViolation(
                f"model: the server runs model {self.workload.model}, "
                f"not the expected {expected_model_digest}"
            )
        checks.append(DocumentCheck(name="model", ok=True, detail=self.workload.model))
        if expected_config_sha256 is not None and self.workload.config_sha256 != expected_config_sha256:
            raise PolicyViolation(
                f"config: the server runs configuration sha256:{self.workload.config_sha256}, "
                f"not the expected sha256:{expected_config_sha256}"
            )
        checks.append(DocumentCheck(name="config", ok=True, detail="sha256:" + self.workload.config_sha256))
        # (8) Anything insecure.
        if self.insecure and not allow_insecure:
            modes = "; ".join(self.workload.insecure_modes) or "sample evidence"
            raise PolicyViolation(
                f"tee: the server runs in INSECURE development mode ({modes}); its attestation proves "
                "nothing. Pass --allow-insecure-sample-tee only for development."
            )
        detail = self.primary.tee.value + (" (INSECURE)" if self.insecure else "")
        checks.append(DocumentCheck(name="tee", ok=True, detail=detail))
        return checks


def device_claims(devices: Sequence[Evidence]) -> tuple[DeviceClaim, ...]:
    """The keyset's ``devices`` list for device evidence objects, in order."""
    return tuple(DeviceClaim(tee=d.tee.value, evidence_sha384=device_evidence_digest(d)) for d in devices)
