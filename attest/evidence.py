"""The evidence interface shared by the attesters, the verifiers and the KBS wire format.

Each TEE's evidence (in its folder under :mod:`attest.tee`) is a frozen dataclass with
``to_json()`` (the JSON object Trustee's attester sends for that TEE) and ``from_json()``. The
JSON shapes follow ``guest-components:attestation-agent/attester/src/<tee>/mod.rs`` exactly, so
the same objects can be posted to a real Trustee KBS.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from foundation.errors import MalformedEvidence

__all__ = [
    "Evidence",
    "TeeKind",
    "additional_evidence_string",
    "b64decode_strict",
]


class TeeKind(StrEnum):
    """TEE names as serialised by ``kbs-types`` ``enum Tee`` (serde names).

    What each kind is (primary or device, secure or not, its parser, attester and verifier) is
    its backend's to say: :func:`attest.tee.backend` is the one place that maps a kind to it.
    """

    TDX = "tdx"
    SNP = "snp"
    SAMPLE = "sample"
    NVIDIA = "nvidia"
    SAMPLE_DEVICE = "sampledevice"


@runtime_checkable
class Evidence(Protocol):
    """Evidence of one TEE, serialisable to the JSON Trustee expects for it."""

    tee: ClassVar[TeeKind]

    def to_json(self) -> dict[str, Any]:
        """Return the Trustee-shaped JSON object."""
        ...


def b64decode_strict(value: object, what: str) -> bytes:
    """Decode standard base64 (padding required), raising :class:`MalformedEvidence`."""
    if not isinstance(value, str):
        raise MalformedEvidence(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEvidence(f"{what} is not valid base64") from exc


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
