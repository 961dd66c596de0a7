"""Collateral carried in an attestation document: typed per TEE, checked by its own signatures."""

from __future__ import annotations

import base64
import json

import pytest

from attest.evidence import TeeKind
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import SnpCollateral, TdxCollateral, collateral_from_json, verify_evidence
from foundation.errors import MalformedEvidence, VerificationError
from tests.attest.support import NOW
from tests.vector_files import vector


def _verify(collateral: object) -> None:
    tcb = next(
        step
        for step in verify_evidence(
            TdxEvidence(quote=vector("tdx/tdx_quote")),
            expected_report_data=None,
            now=NOW,
            collateral=collateral,
        ).steps
        if step.name == "tcb"
    )
    assert tcb.outcome.value == "passed" and "UpToDate" in tcb.detail


def test_the_documents_tdx_collateral_verifies_the_quote_offline() -> None:
    typed = collateral_from_json({"tdx": json.loads(vector("tdx/tdx_quote_collateral.json"))})
    assert isinstance(typed[TeeKind.TDX], TdxCollateral)
    _verify(typed[TeeKind.TDX])


def test_collateral_the_host_altered_fails_by_its_own_signature() -> None:
    raw = json.loads(vector("tdx/tdx_quote_collateral.json"))
    raw["tcb_info"] = raw["tcb_info"].replace('"version":3', '"version":4', 1)
    with pytest.raises(VerificationError):
        _verify(collateral_from_json({"tdx": raw})[TeeKind.TDX])


def test_snp_vcek_and_malformed_items() -> None:
    typed = collateral_from_json({"snp": {"vcek": base64.b64encode(b"DER").decode()}})
    assert typed[TeeKind.SNP] == SnpCollateral(vek=b"DER")
    for bad in ({"snp": "not an object"}, {"snp": {"vcek": "not base64!"}}, {"tpm": {}}, {"tdx": {"x": 1}}):
        with pytest.raises(MalformedEvidence):
            collateral_from_json(bad)
