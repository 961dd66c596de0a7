"""Typed evidence models shared by the attesters, the verifiers and the KBS wire format.

Each TEE's evidence is a frozen dataclass with ``to_json()`` (the JSON object Trustee's
attester sends for that TEE) and ``from_json()``. The JSON shapes follow
``guest-components:attestation-agent/attester/src/<tee>/mod.rs`` exactly, so the same objects
can be posted to a real Trustee KBS.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from attest.errors import MalformedEvidence

__all__ = [
    "DEVICE_TEES",
    "Evidence",
    "SampleDeviceEvidence",
    "SampleEvidence",
    "TeeKind",
    "additional_evidence_string",
    "b64decode_strict",
    "evidence_from_json",
    "register_evidence_type",
]


class TeeKind(StrEnum):
    """TEE names as serialised by ``kbs-types`` ``enum Tee`` (serde names)."""

    TDX = "tdx"
    SNP = "snp"
    SAMPLE = "sample"
    NVIDIA = "nvidia"
    SAMPLE_DEVICE = "sampledevice"

    @property
    def is_device(self) -> bool:
        """Whether this TEE is an *additional* (device) TEE rather than a primary CPU TEE."""
        return self in DEVICE_TEES

    @property
    def is_insecure(self) -> bool:
        """Whether evidence of this kind proves nothing (development only)."""
        return self in (TeeKind.SAMPLE, TeeKind.SAMPLE_DEVICE)


DEVICE_TEES = frozenset({TeeKind.NVIDIA, TeeKind.SAMPLE_DEVICE})


@runtime_checkable
class Evidence(Protocol):
    """Evidence of one TEE, serialisable to the JSON Trustee expects for it."""

    tee: ClassVar[TeeKind]

    def to_json(self) -> dict[str, Any]:
        """Return the Trustee-shaped JSON object."""
        ...


_EVIDENCE_TYPES: dict[TeeKind, Callable[[Mapping[str, Any]], Evidence]] = {}


def register_evidence_type(tee: TeeKind, from_json: Callable[[Mapping[str, Any]], Evidence]) -> None:
    """Register the JSON parser for one TEE's evidence (used by verifiers and the dev KBS)."""
    _EVIDENCE_TYPES[tee] = from_json


def evidence_from_json(tee: TeeKind, obj: object) -> Evidence:
    """Parse Trustee-shaped evidence JSON for ``tee``.

    Raises:
        MalformedEvidence: the object is not evidence of that kind, or no parser is known.
    """
    if tee not in _EVIDENCE_TYPES:
        import attest.formats  # noqa: F401  (registers the TDX, SNP and NVIDIA evidence types)
    try:
        parse = _EVIDENCE_TYPES[tee]
    except KeyError:
        raise MalformedEvidence(f"no evidence parser registered for TEE {tee.value!r}") from None
    if not isinstance(obj, Mapping):
        raise MalformedEvidence(f"{tee.value} evidence must be a JSON object")
    return parse(obj)


def b64decode_strict(value: object, what: str) -> bytes:
    """Decode standard base64 (padding required), raising :class:`MalformedEvidence`."""
    if not isinstance(value, str):
        raise MalformedEvidence(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEvidence(f"{what} is not valid base64") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleEvidence:
    """Trustee's *sample* evidence: ``{"svn": "1", "report_data": base64}``.

    .. warning::
       Sample evidence is not signed by anything. It proves nothing and exists for development
       on machines without a TEE; a verifier must refuse it unless explicitly told otherwise.
    """

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE
    svn: str = "1"
    report_data: bytes
    #: The init-data register the sample TEE pretends to have (``--sample-init-data``); an
    #: enclave-serve extension that Trustee's sample verifier ignores.
    init_data: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"svn": self.svn, "report_data": base64.b64encode(self.report_data).decode()}
        if self.init_data is not None:
            out["init_data"] = base64.b64encode(self.init_data).decode()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SampleEvidence:
        svn = obj.get("svn")
        if not isinstance(svn, str):
            raise MalformedEvidence("sample evidence: 'svn' must be a string")
        init = obj.get("init_data")
        return cls(
            svn=svn,
            report_data=b64decode_strict(obj.get("report_data"), "sample report_data"),
            init_data=None if init is None else b64decode_strict(init, "sample init_data"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDeviceEvidence:
    """Trustee's *sampledevice* evidence ``{"svn": "2", "report_data": base64}`` (insecure)."""

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE_DEVICE
    svn: str = "2"
    report_data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"svn": self.svn, "report_data": base64.b64encode(self.report_data).decode()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SampleDeviceEvidence:
        svn = obj.get("svn")
        if not isinstance(svn, str):
            raise MalformedEvidence("sampledevice evidence: 'svn' must be a string")
        return cls(svn=svn, report_data=b64decode_strict(obj.get("report_data"), "sampledevice report_data"))


register_evidence_type(TeeKind.SAMPLE, SampleEvidence.from_json)
register_evidence_type(TeeKind.SAMPLE_DEVICE, SampleDeviceEvidence.from_json)


def additional_evidence_string(devices: Sequence[Evidence]) -> str:
    """Serialise device evidence the way ``kbs_protocol`` does (``serde_json::to_string``)."""
    if not devices:
        return ""
    mapping: dict[str, Any] = {}
    for dev in devices:
        if dev.tee.value in mapping:
            raise ValueError(f"two device evidence objects for {dev.tee.value}")
        mapping[dev.tee.value] = dev.to_json()
    return json.dumps(mapping, separators=(",", ":"))
