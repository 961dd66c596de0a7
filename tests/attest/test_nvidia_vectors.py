"""NVIDIA reports as current drivers emit them (tests/vectors/nvidia/PROVENANCE.md, set B).

Each vector parses, verifies against the pinned NVIDIA root with its own nonce, and is refused
with any other nonce or chain. The CoCo Hopper report carries one unsigned byte after the
signature (Trustee accepts it, so do we, and say so); the NVDAOD transcript uses the versioned
opaque-data layout of drivers released with CUDA 13.5 and later.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attest.evidence import TeeKind
from attest.tee.nvidia.report import (
    HOPPER_SIGNATURE_SIZE,
    NvidiaDeviceEvidence,
    NvidiaEvidence,
    OpaqueType,
    parse_nvidia_report,
)
from attest.tee.nvidia.verifier import NvidiaVerifier
from attest.tee.result import StepLog
from attest.verify import NvidiaClaims, verify_device_evidence
from foundation.errors import MalformedEvidence, VerificationError
from tests.attest.pki import NvidiaPki, sign_nvidia_report
from tests.attest.support import NOW
from tests.vector_files import vector


@dataclass(frozen=True)
class Vector:
    name: str
    arch: str
    report: bytes
    chain: bytes
    nonce: str
    driver: str
    vbios: str
    project: str
    chip_sku: str
    trailing: int
    feature_flag: str | None
    leaf: str


def _hex(name: str) -> bytes:
    return bytes.fromhex(vector(f"nvidia/{name}").decode().strip())


def _nvat_json() -> dict[str, str]:
    (entry,) = json.loads(vector("nvidia/nvat_evidence_hopper_590_12.json"))
    assert isinstance(entry, dict)
    return entry


VECTORS = [
    Vector(
        name="trustee-coco-hopper-580",
        arch="HOPPER",
        report=_hex("trustee_hopper_coco_report1.txt"),
        chain=vector("nvidia/trustee_hopper_coco_certs1.txt"),
        nonce="87d8e24ab336adafe228d49e83d745f6dba4ae505372b6a5704820856b343fec",
        driver="580.95.05",
        vbios="96.00.74.00.1a",
        project="1010",
        chip_sku="882",
        trailing=1,
        feature_flag="SPT",
        leaf="GH100 A01 GSP FMC LF",
    ),
    Vector(
        name="nvat-blackwell-gb100",
        arch="BLACKWELL",
        report=_hex("nvat_blackwell_report.txt"),
        chain=vector("nvidia/nvat_blackwell_certs.txt"),
        nonce="931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb",
        driver="575.32",
        vbios="97.00.88.00.0f",
        project="G525",
        chip_sku="886",
        trailing=0,
        feature_flag=None,
        leaf="GB100 A01 GSP FMC LF",
    ),
    Vector(
        name="trustee-pr1551-rtx-pro-6000",
        arch="BLACKWELL",
        report=_hex("trustee_pr1551_blackwell_report.txt"),
        chain=vector("nvidia/trustee_pr1551_blackwell_certs.txt"),
        nonce="4cff7f5380ead8fad8ec2c531c110aca4302a88f603792801a8ca29ee151af2e",
        driver="595.58.03",
        vbios="98.02.81.00.01",
        project="G153",
        chip_sku="895",
        trailing=0,
        feature_flag="SPT",
        leaf="GB20X A01 GSP FMC LF",
    ),
    Vector(
        name="nvat-hopper-ppcie-590",
        arch="HOPPER",
        report=base64.b64decode(_nvat_json()["evidence"]),
        chain=base64.b64decode(_nvat_json()["certificate"]),
        nonce="e97b23a1718095a0e9e35edca810768c70a6a5a389b705e753b197912bc11576",
        driver="590.12",
        vbios="96.00.a5.00.01",
        project="G520",
        chip_sku="885",
        trailing=0,
        feature_flag="PPCIE",
        leaf="GH100 A01 GSP FMC LF",
    ),
]
IDS = [v.name for v in VECTORS]


def _evidence(v: Vector, *, report: bytes | None = None, chain: bytes | None = None) -> NvidiaEvidence:
    device = NvidiaDeviceEvidence(
        arch=v.arch,
        uuid="unknown",
        evidence=v.report if report is None else report,
        certificate=v.chain if chain is None else chain,
    )
    return NvidiaEvidence(devices=(device,))


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_vector_fields(v: Vector) -> None:
    report = parse_nvidia_report(v.report)
    assert report.nonce.hex() == v.nonce
    assert report.driver_version == v.driver
    assert report.vbios_version == v.vbios
    assert report.project == v.project
    assert report.chip_sku == v.chip_sku
    assert report.trailing_bytes == v.trailing
    assert report.feature_flag == v.feature_flag
    assert report.opaque_header is None  # all four use the legacy layout
    assert report.signature_offset + HOPPER_SIGNATURE_SIZE + v.trailing == len(v.report)


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_vector_verifies_with_its_nonce(v: Vector) -> None:
    result = verify_device_evidence(_evidence(v), expected_runtime_data=bytes.fromhex(v.nonce), now=NOW)
    names = [s.name for s in result.steps]
    for step in ("arch", "parse", "cert_chain", "distinct", "signature", "nonce", "fwid"):
        assert f"gpu0.{step}" in names
    assert all(s.ok for s in result.steps)
    claims = result.claims
    assert isinstance(claims, NvidiaClaims)
    assert claims.gpus[0].driver_version == v.driver
    assert claims.gpus[0].leaf_subject == v.leaf


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_vector_with_another_nonce_is_refused(v: Vector) -> None:
    with pytest.raises(VerificationError, match=r"gpu0\.nonce"):
        verify_device_evidence(_evidence(v), expected_runtime_data=bytes(32), now=NOW)


def test_reports_do_not_verify_with_another_gpus_chain() -> None:
    coco, gb100 = VECTORS[0], VECTORS[1]
    with pytest.raises(VerificationError, match=r"gpu0\.(signature|fwid)"):
        verify_device_evidence(
            _evidence(coco, chain=gb100.chain), expected_runtime_data=bytes.fromhex(coco.nonce), now=NOW
        )


def test_trailing_byte_is_unsigned_and_reported() -> None:
    coco = VECTORS[0]
    report = parse_nvidia_report(coco.report)
    assert report.to_json()["trailing_unsigned_bytes"] == 1
    # The signature covers everything up to the parsed signature, not "all but the last 96".
    assert report.signed_data == coco.report[: report.signature_offset]
    changed = coco.report[:-1] + b"\x7f"
    result = verify_device_evidence(
        _evidence(coco, report=changed), expected_runtime_data=bytes.fromhex(coco.nonce), now=NOW
    )
    parse_step = result.step("gpu0.parse")
    assert parse_step is not None
    assert "1 unsigned byte(s) after the signature" in parse_step.detail


def test_signature_byte_flip_is_refused_even_with_trailing_bytes() -> None:
    coco = VECTORS[0]
    at = parse_nvidia_report(coco.report).signature_offset + 10
    forged = coco.report[:at] + bytes([coco.report[at] ^ 1]) + coco.report[at + 1 :]
    with pytest.raises(VerificationError, match=r"gpu0\.signature"):
        verify_device_evidence(
            _evidence(coco, report=forged), expected_runtime_data=bytes.fromhex(coco.nonce), now=NOW
        )


def test_blackwell_nvdec0_status_is_a_byte_not_text() -> None:
    rtx = parse_nvidia_report(VECTORS[2].report)
    assert rtx.opaque(OpaqueType.NVDEC0_STATUS) == b"\xaa"
    assert rtx.nvdec0_status == "enabled"


def test_blackwell_fwid_comes_from_the_dice_tcb_info_extension() -> None:
    gb100 = VECTORS[1]
    result = verify_device_evidence(
        _evidence(gb100), expected_runtime_data=bytes.fromhex(gb100.nonce), now=NOW
    )
    fwid = result.step("gpu0.fwid")
    assert fwid is not None and fwid.ok


# -- the versioned (NVDAOD) layout ---------------------------------------------------------

NVDAOD_NONCE = "50e4490df1dadcc80d42038cfc91c023f55f1cd914e540641bf770d7bdfe6f4e"


@pytest.fixture(scope="module")
def nvdaod() -> bytes:
    return _hex("nvat_sample_nvdaod_transcript.txt")


def test_versioned_opaque_data_parses(nvdaod: bytes) -> None:
    report = parse_nvidia_report(nvdaod)
    assert report.nonce.hex() == NVDAOD_NONCE
    header = report.opaque_header
    assert header is not None
    assert (header.profile, header.major, header.minor, header.patch) == (0, 2, 0, 0)
    assert report.driver_version == "620.12"
    assert report.nvdec0_status == "enabled"
    assert report.trailing_bytes == 0
    types = [f.type for f in report.opaque_fields]
    assert OpaqueType.FSP_UCODE_MIN_SVN in types
    value_types = {f.type: f.value_type for f in report.opaque_fields}
    assert value_types[OpaqueType.FSP_UCODE_MIN_SVN] == 0x87
    assert value_types[OpaqueType.FWID] == 0x0001
    out = report.to_json()
    assert (out["opaque_layout"], out["opaque_header"]) == ("versioned", "2.0.0")


def test_versioned_layout_with_another_profile_is_refused(nvdaod: bytes) -> None:
    at = nvdaod.index(b"NVDAOD") + 6
    with pytest.raises(MalformedEvidence, match="profile"):
        parse_nvidia_report(nvdaod[:at] + b"\x01\x00" + nvdaod[at + 2 :])


def test_versioned_layout_verifies_end_to_end_under_a_private_pki(nvdaod: bytes) -> None:
    """No chain is published for the transcript: re-sign it under a test PKI (named as such)."""
    report = parse_nvidia_report(nvdaod)
    assert report.fwid is not None
    pki = NvidiaPki.create()
    key, leaf = pki.issue_leaf(report.fwid)
    signed = sign_nvidia_report(nvdaod[: report.signature_offset], key)
    pem = leaf.public_bytes(Encoding.PEM) + pki.root.public_bytes(Encoding.PEM)
    evidence = NvidiaEvidence(
        devices=(NvidiaDeviceEvidence(arch="BLACKWELL", uuid="unknown", evidence=signed, certificate=pem),)
    )
    log = StepLog(tee=TeeKind.NVIDIA)
    NvidiaVerifier(root=pki.root).verify(
        evidence, expected=bytes.fromhex(NVDAOD_NONCE), now=NOW, collateral=None, log=log
    )
    result = log.result()
    assert result.ok
    parse_step = result.step("gpu0.parse")
    assert parse_step is not None and "opaque data v2" in parse_step.detail


# -- Trustee's device_evidence_list ---------------------------------------------------------


def test_trustee_list_with_several_gpus_verifies_each_and_names_them() -> None:
    devices = tuple(
        NvidiaDeviceEvidence(arch=v.arch.lower(), uuid=f"GPU-{i}", evidence=v.report, certificate=v.chain)
        for i, v in enumerate(VECTORS)
    )
    obj = NvidiaEvidence(devices=devices).to_json()
    parsed = NvidiaEvidence.from_json(obj)
    assert len(parsed.devices) == 4
    # Each GPU answered its own nonce, so one expected nonce refuses the second one by name.
    with pytest.raises(VerificationError, match=r"gpu1\.nonce"):
        verify_device_evidence(parsed, expected_runtime_data=bytes.fromhex(VECTORS[0].nonce), now=NOW)
    result = verify_device_evidence(parsed, expected_runtime_data=None, now=NOW)
    claims = result.claims
    assert isinstance(claims, NvidiaClaims)
    assert [g.uuid for g in claims.gpus] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]


def test_the_same_gpu_under_another_uuid_is_refused() -> None:
    coco = VECTORS[0]
    devices = tuple(
        NvidiaDeviceEvidence(arch="HOPPER", uuid=uuid, evidence=coco.report, certificate=coco.chain)
        for uuid in ("GPU-a", "GPU-b")
    )
    with pytest.raises(VerificationError, match=r"gpu1\.distinct.*same device as gpu0"):
        verify_device_evidence(NvidiaEvidence(devices=devices), expected_runtime_data=None, now=NOW)


def test_nvswitch_entries_parse_but_are_refused_locally() -> None:
    coco = VECTORS[0]
    obj = {
        "device_evidence_list": [
            {
                "arch": "HOPPER",
                "uuid": "unknown",
                "evidence": base64.b64encode(coco.report).decode(),
                "certificate": base64.b64encode(coco.chain).decode(),
            },
            {
                "arch": "LS10",
                "uuid": "unknown",
                "evidence": base64.b64encode(b"switch").decode(),
                "certificate": base64.b64encode(b"chain").decode(),
            },
        ]
    }
    evidence = NvidiaEvidence.from_json(obj)
    assert [d.arch for d in evidence.devices] == ["HOPPER", "LS10"]
    with pytest.raises(VerificationError, match=r"gpu1\.arch.*NVSwitch"):
        verify_device_evidence(evidence, expected_runtime_data=bytes.fromhex(coco.nonce), now=NOW)
