"""SEV-SNP: the vectors parse and verify as tests/vectors/snp/PROVENANCE.md says; negative
scenarios on real data, and Turin/VLEK paths on a private test PKI (tests/attest/pki.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from attest.evidence import TeeKind
from attest.tee import _x509, evidence_from_json
from attest.tee.result import StepLog
from attest.tee.snp.claims import SnpClaims
from attest.tee.snp.report import (
    CERT_TABLE_GUIDS,
    SnpCertificate,
    SnpCertType,
    SnpEvidence,
    SnpProduct,
    SnpReport,
    parse_snp_cert_table,
    parse_snp_report,
)
from attest.tee.snp.verifier import SnpVerifier, pinned_amd_chain
from attest.verify import Outcome, RefuseInsecure, SnpCollateral, result_of, verify_evidence
from foundation.errors import MalformedEvidence, PolicyViolation, VerificationError
from tests.attest.pki import AmdPki, sign_snp_report, turin_report_json
from tests.attest.support import NOW
from tests.vector_files import vector

MILAN_FACTS: dict[str, Any] = {
    "version": 2,
    "guest_svn": 4,
    "policy": 0x3001F,
    "vmpl": 0,
    "sig_algo": 1,
    "signing_key": 0,
    "platform_info": 0x1,
    "report_data": "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2" + "00" * 32,
    "measurement": "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f6"
    "3fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c",
    "host_data": "00" * 32,
    "chip_id": "c38427a30d4c7af9d96f7a15b97269825a64cb76a2352ffd5d18115d89ad473f"
    "8e8c0bcd9a5d9286612bad4aadfb4426205a3b9e4fea82301135a170e477524e",
    "tcb": (3, 0, 8, 115),
    "fw": "1.52.4",
}

GENOA_FACTS: dict[str, Any] = {
    "version": 3,
    "guest_svn": 0,
    "policy": 0x30000,
    "vmpl": 0,
    "sig_algo": 1,
    "signing_key": 0,
    "platform_info": 0x25,
    "report_data": "7e7320889600c7ac133aea7b896c51f41026002982292a7369559796999c1bf9"
    "29eef3ff23c46e858f0b1982f9a92b17c51b578d958cde6b0c92978f150cf9b0",
    "measurement": "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05"
    "f1a2cca5059d0cf4ae62a36d75c837974dd50b315506e73e",
    "host_data": "00" * 32,
    "chip_id": "371c55d6d15cb50f16dc31d39a24e300caaabff4431e841111429b73ec45ad67"
    "ea6e687ffae7bf84b54a5d0e6d79b3ef6ff0bd8b4cff94c2163af5c5de8718e8",
    "tcb": (10, 0, 23, 25),
    "fw": "1.55.40",
}


def _check_facts(report: SnpReport, facts: dict[str, Any]) -> None:
    assert report.version == facts["version"]
    assert report.guest_svn == facts["guest_svn"]
    assert report.policy == facts["policy"]
    assert report.vmpl == facts["vmpl"]
    assert report.sig_algo == facts["sig_algo"]
    assert report.signing_key == facts["signing_key"]
    assert report.platform_info == facts["platform_info"]
    assert report.report_data.hex() == facts["report_data"]
    assert report.measurement.hex() == facts["measurement"]
    assert report.host_data.hex() == facts["host_data"]
    assert report.chip_id.hex() == facts["chip_id"]
    tcb = report.reported_tcb
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == facts["tcb"]
    assert tcb.fmc is None
    assert str(report.current_version) == facts["fw"]


def test_milan_report_fields(snp_report: bytes) -> None:
    report = parse_snp_report(snp_report)
    _check_facts(report, MILAN_FACTS)
    assert report.cpuid_fam_id is None and report.product is None  # v2: no CPUID bytes


def test_genoa_trustee_json_fields(snp_trustee_evidence: SnpEvidence) -> None:
    report = parse_snp_report(snp_trustee_evidence.report)
    _check_facts(report, GENOA_FACTS)
    assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (0x19, 0xA0, 2)
    assert report.product is SnpProduct.GENOA
    assert snp_trustee_evidence.cert_chain is not None
    assert [c.cert_type for c in snp_trustee_evidence.cert_chain] == [SnpCertType.VCEK]


def test_sev_json_round_trips_both_ways(snp_report: bytes, snp_trustee_json: dict[str, Any]) -> None:
    report = parse_snp_report(snp_report)
    assert SnpReport.from_sev_json(report.to_sev_json()).raw == snp_report
    evidence = SnpEvidence.from_json(snp_trustee_json)
    assert evidence.to_json() == snp_trustee_json
    assert evidence_from_json(TeeKind.SNP, snp_trustee_json) == evidence


def test_milan_report_verifies_with_its_vcek(snp_report: bytes, snp_collateral: SnpCollateral) -> None:
    expected = bytes.fromhex(MILAN_FACTS["report_data"])[:32]  # unpadded digest, zero-padded by the verifier
    result = verify_evidence(
        SnpEvidence(report=snp_report), expected_report_data=expected, now=NOW, collateral=snp_collateral
    )
    assert [s.name for s in result.steps if s.outcome is Outcome.PASSED] == [
        "parse",
        "signature_algorithm",
        "vek",
        "vek_chain",
        "vek_tcb",
        "chip_id",
        "report_signature",
        "vmpl",
        "report_data",
    ]
    assert "SEV-Milan" in result.step("vek_chain").detail  # type: ignore[union-attr]
    assert "from the VEK issuer" in result.step("vek_chain").detail  # type: ignore[union-attr]
    claims = result.claims
    assert isinstance(claims, SnpClaims)
    assert claims.product == "Milan"
    assert claims.to_json()["measurement"] == MILAN_FACTS["measurement"]
    assert claims.to_json()["chip_id"] == MILAN_FACTS["chip_id"]


def test_genoa_trustee_evidence_verifies_with_embedded_vcek(snp_trustee_evidence: SnpEvidence) -> None:
    expected = bytes.fromhex(GENOA_FACTS["report_data"])
    result = verify_evidence(snp_trustee_evidence, expected_report_data=expected, now=NOW)
    assert result.ok
    assert result.skipped == ("policy",)
    assert "SEV-Genoa" in result.step("vek_chain").detail  # type: ignore[union-attr]
    assert "report CPUID" in result.step("vek_chain").detail  # type: ignore[union-attr]
    assert "from the evidence cert_chain" in result.step("vek").detail  # type: ignore[union-attr]


def test_vcek_certificate_facts(snp_vcek: bytes, snp_trustee_evidence: SnpEvidence) -> None:
    milan = _x509.load_certificates(snp_vcek)[0]
    assert _x509.common_name(milan) == "SEV-VCEK"
    assert milan.not_valid_after_utc == datetime(2030, 1, 24, 17, 58, 26, tzinfo=UTC)
    assert snp_trustee_evidence.cert_chain is not None
    genoa = _x509.load_certificates(snp_trustee_evidence.cert_chain[0].data)[0]
    assert genoa.not_valid_after_utc == datetime(2032, 5, 27, 17, 57, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("product", "sha256"),
    [
        ("milan", "cc871f0d2294176386175d9b5b962e18556b15ec13f55f8698b5f7a07aebf0c7"),
        ("genoa", "7397ae50f4bac4699393121cf7ce9e72bac49f9f7b8c524be8df97e59ca151e3"),
        ("turin", "34251ef16c414387e2bf36a69b675329156361e6e8113241209e46ebbd6da93f"),
    ],
)
def test_pinned_amd_bundles(product: str, sha256: str) -> None:
    from importlib import resources

    data = resources.files("attest").joinpath("roots", f"{product}_ask_ark_asvk.pem").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256
    ark, ask, asvk = pinned_amd_chain(SnpProduct(product.capitalize()))
    name = product.capitalize()
    assert [_x509.common_name(c) for c in (ask, ark, asvk)] == [
        f"SEV-{name}",
        f"ARK-{name}",
        f"SEV-VLEK-{name}",
    ]
    for cert, issuer in ((ark, ark), (ask, ark), (asvk, ark)):
        assert _x509.check_link(cert, issuer, hash_name=_x509.SHA384, rsa_pss=True) is None
    assert ark.signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"  # rsassaPss


def test_only_the_milan_chain_validates_the_milan_vcek(snp_vcek: bytes) -> None:
    from attest.tee.snp.verifier import _chain_problem

    vek = _x509.load_certificates(snp_vcek)[0]
    assert _chain_problem(vek, SnpCertType.VCEK, pinned_amd_chain(SnpProduct.MILAN), NOW) is None
    assert _chain_problem(vek, SnpCertType.VCEK, pinned_amd_chain(SnpProduct.GENOA), NOW) is not None
    assert _chain_problem(vek, SnpCertType.VCEK, pinned_amd_chain(SnpProduct.TURIN), NOW) is not None


# --- negative scenarios on real data ------------------------------------------------------------


def test_missing_vcek_is_refused_with_advice(snp_report: bytes) -> None:
    with pytest.raises(VerificationError, match=r"step 'vek'.*SnpCollateral") as info:
        verify_evidence(SnpEvidence(report=snp_report), expected_report_data=None, now=NOW)
    assert result_of(info.value) is not None


def test_wrong_product_chain_genoa_report_with_milan_vcek(
    snp_trustee_evidence: SnpEvidence, snp_vcek: bytes
) -> None:
    evidence = SnpEvidence(
        report=snp_trustee_evidence.report,
        cert_chain=(SnpCertificate(cert_type=SnpCertType.VCEK, data=snp_vcek),),
    )
    with pytest.raises(VerificationError, match=r"vek_chain.*Genoa"):
        verify_evidence(evidence, expected_report_data=None, now=NOW)


def test_vcek_tcb_mismatch_milan_report_with_genoa_vcek(
    snp_report: bytes, snp_trustee_evidence: SnpEvidence
) -> None:
    assert snp_trustee_evidence.cert_chain is not None
    genoa_vcek = snp_trustee_evidence.cert_chain[0].data
    with pytest.raises(VerificationError, match=r"vek_tcb.*bootloader SPL 10.*claims 3"):
        verify_evidence(
            SnpEvidence(report=snp_report),
            expected_report_data=None,
            now=NOW,
            collateral=SnpCollateral(vek=genoa_vcek),
        )


def test_chip_id_mismatch(snp_report: bytes, snp_collateral: SnpCollateral) -> None:
    tampered = bytearray(snp_report)
    tampered[0x1A0] ^= 0xFF
    with pytest.raises(VerificationError, match="chip_id"):
        verify_evidence(
            SnpEvidence(report=bytes(tampered)), expected_report_data=None, now=NOW, collateral=snp_collateral
        )


def test_tampered_measurement_breaks_the_signature(snp_report: bytes, snp_collateral: SnpCollateral) -> None:
    tampered = bytearray(snp_report)
    tampered[0x90] ^= 0x01
    with pytest.raises(VerificationError, match="report_signature"):
        verify_evidence(
            SnpEvidence(report=bytes(tampered)), expected_report_data=None, now=NOW, collateral=snp_collateral
        )


def test_tampered_vcek_certificate_is_refused(snp_report: bytes, snp_vcek: bytes) -> None:
    tampered = bytearray(snp_vcek)
    tampered[-10] ^= 0x01  # inside the ASK's RSA-PSS signature
    with pytest.raises(VerificationError, match="vek_chain"):
        verify_evidence(
            SnpEvidence(report=snp_report),
            expected_report_data=None,
            now=NOW,
            collateral=SnpCollateral(vek=bytes(tampered)),
        )


def test_expired_vcek_is_refused(snp_report: bytes, snp_collateral: SnpCollateral) -> None:
    with pytest.raises(VerificationError, match=r"vek_chain.*expired"):
        verify_evidence(
            SnpEvidence(report=snp_report),
            expected_report_data=None,
            now=datetime(2030, 1, 25, tzinfo=UTC),
            collateral=snp_collateral,
        )


def test_wrong_report_data(snp_trustee_evidence: SnpEvidence) -> None:
    with pytest.raises(VerificationError, match="step 'report_data'"):
        verify_evidence(snp_trustee_evidence, expected_report_data=b"\0" * 48, now=NOW)


def test_refuse_insecure_passes_a_production_guest(snp_trustee_evidence: SnpEvidence) -> None:
    # Measurement and TCB floors are the workload policy's rules (test_workload_policy.py).
    result = verify_evidence(
        snp_trustee_evidence, expected_report_data=None, now=NOW, policy=RefuseInsecure()
    )
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("scenario", "mutate", "message"),
    [
        ("wrong_size", lambda r: r[:-1], "1183 bytes"),
        ("version_1", lambda r: (1).to_bytes(4, "little") + r[4:], "version 1"),
        ("version_6", lambda r: (6).to_bytes(4, "little") + r[4:], "version 6"),
    ],
)
def test_malformed_reports(snp_report: bytes, scenario: str, mutate: Any, message: str) -> None:
    with pytest.raises(MalformedEvidence, match=message):
        parse_snp_report(mutate(snp_report))


@pytest.mark.parametrize(
    ("scenario", "change"),
    [
        ("byte_out_of_range", {"measurement": [256] + [0] * 47}),
        ("short_array", {"chip_id": [0] * 63}),
        ("negative_int", {"guest_svn": -1}),
        ("bool_is_not_int", {"vmpl": True}),
        ("fmc_on_genoa", {"reported_tcb": {"fmc": 1, "bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}}),
        ("signature_missing", {"signature": None}),
        ("version_out_of_range", {"version": 9}),
    ],
)
def test_malformed_sev_json(snp_trustee_json: dict[str, Any], scenario: str, change: dict[str, Any]) -> None:
    report = copy.deepcopy(snp_trustee_json["attestation_report"])
    report.update(change)
    with pytest.raises(MalformedEvidence):
        SnpReport.from_sev_json(report)


@pytest.mark.parametrize(
    ("scenario", "chain"),
    [
        ("unknown_cert_type", [{"cert_type": "NOPE", "data": []}]),
        ("data_not_bytes", [{"cert_type": "VCEK", "data": "AAAA"}]),
        ("other_without_guid", [{"cert_type": "OTHER", "data": []}]),
        ("chain_not_array", "VCEK"),
    ],
)
def test_malformed_cert_chain(snp_trustee_json: dict[str, Any], scenario: str, chain: object) -> None:
    obj = dict(snp_trustee_json, cert_chain=chain)
    with pytest.raises(MalformedEvidence):
        SnpEvidence.from_json(obj)


def test_cert_chain_other_type_round_trips() -> None:
    guid = uuid.uuid4()
    cert = SnpCertificate.from_json({"cert_type": {"OTHER": str(guid)}, "data": [1, 2]})
    assert cert.cert_type is SnpCertType.OTHER and cert.guid == guid
    assert cert.to_json() == {"cert_type": {"OTHER": str(guid)}, "data": [1, 2]}


def _cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header_size = 24 * (len(entries) + 1)
    table = b""
    blob = b""
    for guid, data in entries:
        table += (
            guid.bytes + (header_size + len(blob)).to_bytes(4, "little") + len(data).to_bytes(4, "little")
        )
        blob += data
    return table + b"\0" * 24 + blob


def test_cert_table_parses_guids(snp_vcek: bytes) -> None:
    by_type = {v: k for k, v in CERT_TABLE_GUIDS.items()}
    other = uuid.uuid4()
    raw = _cert_table(
        [(by_type[SnpCertType.VCEK], snp_vcek), (by_type[SnpCertType.ASK], b"ask"), (other, b"x")]
    )
    certs = parse_snp_cert_table(raw + b"\0" * 100)
    assert [c.cert_type for c in certs] == [SnpCertType.VCEK, SnpCertType.ASK, SnpCertType.OTHER]
    assert certs[0].data == snp_vcek and certs[2].guid == other


@pytest.mark.parametrize(
    ("scenario", "raw"),
    [
        ("unterminated", uuid.uuid4().bytes + (0).to_bytes(8, "little")),
        (
            "points_outside",
            uuid.uuid4().bytes + (100).to_bytes(4, "little") + (50).to_bytes(4, "little") + b"\0" * 24,
        ),
        ("truncated_entry", b"\x01" * 10),
    ],
)
def test_malformed_cert_tables(scenario: str, raw: bytes) -> None:
    with pytest.raises(MalformedEvidence):
        parse_snp_cert_table(raw)


# --- private PKI: Turin, VLEK, and steps behind a valid signature ------------------------------

TURIN_TCB = {"fmc": 2, "bootloader": 4, "tee": 1, "snp": 24, "microcode": 72}
CHIP8 = bytes.fromhex("0123456789abcdef")


@pytest.fixture(scope="module")
def turin_pki() -> AmdPki:
    return AmdPki.create("Turin")


def _verify(pki: AmdPki, evidence: SnpEvidence, expected: bytes | None = None) -> StepLog:
    log = StepLog(tee=TeeKind.SNP)
    SnpVerifier(chains={SnpProduct.TURIN: pki.chain}).verify(
        evidence, expected=expected, now=NOW, collateral=None, log=log
    )
    return log


def _turin_evidence(
    pki: AmdPki, *, vlek: bool = False, vek_tcb: dict[str, int] = TURIN_TCB, **changes: Any
) -> SnpEvidence:
    base = json.loads(vector("kbs/evidence.json"))["attestation_report"]
    changes.setdefault("key_info", 1 << 2 if vlek else 0)
    report_json = turin_report_json(base, chip8=CHIP8, tcb=TURIN_TCB, **changes)
    key, vek = pki.issue_vek(vlek=vlek, tcb=vek_tcb, hwid=None if vlek else CHIP8)
    from cryptography.hazmat.primitives.serialization import Encoding

    raw = sign_snp_report(report_json, key)
    kind = SnpCertType.VLEK if vlek else SnpCertType.VCEK
    return SnpEvidence(
        report=raw, cert_chain=(SnpCertificate(cert_type=kind, data=vek.public_bytes(Encoding.DER)),)
    )


def test_turin_vcek_with_fmc_and_8_byte_hwid(turin_pki: AmdPki) -> None:
    evidence = _turin_evidence(turin_pki)
    report = parse_snp_report(evidence.report)
    assert report.product is SnpProduct.TURIN and report.reported_tcb.fmc == 2
    assert report.reported_tcb.raw == bytes([2, 4, 1, 24, 0, 0, 0, 72])
    log = _verify(turin_pki, evidence)
    assert log.result().ok
    assert "fmc=2" in log.result().step("vek_tcb").detail  # type: ignore[union-attr]
    # The JSON form carries fmc and rebuilds the same bytes.
    assert SnpEvidence.from_json(evidence.to_json()) == evidence


def test_turin_fmc_mismatch(turin_pki: AmdPki) -> None:
    evidence = _turin_evidence(turin_pki, vek_tcb=dict(TURIN_TCB, fmc=3))
    with pytest.raises(VerificationError, match=r"vek_tcb.*fmc SPL 3"):
        _verify(turin_pki, evidence)


def test_turin_report_is_refused_by_the_pinned_roots(turin_pki: AmdPki) -> None:
    with pytest.raises(VerificationError, match=r"vek_chain.*Turin"):
        verify_evidence(_turin_evidence(turin_pki), expected_report_data=None, now=NOW)


def test_vlek_report_skips_chip_id(turin_pki: AmdPki) -> None:
    log = _verify(turin_pki, _turin_evidence(turin_pki, vlek=True))
    result = log.result()
    assert result.ok
    assert result.step("chip_id").outcome is Outcome.SKIPPED  # type: ignore[union-attr]
    assert "SEV-VLEK-Turin" in result.step("vek_chain").detail  # type: ignore[union-attr]


def test_vlek_named_by_report_but_vcek_supplied(turin_pki: AmdPki) -> None:
    evidence = _turin_evidence(turin_pki, vlek=True)
    assert evidence.cert_chain is not None
    relabelled = SnpEvidence(
        report=evidence.report,
        cert_chain=(SnpCertificate(cert_type=SnpCertType.VCEK, data=evidence.cert_chain[0].data),),
    )
    with pytest.raises(VerificationError, match="no VLEK"):
        _verify(turin_pki, relabelled)


def test_vmpl_other_than_zero_is_refused(turin_pki: AmdPki) -> None:
    with pytest.raises(VerificationError, match="step 'vmpl'"):
        _verify(turin_pki, _turin_evidence(turin_pki, vmpl=1))


def test_unsigned_report_is_refused(turin_pki: AmdPki) -> None:
    with pytest.raises(VerificationError, match="signing key 7"):
        _verify(turin_pki, _turin_evidence(turin_pki, key_info=7 << 2))


def test_debug_guest_is_refused_by_refuse_insecure(turin_pki: AmdPki) -> None:
    log = _verify(turin_pki, _turin_evidence(turin_pki, policy=0x30000 | (1 << 19)))
    with pytest.raises(PolicyViolation, match="debugging"):
        RefuseInsecure().verify(log.result())


def test_hwid_extension_encodings(turin_pki: AmdPki, snp_vcek: bytes) -> None:
    from attest.tee.snp.verifier import _hwid

    raw_form = _x509.load_certificates(snp_vcek)[0]
    assert _hwid(raw_form) == bytes.fromhex(MILAN_FACTS["chip_id"])
    chip = bytes(range(64))
    _, octet_form = turin_pki.issue_vek(tcb=TURIN_TCB, hwid=chip, hwid_as_octet_string=True)
    assert _hwid(octet_form) == chip


def test_fetch_vcek_builds_the_kds_url(snp_trustee_evidence: SnpEvidence, snp_report: bytes) -> None:
    import httpx

    from attest.verify import fetch_vcek

    seen: list[str] = []

    def kds(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=b"vcek-der")

    report = parse_snp_report(snp_trustee_evidence.report)
    with httpx.Client(transport=httpx.MockTransport(kds)) as client:
        assert fetch_vcek(report, client=client) == b"vcek-der"
    assert seen == [
        f"https://kdsintf.amd.com/vcek/v1/Genoa/{GENOA_FACTS['chip_id']}?blSPL=10&teeSPL=00&snpSPL=23&ucodeSPL=25"
    ]
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        with pytest.raises(VerificationError, match="AMD KDS"):
            fetch_vcek(report, client=client)
        with pytest.raises(VerificationError, match="product="):
            fetch_vcek(parse_snp_report(snp_report), client=client)


def test_der_certificate_ending_in_a_zero_byte_loads() -> None:
    # Regression: trailing NULs are stripped from PEM buffers only, never from DER.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zero")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
    )
    for serial in range(1, 5000):
        der = builder.serial_number(serial).sign(key, hashes.SHA256()).public_bytes(Encoding.DER)
        if der.endswith(b"\0"):
            break
    else:  # pragma: no cover - 5000 tries without a trailing zero is ~2e-9 likely
        pytest.fail("no certificate ending in 0x00 was produced")
    assert _x509.load_certificates(der)[0].public_bytes(Encoding.DER) == der
