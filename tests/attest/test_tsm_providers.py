"""configfs-tsm client and the TDX/SNP attesters, against a kernel-like test double
(tests/attest/tsm_kernel.py) and, for the plain file operations, a real temporary directory."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from attest.tee.snp.attester import SnpAttester
from attest.tee.snp.report import CERT_TABLE_GUIDS, SnpCertType, parse_snp_report
from attest.tee.tdx.attester import TdxAttester
from attest.tee.tdx.quote import parse_tdx_quote
from attest.tee.tsm import ConfigfsTsm, OsFilesystem
from foundation.errors import BackendUnavailable, EvidenceCollectionError
from tests.attest.tsm_kernel import KernelLikeTsm
from tests.vector_files import vector

TDX_QUOTE = vector("tdx/tdx_quote_4.dat")
SNP_REPORT = vector("snp/test-report.bin")
REPORT_DATA_OFFSET_TDX = 568
REPORT_DATA_OFFSET_SNP = 0x50


def tdx_respond(inblob: bytes, privlevel: int | None) -> bytes:
    """A quote with our REPORTDATA spliced in (its signature no longer verifies; parsing does)."""
    return TDX_QUOTE[:REPORT_DATA_OFFSET_TDX] + inblob + TDX_QUOTE[REPORT_DATA_OFFSET_TDX + 64 :]


def snp_respond(inblob: bytes, privlevel: int | None) -> bytes:
    assert privlevel == 0
    return SNP_REPORT[:REPORT_DATA_OFFSET_SNP] + inblob + SNP_REPORT[REPORT_DATA_OFFSET_SNP + 64 :]


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "tsm" / "report"
    path.mkdir(parents=True)
    return path


def _client(
    root: Path, kernel: KernelLikeTsm, sleeps: Sleeps | None = None, attempts: int = 5
) -> ConfigfsTsm:
    return ConfigfsTsm(
        root, fs=kernel, max_attempts=attempts, sleep=sleeps if sleeps is not None else Sleeps()
    )


def test_tdx_attester_collects_a_quote_and_the_ccel(root: Path, tmp_path: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond)
    ccel = tmp_path / "CCEL"
    ccel.write_bytes(b"\x01eventlog")
    attester = TdxAttester(tsm=_client(root, kernel), ccel_path=ccel)
    evidence = attester.collect(b"\xab" * 48)
    assert parse_tdx_quote(evidence.quote).body.report_data == b"\xab" * 48 + b"\0" * 16
    assert evidence.cc_eventlog == b"\x01eventlog"
    assert kernel.created == kernel.removed and len(kernel.created) == 1
    assert list(root.iterdir()) == []


def test_tdx_without_ccel(root: Path, tmp_path: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond)
    evidence = TdxAttester(tsm=_client(root, kernel), ccel_path=tmp_path / "absent").collect(b"")
    assert evidence.cc_eventlog is None


def test_snp_attester_writes_privlevel_and_reads_the_cert_table(root: Path) -> None:
    vcek = vector("snp/test-vcek.der")
    guid = next(g for g, t in CERT_TABLE_GUIDS.items() if t is SnpCertType.VCEK)
    table = guid.bytes + (48).to_bytes(4, "little") + len(vcek).to_bytes(4, "little") + b"\0" * 24 + vcek
    kernel = KernelLikeTsm(root=root, provider="sev_guest", respond=snp_respond, auxblob=table)
    evidence = SnpAttester(tsm=_client(root, kernel)).collect(b"\x11" * 64)
    assert parse_snp_report(evidence.report).report_data == b"\x11" * 64
    assert evidence.cert_chain is not None
    assert evidence.cert_chain[0].cert_type is SnpCertType.VCEK and evidence.cert_chain[0].data == vcek
    assert list(root.iterdir()) == []


def test_snp_without_auxblob_has_no_cert_chain(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="sev_guest", respond=snp_respond)
    assert SnpAttester(tsm=_client(root, kernel)).collect(b"x").cert_chain is None


def test_ebusy_is_retried_with_a_fresh_entry(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond, busy=2)
    sleeps = Sleeps()
    report = _client(root, kernel, sleeps).report(b"\0" * 64, provider="tdx_guest")
    assert report.generation == 1
    assert kernel.outblob_reads == 3 and len(kernel.created) == 3
    assert kernel.removed == kernel.created
    assert sleeps == [0.05, 0.1]


def test_retries_are_bounded(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond, busy=100)
    with pytest.raises(EvidenceCollectionError, match=r"failed 3 times.*EBUSY"):
        _client(root, kernel, attempts=3).report(b"\0" * 64, provider="tdx_guest")
    assert kernel.outblob_reads == 3
    assert list(root.iterdir()) == []


def test_generation_race_is_detected_and_retried(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond, races=1)
    report = _client(root, kernel).report(b"\0" * 64, provider="tdx_guest")
    assert report.generation == 1 and len(kernel.created) == 2


def test_persistent_race_fails(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="sev_guest", respond=snp_respond, races=100)
    with pytest.raises(EvidenceCollectionError, match="generation is 3, expected 2"):
        _client(root, kernel, attempts=2).report(b"\0" * 64, provider="sev_guest", privlevel=0)
    assert list(root.iterdir()) == []


def test_provider_mismatch_is_backend_unavailable(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="sev_guest", respond=snp_respond)
    with pytest.raises(BackendUnavailable, match="'sev_guest', not 'tdx_guest'"):
        TdxAttester(tsm=_client(root, kernel), ccel_path=None).collect(b"")
    assert kernel.removed == kernel.created


def test_inblob_must_be_exactly_64_bytes(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond)
    with pytest.raises(ValueError, match="exactly 64"):
        _client(root, kernel).report(b"\0" * 32, provider="tdx_guest")
    with pytest.raises(ValueError, match=r"longer than 64|holds 64"):
        TdxAttester(tsm=_client(root, kernel)).collect(b"\0" * 65)
    assert kernel.created == []


def test_kernel_refusal_is_not_retried(root: Path) -> None:
    # privlevel on a TDX kernel: the attribute does not exist, which no retry can fix.
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond)
    with pytest.raises(EvidenceCollectionError, match="ENOENT"):
        _client(root, kernel).report(b"\0" * 64, provider="tdx_guest", privlevel=0)
    assert len(kernel.created) == 1 and kernel.removed == kernel.created


def test_missing_configfs_is_backend_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="configfs-tsm is not available"):
        ConfigfsTsm(tmp_path / "absent").report(b"\0" * 64, provider="tdx_guest")


def test_permission_denied_says_to_run_as_root(root: Path) -> None:
    class Denied(KernelLikeTsm):
        def make_entry(self, root: Path, prefix: str) -> Path:
            raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(EvidenceCollectionError, match="run as root"):
        ConfigfsTsm(root, fs=Denied(root=root, provider="tdx_guest", respond=tdx_respond)).report(
            b"\0" * 64, provider="tdx_guest"
        )


def test_quote_over_other_report_data_is_refused(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=lambda inblob, _: TDX_QUOTE)
    with pytest.raises(EvidenceCollectionError, match="other report data"):
        TdxAttester(tsm=_client(root, kernel), ccel_path=None).collect(b"\x01")


def test_garbage_outblob_is_a_collection_error(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=lambda inblob, _: b"garbage")
    with pytest.raises(EvidenceCollectionError, match="does not parse"):
        TdxAttester(tsm=_client(root, kernel), ccel_path=None).collect(b"")


def test_os_filesystem_uses_mkdtemp_write_read_and_rmdir(tmp_path: Path) -> None:
    fs = OsFilesystem()
    entry = fs.make_entry(tmp_path, "enclave-serve-")
    assert entry.parent == tmp_path and entry.name.startswith("enclave-serve-")
    fs.write(entry / "inblob", b"\x00" * 64)
    assert fs.read(entry / "inblob") == b"\x00" * 64 and fs.exists(entry / "inblob")
    # rmdir, never rmtree: on an ordinary directory with files it refuses.
    with pytest.raises(OSError):
        fs.remove_entry(entry)
    (entry / "inblob").unlink()
    fs.remove_entry(entry)
    assert not entry.exists()


def test_detect_checks_paths_only(tmp_path: Path) -> None:
    tsm = tmp_path / "report"
    device = tmp_path / "tdx_guest"
    assert not TdxAttester.detect(tsm_root=tsm, device_paths=[device])
    tsm.mkdir()
    assert not TdxAttester.detect(tsm_root=tsm, device_paths=[device])
    device.touch()
    assert TdxAttester.detect(tsm_root=tsm, device_paths=[device])
    assert SnpAttester.detect(tsm_root=tsm, device_paths=[device])
    assert not SnpAttester.detect(tsm_root=tsm, device_paths=[tmp_path / str(uuid.uuid4())])


def test_describe(root: Path) -> None:
    kernel = KernelLikeTsm(root=root, provider="tdx_guest", respond=tdx_respond)
    info = TdxAttester(tsm=_client(root, kernel), ccel_path=None).describe()
    assert info == {
        "tee": "tdx",
        "insecure": False,
        "tsm_root": str(root),
        "tsm_available": True,
        "ccel": False,
    }
