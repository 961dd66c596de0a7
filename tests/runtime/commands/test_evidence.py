"""``enclave-serve evidence`` through the real CLI entry point."""

from __future__ import annotations

import base64

import pytest

from runtime.cli import main
from tests.runtime.commands.support import main_json


def test_evidence_status(capsys: pytest.CaptureFixture[str]) -> None:
    out = main_json(capsys, ["evidence", "--json", "--gpus", "none"])
    assert set(out["tees"]) == {"tdx", "snp", "sample"}
    assert out["devices"] == []


def test_evidence_sample_nonce(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "evidence",
        "--tee",
        "sample",
        "--allow-insecure-sample-tee",
        "--gpus",
        "sample",
        "--nonce",
        "0011",
        "--json",
    ]
    out = main_json(capsys, argv)
    assert out["tee"] == "sample" and out["insecure"] is True
    assert base64.b64decode(out["evidence"]["report_data"]) == b"\x00\x11"
    assert out["additional_evidence"]["sampledevice"]["svn"] == "2"


def test_evidence_sample_needs_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "--tee", "sample", "--nonce", "00"]) == 1
    assert "--allow-insecure-sample-tee" in capsys.readouterr().err


def test_evidence_bad_nonce(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "--tee", "sample", "--allow-insecure-sample-tee", "--nonce", "zz"]) == 1
    assert main(["evidence", "--tee", "sample", "--allow-insecure-sample-tee", "--nonce", "00" * 65]) == 1
