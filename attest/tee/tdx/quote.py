"""Parse Intel TDX DCAP quotes (v4 and v5) into typed dataclasses, and TDX evidence JSON.

Layouts follow the Intel TDX DCAP Quote Generation Library and Quote Verification Library
API (Appendix A, "Quote Format", v4 and v5) as implemented by Phala ``dcap-qvl``
(``src/quote.rs``, ``src/constants.rs``) and Trustee (``deps/verifier/src/intel_dcap/quote.rs``)::

    header (48) | [v5: body type u16, body size u32] | TD report body (584 TDX 1.0 / 648 TDX 1.5)
    | signature data length u32 | signature data

Signature data (attestation key type 2, ECDSA P-256)::

    quote signature r||s (64) | attestation public key x||y (64)
    | certification data type u16 (= 6, QE report) | size u32
    |   QE report (384) | QE report signature (64) | QE auth data length u16 | auth data
    |   certification data type u16 (= 5, PCK chain) | size u32 | PEM chain

This module only parses: it checks lengths, versions and types, never signatures. See
:mod:`attest.tee.tdx.verifier` for verification.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from attest.evidence import TeeKind, b64decode_strict
from attest.tee._reader import Reader
from foundation.errors import MalformedEvidence

__all__ = [
    "ATTESTATION_KEY_TYPE_ECDSA_P256",
    "CERT_DATA_TYPE_PCK_CHAIN",
    "CERT_DATA_TYPE_QE_REPORT",
    "QUOTE_HEADER_SIZE",
    "TEE_TYPE_TDX",
    "QeReport",
    "TdReportBody",
    "TdxBodyType",
    "TdxEvidence",
    "TdxQuote",
    "TdxQuoteHeader",
    "TdxQuoteSignature",
    "parse_tdx_quote",
]

#: Quote header size (DCAP QVL API, A.3 "Quote Header").
QUOTE_HEADER_SIZE = 48
#: ``tee_type`` of a TDX quote (A.3; 0x00000000 is SGX).
TEE_TYPE_TDX = 0x81
#: Attestation key type 2 = ECDSA-256-with-P-256 (A.3).
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
#: Quote versions this parser understands (A.3 / A.4, "Version 5").
SUPPORTED_VERSIONS = (4, 5)
#: TD report body sizes (dcap-qvl ``src/constants.rs`` TD_REPORT10_BYTE_LEN / TD_REPORT15_BYTE_LEN).
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
#: v5 body descriptor: type u16 + size u32 (dcap-qvl BODY_BYTE_SIZE).
V5_BODY_DESCRIPTOR_SIZE = 6
#: Certification data type 6 = QE report certification data (A.4.11).
CERT_DATA_TYPE_QE_REPORT = 6
#: Certification data type 5 = concatenated PCK cert chain, PEM (A.4.11).
CERT_DATA_TYPE_PCK_CHAIN = 5
#: SGX REPORT BODY size of the QE report (SGX SDK ``sgx_report_body_t``).
QE_REPORT_SIZE = 384
#: ECDSA P-256 signature r||s and public key x||y sizes (A.4.9).
ECDSA_P256_SIGNATURE_SIZE = 64
ECDSA_P256_KEY_SIZE = 64
#: Upper bound on quote size we accept, well above any real quote (CWT quotes stay < 16 KiB).
MAX_QUOTE_SIZE = 64 * 1024


class TdxBodyType(IntEnum):
    """v5 body type (A.4 "Quote Body Descriptor"); v4 quotes always carry a TDX 1.0 body."""

    TDX10 = 2
    TDX15 = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReportBody:
    """The TD report body (TDX 1.0; TDX 1.5 adds ``tee_tcb_svn2`` and ``mr_servicetd``)."""

    body_type: TdxBodyType
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def rtmr0(self) -> bytes:
        """RTMR0 (firmware configuration)."""
        return self.rtmrs[0]

    @property
    def rtmr1(self) -> bytes:
        """RTMR1 (OS loader and kernel)."""
        return self.rtmrs[1]

    @property
    def rtmr2(self) -> bytes:
        """RTMR2 (kernel command line, initrd)."""
        return self.rtmrs[2]

    @property
    def rtmr3(self) -> bytes:
        """RTMR3 (runtime, e.g. CoCo init-data)."""
        return self.rtmrs[3]

    @property
    def debug(self) -> bool:
        """Whether TDATTRIBUTES.DEBUG (bit 0) is set: the host can read the TD's memory."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True, slots=True, kw_only=True)
class QeReport:
    """The Quoting Enclave's SGX report body (384 bytes) certifying the attestation key."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuoteSignature:
    """The quote's signature data (ECDSA P-256 attestation key, QE report certification)."""

    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuote:
    """A parsed TDX quote. ``signed_data`` is the exact byte range the quote signature covers."""

    header: TdxQuoteHeader
    body: TdReportBody
    signature: TdxQuoteSignature
    signed_data: bytes
    size: int
    trailing_bytes: int

    @property
    def version(self) -> int:
        """The quote version (4 or 5)."""
        return self.header.version

    def to_json(self) -> dict[str, Any]:
        """Return every field, bytes as lower-case hex, with the DCAP field names."""
        h, b, s = self.header, self.body, self.signature
        out: dict[str, Any] = {
            "version": h.version,
            "attestation_key_type": h.attestation_key_type,
            "tee_type": h.tee_type,
            "qe_svn": h.qe_svn,
            "pce_svn": h.pce_svn,
            "qe_vendor_id": h.qe_vendor_id.hex(),
            "user_data": h.user_data.hex(),
            "body_type": b.body_type.name,
            "tee_tcb_svn": b.tee_tcb_svn.hex(),
            "mr_seam": b.mr_seam.hex(),
            "mr_signer_seam": b.mr_signer_seam.hex(),
            "seam_attributes": b.seam_attributes.hex(),
            "td_attributes": b.td_attributes.hex(),
            "debug": b.debug,
            "xfam": b.xfam.hex(),
            "mrtd": b.mrtd.hex(),
            "mr_config_id": b.mr_config_id.hex(),
            "mr_owner": b.mr_owner.hex(),
            "mr_owner_config": b.mr_owner_config.hex(),
        }
        out.update({f"rtmr{i}": r.hex() for i, r in enumerate(b.rtmrs)})
        out["report_data"] = b.report_data.hex()
        if b.tee_tcb_svn2 is not None and b.mr_servicetd is not None:
            out["tee_tcb_svn2"] = b.tee_tcb_svn2.hex()
            out["mr_servicetd"] = b.mr_servicetd.hex()
        out.update(
            {
                "quote_signature": s.signature.hex(),
                "attestation_key": s.attestation_key.hex(),
                "qe_report": {
                    "cpu_svn": s.qe_report.cpu_svn.hex(),
                    "misc_select": s.qe_report.misc_select,
                    "attributes": s.qe_report.attributes.hex(),
                    "mr_enclave": s.qe_report.mr_enclave.hex(),
                    "mr_signer": s.qe_report.mr_signer.hex(),
                    "isv_prod_id": s.qe_report.isv_prod_id,
                    "isv_svn": s.qe_report.isv_svn,
                    "report_data": s.qe_report.report_data.hex(),
                },
                "qe_report_signature": s.qe_report_signature.hex(),
                "qe_auth_data": s.qe_auth_data.hex(),
                "pck_chain_pem_size": len(s.pck_chain_pem),
                "size": self.size,
                "trailing_bytes": self.trailing_bytes,
            }
        )
        return out


def _parse_header(r: Reader) -> TdxQuoteHeader:
    version = r.u16("header.version")
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(
            f"TDX quote: unsupported quote version {version} (expected 4 or 5; version 3 is SGX)"
        )
    att_key_type = r.u16("header.attestation_key_type")
    tee_type = r.u32("header.tee_type")
    if tee_type != TEE_TYPE_TDX:
        raise MalformedEvidence(f"TDX quote: tee_type is {tee_type:#x}, not TDX ({TEE_TYPE_TDX:#x})")
    if att_key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise MalformedEvidence(
            f"TDX quote: attestation key type {att_key_type} is not supported (only 2, ECDSA P-256)"
        )
    qe_svn = r.u16("header.qe_svn")
    pce_svn = r.u16("header.pce_svn")
    qe_vendor_id = r.take(16, "header.qe_vendor_id")
    user_data = r.take(20, "header.user_data")
    return TdxQuoteHeader(
        version=version,
        attestation_key_type=att_key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=qe_vendor_id,
        user_data=user_data,
    )


def _parse_body(r: Reader, body_type: TdxBodyType) -> TdReportBody:
    tee_tcb_svn = r.take(16, "body.tee_tcb_svn")
    mr_seam = r.take(48, "body.mr_seam")
    mr_signer_seam = r.take(48, "body.mr_signer_seam")
    seam_attributes = r.take(8, "body.seam_attributes")
    td_attributes = r.take(8, "body.td_attributes")
    xfam = r.take(8, "body.xfam")
    mrtd = r.take(48, "body.mrtd")
    mr_config_id = r.take(48, "body.mr_config_id")
    mr_owner = r.take(48, "body.mr_owner")
    mr_owner_config = r.take(48, "body.mr_owner_config")
    rtmrs = (
        r.take(48, "body.rtmr0"),
        r.take(48, "body.rtmr1"),
        r.take(48, "body.rtmr2"),
        r.take(48, "body.rtmr3"),
    )
    report_data = r.take(64, "body.report_data")
    tee_tcb_svn2 = mr_servicetd = None
    if body_type is TdxBodyType.TDX15:
        tee_tcb_svn2 = r.take(16, "body.tee_tcb_svn2")
        mr_servicetd = r.take(48, "body.mr_servicetd")
    return TdReportBody(
        body_type=body_type,
        tee_tcb_svn=tee_tcb_svn,
        mr_seam=mr_seam,
        mr_signer_seam=mr_signer_seam,
        seam_attributes=seam_attributes,
        td_attributes=td_attributes,
        xfam=xfam,
        mrtd=mrtd,
        mr_config_id=mr_config_id,
        mr_owner=mr_owner,
        mr_owner_config=mr_owner_config,
        rtmrs=rtmrs,
        report_data=report_data,
        tee_tcb_svn2=tee_tcb_svn2,
        mr_servicetd=mr_servicetd,
    )


def _parse_qe_report(raw: bytes) -> QeReport:
    r = Reader(raw, "TDX quote QE report")
    cpu_svn = r.take(16, "cpu_svn")
    misc_select = r.u32("misc_select")
    r.skip(28, "reserved1")
    attributes = r.take(16, "attributes")
    mr_enclave = r.take(32, "mr_enclave")
    r.skip(32, "reserved2")
    mr_signer = r.take(32, "mr_signer")
    r.skip(96, "reserved3")
    isv_prod_id = r.u16("isv_prod_id")
    isv_svn = r.u16("isv_svn")
    r.skip(60, "reserved4")
    report_data = r.take(64, "report_data")
    return QeReport(
        raw=raw,
        cpu_svn=cpu_svn,
        misc_select=misc_select,
        attributes=attributes,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=report_data,
    )


def _parse_signature(data: bytes) -> TdxQuoteSignature:
    r = Reader(data, "TDX quote signature data")
    signature = r.take(ECDSA_P256_SIGNATURE_SIZE, "quote_signature")
    attestation_key = r.take(ECDSA_P256_KEY_SIZE, "attestation_key")
    cert_type = r.u16("certification_data.type")
    cert_size = r.u32("certification_data.size")
    if cert_type != CERT_DATA_TYPE_QE_REPORT:
        raise MalformedEvidence(
            f"TDX quote: certification data type {cert_type} is not supported (expected 6, QE report)"
        )
    if cert_size != r.remaining:
        raise MalformedEvidence(
            f"TDX quote: certification data size {cert_size} does not match the {r.remaining} bytes left"
        )
    qe_report = _parse_qe_report(r.take(QE_REPORT_SIZE, "qe_report"))
    qe_report_signature = r.take(ECDSA_P256_SIGNATURE_SIZE, "qe_report_signature")
    auth_len = r.u16("qe_auth_data.size")
    qe_auth_data = r.take(auth_len, "qe_auth_data")
    inner_type = r.u16("pck_certification_data.type")
    inner_size = r.u32("pck_certification_data.size")
    if inner_type != CERT_DATA_TYPE_PCK_CHAIN:
        raise MalformedEvidence(
            f"TDX quote: QE certification data type {inner_type} is not supported (expected 5, PCK chain)"
        )
    pck_chain_pem = r.take(inner_size, "pck_chain")
    if r.remaining:
        raise MalformedEvidence(f"TDX quote: {r.remaining} unexpected bytes after the PCK chain")
    return TdxQuoteSignature(
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain_pem.rstrip(b"\0"),
    )


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a raw TDX DCAP quote (v4 or v5, TDX 1.0 or 1.5 body).

    Checks the structure only: versions, types and that every length fits. Trailing zero
    bytes after the signature data (padding some quote generators add) are tolerated and
    counted in ``trailing_bytes``; any other trailing byte is an error. Signatures, the
    PCK chain and TCB are *not* checked here (see :func:`attest.verify.verify_evidence`).

    Raises:
        MalformedEvidence: the bytes are not a TDX quote this parser understands.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence("TDX quote must be bytes")
    data = bytes(data)
    if len(data) > MAX_QUOTE_SIZE:
        raise MalformedEvidence(f"TDX quote is {len(data)} bytes; more than the {MAX_QUOTE_SIZE} allowed")
    r = Reader(data, "TDX quote")
    header = _parse_header(r)
    if header.version == 4:
        body_type = TdxBodyType.TDX10
    else:
        raw_type = r.u16("body_descriptor.type")
        body_size = r.u32("body_descriptor.size")
        try:
            body_type = TdxBodyType(raw_type)
        except ValueError:
            raise MalformedEvidence(
                f"TDX quote v5: body type {raw_type} is not supported (2 = TDX 1.0, 3 = TDX 1.5)"
            ) from None
        expected = TD_REPORT10_SIZE if body_type is TdxBodyType.TDX10 else TD_REPORT15_SIZE
        if body_size != expected:
            raise MalformedEvidence(
                f"TDX quote v5: body size {body_size} does not match body type {raw_type} ({expected})"
            )
    body = _parse_body(r, body_type)
    signed_len = r.offset
    sig_len = r.u32("signature_data.size")
    sig_data = r.take(sig_len, "signature_data")
    trailing = data[r.offset :]
    if trailing.strip(b"\0"):
        raise MalformedEvidence(f"TDX quote: {len(trailing)} trailing bytes after the signature data")
    return TdxQuote(
        header=header,
        body=body,
        signature=_parse_signature(sig_data),
        signed_data=data[:signed_len],
        size=r.offset,
        trailing_bytes=len(trailing),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxEvidence:
    """Trustee TDX evidence: ``{"cc_eventlog": base64 | null, "quote": base64}``.

    ``quote`` is the raw DCAP quote; ``cc_eventlog`` the CCEL event log when the guest has one
    (it is carried, not interpreted, here).
    """

    tee: ClassVar[TeeKind] = TeeKind.TDX
    quote: bytes
    cc_eventlog: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the Trustee-shaped JSON object."""
        eventlog = None if self.cc_eventlog is None else base64.b64encode(self.cc_eventlog).decode()
        return {"cc_eventlog": eventlog, "quote": base64.b64encode(self.quote).decode()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TdxEvidence:
        """Build from Trustee-shaped JSON (structure only; the quote is parsed on verification).

        Raises:
            MalformedEvidence: a field is missing or not base64.
        """
        if not isinstance(obj, Mapping):
            raise MalformedEvidence("tdx evidence must be a JSON object")
        eventlog = obj.get("cc_eventlog")
        return cls(
            quote=b64decode_strict(obj.get("quote"), "tdx quote"),
            cc_eventlog=None if eventlog is None else b64decode_strict(eventlog, "tdx cc_eventlog"),
        )
