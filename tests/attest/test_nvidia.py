"""NVIDIA: the Hopper vector parses and verifies as tests/vectors/nvidia/PROVENANCE.md says."""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

import pytest

from attest.evidence import TeeKind
from attest.tee import _x509, evidence_from_json
from attest.tee.nvidia.report import (
    NvidiaDeviceEvidence,
    NvidiaEvidence,
    OpaqueType,
    format_vbios_version,
    parse_nvidia_report,
)
from attest.tee.nvidia.verifier import NvidiaVerifier
from attest.tee.result import StepLog, VerificationResult
from attest.verify import NvidiaClaims, Outcome, result_of, verify_device_evidence, verify_evidence
from foundation.errors import MalformedEvidence, PolicyViolation, VerificationError
from tests.attest.pki import NvidiaPki, sign_nvidia_report
from tests.attest.support import HOPPER_NONCE, NOW
from tests.vector_files import vector

FWID = "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d"
OPAQUE = [
    "VBIOS_VERSION",
    "BOARD_ID",
    "CHIP_SKU",
    "CHIP_SKU_MOD",
    "PROJECT",
    "PROJECT_SKU",
    "PROJECT_SKU_MOD",
    "DRIVER_VERSION",
    "GPU_INFO",
    "MSRSCNT",
    "CPRINFO",
    "NVDEC0_STATUS",
    "FWID",
    "PROTECTED_PCIE_STATUS",
]


def test_report_fields_match_provenance(nvidia_report: bytes) -> None:
    report = parse_nvidia_report(nvidia_report)
    assert len(report.raw) == 4117
    assert report.spdm_version == 0x11
    assert report.nonce == HOPPER_NONCE
    assert len(report.measurement_blocks) == 64
    assert sum(1 for b in report.measurement_blocks if any(b.value)) == 26
    ordered = b"".join(v for _, v in sorted(report.measurements.items()))
    assert (
        hashlib.sha256(ordered).hexdigest()
        == "d2e0f10327ad8d1a9811653fcb998095c5e41400b7ef17646bd1a0c78e496c34"
    )
    assert report.responder_nonce.hex() == "b4b8a06aaaa35542839388e159d447a5d6f6194998fd86513e2d591ccf640985"
    assert [f.name for f in report.opaque_fields] == OPAQUE
    assert report.driver_version == "550.90.07"
    assert report.vbios_version == "96.00.9f.00.01"
    assert report.project == "1010"
    assert report.project_sku == "0200"
    assert report.chip_sku == "882"
    assert report.fwid is not None and report.fwid.hex() == FWID
    assert report.opaque_data_version is None
    assert report.feature_flag is None
    assert len(report.signed_data) == 4021 and report.signature == nvidia_report[-96:]


def test_vbios_formatting_matches_nvtrust() -> None:
    assert format_vbios_version(bytes.fromhex("009f009601000000")) == "96.00.9f.00.01"


def test_report_verifies_against_the_pinned_root(nvidia_evidence: NvidiaEvidence) -> None:
    result = verify_device_evidence(nvidia_evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)
    passed = [s.name for s in result.steps if s.outcome is Outcome.PASSED]
    assert passed == [
        "devices",
        "gpu0.arch",
        "gpu0.parse",
        "gpu0.cert_chain",
        "gpu0.distinct",
        "gpu0.signature",
        "gpu0.nonce",
        "gpu0.fwid",
    ]
    chain_detail = result.step("gpu0.cert_chain").detail  # type: ignore[union-attr]
    assert chain_detail.startswith("GH100 A01 GSP FMC LF -> GH100 A01 GSP BROM")
    assert chain_detail.endswith("NVIDIA Device Identity CA (pinned)")
    claims = result.claims
    assert isinstance(claims, NvidiaClaims)
    gpu = claims.gpus[0]
    assert gpu.leaf_subject == "GH100 A01 GSP FMC LF"
    assert gpu.to_json()["driver_version"] == "550.90.07"
    assert gpu.to_json()["vbios_version"] == "96.00.9f.00.01"
    assert gpu.to_json()["nonce"] == HOPPER_NONCE.hex()


def test_chain_facts(nvidia_chain: bytes) -> None:
    certs = _x509.load_certificates(nvidia_chain)
    assert len(certs) == 5
    root = _x509.load_pinned("nvidia_device_root.pem")[0]
    assert _x509.same_certificate(certs[-1], root)
    assert all(c.not_valid_after_utc.year == 9999 for c in certs)
    data = resources.files("attest").joinpath("roots", "nvidia_device_root.pem").read_bytes()
    assert data == vector("nvidia/verifier_device_root.pem")


def test_runtime_data_longer_than_32_bytes_uses_its_prefix(nvidia_evidence: NvidiaEvidence) -> None:
    verify_device_evidence(nvidia_evidence, expected_runtime_data=HOPPER_NONCE + b"\xff" * 16, now=NOW)


def test_wrong_nonce_is_refused(nvidia_evidence: NvidiaEvidence) -> None:
    with pytest.raises(VerificationError, match=r"gpu0.nonce") as info:
        verify_device_evidence(
            nvidia_evidence, expected_runtime_data=b"\x4c\xff\x7f\x53" + b"\0" * 28, now=NOW
        )
    partial = result_of(info.value)
    assert partial is not None and partial.step("gpu0.signature").outcome is Outcome.PASSED  # type: ignore[union-attr]


def test_responder_nonce_is_not_the_callers_nonce(
    nvidia_evidence: NvidiaEvidence, nvidia_report: bytes
) -> None:
    responder = parse_nvidia_report(nvidia_report).responder_nonce
    with pytest.raises(VerificationError, match=r"gpu0.nonce"):
        verify_device_evidence(nvidia_evidence, expected_runtime_data=responder, now=NOW)


def test_tampered_measurement_breaks_the_signature(nvidia_report: bytes, nvidia_chain: bytes) -> None:
    tampered = bytearray(nvidia_report)
    tampered[100] ^= 0x01
    evidence = NvidiaEvidence(
        devices=(
            NvidiaDeviceEvidence(arch="HOPPER", uuid="x", evidence=bytes(tampered), certificate=nvidia_chain),
        )
    )
    with pytest.raises(VerificationError, match=r"gpu0.signature"):
        verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)


def test_tampered_chain_is_refused(nvidia_report: bytes, nvidia_chain: bytes) -> None:
    certs = _x509.load_certificates(nvidia_chain)
    from cryptography.hazmat.primitives.serialization import Encoding

    der = bytearray(certs[1].public_bytes(Encoding.DER))
    der[-5] ^= 0x01  # inside the BROM certificate's signature
    from cryptography import x509

    bad = x509.load_der_x509_certificate(bytes(der))
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in [certs[0], bad, *certs[2:]])
    evidence = NvidiaEvidence(
        devices=(NvidiaDeviceEvidence(arch="HOPPER", uuid="x", evidence=nvidia_report, certificate=pem),)
    )
    with pytest.raises(VerificationError, match=r"gpu0.cert_chain"):
        verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)


def test_chain_that_does_not_end_at_nvidia_is_refused(nvidia_report: bytes, nvidia_chain: bytes) -> None:
    # Dropping the intermediate chain: the leaf alone plus the (replaced) root does not link.
    certs = _x509.load_certificates(nvidia_chain)
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = certs[0].public_bytes(Encoding.PEM) + certs[-1].public_bytes(Encoding.PEM)
    evidence = NvidiaEvidence(
        devices=(NvidiaDeviceEvidence(arch="HOPPER", uuid="x", evidence=nvidia_report, certificate=pem),)
    )
    with pytest.raises(VerificationError, match=r"gpu0.cert_chain"):
        verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)


@pytest.mark.parametrize(("arch", "message"), [("LS10", "NVSwitch"), ("AMPERE", "Hopper and Blackwell only")])
def test_other_architectures_and_switches_are_refused(
    nvidia_report: bytes, nvidia_chain: bytes, arch: str, message: str
) -> None:
    evidence = NvidiaEvidence(
        devices=(NvidiaDeviceEvidence(arch=arch, uuid="x", evidence=nvidia_report, certificate=nvidia_chain),)
    )
    with pytest.raises(VerificationError, match=rf"gpu0.arch.*{message}"):
        verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)


def test_empty_device_list_is_refused() -> None:
    with pytest.raises(VerificationError, match="step 'devices'"):
        verify_device_evidence(NvidiaEvidence(devices=()), expected_runtime_data=None, now=NOW)


class _GpuVersions:
    """A policy hook reading every GPU's versions (what the workload policy's [gpu] rules pin)."""

    def __init__(self, driver: str, vbios: str) -> None:
        self.driver, self.vbios = driver, vbios

    def verify(self, result: VerificationResult) -> None:
        assert isinstance(result.claims, NvidiaClaims)
        for gpu in result.claims.gpus:
            if (gpu.driver_version, gpu.vbios_version) != (self.driver, self.vbios):
                raise PolicyViolation(
                    f"GPU {gpu.uuid}: driver {gpu.driver_version!r}, VBIOS {gpu.vbios_version!r}"
                )


def test_the_policy_hook_reads_the_gpu_versions(nvidia_evidence: NvidiaEvidence) -> None:
    ok = _GpuVersions("550.90.07", "96.00.9f.00.01")
    result = verify_device_evidence(nvidia_evidence, expected_runtime_data=HOPPER_NONCE, now=NOW, policy=ok)
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]
    with pytest.raises(PolicyViolation, match=r"driver '550.90.07'"):
        verify_device_evidence(
            nvidia_evidence,
            expected_runtime_data=HOPPER_NONCE,
            now=NOW,
            policy=_GpuVersions("570.0", "96.00.9f.00.01"),
        )


def test_device_and_primary_entry_points_are_not_interchangeable(nvidia_evidence: NvidiaEvidence) -> None:
    with pytest.raises(TypeError, match="verify_device_evidence"):
        verify_evidence(nvidia_evidence, expected_report_data=None)


def test_trustee_json_round_trip_and_legacy_hex(
    nvidia_evidence: NvidiaEvidence, nvidia_report: bytes
) -> None:
    obj = nvidia_evidence.to_json()
    device = obj["device_evidence_list"][0]
    assert set(device) == {"arch", "uuid", "evidence", "certificate"}
    assert base64.b64decode(device["evidence"]) == nvidia_report
    assert evidence_from_json(TeeKind.NVIDIA, obj) == nvidia_evidence
    legacy = dict(device, evidence=nvidia_report.hex())
    parsed = NvidiaEvidence.from_json({"device_evidence_list": [legacy]})
    assert parsed.devices[0].evidence == nvidia_report
    no_uuid = {k: v for k, v in device.items() if k != "uuid"}
    assert NvidiaEvidence.from_json({"device_evidence_list": [no_uuid]}).devices[0].uuid == "unknown"


@pytest.mark.parametrize(
    ("scenario", "obj"),
    [
        ("list_missing", {}),
        ("entry_not_object", {"device_evidence_list": ["x"]}),
        ("arch_missing", {"device_evidence_list": [{"evidence": "AA==", "certificate": "AA=="}]}),
        (
            "certificate_not_base64",
            {"device_evidence_list": [{"arch": "HOPPER", "evidence": "AA==", "certificate": "*"}]},
        ),
    ],
)
def test_malformed_trustee_json(scenario: str, obj: dict[str, object]) -> None:
    with pytest.raises(MalformedEvidence):
        NvidiaEvidence.from_json(obj)


@pytest.mark.parametrize(
    ("scenario", "mutate", "message"),
    [
        ("spdm_1_0_request", lambda r: b"\x10" + r[1:], "request SPDM version"),
        ("not_get_measurements", lambda r: r[:1] + b"\x81" + r[2:], "GET_MEASUREMENTS"),
        ("truncated_signature", lambda r: r[:-1], "truncated"),
        ("too_many_blocks", lambda r: r[:41] + b"\x41" + r[42:], "measurement"),
    ],
)
def test_malformed_reports(nvidia_report: bytes, scenario: str, mutate: object, message: str) -> None:
    assert callable(mutate)
    with pytest.raises(MalformedEvidence, match=message):
        parse_nvidia_report(mutate(nvidia_report))


def test_duplicate_opaque_field_is_refused(nvidia_report: bytes) -> None:
    report = parse_nvidia_report(nvidia_report)
    driver = report.opaque(OpaqueType.DRIVER_VERSION)
    assert driver is not None
    opaque_start = len(nvidia_report) - 96 - sum(4 + len(f.value) for f in report.opaque_fields)
    extra = (3).to_bytes(2, "little") + len(driver).to_bytes(2, "little") + driver
    opaque_len_at = opaque_start - 2
    old_len = int.from_bytes(nvidia_report[opaque_len_at:opaque_start], "little")
    forged = (
        nvidia_report[:opaque_len_at]
        + (old_len + len(extra)).to_bytes(2, "little")
        + nvidia_report[opaque_start:-96]
        + extra
        + nvidia_report[-96:]
    )
    with pytest.raises(MalformedEvidence, match="appears twice"):
        parse_nvidia_report(forged)


# --- private PKI: FWID binding behind a valid signature -----------------------------------------


@pytest.fixture(scope="module")
def nvidia_pki() -> NvidiaPki:
    return NvidiaPki.create()


def _private_evidence(pki: NvidiaPki, nvidia_report: bytes, cert_fwid: bytes) -> NvidiaEvidence:
    from cryptography.hazmat.primitives.serialization import Encoding

    key, leaf = pki.issue_leaf(cert_fwid)
    raw = sign_nvidia_report(parse_nvidia_report(nvidia_report).signed_data, key)
    pem = leaf.public_bytes(Encoding.PEM) + pki.root.public_bytes(Encoding.PEM)
    return NvidiaEvidence(
        devices=(NvidiaDeviceEvidence(arch="HOPPER", uuid="x", evidence=raw, certificate=pem),)
    )


def test_fwid_matching_leaf_passes(nvidia_pki: NvidiaPki, nvidia_report: bytes) -> None:
    log = StepLog(tee=TeeKind.NVIDIA)
    evidence = _private_evidence(nvidia_pki, nvidia_report, bytes.fromhex(FWID))
    NvidiaVerifier(root=nvidia_pki.root).verify(
        evidence, expected=HOPPER_NONCE, now=NOW, collateral=None, log=log
    )
    assert log.result().ok


def test_fwid_mismatch_is_refused(nvidia_pki: NvidiaPki, nvidia_report: bytes) -> None:
    log = StepLog(tee=TeeKind.NVIDIA)
    evidence = _private_evidence(nvidia_pki, nvidia_report, b"\x01" * 48)
    with pytest.raises(VerificationError, match=r"gpu0.fwid"):
        NvidiaVerifier(root=nvidia_pki.root).verify(
            evidence, expected=HOPPER_NONCE, now=NOW, collateral=None, log=log
        )
    assert log.result().step("gpu0.signature").outcome is Outcome.PASSED  # type: ignore[union-attr]


def test_private_pki_is_refused_by_the_pinned_root(nvidia_pki: NvidiaPki, nvidia_report: bytes) -> None:
    evidence = _private_evidence(nvidia_pki, nvidia_report, bytes.fromhex(FWID))
    with pytest.raises(VerificationError, match=r"gpu0.cert_chain"):
        verify_device_evidence(evidence, expected_runtime_data=HOPPER_NONCE, now=NOW)
