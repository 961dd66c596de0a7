"""Parse NVIDIA Hopper attestation reports (SPDM 1.1 GET_MEASUREMENTS) and NVIDIA evidence JSON.

What ``nvmlDeviceGetConfComputeGpuAttestationReport`` returns is the SPDM request the driver
sent, followed by the GPU's signed response (DMTF DSP0274 1.1.1, section 10.11)::

    request (37):  version | code | param1 | param2 | nonce[32] | slot id
    response:      version | code | param1 | param2 | number of blocks u8
                   | measurement record length u24 | measurement record
                   | responder nonce[32] | opaque length u16 | opaque data | signature[96]

Opaque data comes in two layouts (NVIDIA attestation docs, "opaque data format"):

* **legacy** (drivers before CUDA 13.5): a TLV list, ``u16 type, u16 length, value``;
* **versioned**: a 12-byte header (``"NVDAOD"`` magic, ``u16`` profile that must be 0, then
  major, minor, patch and one padding byte) followed by ``u16 type, u16 value type, u16 length,
  value`` entries. A verifier tells them apart by the magic (NVIDIA attestation-sdk
  ``spdm_opaque_data_parser``); the header's major is then the opaque-data version.

Type numbers and names follow nvtrust's local verifier, Trustee
(``deps/verifier/src/nvidia/spdm_response.rs``) and NVIDIA's attestation-sdk. The signature
(Hopper, Blackwell: raw ECDSA P-384 r||s) covers every byte before it. Bytes after the signature
are not signed: Trustee parses field by field and ignores them (a Hopper report collected by
CoCo under driver 580.x ends with one ``00``), so this parser accepts them too and records how
many there are (:attr:`NvidiaReport.trailing_bytes`, shown by ``inspect``).

This module only parses; see :mod:`attest.tee.nvidia.verifier` for the signature, chain and nonce.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from attest.evidence import TeeKind, b64decode_strict
from attest.tee._reader import Reader
from foundation.errors import MalformedEvidence

__all__ = [
    "HOPPER_SIGNATURE_SIZE",
    "NVDAOD_MAGIC",
    "SPDM_NONCE_SIZE",
    "SPDM_REQUEST_SIZE",
    "MeasurementBlock",
    "NvidiaDeviceEvidence",
    "NvidiaEvidence",
    "NvidiaReport",
    "OpaqueField",
    "OpaqueHeader",
    "OpaqueType",
    "SpdmRequest",
    "expected_gpu_nonce",
    "format_vbios_version",
    "parse_nvidia_report",
]

#: SPDM version byte 0x11 = SPDM 1.1 (DSP0274 1.1.1, table 4).
SPDM_VERSION_1_1 = 0x11
#: GET_MEASUREMENTS request code and MEASUREMENTS response code (DSP0274 table 4/5).
SPDM_GET_MEASUREMENTS = 0xE0
SPDM_MEASUREMENTS = 0x60
#: Nonce size (DSP0274 table 42).
SPDM_NONCE_SIZE = 32


def expected_gpu_nonce(runtime_data: bytes) -> bytes:
    """Return the 32-byte SPDM nonce a GPU is given for ``runtime_data`` (first 32, zero-padded)."""
    return runtime_data[:SPDM_NONCE_SIZE].ljust(SPDM_NONCE_SIZE, b"\0")


#: GET_MEASUREMENTS request with signature requested: 4 header bytes, nonce, slot id.
SPDM_REQUEST_SIZE = 4 + SPDM_NONCE_SIZE + 1
#: MeasurementSpecification bit 0 = DMTF (DSP0274 table 48).
DMTF_MEASUREMENT_SPECIFICATION = 1
#: Hopper responds with a raw ECDSA P-384 signature r||s (Trustee HOPPER_SIGNATURE_LENGTH).
HOPPER_SIGNATURE_SIZE = 96
#: Upper bound on report size (NVML_CC_GPU_ATTESTATION_REPORT_SIZE = 0x2000).
MAX_REPORT_SIZE = 0x2000
#: FWID opaque field and TCG DICE FWID are SHA-384 digests.
FWID_SIZE = 48
#: Magic of the versioned opaque-data header (NVIDIA opaque data format; attestation-sdk
#: ``OPAQUE_DATA_MAGIC``), and the header's size.
NVDAOD_MAGIC = b"NVDAOD"
NVDAOD_HEADER_SIZE = 12
#: NVDEC0_STATUS values (attestation-sdk ``NVDEC_STATUS_ENABLED``/``_DISABLED``).
NVDEC_STATUS = {0xAA: "enabled", 0x55: "disabled"}


class OpaqueType(IntEnum):
    """NVIDIA opaque-data TLV types (nvtrust ``OpaqueDataType``; Trustee ``OpaqueDataType``)."""

    CERT_ISSUER_NAME = 1
    CERT_AUTHORITY_KEY_IDENTIFIER = 2
    DRIVER_VERSION = 3
    GPU_INFO = 4
    ID_SKU = 5
    VBIOS_VERSION = 6
    MANUFACTURER_ID = 7
    TAMPER_DETECTION = 8
    SMC = 9
    VPR = 10
    NVDEC0_STATUS = 11
    MSRSCNT = 12
    CPRINFO = 13
    BOARD_ID = 14
    CHIP_SKU = 15
    CHIP_SKU_MOD = 16
    PROJECT = 17
    PROJECT_SKU = 18
    PROJECT_SKU_MOD = 19
    FWID = 20
    PROTECTED_PCIE_STATUS = 21
    SWITCH_PDI = 22
    FLOORSWEPT_PORTS = 23
    POSITION_ID = 24
    LOCK_SWITCH_STATUS = 25
    GPU_LINK_CONN = 32
    SYS_ENABLE_STATUS = 33
    OPAQUE_DATA_VERSION = 34
    CHIP_INFO = 35
    FEATURE_FLAG = 36
    #: Versioned opaque data only (attestation-sdk tests; no nvtrust/Trustee name yet).
    FSP_UCODE_MIN_SVN = 37
    NVLE_STATUS = 38


#: Opaque fields that hold NUL-terminated ASCII (nvtrust decodes these as strings).
_TEXT_FIELDS = frozenset(
    {
        OpaqueType.DRIVER_VERSION,
        OpaqueType.CHIP_SKU,
        OpaqueType.CHIP_SKU_MOD,
        OpaqueType.PROJECT,
        OpaqueType.PROJECT_SKU,
        OpaqueType.PROJECT_SKU_MOD,
    }
)
#: FEATURE_FLAG values (nvtrust / Trustee ``decode_feature_flag``).
FEATURE_FLAGS = {0: "SPT", 1: "MPT", 2: "PPCIE"}


def format_vbios_version(raw: bytes) -> str:
    """Format the VBIOS_VERSION opaque field as nvtrust does (``format_vbios_version``).

    The first half of the bytes reversed, dot-separated hex, then the first byte of the second
    half: ``00 9f 00 96 01 00 00 00`` becomes ``96.00.9f.00.01``.

    Raises:
        MalformedEvidence: fewer than two bytes.
    """
    if len(raw) < 2:
        raise MalformedEvidence("NVIDIA report: VBIOS_VERSION opaque field is shorter than 2 bytes")
    half = len(raw) // 2
    return ".".join(f"{b:02x}" for b in reversed(raw[:half])) + f".{raw[half]:02x}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpdmRequest:
    """The GET_MEASUREMENTS request the driver sent; ``nonce`` is the caller's nonce."""

    spdm_version: int
    code: int
    param1: int
    param2: int
    nonce: bytes
    slot_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementBlock:
    """One DMTF measurement block (DSP0274 tables 47/49)."""

    index: int
    value_type: int
    value: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class OpaqueHeader:
    """The header of versioned opaque data (``NVDAOD``, profile, version)."""

    profile: int
    major: int
    minor: int
    patch: int

    @property
    def version(self) -> str:
        """``"major.minor.patch"``."""
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True, slots=True, kw_only=True)
class OpaqueField:
    """One NVIDIA opaque entry; ``type`` is an :class:`OpaqueType` or an unknown raw number.

    ``value_type`` is the versioned layout's value type (``None`` in the legacy layout).
    """

    type: OpaqueType | int
    value: bytes
    value_type: int | None = None

    @property
    def name(self) -> str:
        """The nvtrust-style upper-case name, or ``TYPE_<n>`` for unknown types."""
        return self.type.name if isinstance(self.type, OpaqueType) else f"TYPE_{self.type}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaReport:
    """A parsed Hopper attestation report. ``signed_data`` is everything before the signature."""

    raw: bytes
    request: SpdmRequest
    spdm_version: int
    code: int
    param1: int
    param2: int
    measurement_blocks: tuple[MeasurementBlock, ...]
    responder_nonce: bytes
    opaque_fields: tuple[OpaqueField, ...]
    signature: bytes
    #: Where the signature starts: it covers ``raw[:signature_offset]``.
    signature_offset: int
    #: The versioned opaque-data header, or None for the legacy layout.
    opaque_header: OpaqueHeader | None = None

    @property
    def signed_data(self) -> bytes:
        """The bytes the signature covers: everything before it."""
        return self.raw[: self.signature_offset]

    @property
    def trailing_bytes(self) -> int:
        """How many (unsigned) bytes follow the signature."""
        return len(self.raw) - self.signature_offset - len(self.signature)

    @property
    def nonce(self) -> bytes:
        """The caller's nonce (the *request* nonce, bytes 4..36), not the responder's."""
        return self.request.nonce

    @property
    def measurements(self) -> dict[int, bytes]:
        """Measurement values by block index."""
        return {b.index: b.value for b in self.measurement_blocks}

    def opaque(self, kind: OpaqueType) -> bytes | None:
        """Return the raw value of one opaque field, or None when absent."""
        for f in self.opaque_fields:
            if f.type == kind:
                return f.value
        return None

    def _text(self, kind: OpaqueType) -> str | None:
        raw = self.opaque(kind)
        return None if raw is None else raw.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def driver_version(self) -> str | None:
        """The driver version (NUL-terminated ASCII), e.g. ``550.90.07``."""
        return self._text(OpaqueType.DRIVER_VERSION)

    @property
    def vbios_version(self) -> str | None:
        """The VBIOS version formatted as nvtrust does, e.g. ``96.00.9f.00.01``."""
        raw = self.opaque(OpaqueType.VBIOS_VERSION)
        return None if raw is None else format_vbios_version(raw)

    @property
    def project(self) -> str | None:
        """The board project, e.g. ``1010``."""
        return self._text(OpaqueType.PROJECT)

    @property
    def project_sku(self) -> str | None:
        """The project SKU, e.g. ``0200``."""
        return self._text(OpaqueType.PROJECT_SKU)

    @property
    def project_sku_mod(self) -> str | None:
        """The project SKU modifier."""
        return self._text(OpaqueType.PROJECT_SKU_MOD)

    @property
    def chip_sku(self) -> str | None:
        """The chip SKU, e.g. ``882``."""
        return self._text(OpaqueType.CHIP_SKU)

    @property
    def chip_sku_mod(self) -> str | None:
        """The chip SKU modifier."""
        return self._text(OpaqueType.CHIP_SKU_MOD)

    @property
    def fwid(self) -> bytes | None:
        """The firmware ID (48 bytes), also bound into the leaf certificate."""
        return self.opaque(OpaqueType.FWID)

    @property
    def feature_flag(self) -> str | None:
        """``SPT``, ``MPT`` or ``PPCIE`` (absent on older drivers)."""
        raw = self.opaque(OpaqueType.FEATURE_FLAG)
        if raw is None:
            return None
        return FEATURE_FLAGS.get(int.from_bytes(raw[:8], "little"), "unknown")

    @property
    def opaque_data_version(self) -> int | None:
        """The opaque-data format version: the header's major, else the legacy field, if any."""
        if self.opaque_header is not None:
            return self.opaque_header.major
        raw = self.opaque(OpaqueType.OPAQUE_DATA_VERSION)
        return None if raw is None else int.from_bytes(raw[:8], "little")

    @property
    def nvdec0_status(self) -> str | None:
        """``enabled`` (0xAA) or ``disabled`` (0x55), else the raw byte in hex."""
        raw = self.opaque(OpaqueType.NVDEC0_STATUS)
        if raw is None:
            return None
        return NVDEC_STATUS.get(raw[0], raw.hex()) if len(raw) == 1 else raw.hex()

    def to_json(self) -> dict[str, Any]:
        """Return every field (nvtrust names for opaque data), bytes as lower-case hex."""
        opaque: dict[str, Any] = {}
        for f in self.opaque_fields:
            opaque[f.name.lower()] = f.value.hex()
        opaque.update(
            {
                "driver_version": self.driver_version,
                "vbios_version": self.vbios_version,
                "project": self.project,
                "project_sku": self.project_sku,
                "project_sku_mod": self.project_sku_mod,
                "chip_sku": self.chip_sku,
                "chip_sku_mod": self.chip_sku_mod,
                "feature_flag": self.feature_flag,
                "opaque_data_version": self.opaque_data_version,
                "nvdec0_status": self.nvdec0_status,
            }
        )
        return {
            "size": len(self.raw),
            "spdm_version": f"{self.spdm_version:#x}",
            "nonce": self.nonce.hex(),
            "request": {
                "param1": self.request.param1,
                "param2": self.request.param2,
                "slot_id": self.request.slot_id,
            },
            "measurements": {str(b.index): b.value.hex() for b in self.measurement_blocks},
            "responder_nonce": self.responder_nonce.hex(),
            **{k: v for k, v in opaque.items() if v is not None},
            "fwid": None if self.fwid is None else self.fwid.hex(),
            "opaque_layout": "versioned" if self.opaque_header is not None else "legacy",
            "opaque_header": None if self.opaque_header is None else self.opaque_header.version,
            "signature": self.signature.hex(),
            "trailing_unsigned_bytes": self.trailing_bytes,
        }


def _parse_request(r: Reader) -> SpdmRequest:
    version = r.u8("request.spdm_version")
    if version != SPDM_VERSION_1_1:
        raise MalformedEvidence(f"NVIDIA report: request SPDM version {version:#x} is not 1.1 (0x11)")
    code = r.u8("request.code")
    if code != SPDM_GET_MEASUREMENTS:
        raise MalformedEvidence(f"NVIDIA report: request code {code:#x} is not GET_MEASUREMENTS (0xe0)")
    return SpdmRequest(
        spdm_version=version,
        code=code,
        param1=r.u8("request.param1"),
        param2=r.u8("request.param2"),
        nonce=r.take(SPDM_NONCE_SIZE, "request.nonce"),
        slot_id=r.u8("request.slot_id"),
    )


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    r = Reader(record, "NVIDIA measurement record")
    blocks: list[MeasurementBlock] = []
    for _ in range(count):
        index = r.u8("block.index")
        spec = r.u8("block.specification")
        size = r.u16("block.size")
        if spec != DMTF_MEASUREMENT_SPECIFICATION:
            raise MalformedEvidence(f"NVIDIA report: measurement block {index} is not a DMTF measurement")
        body = Reader(r.take(size, f"block[{index}]"), f"NVIDIA measurement block {index}")
        value_type = body.u8("dmtf.type")
        value_size = body.u16("dmtf.size")
        value = body.take(value_size, "dmtf.value")
        if body.remaining:
            raise MalformedEvidence(
                f"NVIDIA report: measurement block {index} has {body.remaining} extra bytes"
            )
        blocks.append(MeasurementBlock(index=index, value_type=value_type, value=value))
    if r.remaining:
        raise MalformedEvidence(f"NVIDIA report: {r.remaining} bytes after the last measurement block")
    return tuple(blocks)


def _parse_opaque(data: bytes) -> tuple[OpaqueHeader | None, tuple[OpaqueField, ...]]:
    r = Reader(data, "NVIDIA opaque data")
    header = None
    if len(data) >= NVDAOD_HEADER_SIZE and data[: len(NVDAOD_MAGIC)] == NVDAOD_MAGIC:
        r.take(len(NVDAOD_MAGIC), "opaque.magic")
        profile = r.u16("opaque.profile")
        if profile != 0:
            raise MalformedEvidence(f"NVIDIA report: versioned opaque data has profile {profile}, not 0")
        major, minor, patch = r.u8("opaque.major"), r.u8("opaque.minor"), r.u8("opaque.patch")
        r.u8("opaque.padding")
        header = OpaqueHeader(profile=profile, major=major, minor=minor, patch=patch)
    fields: list[OpaqueField] = []
    seen: set[int] = set()
    while r.remaining:
        raw_type = r.u16("opaque.type")
        value_type = r.u16("opaque.value_type") if header is not None else None
        size = r.u16("opaque.size")
        value = r.take(size, f"opaque[{raw_type}]")
        if raw_type in seen:
            raise MalformedEvidence(f"NVIDIA report: opaque field {raw_type} appears twice")
        seen.add(raw_type)
        kind: OpaqueType | int
        try:
            kind = OpaqueType(raw_type)
        except ValueError:
            kind = raw_type
        if isinstance(kind, OpaqueType) and kind in _TEXT_FIELDS:
            try:
                value.split(b"\0", 1)[0].decode("ascii")
            except UnicodeDecodeError:
                raise MalformedEvidence(f"NVIDIA report: opaque field {kind.name} is not ASCII") from None
        if kind == OpaqueType.VBIOS_VERSION and size < 2:
            raise MalformedEvidence("NVIDIA report: VBIOS_VERSION opaque field is shorter than 2 bytes")
        if kind == OpaqueType.FWID and size != FWID_SIZE:
            raise MalformedEvidence(f"NVIDIA report: FWID is {size} bytes, expected {FWID_SIZE}")
        if kind in (OpaqueType.FEATURE_FLAG, OpaqueType.OPAQUE_DATA_VERSION) and size > 8:
            raise MalformedEvidence(f"NVIDIA report: opaque field {raw_type} is longer than 8 bytes")
        fields.append(OpaqueField(type=kind, value=value, value_type=value_type))
    return header, tuple(fields)


def parse_nvidia_report(data: bytes) -> NvidiaReport:
    """Parse a Hopper/Blackwell attestation report (SPDM GET_MEASUREMENTS request ‖ response).

    Checks structure only: SPDM 1.1, request/response codes, that every length fits, DMTF
    measurement blocks, either opaque-data layout, no duplicate opaque fields, and a 96-byte
    signature where the fields end (unsigned bytes after it are tolerated, as Trustee does, and
    counted). The signature, certificate chain and nonce are not checked here.

    Raises:
        MalformedEvidence: the bytes are not such a report.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence("NVIDIA report must be bytes")
    data = bytes(data)
    if len(data) > MAX_REPORT_SIZE:
        raise MalformedEvidence(f"NVIDIA report is {len(data)} bytes; more than {MAX_REPORT_SIZE}")
    r = Reader(data, "NVIDIA report")
    request = _parse_request(r)
    version = r.u8("response.spdm_version")
    if version != SPDM_VERSION_1_1:
        raise MalformedEvidence(f"NVIDIA report: response SPDM version {version:#x} is not 1.1 (0x11)")
    code = r.u8("response.code")
    if code != SPDM_MEASUREMENTS:
        raise MalformedEvidence(f"NVIDIA report: response code {code:#x} is not MEASUREMENTS (0x60)")
    param1 = r.u8("response.param1")
    param2 = r.u8("response.param2")
    count = r.u8("response.number_of_blocks")
    record_len = r.uint(3, "response.measurement_record_length")
    blocks = _parse_blocks(r.take(record_len, "response.measurement_record"), count)
    responder_nonce = r.take(SPDM_NONCE_SIZE, "response.nonce")
    opaque_len = r.u16("response.opaque_length")
    header, opaque = _parse_opaque(r.take(opaque_len, "response.opaque_data"))
    signature_offset = len(data) - r.remaining
    signature = r.take(HOPPER_SIGNATURE_SIZE, "response.signature")
    return NvidiaReport(
        raw=data,
        request=request,
        spdm_version=version,
        code=code,
        param1=param1,
        param2=param2,
        measurement_blocks=blocks,
        responder_nonce=responder_nonce,
        opaque_fields=opaque,
        signature=signature,
        signature_offset=signature_offset,
        opaque_header=header,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaDeviceEvidence:
    """One GPU: architecture, UUID, raw report bytes and the PEM certificate chain NVML gave."""

    arch: str
    uuid: str
    evidence: bytes
    certificate: bytes

    def to_json(self) -> dict[str, Any]:
        """Return Trustee's ``{"arch", "uuid", "evidence": b64, "certificate": b64}``."""
        return {
            "arch": self.arch,
            "uuid": self.uuid,
            "evidence": base64.b64encode(self.evidence).decode(),
            "certificate": base64.b64encode(self.certificate).decode(),
        }

    @classmethod
    def from_json(cls, obj: object) -> NvidiaDeviceEvidence:
        """Parse one ``device_evidence_list`` entry (``evidence`` may also be legacy hex).

        Raises:
            MalformedEvidence: a field is missing or badly encoded.
        """
        if not isinstance(obj, Mapping):
            raise MalformedEvidence("nvidia evidence: device entries must be objects")
        arch = obj.get("arch")
        uuid = obj.get("uuid", "unknown")
        if not isinstance(arch, str) or not isinstance(uuid, str):
            raise MalformedEvidence("nvidia evidence: 'arch' and 'uuid' must be strings")
        raw = obj.get("evidence")
        if isinstance(raw, str) and len(raw) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in raw):
            # Trustee accepts the legacy hex encoding; hex text is never valid report base64
            # of the right structure, and the report parser will reject a wrong guess.
            try:
                evidence = binascii.unhexlify(raw)
            except binascii.Error as exc:  # pragma: no cover - guarded by the check above
                raise MalformedEvidence("nvidia evidence: bad hex") from exc
        else:
            evidence = b64decode_strict(raw, "nvidia evidence")
        return cls(
            arch=arch,
            uuid=uuid,
            evidence=evidence,
            certificate=b64decode_strict(obj.get("certificate"), "nvidia certificate"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaEvidence:
    """Trustee NVIDIA evidence: ``{"device_evidence_list": [...]}``, one entry per GPU."""

    tee: ClassVar[TeeKind] = TeeKind.NVIDIA
    devices: tuple[NvidiaDeviceEvidence, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the Trustee-shaped JSON object."""
        return {"device_evidence_list": [d.to_json() for d in self.devices]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NvidiaEvidence:
        """Build from Trustee-shaped JSON.

        Raises:
            MalformedEvidence: the list is missing or an entry is malformed.
        """
        if not isinstance(obj, Mapping):
            raise MalformedEvidence("nvidia evidence must be a JSON object")
        devices = obj.get("device_evidence_list")
        if not isinstance(devices, Sequence) or isinstance(devices, str | bytes):
            raise MalformedEvidence("nvidia evidence: 'device_evidence_list' must be an array")
        return cls(devices=tuple(NvidiaDeviceEvidence.from_json(d) for d in devices))
