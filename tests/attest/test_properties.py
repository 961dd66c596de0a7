"""Property tests: parsers give a clean MalformedEvidence on any input (never another exception,
never a bogus pass), and a flipped bit in a signed region never verifies."""

from __future__ import annotations

import binascii
import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence, parse_nvidia_report
from attest.tee.snp.report import SnpEvidence, SnpReport, parse_snp_cert_table, parse_snp_report
from attest.tee.tdx.quote import TdxEvidence, parse_tdx_quote
from attest.tee.tdx.report import parse_tdreport
from attest.verify import SnpCollateral, verify_device_evidence, verify_evidence
from foundation.errors import MalformedEvidence, VerificationError
from tests.attest.support import HOPPER_NONCE, NOW
from tests.vector_files import vector

TDX_QUOTE = vector("tdx/tdx_quote_4.dat")
SNP_REPORT = vector("snp/test-report.bin")
SNP_VCEK = SnpCollateral(vek=vector("snp/test-vcek.der"))
SNP_JSON = json.loads(vector("kbs/evidence.json"))
NV_REPORT = binascii.unhexlify(vector("nvidia/hopperAttestationReport.txt").strip())
NV_CHAIN = vector("nvidia/hopperCertChain.txt")

PARSERS = [parse_tdx_quote, parse_tdreport, parse_snp_report, parse_nvidia_report, parse_snp_cert_table]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parses_or_malformed(parser: Any, data: bytes) -> None:
    with contextlib.suppress(MalformedEvidence):
        parser(data)


@FAST
@given(st.binary(max_size=6000))
def test_arbitrary_bytes_never_crash_a_parser(data: bytes) -> None:
    for parser in PARSERS:
        _parses_or_malformed(parser, data)


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    flip = st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)).map(
        lambda t: base[: t[0]] + bytes([base[t[0]] ^ t[1]]) + base[t[0] + 1 :]
    )
    cut = st.integers(0, len(base)).map(lambda n: base[:n])
    splice = st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=64)).map(
        lambda t: base[: t[0]] + t[1] + base[t[0] :]
    )
    length_field = st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFFFFFF)).map(
        lambda t: _set_u32_somewhere(base, t[0], t[1])
    )
    return st.one_of(flip, cut, splice, length_field)


def _set_u32_somewhere(base: bytes, which: int, value: int) -> bytes:
    # Overwrite one of a few interesting length/size positions.
    positions = [632, 636 + 128 + 2, 5, len(base) // 2]
    pos = min(positions[which], len(base) - 4)
    return base[:pos] + value.to_bytes(4, "little") + base[pos + 4 :]


@FAST
@given(_mutations(TDX_QUOTE))
def test_mutated_tdx_quotes_parse_or_are_malformed(data: bytes) -> None:
    _parses_or_malformed(parse_tdx_quote, data)


@FAST
@given(_mutations(SNP_REPORT))
def test_mutated_snp_reports_parse_or_are_malformed(data: bytes) -> None:
    _parses_or_malformed(parse_snp_report, data)


@FAST
@given(_mutations(NV_REPORT))
def test_mutated_nvidia_reports_parse_or_are_malformed(data: bytes) -> None:
    _parses_or_malformed(parse_nvidia_report, data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)


@FAST
@given(JSON)
def test_arbitrary_json_never_crashes_evidence_parsers(obj: Any) -> None:
    for parse in (
        TdxEvidence.from_json,
        SnpEvidence.from_json,
        NvidiaEvidence.from_json,
        SnpReport.from_sev_json,
    ):
        with contextlib.suppress(MalformedEvidence):
            parse(obj)


@FAST
@given(st.sampled_from(sorted(SNP_JSON["attestation_report"])), JSON)
def test_one_bad_sev_json_field_is_malformed_or_consistent(key: str, value: Any) -> None:
    report = dict(SNP_JSON["attestation_report"], **{key: value})
    try:
        rebuilt = SnpReport.from_sev_json(report)
    except MalformedEvidence:
        return
    assert len(rebuilt.raw) == 0x4A0


# --- a flipped bit in a signed region never verifies -------------------------------------------


@SLOW
@given(st.integers(48, 631), st.integers(0, 7))
def test_flipped_bit_in_tdx_body_fails_verification(offset: int, bit: int) -> None:
    tampered = bytearray(TDX_QUOTE)
    tampered[offset] ^= 1 << bit
    try:
        verify_evidence(TdxEvidence(quote=bytes(tampered)), expected_report_data=None, now=NOW)
    except VerificationError as exc:
        assert "quote_signature" in str(exc)
    else:
        raise AssertionError("a tampered quote verified")


@SLOW
@given(st.integers(0, 47), st.integers(0, 7))
def test_flipped_bit_in_tdx_header_never_verifies(offset: int, bit: int) -> None:
    tampered = bytearray(TDX_QUOTE)
    tampered[offset] ^= 1 << bit
    try:
        verify_evidence(TdxEvidence(quote=bytes(tampered)), expected_report_data=None, now=NOW)
    except (VerificationError, MalformedEvidence):
        return
    raise AssertionError("a tampered quote verified")


@SLOW
@given(st.integers(4, 0x29F), st.integers(0, 7))
def test_flipped_bit_in_snp_signed_region_fails_verification(offset: int, bit: int) -> None:
    tampered = bytearray(SNP_REPORT)
    tampered[offset] ^= 1 << bit
    try:
        verify_evidence(
            SnpEvidence(report=bytes(tampered)), expected_report_data=None, now=NOW, collateral=SNP_VCEK
        )
    except VerificationError:
        return
    raise AssertionError("a tampered SNP report verified")


@SLOW
@given(st.integers(0x2A0, 0x2A0 + 143), st.integers(0, 7))
def test_flipped_bit_in_snp_signature_fails_verification(offset: int, bit: int) -> None:
    tampered = bytearray(SNP_REPORT)
    tampered[offset] ^= 1 << bit
    try:
        verify_evidence(
            SnpEvidence(report=bytes(tampered)), expected_report_data=None, now=NOW, collateral=SNP_VCEK
        )
    except VerificationError as exc:
        assert "report_signature" in str(exc)
    else:
        raise AssertionError("a tampered SNP signature verified")


@SLOW
@given(st.integers(0, len(NV_REPORT) - 1), st.integers(0, 7))
def test_flipped_bit_anywhere_in_nvidia_report_never_verifies(offset: int, bit: int) -> None:
    tampered = bytearray(NV_REPORT)
    tampered[offset] ^= 1 << bit
    device = NvidiaDeviceEvidence(arch="HOPPER", uuid="x", evidence=bytes(tampered), certificate=NV_CHAIN)
    try:
        verify_device_evidence(NvidiaEvidence(devices=(device,)), expected_runtime_data=HOPPER_NONCE, now=NOW)
    except (VerificationError, MalformedEvidence):
        return
    raise AssertionError("a tampered NVIDIA report verified")
