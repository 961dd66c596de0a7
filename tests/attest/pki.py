"""A private test PKI shaped like AMD's and NVIDIA's, to reach verifier steps the real vectors
cannot (Turin, VLEK, TCB/FWID mismatches under a valid signature).

Test-only: these keys are generated per run and trusted only through the verifiers' explicit
``chains=`` / ``root=`` test hooks, never through the pinned roots.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attest.tee.snp.report import SIGNED_SIZE, SnpReport

NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2040, 1, 1, tzinfo=UTC)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD_ARC = "1.3.6.1.4.1.3704.1."


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def der_integer(value: int) -> bytes:
    """Encode a small non-negative DER INTEGER."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _builder(subject: str, issuer: str, key: Any) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )


def _ca(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    return builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)


@dataclass
class AmdPki:
    """ARK, ASK and ASVK of one product (RSA-PSS/SHA-384, like AMD's)."""

    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    asvk_key: rsa.RSAPrivateKey

    @classmethod
    def create(cls, product: str) -> AmdPki:
        ark_key, ask_key, asvk_key = (rsa.generate_private_key(65537, 2048) for _ in range(3))
        ark = _ca(_builder(f"ARK-{product}", f"ARK-{product}", ark_key.public_key())).sign(
            ark_key, hashes.SHA384(), rsa_padding=PSS
        )
        ask = _ca(_builder(f"SEV-{product}", f"ARK-{product}", ask_key.public_key())).sign(
            ark_key, hashes.SHA384(), rsa_padding=PSS
        )
        asvk = _ca(_builder(f"SEV-VLEK-{product}", f"ARK-{product}", asvk_key.public_key())).sign(
            ark_key, hashes.SHA384(), rsa_padding=PSS
        )
        return cls(product=product, ark=ark, ask=ask, asvk=asvk, ask_key=ask_key, asvk_key=asvk_key)

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        """(ARK, ASK, ASVK) as the verifier takes them."""
        return self.ark, self.ask, self.asvk

    def issue_vek(
        self,
        *,
        vlek: bool = False,
        tcb: dict[str, int],
        hwid: bytes | None = None,
        hwid_as_octet_string: bool = True,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Issue a VCEK (by the ASK) or VLEK (by the ASVK) with AMD's TCB extensions."""
        key = ec.generate_private_key(ec.SECP384R1())
        issuer, issuer_key = (self.asvk, self.asvk_key) if vlek else (self.ask, self.ask_key)
        builder = _builder(
            "SEV-VLEK" if vlek else "SEV-VCEK", issuer.subject.rfc4514_string()[3:], key.public_key()
        )
        oids = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}
        for name, value in tcb.items():
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(AMD_ARC + oids[name]), der_integer(value))
            builder = builder.add_extension(ext, critical=False)
        if hwid is not None:
            hwid_value = bytes([0x04, len(hwid)]) + hwid if hwid_as_octet_string else hwid
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(AMD_ARC + "4"), hwid_value), critical=False
            )
        return key, builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)


def sign_snp_report(report_json: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    """Build the report from sev serde JSON and sign it with ``key`` (R/S little-endian)."""
    raw = bytearray(SnpReport.from_sev_json(report_json).raw)
    r, s = decode_dss_signature(key.sign(bytes(raw[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
    raw[SIGNED_SIZE : SIGNED_SIZE + 72] = r.to_bytes(72, "little")
    raw[SIGNED_SIZE + 72 : SIGNED_SIZE + 144] = s.to_bytes(72, "little")
    return bytes(raw)


def turin_report_json(
    base: dict[str, Any], *, chip8: bytes, tcb: dict[str, int], **changes: Any
) -> dict[str, Any]:
    """Turn the Genoa vector's serde JSON into a Turin one (family 0x1A, 8-byte CHIP_ID)."""
    obj = copy.deepcopy(base)
    obj.update(cpuid_fam_id=0x1A, cpuid_mod_id=0x01, cpuid_step=0, chip_id=list(chip8) + [0] * 56)
    for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
        obj[name] = {"fmc": tcb["fmc"], **{k: tcb[k] for k in ("bootloader", "tee", "snp", "microcode")}}
    obj.update(changes)
    return obj


@dataclass
class NvidiaPki:
    """A device root and a leaf carrying a TCG DICE FWID extension (ECDSA P-384/SHA-384)."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> NvidiaPki:
        key = ec.generate_private_key(ec.SECP384R1())
        root = _ca(_builder("Test Device Identity CA", "Test Device Identity CA", key.public_key())).sign(
            key, hashes.SHA384()
        )
        return cls(root=root, root_key=key)

    def issue_leaf(self, fwid: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Issue a leaf whose DICE TcbInfo extension ends with ``fwid``."""
        key = ec.generate_private_key(ec.SECP384R1())
        tcb_info = (
            bytes([0x30, 0x40]) + b"\xa6\x3e" + b"\x30\x3c" + b"\x06\x09" + b"\x60" * 9 + b"\x04\x30" + fwid
        )
        cert = (
            _builder("Test GSP FMC LF", "Test Device Identity CA", key.public_key())
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier("2.23.133.5.4.1"), tcb_info), critical=False
            )
            .sign(self.root_key, hashes.SHA384())
        )
        return key, cert


def sign_nvidia_report(signed_data: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Append a raw r||s P-384 signature over ``signed_data``."""
    r, s = decode_dss_signature(key.sign(signed_data, ec.ECDSA(hashes.SHA384())))
    return signed_data + r.to_bytes(48, "big") + s.to_bytes(48, "big")


def _raw_p256_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def forge_tdx_quote(
    quote: bytes, *, qe_mr_signer: bytes | None = None, qe_isv_prod_id: int | None = None
) -> tuple[bytes, x509.Certificate]:
    """Re-sign a real TDX quote under a private Intel-shaped PKI, optionally with another QE.

    The header and TD report stay; a fresh attestation key signs them, the QE report (with the
    given MRSIGNER / ISVPRODID) certifies that key and is signed by a private PCK leaf. Returns
    the quote and the private root to pass as ``TdxVerifier(root=...)``. Everything up to the QE
    identity verifies, so a test reaches that step alone.
    """
    import hashlib
    import struct

    from cryptography.hazmat.primitives import serialization

    from attest.tee.tdx.quote import parse_tdx_quote

    parsed = parse_tdx_quote(quote)
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca(_builder("Test SGX Root CA", "Test SGX Root CA", root_key.public_key())).sign(
        root_key, hashes.SHA256()
    )
    inter = _ca(_builder("Test SGX PCK Platform CA", "Test SGX Root CA", inter_key.public_key())).sign(
        root_key, hashes.SHA256()
    )
    leaf = _builder("Test SGX PCK Certificate", "Test SGX PCK Platform CA", leaf_key.public_key()).sign(
        inter_key, hashes.SHA256()
    )
    att_key = ec.generate_private_key(ec.SECP256R1())
    numbers = att_key.public_key().public_numbers()
    att_pub = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    auth = parsed.signature.qe_auth_data
    qe = bytearray(parsed.signature.qe_report.raw)  # SGX REPORTBODY: MRSIGNER @128, ISVPRODID @256
    if qe_mr_signer is not None:
        qe[128:160] = qe_mr_signer
    if qe_isv_prod_id is not None:
        qe[256:258] = struct.pack("<H", qe_isv_prod_id)
    qe[320:384] = hashlib.sha256(att_pub + auth).digest() + bytes(32)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, inter, root))
    inner = (
        bytes(qe)
        + _raw_p256_signature(leaf_key, bytes(qe))
        + struct.pack("<H", len(auth))
        + auth
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    sig_data = (
        _raw_p256_signature(att_key, parsed.signed_data) + att_pub + struct.pack("<HI", 6, len(inner)) + inner
    )
    return parsed.signed_data + struct.pack("<I", len(sig_data)) + sig_data, root
