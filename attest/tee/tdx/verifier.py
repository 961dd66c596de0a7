"""Verify Intel TDX evidence: the DCAP quote, offline, and its TCB with collateral via dcap-qvl.

Steps (each recorded on the result; the first failure raises)::

    (1) parse               the quote parses (v4/v5, TDX, ECDSA P-256 attestation key)
    (2) quote_signature     the attestation key signed header || body
    (3) qe_report_binding   QE report REPORTDATA = SHA-256(attestation key || QE auth data) || 0*32
    (4) pck_chain           PCK leaf -> PCK CA -> the pinned Intel SGX Root CA, valid at ``now``
    (5) qe_report_signature the PCK leaf key signed the QE report
    (5b) qe_identity        the QE report is Intel's TD Quoting Enclave (pinned MRSIGNER,
                            ISVPRODID, ATTRIBUTES and MISCSELECT under Intel's masks), checked
                            offline too: a PCK key certifies *any* enclave with the provisioning
                            key, so without this a host could sign quotes with its own enclave
    (6) tcb                 with collateral: dcap-qvl (TCB info, QE identity, CRLs, all signed by
                            the pinned root) gives the TCB status and advisory IDs;
                            without: skipped, ``tcb_status = "unknown"``
    (7) report_data         REPORTDATA equals the expected binding, zero-padded to 64 bytes
    (8) eventlog            skipped: the CCEL event log is carried, not replayed against RTMRs

What is *not* verified: without collateral, neither revocation (PCK CRL) nor the QE's TCB level
(ISVSVN) nor the platform TCB level; the event log is never replayed; measurement values (MRTD, RTMRs,
MRCONFIGID) are only compared by the workload policy (:mod:`attest.verify.workload`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.evidence import Evidence, TeeKind
from attest.tee import _x509
from attest.tee.result import StepLog
from attest.tee.tdx.claims import TdxClaims
from attest.tee.tdx.quote import TdxEvidence, parse_tdx_quote
from attest.tee.verifier import Verifier, check_padded_report_data, parse_logged
from foundation.errors import MalformedEvidence

__all__ = [
    "INTEL_SGX_ROOT_CA",
    "TCB_STATUS_REVOKED",
    "TD_QE_ATTRIBUTES",
    "TD_QE_ATTRIBUTES_MASK",
    "TD_QE_ISVPRODID",
    "TD_QE_MISCSELECT",
    "TD_QE_MISCSELECT_MASK",
    "TD_QE_MRSIGNER",
    "TdxCollateral",
    "TdxVerifier",
]

#: Pinned Intel SGX Root CA (attest/roots/PROVENANCE.md).
INTEL_SGX_ROOT_CA = "intel_sgx_root_ca.der"

#: Intel's TD Quoting Enclave identity (Intel PCS ``qe/identity`` for TDX, ``"id": "TD_QE"``, as
#: signed in tests/vectors/tdx/tdx_quote_collateral.json): MRSIGNER, ISVPRODID, and ATTRIBUTES /
#: MISCSELECT compared under Intel's masks.
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
TD_QE_ISVPRODID = 2
TD_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
TD_QE_ATTRIBUTES_MASK = bytes.fromhex("fbffffffffffffff0000000000000000")
TD_QE_MISCSELECT = 0x00000000
TD_QE_MISCSELECT_MASK = 0xFFFFFFFF
#: DCAP TCB status that no policy may accept (Intel PCS API v4, TCB info ``tcbStatus``).
TCB_STATUS_REVOKED = "Revoked"
#: Keys of dcap-qvl's QuoteCollateralV3 JSON.
COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
_PCK_CA_NAMES = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxCollateral:
    """DCAP collateral for one quote: dcap-qvl's ``QuoteCollateralV3`` JSON (PCCS/PCS data).

    Fetch it with ``dcap_qvl.get_collateral(pccs_url, quote)`` (network) and keep it to verify
    offline later; its validity window (TCB info / QE identity issue dates, CRL next update)
    bounds the ``now`` at which verification succeeds.
    """

    json_text: str

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> TdxCollateral:
        """Load collateral JSON (text, bytes or an already-parsed object).

        Raises:
            MalformedEvidence: not JSON, or a collateral field is missing.
        """
        try:
            obj = json.loads(data) if isinstance(data, str | bytes) else dict(data)
        except (ValueError, TypeError) as exc:
            raise MalformedEvidence("TDX collateral is not JSON") from exc
        if not isinstance(obj, dict):
            raise MalformedEvidence("TDX collateral must be a JSON object")
        missing = [k for k in COLLATERAL_KEYS if k not in obj]
        if missing:
            raise MalformedEvidence(f"TDX collateral lacks {', '.join(missing)} (expected dcap-qvl JSON)")
        return cls(json_text=json.dumps(obj))

    def to_json(self) -> dict[str, Any]:
        """Return the collateral JSON object."""
        out: dict[str, Any] = json.loads(self.json_text)
        return out


def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def _verify_p256(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class TdxVerifier(Verifier):
    """Verify :class:`~attest.tee.tdx.quote.TdxEvidence` (see the module docstring)."""

    tee: ClassVar[TeeKind] = TeeKind.TDX

    def __init__(self, *, root: x509.Certificate | None = None) -> None:
        """Trust ``root`` instead of the pinned Intel SGX Root CA (offline steps and dcap-qvl).

        .. warning::
           Only for tests with a private PKI; the default trusts Intel's pinned root.
        """
        self._root = root

    def _root_ca(self) -> x509.Certificate:
        return self._root if self._root is not None else _x509.load_pinned(INTEL_SGX_ROOT_CA)[0]

    def verify(
        self,
        evidence: Evidence,
        *,
        expected: bytes | None,
        now: datetime,
        collateral: object | None,
        log: StepLog,
    ) -> None:
        """Run steps (1)-(8) of the module docstring.

        Raises:
            MalformedEvidence: the quote does not parse.
            VerificationError: a step failed.
            TypeError: wrong evidence or collateral type.
        """
        if not isinstance(evidence, TdxEvidence):
            raise TypeError(f"TdxVerifier needs TdxEvidence, not {type(evidence).__name__}")
        if collateral is not None and not isinstance(collateral, TdxCollateral):
            raise TypeError(f"TDX collateral must be TdxCollateral, not {type(collateral).__name__}")
        # (1) The quote parses.
        quote = parse_logged(log, parse_tdx_quote, evidence.quote)
        log.passed(
            "parse", f"TDX quote v{quote.version}, {quote.body.body_type.name} body, {quote.size} bytes"
        )
        body = quote.body
        log.claims = TdxClaims(
            quote_version=quote.version,
            tee_tcb_svn=body.tee_tcb_svn,
            mr_seam=body.mr_seam,
            mr_signer_seam=body.mr_signer_seam,
            td_attributes=body.td_attributes,
            xfam=body.xfam,
            mrtd=body.mrtd,
            mr_config_id=body.mr_config_id,
            mr_owner=body.mr_owner,
            mr_owner_config=body.mr_owner_config,
            rtmrs=body.rtmrs,
            report_data=body.report_data,
            debug=body.debug,
        )
        sig = quote.signature

        # (2) The attestation key signed the header and body.
        att_key = _p256_key(sig.attestation_key)
        log.check(
            att_key is not None and _verify_p256(att_key, sig.signature, quote.signed_data),
            "quote_signature",
            passed="the attestation key signed the quote header and TD report",
            failed="the quote signature does not verify with the attestation key in the quote",
            hint="the quote was altered or corrupted; collect a fresh quote",
        )

        # (3) The QE report commits to the attestation key (and the QE auth data).
        digest = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest()
        qe_data = sig.qe_report.report_data
        log.check(
            qe_data[:32] == digest and not any(qe_data[32:]),
            "qe_report_binding",
            passed="QE report data = SHA-256(attestation key || QE auth data)",
            failed="the QE report does not certify this attestation key",
            hint="the attestation key was substituted; do not trust this quote",
        )

        # (4) The PCK chain ends at the pinned Intel root.
        chain = self._check_pck_chain(log, sig.pck_chain_pem, now)
        leaf = chain[0]

        # (5) The PCK leaf signed the QE report.
        leaf_key = leaf.public_key()
        log.check(
            isinstance(leaf_key, ec.EllipticCurvePublicKey)
            and _verify_p256(leaf_key, sig.qe_report_signature, sig.qe_report.raw),
            "qe_report_signature",
            passed="the PCK leaf key signed the QE report",
            failed="the QE report signature does not verify with the PCK leaf key",
            hint="the quote was altered, or the PCK chain belongs to another platform",
        )
        self._pck_claims(log, sig.pck_chain_pem, chain)

        # (5b) The QE is Intel's TD Quoting Enclave, not any enclave the PCK key certified.
        qe = sig.qe_report
        masked = bytes(a & m for a, m in zip(qe.attributes, TD_QE_ATTRIBUTES_MASK, strict=True))
        log.check(
            qe.mr_signer == TD_QE_MRSIGNER
            and qe.isv_prod_id == TD_QE_ISVPRODID
            and masked == TD_QE_ATTRIBUTES
            and qe.misc_select & TD_QE_MISCSELECT_MASK == TD_QE_MISCSELECT,
            "qe_identity",
            passed=f"the QE is Intel's TD Quoting Enclave (MRSIGNER {TD_QE_MRSIGNER.hex()[:16]}…, "
            f"ISVPRODID {TD_QE_ISVPRODID}, not debug)",
            failed=f"the quote was produced by an enclave that is not Intel's TD Quoting Enclave "
            f"(MRSIGNER {qe.mr_signer.hex()[:16]}…, ISVPRODID {qe.isv_prod_id}, "
            f"ATTRIBUTES {qe.attributes.hex()})",
            hint="the host substituted its own quoting enclave; do not trust this quote",
        )

        # (6) TCB status from collateral.
        if collateral is None:
            log.skipped(
                "tcb",
                "no DCAP collateral: TCB status, QE identity and revocation not checked (tcb_status unknown)",
            )
        else:
            self._check_tcb(log, evidence.quote, collateral, now)

        # (7) The report data binds this session.
        check_padded_report_data(log, body.report_data, expected)

        # (8) The event log is carried, not replayed.
        if evidence.cc_eventlog is None:
            log.skipped("eventlog", "no CCEL event log in the evidence")
        else:
            log.skipped(
                "eventlog",
                f"CCEL event log ({len(evidence.cc_eventlog)} bytes) not replayed against the RTMRs; "
                "use RTMR reference values in the policy",
            )

    def _check_pck_chain(self, log: StepLog, pem: bytes, now: datetime) -> list[x509.Certificate]:
        hint = "the PCK chain is not Intel's; do not trust this quote"
        try:
            certs = _x509.load_certificates(pem)
        except ValueError:
            log.fail("pck_chain", "the PCK certificate chain in the quote does not parse", hint=hint)
        root = self._root_ca()
        if not certs:
            log.fail("pck_chain", "the quote carries no PCK certificate", hint=hint)
        # Use the supplied certificates up to (not including) a copy of the pinned root.
        chain = [c for c in certs if not _x509.same_certificate(c, root)] + [root]
        for cert, issuer in itertools.pairwise(chain):
            problem = _x509.check_link(cert, issuer, hash_name=_x509.SHA256)
            if problem:
                log.fail("pck_chain", problem, hint=hint)
        for cert in chain:
            problem = _x509.check_validity(cert, now)
            if problem:
                log.fail("pck_chain", problem, hint="check the verification time, or collect a fresh quote")
        names = " -> ".join(_x509.common_name(c) for c in chain)
        log.passed("pck_chain", f"{names} (pinned), valid at {now.isoformat()}")
        return chain

    @staticmethod
    def _pck_claims(log: StepLog, pem: bytes, chain: list[x509.Certificate]) -> None:
        import dcap_qvl

        try:
            ext = dcap_qvl.parse_pck_extension_from_pem(pem)
            fmspc: str | None = bytes(ext.fmspc).hex().upper()
            ppid: bytes | None = bytes(ext.ppid) or None
        except (ValueError, RuntimeError):
            fmspc, ppid = None, None
        issuer = _x509.common_name(chain[1]) if len(chain) > 1 else ""
        log.update_claims(fmspc=fmspc, pck_ca=_PCK_CA_NAMES.get(issuer), ppid=ppid)

    def _check_tcb(self, log: StepLog, raw_quote: bytes, collateral: TdxCollateral, now: datetime) -> None:
        import dcap_qvl

        root_der = self._root_ca().public_bytes(serialization.Encoding.DER)
        try:
            coll = dcap_qvl.QuoteCollateralV3.from_json(collateral.json_text)
            report = dcap_qvl.verify_with_root_ca(raw_quote, coll, root_der, int(now.timestamp()))
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())
            log.fail(
                "tcb",
                f"DCAP verification with the collateral failed: {reason}",
                hint="use collateral for this platform that is valid at the verification time "
                "(refetch it from the PCCS), or check --at",
            )
        status = str(report.status)
        advisories = tuple(str(a) for a in report.advisory_ids)
        log.update_claims(tcb_status=status, advisory_ids=advisories)
        log.check(
            status != TCB_STATUS_REVOKED,
            "tcb",
            passed=f"dcap-qvl: TCB status {status}, advisories {list(advisories)}",
            failed="the platform TCB is revoked",
            hint="this platform must not be trusted",
        )
