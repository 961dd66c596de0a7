"""Parse AMD SEV-SNP attestation reports, the GHCB certificate table, and SNP evidence JSON.

The report layout is ``ATTESTATION_REPORT`` of the SEV Secure Nested Paging Firmware ABI
Specification (AMD 56860, table 23 "ATTESTATION_REPORT Structure", report versions 2 to 5), as
encoded by the virtee ``sev`` crate (``src/firmware/guest/types/snp.rs``). Trustee's SNP
evidence carries the report as that crate's serde JSON; :meth:`SnpReport.from_sev_json`
rebuilds the exact 1184 bytes the signature covers, :meth:`SnpReport.to_sev_json` goes back.

This module only parses; see :mod:`attest.tee.snp.verifier` for signature and chain checks.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from attest.evidence import TeeKind
from attest.tee._reader import Reader
from foundation.errors import MalformedEvidence

__all__ = [
    "CERT_TABLE_GUIDS",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "FirmwareVersion",
    "SnpCertType",
    "SnpCertificate",
    "SnpEvidence",
    "SnpProduct",
    "SnpReport",
    "TcbVersion",
    "parse_snp_cert_table",
    "parse_snp_report",
]

#: Size of ATTESTATION_REPORT (SNP ABI table 23; sev crate ``ATT_REP_FW_LEN``).
REPORT_SIZE = 0x4A0
#: The signature covers bytes 0x000..0x29F (SNP ABI table 23, SIGNATURE).
SIGNED_SIZE = 0x2A0
#: Report versions this parser understands (SNP ABI 1.55: 2; 1.56: 3; 1.57: 4/5).
SUPPORTED_VERSIONS = range(2, 6)
#: ECDSA P-384 R and S components are 72-byte little-endian fields (SNP ABI table 139).
SIGNATURE_COMPONENT_SIZE = 72
#: KEY_INFO bits 4:2 SIGNING_KEY (SNP ABI table 23): 0 VCEK, 1 VLEK, 7 none.
SIGNING_KEY_SHIFT = 2
SIGNING_KEY_MASK = 0x7
#: GUEST_POLICY bit 19 DEBUG (SNP ABI table 9).
POLICY_DEBUG_BIT = 1 << 19


class SnpProduct(StrEnum):
    """EPYC generations with SEV-SNP, named as AMD KDS names them."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> SnpProduct | None:
        """Map CPUID family/model to a product (virtee sev ``Generation::identify_cpu``), or None."""
        if family == 0x19:
            if model <= 0x0F:
                return cls.MILAN
            if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
                return cls.GENOA
        if family == 0x1A and model <= 0x11:
            return cls.TURIN
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbVersion:
    """A TCB_VERSION (SNP ABI table 3). ``fmc`` is only present on Turin.

    Milan/Genoa bytes: ``[bootloader, tee, 0, 0, 0, 0, snp, microcode]``; Turin:
    ``[fmc, bootloader, tee, snp, 0, 0, 0, microcode]`` (sev crate ``from_turin_bytes``).
    """

    raw: bytes
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def from_bytes(cls, raw: bytes, *, turin: bool) -> TcbVersion:
        """Decode eight TCB bytes in the product's layout."""
        if turin:
            return cls(raw=raw, fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7])
        return cls(raw=raw, bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def to_sev_json(self) -> dict[str, int | None]:
        """Return the sev crate's serde form ``{fmc, bootloader, tee, snp, microcode}``."""
        return {
            "fmc": self.fmc,
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }

    def __str__(self) -> str:
        fmc = "" if self.fmc is None else f"fmc={self.fmc} "
        return f"{fmc}bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FirmwareVersion:
    """A firmware version, stored in the report as ``build, minor, major`` bytes."""

    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpReport:
    """A parsed SEV-SNP ATTESTATION_REPORT. ``raw`` is the 1184 bytes; ``signed_data`` their first 0x2A0."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    sig_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes
    signature_s: bytes

    @property
    def signed_data(self) -> bytes:
        """The bytes the report signature covers (0x000..0x29F)."""
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> int:
        """KEY_INFO.SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none."""
        return (self.key_info >> SIGNING_KEY_SHIFT) & SIGNING_KEY_MASK

    @property
    def product(self) -> SnpProduct | None:
        """The product from the CPUID bytes (reports v3+), or None (v2, or an unknown CPU)."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return SnpProduct.from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def debug_allowed(self) -> bool:
        """Whether the guest policy allows debugging (the host can read guest memory)."""
        return bool(self.policy & POLICY_DEBUG_BIT)

    def to_json(self) -> dict[str, Any]:
        """Return every field with SNP ABI names, bytes as lower-case hex (for display)."""
        out = self.to_sev_json()
        for key, value in list(out.items()):
            if isinstance(value, list):
                out[key] = bytes(value).hex()
        out["platform_info"] = out.pop("plat_info")
        out["signature"] = {"r": self.signature_r.hex(), "s": self.signature_s.hex()}
        out["current"] = str(self.current_version)
        out["committed"] = str(self.committed_version)
        product = self.product
        out["product"] = None if product is None else product.value
        out["signing_key"] = {0: "VCEK", 1: "VLEK", 7: "none"}.get(self.signing_key, str(self.signing_key))
        out["debug_allowed"] = self.debug_allowed
        return out

    def to_sev_json(self) -> dict[str, Any]:
        """Return the virtee ``sev`` crate serde JSON of this report (what Trustee sends)."""
        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy,
            "family_id": list(self.family_id),
            "image_id": list(self.image_id),
            "vmpl": self.vmpl,
            "sig_algo": self.sig_algo,
            "current_tcb": self.current_tcb.to_sev_json(),
            "plat_info": self.platform_info,
            "key_info": self.key_info,
            "report_data": list(self.report_data),
            "measurement": list(self.measurement),
            "host_data": list(self.host_data),
            "id_key_digest": list(self.id_key_digest),
            "author_key_digest": list(self.author_key_digest),
            "report_id": list(self.report_id),
            "report_id_ma": list(self.report_id_ma),
            "reported_tcb": self.reported_tcb.to_sev_json(),
            "cpuid_fam_id": self.cpuid_fam_id,
            "cpuid_mod_id": self.cpuid_mod_id,
            "cpuid_step": self.cpuid_step,
            "chip_id": list(self.chip_id),
            "committed_tcb": self.committed_tcb.to_sev_json(),
            "current": _version_json(self.current_version),
            "committed": _version_json(self.committed_version),
            "launch_tcb": self.launch_tcb.to_sev_json(),
        }
        if self.version >= 5:
            out["launch_mit_vector"] = self.launch_mit_vector
            out["current_mit_vector"] = self.current_mit_vector
        out["signature"] = {"r": list(self.signature_r), "s": list(self.signature_s)}
        return out

    @classmethod
    def from_sev_json(cls, obj: object) -> SnpReport:
        """Rebuild the 1184-byte report from the sev crate serde JSON and parse it.

        Reserved bytes are zero, as the firmware writes them, so the rebuilt bytes are the
        signed bytes.

        Raises:
            MalformedEvidence: a field is missing, of the wrong type or out of range.
        """
        return parse_snp_report(_encode_sev_json(obj))


def _version_json(v: FirmwareVersion) -> dict[str, int]:
    return {"major": v.major, "minor": v.minor, "build": v.build}


def _is_turin_like_chip_id(chip_id: bytes) -> bool:
    # sev crate chip_id_is_turin_like: Turin CHIP_IDs are 8 bytes, zero-extended to 64.
    return any(chip_id) and not any(chip_id[8:])


def _uses_turin_tcb(version: int, family: int | None, model: int | None, chip_id: bytes) -> bool:
    if version >= 3 and family is not None and model is not None:
        return SnpProduct.from_cpuid(family, model) is SnpProduct.TURIN
    return _is_turin_like_chip_id(chip_id)


def _firmware_version(raw: bytes) -> FirmwareVersion:
    return FirmwareVersion(build=raw[0], minor=raw[1], major=raw[2])


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte SEV-SNP attestation report (versions 2 to 5).

    Checks the size and version only; reserved bytes are not checked, and the signature is
    not verified here.

    Raises:
        MalformedEvidence: the bytes are not an SNP report of a supported version.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence("SNP report must be bytes")
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise MalformedEvidence(f"SNP report is {len(data)} bytes; expected {REPORT_SIZE}")
    r = Reader(data, "SNP report")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(f"SNP report: unsupported version {version} (expected 2 to 5)")
    has_cpuid = version >= 3
    fam = data[0x188] if has_cpuid else None
    mod = data[0x189] if has_cpuid else None
    step = data[0x18A] if has_cpuid else None
    chip_id = data[0x1A0:0x1E0]
    turin = _uses_turin_tcb(version, fam, mod, chip_id)

    def tcb(field: str) -> TcbVersion:
        return TcbVersion.from_bytes(r.take(8, field), turin=turin)

    guest_svn = r.u32("guest_svn")
    policy = r.u64("policy")
    family_id = r.take(16, "family_id")
    image_id = r.take(16, "image_id")
    vmpl = r.u32("vmpl")
    sig_algo = r.u32("sig_algo")
    current_tcb = tcb("current_tcb")
    platform_info = r.u64("platform_info")
    key_info = r.u32("key_info")
    r.skip(4, "reserved_0x4c")
    report_data = r.take(64, "report_data")
    measurement = r.take(48, "measurement")
    host_data = r.take(32, "host_data")
    id_key_digest = r.take(48, "id_key_digest")
    author_key_digest = r.take(48, "author_key_digest")
    report_id = r.take(32, "report_id")
    report_id_ma = r.take(32, "report_id_ma")
    reported_tcb = tcb("reported_tcb")
    r.skip(24, "cpuid_and_reserved")
    r.skip(64, "chip_id")
    committed_tcb = tcb("committed_tcb")
    current_version = _firmware_version(r.take(4, "current_version"))
    committed_version = _firmware_version(r.take(4, "committed_version"))
    launch_tcb = tcb("launch_tcb")
    launch_mit = current_mit = None
    if version >= 5:
        launch_mit = r.u64("launch_mit_vector")
        current_mit = r.u64("current_mit_vector")
    r.offset = SIGNED_SIZE
    signature_r = r.take(SIGNATURE_COMPONENT_SIZE, "signature.r")
    signature_s = r.take(SIGNATURE_COMPONENT_SIZE, "signature.s")
    return SnpReport(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        sig_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        key_info=key_info,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=reported_tcb,
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=chip_id,
        committed_tcb=committed_tcb,
        current_version=current_version,
        committed_version=committed_version,
        launch_tcb=launch_tcb,
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=signature_r,
        signature_s=signature_s,
    )


# --- sev crate serde JSON -> bytes -------------------------------------------------------------


def _json_int(obj: Mapping[str, Any], key: str, bits: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise MalformedEvidence(f"SNP report JSON: {key!r} must be an integer in [0, 2**{bits})")
    return value


def _json_opt_int(obj: Mapping[str, Any], key: str, bits: int) -> int | None:
    return None if obj.get(key) is None else _json_int(obj, key, bits)


def _json_bytes(value: object, key: str, size: int) -> bytes:
    if (
        not isinstance(value, list)
        or len(value) != size
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value)
    ):
        raise MalformedEvidence(f"SNP report JSON: {key!r} must be an array of {size} bytes")
    return bytes(value)


def _json_obj(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedEvidence(f"SNP report JSON: {key!r} must be an object")
    return value


def _json_tcb(obj: Mapping[str, Any], key: str, turin: bool) -> bytes:
    tcb = _json_obj(obj.get(key), key)
    bl, tee, snp, ucode = (_json_int(tcb, f, 8) for f in ("bootloader", "tee", "snp", "microcode"))
    fmc = _json_opt_int(tcb, "fmc", 8)
    if turin:
        return bytes([fmc or 0, bl, tee, snp, 0, 0, 0, ucode])
    if fmc is not None:
        raise MalformedEvidence(f"SNP report JSON: {key!r} has an fmc value but the CPU is not a Turin")
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


def _json_version(obj: Mapping[str, Any], key: str) -> bytes:
    v = _json_obj(obj.get(key), key)
    return bytes([_json_int(v, "build", 8), _json_int(v, "minor", 8), _json_int(v, "major", 8), 0])


def _encode_sev_json(obj: object) -> bytes:
    o = _json_obj(obj, "attestation_report")
    version = _json_int(o, "version", 32)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(f"SNP report JSON: unsupported version {version} (expected 2 to 5)")
    chip_id = _json_bytes(o.get("chip_id"), "chip_id", 64)
    fam = mod = step = None
    if version >= 3:
        fam = _json_int(o, "cpuid_fam_id", 8)
        mod = _json_int(o, "cpuid_mod_id", 8)
        step = _json_int(o, "cpuid_step", 8)
    turin = _uses_turin_tcb(version, fam, mod, chip_id)
    sig = _json_obj(o.get("signature"), "signature")
    out = bytearray(REPORT_SIZE)

    def put(offset: int, value: bytes) -> None:
        out[offset : offset + len(value)] = value

    put(0x00, version.to_bytes(4, "little"))
    put(0x04, _json_int(o, "guest_svn", 32).to_bytes(4, "little"))
    put(0x08, _json_int(o, "policy", 64).to_bytes(8, "little"))
    put(0x10, _json_bytes(o.get("family_id"), "family_id", 16))
    put(0x20, _json_bytes(o.get("image_id"), "image_id", 16))
    put(0x30, _json_int(o, "vmpl", 32).to_bytes(4, "little"))
    put(0x34, _json_int(o, "sig_algo", 32).to_bytes(4, "little"))
    put(0x38, _json_tcb(o, "current_tcb", turin))
    put(0x40, _json_int(o, "plat_info", 64).to_bytes(8, "little"))
    put(0x48, _json_int(o, "key_info", 32).to_bytes(4, "little"))
    put(0x50, _json_bytes(o.get("report_data"), "report_data", 64))
    put(0x90, _json_bytes(o.get("measurement"), "measurement", 48))
    put(0xC0, _json_bytes(o.get("host_data"), "host_data", 32))
    put(0xE0, _json_bytes(o.get("id_key_digest"), "id_key_digest", 48))
    put(0x110, _json_bytes(o.get("author_key_digest"), "author_key_digest", 48))
    put(0x140, _json_bytes(o.get("report_id"), "report_id", 32))
    put(0x160, _json_bytes(o.get("report_id_ma"), "report_id_ma", 32))
    put(0x180, _json_tcb(o, "reported_tcb", turin))
    if fam is not None and mod is not None and step is not None:
        put(0x188, bytes([fam, mod, step]))
    put(0x1A0, chip_id)
    put(0x1E0, _json_tcb(o, "committed_tcb", turin))
    put(0x1E8, _json_version(o, "current"))
    put(0x1EC, _json_version(o, "committed"))
    put(0x1F0, _json_tcb(o, "launch_tcb", turin))
    if version >= 5:
        put(0x1F8, (_json_opt_int(o, "launch_mit_vector", 64) or 0).to_bytes(8, "little"))
        put(0x200, (_json_opt_int(o, "current_mit_vector", 64) or 0).to_bytes(8, "little"))
    put(SIGNED_SIZE, _json_bytes(sig.get("r"), "signature.r", SIGNATURE_COMPONENT_SIZE))
    put(SIGNED_SIZE + SIGNATURE_COMPONENT_SIZE, _json_bytes(sig.get("s"), "signature.s", 72))
    return bytes(out)


# --- certificates --------------------------------------------------------------------------------


class SnpCertType(StrEnum):
    """Certificate kinds of the GHCB certificate table, named as the sev crate serialises them."""

    ARK = "ARK"
    ASK = "ASK"
    VCEK = "VCEK"
    VLEK = "VLEK"
    CRL = "CRL"
    OTHER = "OTHER"


#: Certificate table GUIDs (GHCB spec 2.03, table 11 "Certificate Table GUIDs";
#: sev crate ``CertType`` Display).
CERT_TABLE_GUIDS: dict[uuid.UUID, SnpCertType] = {
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): SnpCertType.ARK,
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): SnpCertType.ASK,
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): SnpCertType.VCEK,
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): SnpCertType.VLEK,
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): SnpCertType.CRL,
}
#: One certificate table entry: GUID (16), offset u32, length u32.
CERT_TABLE_ENTRY_SIZE = 24
#: Bound on the number of table entries (the kernel's auxblob is a few pages).
MAX_CERT_TABLE_ENTRIES = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpCertificate:
    """One certificate (DER) or CRL from the certificate table or Trustee's ``cert_chain``."""

    cert_type: SnpCertType
    data: bytes
    guid: uuid.UUID | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the sev crate serde form ``{"cert_type": ..., "data": [ints]}``."""
        cert_type: object = self.cert_type.value
        if self.cert_type is SnpCertType.OTHER:
            cert_type = {"OTHER": str(self.guid)}
        return {"cert_type": cert_type, "data": list(self.data)}

    @classmethod
    def from_json(cls, obj: object) -> SnpCertificate:
        """Parse one ``cert_chain`` entry.

        Raises:
            MalformedEvidence: unknown certificate type or bad data.
        """
        entry = _json_obj(obj, "cert_chain[]")
        raw_type = entry.get("cert_type")
        data = entry.get("data")
        if not isinstance(data, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in data
        ):
            raise MalformedEvidence("SNP cert_chain: 'data' must be an array of bytes")
        if isinstance(raw_type, Mapping) and set(raw_type) == {"OTHER"}:
            try:
                guid = uuid.UUID(str(raw_type["OTHER"]))
            except ValueError:
                raise MalformedEvidence("SNP cert_chain: OTHER certificate type needs a GUID") from None
            return cls(cert_type=SnpCertType.OTHER, data=bytes(data), guid=guid)
        try:
            cert_type = SnpCertType(str(raw_type)) if isinstance(raw_type, str) else None
        except ValueError:
            cert_type = None
        if cert_type is None:
            raise MalformedEvidence(f"SNP cert_chain: unknown cert_type {raw_type!r}")
        if cert_type is SnpCertType.OTHER:
            raise MalformedEvidence("SNP cert_chain: OTHER certificate type needs a GUID")
        return cls(cert_type=cert_type, data=bytes(data))


def parse_snp_cert_table(data: bytes) -> tuple[SnpCertificate, ...]:
    """Parse the GHCB certificate table (configfs-tsm ``auxblob`` of ``sev_guest``).

    Entries ``{guid[16], offset u32, length u32}`` end with an all-zero entry; offsets are
    relative to the start of the table (GHCB spec 2.03, section 4.1.8.1). The certificates are
    returned as found, not checked.

    Raises:
        MalformedEvidence: the table is truncated, unterminated or points outside the blob.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence("SNP certificate table must be bytes")
    data = bytes(data)
    r = Reader(data, "SNP certificate table")
    out: list[SnpCertificate] = []
    for _ in range(MAX_CERT_TABLE_ENTRIES):
        guid_bytes = r.take(16, "entry.guid")
        offset = r.u32("entry.offset")
        length = r.u32("entry.length")
        if not any(guid_bytes):
            return tuple(out)
        if offset + length > len(data):
            raise MalformedEvidence(
                f"SNP certificate table: entry points at bytes {offset}..{offset + length}, "
                f"beyond the {len(data)}-byte blob"
            )
        guid = uuid.UUID(bytes=guid_bytes)
        cert_type = CERT_TABLE_GUIDS.get(guid, SnpCertType.OTHER)
        out.append(SnpCertificate(cert_type=cert_type, data=data[offset : offset + length], guid=guid))
    raise MalformedEvidence(f"SNP certificate table has more than {MAX_CERT_TABLE_ENTRIES} entries")


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpEvidence:
    """Trustee SNP evidence: ``{"attestation_report": <sev serde>, "cert_chain": [...] | null}``.

    ``report`` holds the raw 1184 bytes; ``cert_chain`` the certificates the guest obtained with
    the report (usually the VCEK or VLEK), or None.
    """

    tee: ClassVar[TeeKind] = TeeKind.SNP
    report: bytes
    cert_chain: tuple[SnpCertificate, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the Trustee-shaped JSON object.

        Raises:
            MalformedEvidence: ``report`` is not a parseable SNP report.
        """
        chain = None if self.cert_chain is None else [c.to_json() for c in self.cert_chain]
        return {"attestation_report": parse_snp_report(self.report).to_sev_json(), "cert_chain": chain}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SnpEvidence:
        """Build from Trustee-shaped JSON, rebuilding the raw report bytes.

        Raises:
            MalformedEvidence: the report or a certificate entry is malformed.
        """
        if not isinstance(obj, Mapping):
            raise MalformedEvidence("snp evidence must be a JSON object")
        report = SnpReport.from_sev_json(obj.get("attestation_report"))
        raw_chain = obj.get("cert_chain")
        chain: tuple[SnpCertificate, ...] | None = None
        if raw_chain is not None:
            if not isinstance(raw_chain, Sequence) or isinstance(raw_chain, str | bytes):
                raise MalformedEvidence("snp evidence: 'cert_chain' must be an array or null")
            chain = tuple(SnpCertificate.from_json(c) for c in raw_chain)
        return cls(report=report.raw, cert_chain=chain)
