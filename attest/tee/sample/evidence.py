"""Trustee's *sample* and *sampledevice* evidence models (insecure: nothing signs them)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from attest.evidence import TeeKind, b64decode_strict
from foundation.errors import MalformedEvidence

__all__ = ["SAMPLE_INIT_DATA_SIZE", "SampleDeviceEvidence", "SampleEvidence"]

#: Size of the init-data register the sample TEE pretends to have (TDX's MRCONFIGID size).
SAMPLE_INIT_DATA_SIZE = 48


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
