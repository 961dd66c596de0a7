"""TDX: the quote vectors parse and verify exactly as tests/vectors/tdx/PROVENANCE.md says."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from attest.tee import evidence_from_json
from attest.tee.tdx.claims import TdxClaims
from attest.tee.tdx.quote import TdxBodyType, TdxEvidence, parse_tdx_quote
from attest.verify import (
    Outcome,
    RefuseInsecure,
    TdxCollateral,
    result_of,
    verify_evidence,
)
from foundation.errors import MalformedEvidence, VerificationError
from tests.attest.support import DCAP_EXAMPLE_TIME, NOW, WINDOW_END, WINDOW_MID, WINDOW_START, at

QUOTE4_FACTS: dict[str, Any] = {
    "user_data": "d099bfec0a477aa85a605dceabf2b10800000000",
    "tee_tcb_svn": "03000500000000000000000000000000",
    "mr_seam": "2fd279c16164a93dd5bf373d834328d46008c2b693af9ebb"
    "865b08b2ced320c9a89b4869a9fab60fbe9d0c5a5363c656",
    "td_attributes": "0100001000000000",
    "xfam": "e742060000000000",
    "mrtd": "705ee9381b8633a9fbe532b52345e8433343d2868959f578"
    "89d84ca377c395b689cac1599ccea1b7d420483a9ce5f031",
    "mr_config_id": "00" * 48,
    "rtmr0": "e940da7c2712d2790e2961e00484f4fa8e6f9eed71361655"
    "ae22699476b14f9e63867eb41edd4b480fef0c59f496b288",
    "rtmr1": "559cfcf42716ed6c40a48a73d5acb7da255435012f0a9f00"
    "fbe8c1c57612ede486a5684c4c9ff3ddf52315fcdca3a596",
    "rtmr2": "00" * 48,
    "rtmr3": "00" * 48,
    "report_data": "7c71fe2c86eff65a7cf8dbc22b3275689fd0464a267baced1bf94fc1324656ae"
    "b755da3d44d098c0c87382f3a5f85b45c8a28fee1d3bdb38342bf96671501429",
    "trailing_bytes": 0,
    "fmspc": "50806F000000",
}

DCAP_QUOTE_FACTS: dict[str, Any] = {
    "user_data": "889b7d6ff9df2405b240a830e73faf3d00000000",
    "tee_tcb_svn": "06010300000000000000000000000000",
    "mr_seam": "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab5"
    "8c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1",
    "td_attributes": "0000001000000000",
    "xfam": "e702060000000000",
    "mrtd": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a"
    "3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
    "mr_config_id": "00" * 48,
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b"
    "8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973"
    "949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc55"
    "1dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "rtmr3": "00" * 48,
    "report_data": "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20",
    "trailing_bytes": 70,
    "fmspc": "B0C06F000000",
}


@pytest.mark.parametrize(
    ("name", "facts"), [("tdx_quote4", QUOTE4_FACTS), ("tdx_quote_dcap", DCAP_QUOTE_FACTS)]
)
def test_quote_fields_match_provenance(
    name: str, facts: dict[str, object], request: pytest.FixtureRequest
) -> None:
    raw: bytes = request.getfixturevalue(name)
    quote = parse_tdx_quote(raw)
    fields = quote.to_json()
    assert quote.version == 4
    assert quote.header.tee_type == 0x81
    assert quote.header.attestation_key_type == 2
    assert quote.body.body_type is TdxBodyType.TDX10
    for key, value in facts.items():
        if key != "fmspc":
            assert fields[key] == value, key
    assert quote.size == 4936
    assert quote.body.rtmr1.hex() == facts["rtmr1"]
    assert quote.signature.pck_chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize(
    ("name", "facts", "not_after"),
    [
        ("tdx_quote4", QUOTE4_FACTS, "2030-02-07T08:02:55+00:00"),
        ("tdx_quote_dcap", DCAP_QUOTE_FACTS, "2032-02-06T23:25:51+00:00"),
    ],
)
def test_quote_verifies_offline(
    name: str, facts: dict[str, object], not_after: str, request: pytest.FixtureRequest
) -> None:
    raw: bytes = request.getfixturevalue(name)
    expected = bytes.fromhex(str(facts["report_data"]))
    result = verify_evidence(TdxEvidence(quote=raw), expected_report_data=expected, now=NOW)
    outcomes = {s.name: s.outcome for s in result.steps}
    for step in ("quote_signature", "qe_report_binding", "pck_chain", "qe_report_signature", "report_data"):
        assert outcomes[step] is Outcome.PASSED, step
    assert outcomes["tcb"] is Outcome.SKIPPED
    assert outcomes["policy"] is Outcome.SKIPPED
    claims = result.claims
    assert isinstance(claims, TdxClaims)
    assert claims.tcb_status == "unknown"
    assert claims.fmspc == facts["fmspc"]
    assert claims.pck_ca == "platform"
    assert claims.mrtd.hex() == facts["mrtd"]
    assert claims.to_json()["rtmr0"] == facts["rtmr0"]
    assert not result.insecure
    # The PCK leaf expires at the documented time: one second later the chain fails.
    leaf_expiry = int(datetime.fromisoformat(not_after).timestamp())
    with pytest.raises(VerificationError, match=r"pck_chain.*expired"):
        verify_evidence(TdxEvidence(quote=raw), expected_report_data=None, now=at(leaf_expiry + 1))


@pytest.mark.parametrize("when", [WINDOW_START, WINDOW_MID, WINDOW_END - 1])
def test_dcap_quote_is_up_to_date_inside_the_collateral_window(
    tdx_evidence: TdxEvidence, tdx_collateral: TdxCollateral, when: int
) -> None:
    result = verify_evidence(tdx_evidence, expected_report_data=None, now=at(when), collateral=tdx_collateral)
    assert isinstance(result.claims, TdxClaims)
    assert result.claims.tcb_status == "UpToDate"
    assert result.claims.advisory_ids == ()
    assert result.step("tcb") is not None and result.step("tcb").outcome is Outcome.PASSED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("scenario", "when", "message"),
    [
        ("expired_collateral_crl", WINDOW_END + 1, "CrlExpired"),
        # PROVENANCE.md's prose says the window is closed at the end; dcap-qvl 0.7.0 already
        # refuses at the CRL's nextUpdate itself (its table only claims end-1 and end+1).
        ("at_crl_next_update", WINDOW_END, "CrlExpired"),
        ("collateral_not_yet_valid", WINDOW_START - 1, "QE Identity issue date is in the future"),
        ("dcap_example_time_pitfall", DCAP_EXAMPLE_TIME, "TCBInfo issue date is in the future"),
    ],
)
def test_dcap_quote_fails_outside_the_collateral_window(
    tdx_evidence: TdxEvidence, tdx_collateral: TdxCollateral, scenario: str, when: int, message: str
) -> None:
    with pytest.raises(VerificationError, match=message) as info:
        verify_evidence(tdx_evidence, expected_report_data=None, now=at(when), collateral=tdx_collateral)
    partial = result_of(info.value)
    assert partial is not None and partial.steps[-1].name == "tcb"
    assert "step 'tcb'" in str(info.value)


def test_collateral_for_another_platform_is_refused(tdx_quote4: bytes, tdx_collateral: TdxCollateral) -> None:
    with pytest.raises(VerificationError, match="Fmspc mismatch"):
        verify_evidence(
            TdxEvidence(quote=tdx_quote4), expected_report_data=None, now=NOW, collateral=tdx_collateral
        )


def test_wrong_report_data_is_refused(tdx_evidence: TdxEvidence) -> None:
    with pytest.raises(VerificationError, match="step 'report_data'") as info:
        verify_evidence(tdx_evidence, expected_report_data=b"\x01" * 48, now=NOW)
    partial = result_of(info.value)
    assert partial is not None
    assert partial.step("quote_signature").outcome is Outcome.PASSED  # type: ignore[union-attr]
    assert partial.step("report_data").outcome is Outcome.FAILED  # type: ignore[union-attr]


def test_unpadded_report_data_prefix_binds(tdx_quote_dcap: bytes) -> None:
    # A 32-byte digest zero-padded to 64 does not match this quote (its REPORTDATA is 64 non-zero bytes).
    full = parse_tdx_quote(tdx_quote_dcap).body.report_data
    with pytest.raises(VerificationError, match="report_data"):
        verify_evidence(TdxEvidence(quote=tdx_quote_dcap), expected_report_data=full[:32], now=NOW)
    verify_evidence(TdxEvidence(quote=tdx_quote_dcap), expected_report_data=full, now=NOW)


def test_report_data_longer_than_64_bytes_is_refused(tdx_evidence: TdxEvidence) -> None:
    with pytest.raises(VerificationError, match="longer than the 64-byte field"):
        verify_evidence(tdx_evidence, expected_report_data=b"x" * 65, now=NOW)


def test_tampered_body_breaks_the_quote_signature(tdx_quote4: bytes) -> None:
    tampered = bytearray(tdx_quote4)
    tampered[184] ^= 0x01  # first MRTD byte
    with pytest.raises(VerificationError, match="quote_signature"):
        verify_evidence(TdxEvidence(quote=bytes(tampered)), expected_report_data=None, now=NOW)


def test_tampered_qe_report_breaks_the_binding(tdx_quote4: bytes) -> None:
    quote = parse_tdx_quote(tdx_quote4)
    offset = tdx_quote4.index(quote.signature.qe_report.raw) + 320  # QE REPORTDATA
    tampered = bytearray(tdx_quote4)
    tampered[offset] ^= 0x80
    with pytest.raises(VerificationError, match="qe_report_binding"):
        verify_evidence(TdxEvidence(quote=bytes(tampered)), expected_report_data=None, now=NOW)


def test_tampered_pck_certificate_is_refused(tdx_quote4: bytes) -> None:
    # Flip a byte inside the base64 body of the PCK leaf certificate's signature.
    pem_start = tdx_quote4.index(b"-----BEGIN CERTIFICATE-----")
    pem_end = tdx_quote4.index(b"-----END CERTIFICATE-----")
    pos = pem_end - 20
    tampered = bytearray(tdx_quote4)
    tampered[pos] = ord("A") if tampered[pos] != ord("A") else ord("B")
    assert pem_start < pos
    with pytest.raises(VerificationError, match="pck_chain"):
        verify_evidence(TdxEvidence(quote=bytes(tampered)), expected_report_data=None, now=NOW)


def test_refuse_insecure_passes_a_production_td(
    tdx_evidence: TdxEvidence, tdx_collateral: TdxCollateral
) -> None:
    # Measurements and TCB are the workload policy's rules, on this vector: test_workload_policy.py.
    result = verify_evidence(
        tdx_evidence, expected_report_data=None, now=NOW, collateral=tdx_collateral, policy=RefuseInsecure()
    )
    assert result.step("policy").outcome is Outcome.PASSED  # type: ignore[union-attr]
    assert isinstance(result.claims, TdxClaims) and result.claims.mrtd.hex() == DCAP_QUOTE_FACTS["mrtd"]


def test_trustee_json_round_trip(tdx_quote_dcap: bytes) -> None:
    evidence = TdxEvidence(quote=tdx_quote_dcap, cc_eventlog=b"\x01\x02")
    obj = evidence.to_json()
    assert set(obj) == {"cc_eventlog", "quote"}
    assert evidence_from_json(evidence.tee, obj) == evidence
    assert TdxEvidence.from_json({"cc_eventlog": None, "quote": obj["quote"]}).cc_eventlog is None
    result = verify_evidence(evidence, expected_report_data=None, now=NOW)
    assert "not replayed" in result.step("eventlog").detail  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("scenario", "obj"),
    [
        ("quote_missing", {"cc_eventlog": None}),
        ("quote_not_base64", {"quote": "***"}),
        ("eventlog_not_string", {"quote": "AAAA", "cc_eventlog": 5}),
    ],
)
def test_malformed_trustee_json(scenario: str, obj: dict[str, object]) -> None:
    with pytest.raises(MalformedEvidence):
        TdxEvidence.from_json(obj)


def test_collateral_json_must_be_dcap_qvl_shaped() -> None:
    with pytest.raises(MalformedEvidence, match="lacks"):
        TdxCollateral.from_json('{"tcb_info": "{}"}')
    with pytest.raises(MalformedEvidence, match="not JSON"):
        TdxCollateral.from_json(b"\xff")


def test_v5_quote_with_tdx15_body_parses(tdx_quote4: bytes) -> None:
    # Build a v5 quote from the v4 one: header (version 5) | type 3 | size 648 | TDX 1.5 body.
    header = (5).to_bytes(2, "little") + tdx_quote4[2:48]
    body15 = tdx_quote4[48:632] + b"\x11" * 16 + b"\x22" * 48
    rest = tdx_quote4[632:]
    v5 = header + (3).to_bytes(2, "little") + (648).to_bytes(4, "little") + body15 + rest
    quote = parse_tdx_quote(v5)
    assert quote.version == 5
    assert quote.body.body_type is TdxBodyType.TDX15
    assert quote.body.mrtd.hex() == QUOTE4_FACTS["mrtd"]
    assert quote.body.mr_servicetd == b"\x22" * 48
    assert quote.signed_data == v5[: 48 + 6 + 648]
    # The signature no longer covers these bytes.
    with pytest.raises(VerificationError, match="quote_signature"):
        verify_evidence(TdxEvidence(quote=v5), expected_report_data=None, now=NOW)


@pytest.mark.parametrize(
    ("scenario", "mutate", "message"),
    [
        ("sgx_v3_quote", lambda q: (3).to_bytes(2, "little") + q[2:], "version 3"),
        ("not_tdx_tee_type", lambda q: q[:4] + b"\0\0\0\0" + q[8:], "tee_type"),
        ("truncated", lambda q: q[:1000], "truncated"),
        ("nonzero_trailing_bytes", lambda q: q + b"\x01", "trailing"),
        (
            "v5_unknown_body_type",
            lambda q: (5).to_bytes(2, "little") + q[2:48] + b"\x09\x00" + q[48:],
            "body type",
        ),
    ],
)
def test_malformed_quotes(tdx_quote4: bytes, scenario: str, mutate: object, message: str) -> None:
    assert callable(mutate)
    with pytest.raises(MalformedEvidence, match=message):
        parse_tdx_quote(mutate(tdx_quote4))


def _verify_forged(quote: bytes, root: Any) -> Any:
    from attest.tee.result import StepLog
    from attest.tee.tdx.verifier import TdxVerifier

    log = StepLog(tee=TdxEvidence.tee)
    TdxVerifier(root=root).verify(TdxEvidence(quote=quote), expected=None, now=NOW, collateral=None, log=log)
    return log.result()


def test_a_quote_re_signed_by_the_td_quoting_enclave_identity_passes_the_qe_check(tdx_quote4: bytes) -> None:
    from tests.attest.pki import forge_tdx_quote

    quote, root = forge_tdx_quote(tdx_quote4)
    result = _verify_forged(quote, root)
    assert result.step("qe_identity").outcome is Outcome.PASSED


@pytest.mark.parametrize(
    "change",
    [{"qe_mr_signer": bytes(range(32))}, {"qe_isv_prod_id": 1}],
    ids=["other-mrsigner", "sgx-qe-prodid"],
)
def test_quote_from_another_enclave_certified_by_the_pck_key_is_refused(
    tdx_quote4: bytes, change: dict[str, Any]
) -> None:
    """A host can get any enclave with the provisioning key certified by its PCK key: the pinned
    TD_QE identity is what stops it, even offline (no collateral)."""
    from tests.attest.pki import forge_tdx_quote

    quote, root = forge_tdx_quote(tdx_quote4, **change)
    with pytest.raises(VerificationError, match="qe_identity") as info:
        _verify_forged(quote, root)
    partial = result_of(info.value)
    assert partial is not None and partial.step("qe_report_signature").outcome is Outcome.PASSED
