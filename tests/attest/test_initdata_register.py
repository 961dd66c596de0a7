"""The init-data register the boot compares with the init-data file: read only from what the host
cannot forge (TDX: the TDREPORT, else a quote that verifies offline; SNP: the PSP's report).

The TDREPORTs are synthetic (any field at its ABI offset) and one real one, guest-components'
fixture (tests/vectors/tdx/PROVENANCE.md); the TDX quotes are the real vectors of tests/vectors/tdx/PROVENANCE.md, and the SNP report
the one of tests/vectors/snp/PROVENANCE.md. The real ioctl runs only in the ``tdx``-marked test.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.evidence import Evidence, TeeKind
from attest.tee.sample.attester import UnsafeSampleAttester
from attest.tee.sample.evidence import SampleEvidence
from attest.tee.select import Attester, init_data_register
from attest.tee.snp.attester import SnpAttester
from attest.tee.snp.report import SnpEvidence, parse_snp_report
from attest.tee.tdx.attester import TDX_CMD_GET_REPORT0, TDX_GUEST_DEVICE, TdxAttester, read_tdreport
from attest.tee.tdx.quote import TdxEvidence, parse_tdx_quote
from attest.tee.tdx.report import TDREPORT_SIZE, parse_tdreport
from attest.tee.tsm import ConfigfsTsm
from foundation.errors import AttestationError, BackendUnavailable, EvidenceCollectionError, MalformedEvidence
from tests.attest.support import NOW, at
from tests.attest.tsm_kernel import KernelLikeTsm
from tests.vector_files import vector

TDX_QUOTES = ["tdx/tdx_quote_4.dat", "tdx/tdx_quote"]
SNP_REPORT = vector("snp/test-report.bin")
#: MRCONFIGID in a v4 quote: header (48) + body offset 184 (PROVENANCE.md).
QUOTE_MRCONFIGID = slice(232, 280)
#: Offsets inside TDREPORT_STRUCT (Intel TDX Module ABI spec 4.7; attest/tee/tdx/report.py).
REPORTDATA_AT, MRTD_AT, MRCONFIGID_AT, RTMR0_AT, SERVTD_AT = 128, 528, 576, 720, 912
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MR_CONFIG_ID = hashlib.sha384(b"init-data").digest()


def synthetic_tdreport(
    *, report_data: bytes = bytes(64), mr_config_id: bytes = MR_CONFIG_ID, fix_digests: bool = True
) -> bytes:
    """A TDREPORT0 (TDX 1.5 shape) with distinct known values and, by default, correct digests."""
    raw = bytearray(TDREPORT_SIZE)
    raw[0:4] = bytes([0x81, 0, 1, 0])
    raw[REPORTDATA_AT : REPORTDATA_AT + 64] = report_data
    raw[256:264] = b"\xff\x01\x03" + bytes(5)
    raw[MRTD_AT : MRTD_AT + 48] = b"\x11" * 48
    raw[MRCONFIGID_AT : MRCONFIGID_AT + 48] = mr_config_id
    for i in range(4):
        raw[RTMR0_AT + 48 * i : RTMR0_AT + 48 * (i + 1)] = bytes([0x20 + i]) * 48
    raw[SERVTD_AT : SERVTD_AT + 48] = b"\x33" * 48
    if fix_digests:
        raw[32:80] = hashlib.sha384(raw[256:495]).digest()
        raw[80:128] = hashlib.sha384(raw[512:1024]).digest()
    return bytes(raw)


class IoctlDouble:
    """Test double of the kernel's TDX_CMD_GET_REPORT0: writes ``make(reportdata)`` after it."""

    def __init__(self, make: Callable[[bytes], bytes] | None = None, error: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self._make = make if make is not None else lambda rd: synthetic_tdreport(report_data=rd)
        self._error = error

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        self.calls.append((request, len(buf)))
        if self._error is not None:
            raise OSError(self._error, "injected")
        buf[64:] = self._make(bytes(buf[:64]))
        return 0


class AttesterDouble(Attester):
    """Test double: a TDX attester whose ``collect()`` returns the evidence it was given (and
    records calls)."""

    tee: ClassVar[TeeKind] = TeeKind.TDX

    def __init__(self, evidence: Evidence | Exception) -> None:
        self._evidence = evidence
        self.requests: list[bytes] = []

    @classmethod
    def detect(cls) -> bool:
        return False

    def collect(self, report_data: bytes) -> Evidence:
        self.requests.append(report_data)
        if isinstance(self._evidence, Exception):
            raise self._evidence
        return self._evidence


def attester_of(evidence: Evidence | Exception, tee: TeeKind) -> AttesterDouble:
    """An :class:`AttesterDouble` of another TEE kind."""
    kind: type[AttesterDouble] = type(f"{tee.name.title()}AttesterDouble", (AttesterDouble,), {"tee": tee})
    return kind(evidence)


@pytest.fixture
def no_device(tmp_path: Path) -> Path:
    return tmp_path / "tdx_guest"


@pytest.fixture
def device_file(tmp_path: Path) -> Path:
    path = tmp_path / "tdx_guest"
    path.write_bytes(b"")
    return path


# --- the TDREPORT parser ---------------------------------------------------------------------


def test_synthetic_tdreport_parses_at_the_abi_offsets() -> None:
    raw = synthetic_tdreport(report_data=b"\x5a" * 64)
    report = parse_tdreport(raw)
    assert report.mr_config_id == MR_CONFIG_ID == raw[576:624]
    assert report.mrtd == b"\x11" * 48
    assert report.rtmrs == tuple(bytes([0x20 + i]) * 48 for i in range(4))
    assert report.servtd_hash == b"\x33" * 48
    assert report.report_data == b"\x5a" * 64
    assert (report.report_type, report.report_subtype, report.report_version) == (0x81, 0, 1)
    assert report.digests_match()


@pytest.mark.parametrize("size", [0, 64, 1023, 1025, 1088])
def test_tdreport_of_the_wrong_length_is_refused(size: int) -> None:
    with pytest.raises(MalformedEvidence, match="expected exactly 1024"):
        parse_tdreport(synthetic_tdreport().ljust(size, b"\0")[:size])


def test_sgx_report_is_not_a_tdreport() -> None:
    with pytest.raises(MalformedEvidence, match="not TDX"):
        parse_tdreport(b"\x00" + synthetic_tdreport()[1:])


def test_tdreport_of_another_subtype_is_refused() -> None:
    raw = synthetic_tdreport()
    with pytest.raises(MalformedEvidence, match="SUBTYPE"):
        parse_tdreport(raw[:1] + b"\x01" + raw[2:])


def test_tdreport_with_an_altered_tdinfo_fails_the_digest_check() -> None:
    raw = bytearray(synthetic_tdreport())
    raw[MRCONFIGID_AT] ^= 0xFF
    assert not parse_tdreport(bytes(raw)).digests_match()


@FAST
@given(st.binary(max_size=2 * TDREPORT_SIZE))
def test_arbitrary_bytes_never_crash_the_tdreport_parser(data: bytes) -> None:
    with contextlib.suppress(MalformedEvidence):
        parse_tdreport(data)


@FAST
@given(st.binary(min_size=TDREPORT_SIZE - 2, max_size=TDREPORT_SIZE - 2))
def test_any_1024_byte_tdx_report_parses(tail: bytes) -> None:
    report = parse_tdreport(b"\x81\x00" + tail)
    assert report.mr_config_id == (b"\x81\x00" + tail)[576:624]
    assert isinstance(report.digests_match(), bool)


# --- the ioctl reader ------------------------------------------------------------------------


def test_get_report0_is_the_linux_ioctl_number() -> None:
    assert TDX_CMD_GET_REPORT0 == 0xC4405401
    assert Path("/dev/tdx_guest") == TDX_GUEST_DEVICE


def test_missing_device_is_backend_unavailable(no_device: Path) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        read_tdreport(bytes(64), device=no_device)
    assert not isinstance(caught.value, EvidenceCollectionError)
    assert str(no_device) not in str(caught.value)
    assert caught.value.log_detail is not None and str(no_device) in caught.value.log_detail


def test_device_that_is_not_a_tdx_device_is_a_collection_error(device_file: Path) -> None:
    with pytest.raises(EvidenceCollectionError, match="TDX_CMD_GET_REPORT0") as caught:
        read_tdreport(bytes(64), device=device_file)  # the real fcntl.ioctl: ENOTTY
    assert not isinstance(caught.value, BackendUnavailable)


def test_device_that_cannot_be_opened_is_a_collection_error(tmp_path: Path) -> None:
    with pytest.raises(EvidenceCollectionError, match="could not be opened"):
        read_tdreport(bytes(64), device=tmp_path)  # a directory: EISDIR


def test_reader_returns_the_tdreport_over_our_report_data(device_file: Path) -> None:
    ioctl = IoctlDouble()
    report = read_tdreport(b"\x42" * 32, device=device_file, ioctl=ioctl)
    assert ioctl.calls == [(0xC4405401, 64 + 1024)]
    assert report.report_data == b"\x42" * 32 + bytes(32)
    assert report.mr_config_id == MR_CONFIG_ID


def test_reader_refuses_a_report_over_other_report_data(device_file: Path) -> None:
    ioctl = IoctlDouble(lambda rd: synthetic_tdreport(report_data=b"\x01" * 64))
    with pytest.raises(EvidenceCollectionError, match="other report data"):
        read_tdreport(bytes(64), device=device_file, ioctl=ioctl)


def test_reader_refuses_an_inconsistent_report(device_file: Path) -> None:
    ioctl = IoctlDouble(lambda rd: synthetic_tdreport(report_data=rd, fix_digests=False))
    with pytest.raises(EvidenceCollectionError, match="digests"):
        read_tdreport(bytes(64), device=device_file, ioctl=ioctl)


def test_reader_refuses_what_is_not_a_tdreport(device_file: Path) -> None:
    ioctl = IoctlDouble(lambda rd: bytes(TDREPORT_SIZE))
    with pytest.raises(EvidenceCollectionError, match="unusable TDREPORT"):
        read_tdreport(bytes(64), device=device_file, ioctl=ioctl)


def test_reader_reports_a_failed_tdcall(device_file: Path) -> None:
    with pytest.raises(EvidenceCollectionError, match="failed"):
        read_tdreport(bytes(64), device=device_file, ioctl=IoctlDouble(error=errno.EIO))


@pytest.mark.tdx
def test_real_tdx_guest_device_gives_a_consistent_tdreport() -> None:
    report = read_tdreport(b"\x07" * 64)
    assert report.report_data == b"\x07" * 64 and report.digests_match()


# --- TDX: the TDREPORT first, else a quote verified offline ----------------------------------


def test_tdx_register_comes_from_the_tdreport_without_asking_the_host(
    device_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ioctl = IoctlDouble()
    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    attester = AttesterDouble(AssertionError("the quote path must not be used"))
    assert init_data_register(attester, tdx_guest_device=device_file) == MR_CONFIG_ID
    assert attester.requests == [] and len(ioctl.calls) == 1


def test_tdx_device_that_fails_is_refused_not_bypassed(device_file: Path) -> None:
    attester = AttesterDouble(TdxEvidence(quote=vector("tdx/tdx_quote_4.dat")))
    with pytest.raises(EvidenceCollectionError, match="TDX_CMD_GET_REPORT0"):
        init_data_register(attester, tdx_guest_device=device_file, now=NOW)
    assert attester.requests == []


@pytest.mark.parametrize("name", TDX_QUOTES)
def test_genuine_quote_that_verifies_offline_gives_its_mrconfigid(name: str, no_device: Path) -> None:
    quote = vector(name)
    body = parse_tdx_quote(quote).body
    attester = AttesterDouble(TdxEvidence(quote=quote))
    register = init_data_register(attester, tdx_guest_device=no_device, now=NOW, nonce=body.report_data)
    assert register == body.mr_config_id == quote[QUOTE_MRCONFIGID]
    assert attester.requests == [body.report_data]


@pytest.mark.parametrize("name", TDX_QUOTES)
def test_quote_whose_mrconfigid_the_host_altered_is_not_trusted(name: str, no_device: Path) -> None:
    quote = bytearray(vector(name))
    nonce = parse_tdx_quote(bytes(quote)).body.report_data
    quote[QUOTE_MRCONFIGID] = hashlib.sha384(b"the host's init-data").digest()
    attester = AttesterDouble(TdxEvidence(quote=bytes(quote)))
    with pytest.raises(AttestationError, match="cannot forge") as caught:
        init_data_register(attester, tdx_guest_device=no_device, now=NOW, nonce=nonce)
    assert "quote_signature" in str(caught.value)
    assert "no TDX guest device" in str(caught.value)


def test_genuine_quote_over_another_nonce_is_a_replay(no_device: Path) -> None:
    attester = AttesterDouble(TdxEvidence(quote=vector("tdx/tdx_quote_4.dat")))
    with pytest.raises(AttestationError, match=r"cannot forge.*report_data"):
        init_data_register(attester, tdx_guest_device=no_device, now=NOW)
    assert len(attester.requests[0]) == 64  # a fresh random nonce by default


def test_quote_verified_at_a_time_its_pck_chain_is_expired_is_refused(no_device: Path) -> None:
    quote = vector("tdx/tdx_quote_4.dat")  # PCK leaf valid until 2030-02-07
    nonce = parse_tdx_quote(quote).body.report_data
    with pytest.raises(AttestationError, match="pck_chain"):
        init_data_register(
            AttesterDouble(TdxEvidence(quote=quote)),
            tdx_guest_device=no_device,
            now=at(2_000_000_000),
            nonce=nonce,
        )


def test_naive_verification_time_is_refused(no_device: Path) -> None:
    quote = vector("tdx/tdx_quote_4.dat")
    with pytest.raises(ValueError, match="timezone"):
        init_data_register(
            AttesterDouble(TdxEvidence(quote=quote)),
            tdx_guest_device=no_device,
            now=NOW.replace(tzinfo=None),
            nonce=parse_tdx_quote(quote).body.report_data,
        )


def test_quote_that_cannot_be_collected_is_refused(no_device: Path) -> None:
    attester = AttesterDouble(EvidenceCollectionError("tdx_guest returned nothing"))
    with pytest.raises(AttestationError, match=r"cannot forge.*could not be collected"):
        init_data_register(attester, tdx_guest_device=no_device, now=NOW)


def test_tdx_attester_returning_other_evidence_is_refused(no_device: Path) -> None:
    attester = AttesterDouble(SampleEvidence(svn="1", report_data=bytes(64), init_data=bytes(48)))
    with pytest.raises(AttestationError, match="not TDX evidence"):
        init_data_register(attester, tdx_guest_device=no_device, now=NOW)


def test_real_tdx_attester_through_configfs_tsm(tmp_path: Path, no_device: Path) -> None:
    quote = vector("tdx/tdx_quote")
    body = parse_tdx_quote(quote).body
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=lambda inblob, _: quote)
    attester = TdxAttester(tsm=ConfigfsTsm(root, fs=kernel, sleep=lambda _: None), ccel_path=None)
    register = init_data_register(attester, tdx_guest_device=no_device, now=NOW, nonce=body.report_data)
    assert register == body.mr_config_id


# --- SNP, sample and the rest ----------------------------------------------------------------


def test_snp_register_is_host_data_of_the_psp_report() -> None:
    report = parse_snp_report(SNP_REPORT)
    attester = attester_of(SnpEvidence(report=SNP_REPORT), TeeKind.SNP)
    assert init_data_register(attester, nonce=report.report_data) == report.host_data
    assert len(report.host_data) == 32


def test_snp_report_over_other_report_data_is_refused() -> None:
    attester = attester_of(SnpEvidence(report=SNP_REPORT), TeeKind.SNP)
    with pytest.raises(EvidenceCollectionError, match="other report data"):
        init_data_register(attester)


def test_real_snp_attester_asks_with_a_fresh_nonce(tmp_path: Path) -> None:
    def splice(inblob: bytes, privlevel: int | None) -> bytes:
        return SNP_REPORT[:0x50] + inblob + SNP_REPORT[0x50 + 64 :]

    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    kernel = KernelLikeTsm(root=root, provider="sev_guest", respond=splice)
    attester = SnpAttester(tsm=ConfigfsTsm(root, fs=kernel, sleep=lambda _: None))
    assert init_data_register(attester) == parse_snp_report(SNP_REPORT).host_data


def test_snp_attester_returning_other_evidence_is_refused() -> None:
    attester = attester_of(TdxEvidence(quote=vector("tdx/tdx_quote")), TeeKind.SNP)
    with pytest.raises(AttestationError, match="not SNP evidence"):
        init_data_register(attester)


def test_sample_register_is_the_value_it_was_given() -> None:
    attester = UnsafeSampleAttester(allow_insecure=True, init_data=MR_CONFIG_ID)
    assert init_data_register(attester) == MR_CONFIG_ID


def test_sample_without_a_register_reads_zeros_like_a_guest_launched_without_init_data() -> None:
    assert init_data_register(UnsafeSampleAttester(allow_insecure=True)) == bytes(48)


@pytest.mark.parametrize("tee", [TeeKind.NVIDIA, TeeKind.SAMPLE_DEVICE])
def test_tee_without_an_init_data_register_is_refused(tee: TeeKind) -> None:
    attester = attester_of(SampleEvidence(svn="1", report_data=bytes(64)), tee)
    with pytest.raises(AttestationError, match="has no init-data register"):
        init_data_register(attester)
    assert attester.requests == []


def test_a_real_tdreport_parses_with_its_published_rtmrs_and_digests() -> None:
    """guest-components' TDREPORT fixture (tests/vectors/tdx/PROVENANCE.md)."""
    report = parse_tdreport(vector("tdx/tdx_report_1.bin"))
    assert report.rtmrs[0].hex() == (
        "f4ec1a04670fe7926cd5de4aef9aaa7689ab4ceaa132d7c5242b47f67dfaaea64c372a17ad68fef9a6ac99aabbddabdc"
    )
    assert report.rtmrs[1].hex() == (
        "4e5f8826653198ab4bc5156fbe4bc99db054c0b8239a16c4b59249fb427f4acc50eed1b46a85c7d526c4e1e47621b14c"
    )
    assert report.rtmrs[2] == report.rtmrs[3] == bytes(48)
    assert report.digests_match()  # TEE_TCB_INFO and TDINFO hash to what REPORTMACSTRUCT states
    altered = bytearray(vector("tdx/tdx_report_1.bin"))
    altered[MRCONFIGID_AT] ^= 0x01
    assert not parse_tdreport(bytes(altered)).digests_match()
