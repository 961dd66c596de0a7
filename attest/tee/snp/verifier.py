"""Verify AMD SEV-SNP evidence: report signature, VCEK/VLEK chain to the pinned AMD roots, TCB.

Steps (each recorded on the result; the first failure raises)::

    (1) parse               the report parses (1184 bytes, version 2..5)
    (2) signature_algorithm SIGNATURE_ALGO is 1 (ECDSA P-384 with SHA-384)
    (3) vek                 the endorsement key named by KEY_INFO (VCEK or VLEK) is available:
                            from the evidence's cert_chain, else from the caller's SnpCollateral
    (4) vek_chain           ARK (pinned, self-signed) -> ASK (VCEK) or ASVK (VLEK) -> VEK, all
                            RSASSA-PSS/SHA-384, valid at ``now``; the product is taken from the
                            report's CPUID (v3+), else found by trying Milan, Genoa and Turin
    (5) vek_tcb             the VEK's TCB extensions equal REPORTED_TCB (bl, tee, snp, ucode,
                            and fmc on Turin)
    (6) chip_id             a VCEK's hwID extension equals CHIP_ID (skipped for a VLEK)
    (7) report_signature    the VEK signed report bytes 0x000..0x29F (R/S little-endian)
    (8) vmpl                the report was requested at VMPL 0
    (9) report_data         REPORT_DATA equals the expected binding, zero-padded to 64 bytes

What is *not* verified: revocation (AMD's CRLs are not fetched), whether the TCB is recent
enough, MEASUREMENT/HOST_DATA reference values (the workload policy's ``[snp]`` and
``init_data`` rules, :mod:`attest.verify.workload`), the guest policy's debug bit
(:class:`~attest.verify.policy.RefuseInsecure`). No network call is made unless the caller uses
:func:`fetch_vcek` with its own HTTP client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.evidence import Evidence, TeeKind
from attest.tee import _x509
from attest.tee.result import StepLog
from attest.tee.snp.claims import SnpClaims
from attest.tee.snp.report import SnpCertType, SnpEvidence, SnpProduct, SnpReport, parse_snp_report
from attest.tee.verifier import Verifier, check_padded_report_data, parse_logged
from foundation.errors import VerificationError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AMD_KDS_URL",
    "AmdChain",
    "SnpCollateral",
    "SnpVerifier",
    "fetch_vcek",
    "pinned_amd_chain",
]

#: AMD Key Distribution Service (AMD 57230 "VCEK Certificate and KDS Interface Specification").
AMD_KDS_URL = "https://kdsintf.amd.com"
#: SIGNATURE_ALGO 1 = ECDSA P-384 with SHA-384 (SNP ABI table 139).
SIG_ALGO_ECDSA_P384_SHA384 = 1
#: The VMPL a guest's own report must be requested at (Trustee requires 0).
REQUIRED_VMPL = 0
#: VCEK/VLEK extension OIDs (AMD 57230, table 8), arc 1.3.6.1.4.1.3704.1.
OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_FMC_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.9")
OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
#: CHIP_ID size (SNP ABI table 23); Turin hwIDs are its first 8 bytes (AMD 57230).
CHIP_ID_SIZE = 64
TURIN_HWID_SIZE = 8
_SIGNING_KEYS = {0: SnpCertType.VCEK, 1: SnpCertType.VLEK}


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpCollateral:
    """A VCEK or VLEK (DER or PEM) to use when the evidence does not carry one."""

    vek: bytes


#: (ARK, ASK, ASVK) of one product.
AmdChain = tuple[x509.Certificate, x509.Certificate, x509.Certificate]


def pinned_amd_chain(product: SnpProduct) -> AmdChain:
    """Return the pinned (ARK, ASK, ASVK) of ``product`` (attest/roots/PROVENANCE.md)."""
    ask, ark, asvk = _x509.load_pinned(f"{product.value.lower()}_ask_ark_asvk.pem")
    return ark, ask, asvk


def _der_length(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    if n == 0 or n > 2 or pos + 1 + n > len(data):
        raise ValueError("bad DER length")
    return int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def _der_value(data: bytes, tag: int) -> bytes:
    if len(data) < 2 or data[0] != tag:
        raise ValueError("unexpected DER tag")
    length, pos = _der_length(data, 1)
    if pos + length != len(data):
        raise ValueError("bad DER length")
    return data[pos:]


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _extension_int(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> int | None:
    raw = _extension(cert, oid)
    if raw is None:
        return None
    try:
        value = _der_value(raw, 0x02)
    except ValueError:
        return None
    return int.from_bytes(value, "big", signed=True) if value else None


def _hwid(cert: x509.Certificate) -> bytes | None:
    raw = _extension(cert, OID_HWID)
    if raw is None:
        return None
    # Older VCEKs carry the raw 64 bytes; newer ones a DER OCTET STRING (Trustee get_oid_octets).
    if len(raw) in (CHIP_ID_SIZE, TURIN_HWID_SIZE):
        return raw
    try:
        return _der_value(raw, 0x04)
    except ValueError:
        return None


def _chain_problem(vek: x509.Certificate, kind: SnpCertType, chain: AmdChain, now: datetime) -> str | None:
    ark, ask, asvk = chain
    intermediate = asvk if kind is SnpCertType.VLEK else ask
    for cert, issuer in ((ark, ark), (intermediate, ark), (vek, intermediate)):
        problem = _x509.check_link(cert, issuer, hash_name=_x509.SHA384, rsa_pss=True)
        if problem:
            return problem
    for cert in (ark, intermediate, vek):
        problem = _x509.check_validity(cert, now)
        if problem:
            return problem
    return None


def _issuer_product(vek: x509.Certificate) -> SnpProduct | None:
    attrs = vek.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(attrs[0].value) if attrs else ""
    for product in SnpProduct:
        if cn in (f"SEV-{product.value}", f"SEV-VLEK-{product.value}"):
            return product
    return None


class SnpVerifier(Verifier):
    """Verify :class:`~attest.tee.snp.report.SnpEvidence` (see the module docstring)."""

    tee: ClassVar[TeeKind] = TeeKind.SNP

    def __init__(self, *, chains: Mapping[SnpProduct, AmdChain] | None = None) -> None:
        """Trust ``chains`` ((ARK, ASK, ASVK) per product) instead of the pinned AMD roots.

        .. warning::
           Only for tests with a private PKI; the default trusts AMD's pinned roots.
        """
        self._chains = dict(chains) if chains is not None else None

    def _chain(self, product: SnpProduct) -> AmdChain | None:
        if self._chains is None:
            return pinned_amd_chain(product)
        return self._chains.get(product)

    def verify(
        self,
        evidence: Evidence,
        *,
        expected: bytes | None,
        now: datetime,
        collateral: object | None,
        log: StepLog,
    ) -> None:
        """Run steps (1)-(9) of the module docstring.

        Raises:
            MalformedEvidence: the report does not parse.
            VerificationError: a step failed.
            TypeError: wrong evidence or collateral type.
        """
        if not isinstance(evidence, SnpEvidence):
            raise TypeError(f"SnpVerifier needs SnpEvidence, not {type(evidence).__name__}")
        if collateral is not None and not isinstance(collateral, SnpCollateral):
            raise TypeError(f"SNP collateral must be SnpCollateral, not {type(collateral).__name__}")

        # (1) The report parses.
        report = parse_logged(log, parse_snp_report, evidence.report)
        log.passed("parse", f"SNP report v{report.version}")
        kind = _SIGNING_KEYS.get(report.signing_key)
        log.claims = SnpClaims(
            version=report.version,
            guest_svn=report.guest_svn,
            policy=report.policy,
            debug_allowed=report.debug_allowed,
            vmpl=report.vmpl,
            product=None if report.product is None else report.product.value,
            signing_key=kind.value if kind else f"unknown ({report.signing_key})",
            report_data=report.report_data,
            measurement=report.measurement,
            host_data=report.host_data,
            id_key_digest=report.id_key_digest,
            author_key_digest=report.author_key_digest,
            chip_id=report.chip_id,
            platform_info=report.platform_info,
            current_tcb=report.current_tcb,
            reported_tcb=report.reported_tcb,
            committed_tcb=report.committed_tcb,
            launch_tcb=report.launch_tcb,
            firmware_version=str(report.current_version),
        )

        # (2) The signature algorithm is the one we check.
        log.check(
            report.sig_algo == SIG_ALGO_ECDSA_P384_SHA384,
            "signature_algorithm",
            passed="ECDSA P-384 with SHA-384",
            failed=f"signature algorithm {report.sig_algo} is not 1 (ECDSA P-384/SHA-384)",
            hint="the report is not signed in a way this verifier supports",
        )

        # (3) Find the endorsement key the report names.
        if kind is None:
            log.fail(
                "vek",
                f"KEY_INFO names signing key {report.signing_key}, neither VCEK (0) nor VLEK (1)",
                hint="the report is unsigned; do not trust it",
            )
        vek, source = self._find_vek(log, evidence, collateral, kind)

        # (4) Chain the VEK to the pinned AMD root of the right product.
        product = self._check_chain(log, report, vek, kind, now)
        log.update_claims(product=product.value)

        # (5) The VEK certifies the TCB the report claims.
        self._check_tcb(log, report, vek, product)

        # (6) A VCEK is bound to one chip.
        if kind is SnpCertType.VLEK:
            log.skipped("chip_id", "a VLEK is not chip-specific (it names the cloud provider instead)")
        else:
            hwid = _hwid(vek)
            matches = hwid is not None and (
                hwid == report.chip_id
                or (len(hwid) == TURIN_HWID_SIZE and report.chip_id[:TURIN_HWID_SIZE] == hwid)
            )
            log.check(
                matches,
                "chip_id",
                passed="the VCEK hwID extension equals CHIP_ID",
                failed="the VCEK was issued for another chip (hwID differs from CHIP_ID)",
                hint="supply the VCEK of the chip that produced the report",
            )

        # (7) The VEK signed the report.
        key = vek.public_key()
        r = int.from_bytes(report.signature_r, "little")
        s = int.from_bytes(report.signature_s, "little")
        valid = False
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1) and r and s:
            try:
                key.verify(encode_dss_signature(r, s), report.signed_data, ec.ECDSA(hashes.SHA384()))
                valid = True
            except InvalidSignature:
                valid = False
        log.check(
            valid,
            "report_signature",
            passed=f"the {kind.value} ({source}) signed the report",
            failed=f"the report signature does not verify with the {kind.value}",
            hint="the report was altered, or the VEK belongs to another chip or TCB",
        )

        # (8) The guest's own report is requested at VMPL 0.
        log.check(
            report.vmpl == REQUIRED_VMPL,
            "vmpl",
            passed=f"report requested at VMPL {report.vmpl}",
            failed=f"report requested at VMPL {report.vmpl}, not {REQUIRED_VMPL}",
            hint="request the report with privlevel 0 from the guest kernel",
        )

        # (9) The report data binds this session.
        check_padded_report_data(log, report.report_data, expected)

    @staticmethod
    def _find_vek(
        log: StepLog, evidence: SnpEvidence, collateral: SnpCollateral | None, kind: SnpCertType
    ) -> tuple[x509.Certificate, str]:
        raw: bytes | None = None
        source = ""
        for cert in evidence.cert_chain or ():
            if cert.cert_type is kind:
                raw, source = cert.data, "from the evidence cert_chain"
                break
        if raw is None and collateral is not None:
            raw, source = collateral.vek, "supplied by the caller"
        if raw is None:
            log.fail(
                "vek",
                f"the evidence carries no {kind.value} and none was supplied",
                hint=f"pass SnpCollateral(vek=<{kind.value} DER>) (attest.verify.fetch_vcek can get a "
                "VCEK from AMD KDS), or collect evidence with the certificate table",
            )
        try:
            certs = _x509.load_certificates(raw)
        except ValueError:
            log.fail(
                "vek",
                f"the {kind.value} {source} is not a certificate",
                hint="supply a DER or PEM certificate",
            )
        log.passed("vek", f"{kind.value} '{_x509.common_name(certs[0])}' {source}")
        return certs[0], source

    def _check_chain(
        self, log: StepLog, report: SnpReport, vek: x509.Certificate, kind: SnpCertType, now: datetime
    ) -> SnpProduct:
        if report.product is not None:
            candidates, how = [report.product], "from the report CPUID"
        elif (by_issuer := _issuer_product(vek)) is not None:
            candidates, how = [by_issuer], "from the VEK issuer"
        else:
            candidates, how = list(SnpProduct), "by trying every product"
        problems: list[str] = []
        for product in candidates:
            chain = self._chain(product)
            problem = "no trusted chain" if chain is None else _chain_problem(vek, kind, chain, now)
            if problem is None:
                intermediate = (
                    f"SEV-VLEK-{product.value}" if kind is SnpCertType.VLEK else f"SEV-{product.value}"
                )
                log.passed(
                    "vek_chain",
                    f"{_x509.common_name(vek)} -> {intermediate} -> ARK-{product.value} (pinned, product "
                    f"{how}), valid at {now.isoformat()}",
                )
                return product
            problems.append(f"{product.value}: {problem}")
        log.fail(
            "vek_chain",
            f"the {kind.value} does not chain to a pinned AMD root ({'; '.join(problems)})",
            hint="the VEK is not AMD's for this product (or expired at the verification time); "
            "supply the right VCEK/VLEK",
        )

    @staticmethod
    def _check_tcb(log: StepLog, report: SnpReport, vek: x509.Certificate, product: SnpProduct) -> None:
        tcb = report.reported_tcb
        wanted = [
            ("bootloader", OID_BL_SPL, tcb.bootloader),
            ("tee", OID_TEE_SPL, tcb.tee),
            ("snp", OID_SNP_SPL, tcb.snp),
            ("microcode", OID_UCODE_SPL, tcb.microcode),
        ]
        if product is SnpProduct.TURIN:
            wanted.append(("fmc", OID_FMC_SPL, tcb.fmc if tcb.fmc is not None else -1))
        for name, oid, value in wanted:
            certified = _extension_int(vek, oid)
            if certified != value:
                log.fail(
                    "vek_tcb",
                    f"the VEK certifies {name} SPL {certified}, the report claims {value}",
                    hint="supply the VEK issued for this report's REPORTED_TCB (KDS query with its SPLs)",
                )
        log.passed("vek_tcb", f"the VEK certifies the reported TCB ({tcb})")


def fetch_vcek(
    report: SnpReport, *, client: httpx.Client, product: SnpProduct | None = None, base_url: str = AMD_KDS_URL
) -> bytes:
    """Fetch the VCEK for ``report`` from AMD KDS with the caller's HTTP client (opt-in network).

    The URL is ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`` (plus
    ``fmcSPL`` and an 8-byte hwID on Turin), AMD 57230 section 4. The certificate is *not*
    checked here; pass it as ``SnpCollateral(vek=...)`` and the verifier chains it to the
    pinned root. Keep it to verify offline later.

    Raises:
        VerificationError: the product is unknown (v2 report without ``product``) or KDS failed.
    """
    import httpx

    product = product or report.product
    if product is None:
        raise VerificationError("cannot tell the CPU product of this report; pass product= to fetch_vcek")
    tcb = report.reported_tcb
    if product is SnpProduct.TURIN:
        hwid = report.chip_id[:TURIN_HWID_SIZE].hex()
        query = f"fmcSPL={tcb.fmc or 0:02}&blSPL={tcb.bootloader:02}&teeSPL={tcb.tee:02}&snpSPL={tcb.snp:02}"
    else:
        hwid = report.chip_id.hex()
        query = f"blSPL={tcb.bootloader:02}&teeSPL={tcb.tee:02}&snpSPL={tcb.snp:02}"
    url = f"{base_url}/vcek/v1/{product.value}/{hwid}?{query}&ucodeSPL={tcb.microcode:02}"
    try:
        response = client.get(url)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise VerificationError(
            f"could not fetch the VCEK from AMD KDS ({type(exc).__name__}); retry later or supply it "
            "with SnpCollateral"
        ) from exc
    return response.content
