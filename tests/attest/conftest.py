"""Fixtures for the attestation tests: the real vectors in tests/vectors/ (see support.py)."""

from __future__ import annotations

import binascii
import json
from typing import Any

import pytest

from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence
from attest.tee.snp.report import SnpEvidence
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import SnpCollateral, TdxCollateral
from tests.vector_files import vector


@pytest.fixture
def tdx_quote4() -> bytes:
    return vector("tdx/tdx_quote_4.dat")


@pytest.fixture
def tdx_quote_dcap() -> bytes:
    return vector("tdx/tdx_quote")


@pytest.fixture
def tdx_collateral() -> TdxCollateral:
    return TdxCollateral.from_json(vector("tdx/tdx_quote_collateral.json"))


@pytest.fixture
def snp_report() -> bytes:
    return vector("snp/test-report.bin")


@pytest.fixture
def snp_vcek() -> bytes:
    return vector("snp/test-vcek.der")


@pytest.fixture
def snp_collateral(snp_vcek: bytes) -> SnpCollateral:
    return SnpCollateral(vek=snp_vcek)


@pytest.fixture
def snp_trustee_json() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(vector("kbs/evidence.json"))
    return obj


@pytest.fixture
def snp_trustee_evidence(snp_trustee_json: dict[str, Any]) -> SnpEvidence:
    return SnpEvidence.from_json(snp_trustee_json)


@pytest.fixture
def nvidia_report() -> bytes:
    return binascii.unhexlify(vector("nvidia/hopperAttestationReport.txt").strip())


@pytest.fixture
def nvidia_chain() -> bytes:
    return vector("nvidia/hopperCertChain.txt")


@pytest.fixture
def nvidia_evidence(nvidia_report: bytes, nvidia_chain: bytes) -> NvidiaEvidence:
    device = NvidiaDeviceEvidence(
        arch="HOPPER", uuid="GPU-sample", evidence=nvidia_report, certificate=nvidia_chain
    )
    return NvidiaEvidence(devices=(device,))


@pytest.fixture
def tdx_evidence(tdx_quote_dcap: bytes) -> TdxEvidence:
    return TdxEvidence(quote=tdx_quote_dcap)
