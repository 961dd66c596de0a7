"""Verify NVIDIA GPU evidence locally: each Hopper GPU's report, chain, nonce and FWID.

Steps, for every device ``i`` (each recorded on the result; the first failure raises)::

    (0) devices             the evidence lists at least one device
    (1) gpu<i>.arch         the architecture is Hopper or Blackwell (NVSwitch ``LS10`` evidence
                            cannot be verified locally: refused, fail closed)
    (2) gpu<i>.parse        the report parses (SPDM 1.1 GET_MEASUREMENTS request || response,
                            legacy or versioned opaque data; unsigned trailing bytes counted)
    (3) gpu<i>.cert_chain   nvtrust's rule: drop the last supplied certificate, append the pinned
                            NVIDIA Device Identity CA; every link ECDSA/SHA-384, valid at ``now``
    (4) gpu<i>.distinct     no two entries carry the same device certificate (issuer and serial:
                            the device identity, unlike the UUID the guest reports)
    (5) gpu<i>.signature    the leaf key signed every byte before the signature (P-384/SHA-384)
    (6) gpu<i>.nonce        the *request* nonce equals the first 32 bytes of the expected
                            runtime data (zero-padded to 32)
    (7) gpu<i>.fwid         the leaf certificate's TCG DICE FWID equals the report's FWID opaque
                            field (Hopper: the last 48 bytes of 2.23.133.5.4.1; Blackwell: the
                            first FWID of the DiceTcbInfo in 2.23.133.5.4.1.1)

What is *not* verified: measurements against NVIDIA's reference integrity manifests (RIMs),
OCSP revocation of the device chain, and driver/VBIOS versions (the workload policy's ``[gpu]``
rules, :mod:`attest.verify.workload`). No network call is made.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.evidence import Evidence, TeeKind
from attest.tee import _x509
from attest.tee.nvidia.claims import GpuClaims, NvidiaClaims
from attest.tee.nvidia.report import (
    FWID_SIZE,
    HOPPER_SIGNATURE_SIZE,
    NvidiaDeviceEvidence,
    NvidiaEvidence,
    NvidiaReport,
    expected_gpu_nonce,
    parse_nvidia_report,
)
from attest.tee.result import StepLog
from attest.tee.verifier import Verifier, parse_logged

__all__ = [
    "LOCAL_ARCHES",
    "NVIDIA_DEVICE_ROOT",
    "OID_TCG_DICE_TCB_INFO",
    "OID_TCG_DICE_TCB_INFO_DER",
    "NvidiaVerifier",
    "expected_gpu_nonce",
]

#: Pinned NVIDIA Device Identity CA (attest/roots/PROVENANCE.md).
NVIDIA_DEVICE_ROOT = "nvidia_device_root.pem"
#: TCG DICE TcbInfo extension carrying the FWID (TCG DICE Attestation Architecture, 6.1.1).
OID_TCG_DICE_TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.1")
#: Where Blackwell leaf certificates carry a DER DiceTcbInfo (NVIDIA attestation-sdk
#: ``get_fwid_2_23_133_5_4_1_1``).
OID_TCG_DICE_TCB_INFO_DER = x509.ObjectIdentifier("2.23.133.5.4.1.1")
#: Architectures the local verifier supports (Hopper and Blackwell sign the same way).
LOCAL_ARCHES = frozenset({"HOPPER", "BLACKWELL"})
#: NVSwitch evidence (protected PCIe) architectures: not verifiable locally.
SWITCH_ARCHES = frozenset({"LS10"})


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Split DER ``data`` into (tag, content) items (definite lengths only)."""
    items, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length, i = data[i], data[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or i + n > len(data):
                raise ValueError("unsupported DER length")
            length, i = int.from_bytes(data[i : i + n], "big"), i + n
        if i + length > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[i : i + length]))
        i += length
    return items


def _dice_tcb_info_fwid(der: bytes) -> bytes | None:
    """The first FWID digest of a DER ``DiceTcbInfo`` (``fwids [6] IMPLICIT SEQUENCE OF FWID``)."""
    try:
        (tag, body), *_ = _der_items(der)
        if tag != 0x30:
            return None
        for field_tag, content in _der_items(body):
            if field_tag == 0xA6:  # [6] constructed: the FWID list
                for fwid_tag, fwid in _der_items(content):
                    if fwid_tag == 0x30:
                        parts = _der_items(fwid)
                        digests = [c for t, c in parts if t == 0x04]
                        return digests[0] if digests else None
    except ValueError:
        return None
    return None


def _leaf_fwid(cert: x509.Certificate) -> bytes | None:
    for oid in (OID_TCG_DICE_TCB_INFO, OID_TCG_DICE_TCB_INFO_DER):
        try:
            value = cert.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            continue
        if not isinstance(value, x509.UnrecognizedExtension):
            continue
        if oid == OID_TCG_DICE_TCB_INFO_DER:
            return _dice_tcb_info_fwid(value.value)
        if len(value.value) >= FWID_SIZE:
            return value.value[-FWID_SIZE:]
    return None


class NvidiaVerifier(Verifier):
    """Verify :class:`~attest.tee.nvidia.report.NvidiaEvidence` (see the module docstring)."""

    tee: ClassVar[TeeKind] = TeeKind.NVIDIA

    def __init__(self, *, root: x509.Certificate | None = None) -> None:
        """Trust ``root`` instead of the pinned NVIDIA Device Identity CA.

        .. warning::
           Only for tests with a private PKI; the default trusts NVIDIA's pinned root.
        """
        self._root = root

    def verify(
        self,
        evidence: Evidence,
        *,
        expected: bytes | None,
        now: datetime,
        collateral: object | None,
        log: StepLog,
    ) -> None:
        """Run steps (0)-(6) of the module docstring for every GPU.

        Raises:
            MalformedEvidence: a report does not parse.
            VerificationError: a step failed.
            TypeError: wrong evidence type, or collateral given (none is supported).
        """
        if not isinstance(evidence, NvidiaEvidence):
            raise TypeError(f"NvidiaVerifier needs NvidiaEvidence, not {type(evidence).__name__}")
        if collateral is not None:
            raise TypeError(
                "the local NVIDIA verifier takes no collateral (RIM/OCSP checks are not implemented)"
            )
        log.claims = NvidiaClaims(gpus=())
        log.check(
            bool(evidence.devices),
            "devices",
            passed=f"{len(evidence.devices)} GPU(s)",
            failed="the evidence lists no GPU",
            hint="collect evidence on a machine whose GPUs are in confidential-computing mode",
        )
        gpus: list[GpuClaims] = []
        identities: dict[tuple[str, int], int] = {}
        for index, device in enumerate(evidence.devices):
            gpus.append(self._verify_gpu(log, f"gpu{index}", device, expected, now, gpus, identities))

    def _verify_gpu(
        self,
        log: StepLog,
        name: str,
        device: NvidiaDeviceEvidence,
        expected: bytes | None,
        now: datetime,
        done: list[GpuClaims],
        identities: dict[tuple[str, int], int],
    ) -> GpuClaims:
        # (1) Hopper and Blackwell are verified locally; NVSwitch evidence is not (fail closed).
        arch = device.arch.upper()
        failed = (
            f"NVSwitch ({device.arch}) evidence cannot be verified locally; refusing it"
            if arch in SWITCH_ARCHES
            else f"architecture {device.arch!r} cannot be verified locally (Hopper and Blackwell only)"
        )
        log.check(
            arch in LOCAL_ARCHES,
            f"{name}.arch",
            passed=f"{device.arch} {device.uuid}",
            failed=failed,
            hint="verify this device with NVIDIA's remote attestation service",
        )

        # (2) The report parses.
        report = parse_logged(log, parse_nvidia_report, device.evidence)
        header = report.opaque_header
        detail = f"{len(report.raw)}-byte report, {len(report.measurement_blocks)} measurements, " + (
            f"opaque data v{header.version}" if header is not None else "legacy opaque data"
        )
        if report.trailing_bytes:
            detail += f", {report.trailing_bytes} unsigned byte(s) after the signature (ignored)"
        log.passed(f"{name}.parse", detail)

        # (3) The certificate chain ends at the pinned root.
        leaf = self._check_chain(log, name, device.certificate, now)
        # (4) Each device once: its identity is its certificate, not the UUID the guest reports.
        identity = (leaf.issuer.rfc4514_string(), leaf.serial_number)
        first = identities.setdefault(identity, len(done))
        log.check(
            first == len(done),
            f"{name}.distinct",
            passed="a device certificate no other entry carries",
            failed=f"the same device as gpu{first} (certificate serial {leaf.serial_number:x})",
            hint="the evidence repeats one GPU's report; each GPU must be attested once",
        )
        claims = GpuClaims(
            uuid=device.uuid,
            arch=device.arch,
            nonce=report.nonce,
            driver_version=report.driver_version,
            vbios_version=report.vbios_version,
            project=report.project,
            project_sku=report.project_sku,
            chip_sku=report.chip_sku,
            fwid=report.fwid,
            feature_flag=report.feature_flag,
            measurements=tuple(sorted(report.measurements.items())),
            leaf_subject=_x509.common_name(leaf),
        )
        log.claims = NvidiaClaims(gpus=(*done, claims))

        # (5) The leaf key signed the report.
        log.check(
            self._signature_valid(leaf, report),
            f"{name}.signature",
            passed="the device leaf key signed the report",
            failed="the report signature does not verify with the device leaf certificate",
            hint="the report was altered, or the certificate chain belongs to another GPU",
        )

        # (6) The GPU answered our nonce.
        if expected is None:
            log.skipped(f"{name}.nonce", "not checked: the caller passed expected_runtime_data=None")
        else:
            nonce = expected_gpu_nonce(expected)
            log.check(
                report.nonce == nonce,
                f"{name}.nonce",
                passed="the request nonce equals the expected runtime data",
                failed=f"request nonce {report.nonce.hex()} is not the expected {nonce.hex()}",
                hint="the report was made for another nonce (replay or wrong session); collect fresh "
                "evidence",
            )

        # (7) The leaf certificate names the firmware that signed.
        cert_fwid = _leaf_fwid(leaf)
        log.check(
            report.fwid is not None and cert_fwid == report.fwid,
            f"{name}.fwid",
            passed="the leaf certificate FWID equals the report FWID",
            failed="the leaf certificate FWID does not match the report's FWID (or one is missing)",
            hint="the report and certificate come from different firmware; collect them together",
        )
        return claims

    def _check_chain(self, log: StepLog, name: str, pem: bytes, now: datetime) -> x509.Certificate:
        step = f"{name}.cert_chain"
        hint = "the certificate chain is not NVIDIA's; do not trust this GPU"
        try:
            supplied = _x509.load_certificates(pem)
        except ValueError:
            log.fail(step, "the certificate chain does not parse as PEM", hint=hint)
        if len(supplied) < 2:
            log.fail(step, f"the chain has {len(supplied)} certificate(s); expected leaf .. root", hint=hint)
        # nvtrust: the supplied root is replaced by the pinned one.
        root = self._root if self._root is not None else _x509.load_pinned(NVIDIA_DEVICE_ROOT)[0]
        chain = [*supplied[:-1], root]
        for cert, issuer in itertools.pairwise(chain):
            problem = _x509.check_link(cert, issuer, hash_name=_x509.SHA384)
            if problem:
                log.fail(step, problem, hint=hint)
        for cert in chain:
            problem = _x509.check_validity(cert, now)
            if problem:
                log.fail(step, problem, hint="check the verification time")
        log.passed(step, " -> ".join(_x509.common_name(c) for c in chain) + " (pinned)")
        return chain[0]

    @staticmethod
    def _signature_valid(leaf: x509.Certificate, report: NvidiaReport) -> bool:
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            return False
        half = HOPPER_SIGNATURE_SIZE // 2
        r = int.from_bytes(report.signature[:half], "big")
        s = int.from_bytes(report.signature[half:], "big")
        if not r or not s:
            return False
        try:
            key.verify(encode_dss_signature(r, s), report.signed_data, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return False
        return True
