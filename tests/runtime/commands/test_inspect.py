"""``enclave-serve inspect`` through the real CLI entry point."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from attest.tee.tdx.quote import TdxEvidence
from runtime.cli import main
from tests.attest.support import HOPPER_NONCE, WINDOW_END, WINDOW_MID
from tests.runtime.commands.support import main_json
from tests.vector_files import vector, vector_path


def test_inspect_tdx_with_collateral(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "inspect",
        str(vector_path("tdx/tdx_quote")),
        "--collateral",
        str(vector_path("tdx/tdx_quote_collateral.json")),
        "--at",
        str(WINDOW_MID),
        "--json",
    ]
    out = main_json(capsys, argv)
    assert out["type"] == "tdx_quote" and out["encoding"] == "raw"
    assert out["mrtd"].startswith("91eb2b44d141d4ec")
    assert out["rtmr2"].startswith("d833feef")
    assert out["signature_valid"] is True
    assert out["tcb_status"] == "UpToDate"


def test_inspect_tdx_expired_collateral(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "inspect",
        str(vector_path("tdx/tdx_quote")),
        "--collateral",
        str(vector_path("tdx/tdx_quote_collateral.json")),
    ]
    out = main_json(capsys, [*argv, "--at", str(WINDOW_END + 1), "--json"], code=1)
    assert "CrlExpired" in out["error"]
    assert out["signature_valid"] is True  # the signatures were fine; the collateral was not


def test_inspect_tdx_offline_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(vector_path("tdx/tdx_quote_4.dat")), "--at", "2025-07-04T00:00:00Z"]) == 0
    text = capsys.readouterr().out
    assert "705ee9381b8633a9" in text
    assert "[passed ] qe_report_signature" in text
    assert "TCB status unknown" in text


@pytest.mark.parametrize("encoding", ["hex", "base64", "trustee-json"])
def test_inspect_recognises_encodings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, encoding: str
) -> None:
    raw = vector("tdx/tdx_quote_4.dat")
    path = tmp_path / "quote"
    if encoding == "hex":
        path.write_text(raw.hex())
    elif encoding == "base64":
        path.write_text(base64.b64encode(raw).decode())
    else:
        path.write_text(json.dumps(TdxEvidence(quote=raw).to_json()))
    out = main_json(capsys, ["inspect", str(path), "--json", "--at", str(WINDOW_MID)])
    assert out["encoding"] == encoding
    assert out["report_data"].startswith("7c71fe2c")


def test_inspect_snp_needs_a_chain_to_verify(capsys: pytest.CaptureFixture[str]) -> None:
    report = str(vector_path("snp/test-report.bin"))
    out = main_json(capsys, ["inspect", report, "--json"])
    assert out["type"] == "snp_report" and out["verification"] is None and out["signature_valid"] is None
    assert out["measurement"].startswith("a1f3930413247bb3")
    out = main_json(
        capsys,
        [
            "inspect",
            report,
            "--chain",
            str(vector_path("snp/test-vcek.der")),
            "--json",
            "--at",
            str(WINDOW_MID),
        ],
    )
    assert out["signature_valid"] is True
    assert out["chip_id"].startswith("c38427a30d4c7af9")


def test_inspect_trustee_snp_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = main_json(
        capsys, ["inspect", str(vector_path("kbs/evidence.json")), "--json", "--at", str(WINDOW_MID)]
    )
    assert out["encoding"] == "trustee-json" and out["product"] == "Genoa"
    assert out["signature_valid"] is True and out["verification"]["ok"] is True


def test_inspect_nvidia_hex_with_chain(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "inspect",
        str(vector_path("nvidia/hopperAttestationReport.txt")),
        "--chain",
        str(vector_path("nvidia/hopperCertChain.txt")),
        "--json",
    ]
    out = main_json(capsys, argv)
    assert out["type"] == "nvidia_report" and out["encoding"] == "hex"
    assert out["nonce"] == HOPPER_NONCE.hex()
    assert out["driver_version"] == "550.90.07" and out["vbios_version"] == "96.00.9f.00.01"
    assert out["signature_valid"] is True


def test_inspect_accepts_the_trailing_byte_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """The CoCo Hopper report (driver 580) has one unsigned byte after the signature."""
    argv = [
        "inspect",
        str(vector_path("nvidia/trustee_hopper_coco_report1.txt")),
        "--chain",
        str(vector_path("nvidia/trustee_hopper_coco_certs1.txt")),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trailing_unsigned_bytes" in out and "1 unsigned byte(s) after the signature (ignored)" in out
    assert "[passed ] gpu0.signature" in out


def test_inspect_blackwell_names_the_architecture_from_the_chain(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "inspect",
        str(vector_path("nvidia/trustee_pr1551_blackwell_report.txt")),
        "--chain",
        str(vector_path("nvidia/trustee_pr1551_blackwell_certs.txt")),
        "--json",
    ]
    out = main_json(capsys, argv)
    assert out["arch"] == "BLACKWELL" and out["driver_version"] == "595.58.03"
    assert out["signature_valid"] is True and out["verification"]["ok"] is True


def test_inspect_nvat_json_and_versioned_opaque_data(capsys: pytest.CaptureFixture[str]) -> None:
    out = main_json(
        capsys, ["inspect", str(vector_path("nvidia/nvat_evidence_hopper_590_12.json")), "--json"]
    )
    assert out["encoding"] == "nvat-json" and out["feature_flag"] == "PPCIE"
    assert out["verification"]["ok"] is True
    out = main_json(
        capsys, ["inspect", str(vector_path("nvidia/nvat_sample_nvdaod_transcript.txt")), "--json"]
    )
    assert out["opaque_layout"] == "versioned" and out["opaque_header"] == "2.0.0"
    assert out["driver_version"] == "620.12" and out["verification"] is None  # no chain published


def test_inspect_rejects_unknown_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x00\x01\x02 not evidence")
    assert main(["inspect", str(path)]) == 1
    assert "MalformedEvidence" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent")]) == 1
    assert main(["inspect", str(vector_path("tdx/tdx_quote")), "--at", "yesterday"]) == 1
