"""The boot through its seams: a Runtime built with test-double factories runs its real ``config``
and ``attest`` stages and asks the key-source factory for the configured source, with nothing of
the runtime patched; the boot record is frozen and carries each stage's result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from attest.evidence import TeeKind
from attest.keysource import KeyRelease, KeySource, KeySourceSpec
from attest.runconfig import RunConfiguration
from attest.tee.attester import Attester, DeviceAttester
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from foundation.errors import KeyRetrievalError
from foundation.resource import ResourceUri
from runtime import boot
from runtime.config import RunConfig
from runtime.record import (
    BootRecord,
    CanaryResult,
    CollateralResult,
    ConfigResult,
    EvidenceResult,
    KeyResult,
    LoadResult,
    RankLoad,
)
from runtime.seams import BootSeams
from server.attestation import AttestationService, CanaryClaim
from tests.attest.support import workload_pins
from tests.server.test_attestation_document import RECEIPT

ARGS = ("--enforce-eager", "--max-model-len", "512", "--served-model-name", "tiny")


@pytest.fixture
def environment() -> Iterator[None]:
    """The config stage makes this process's environment the attested one: put it back after."""
    saved, tempdir = dict(os.environ), tempfile.tempdir
    # What libraries imported by other tests put into this process's environment (cv2's
    # LD_LIBRARY_PATH, torch's inductor and triton settings), which the config stage rightly refuses.
    for name in [
        k for k in os.environ if k == "LD_LIBRARY_PATH" or k.startswith(("TORCHINDUCTOR_", "TRITON_"))
    ]:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        tempfile.tempdir = tempdir


class KeySourceDouble(KeySource):
    """Test double: records what it was built with and asked for, then refuses (ends the boot)."""

    name = "file"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def fetch(self, resource: ResourceUri) -> KeyRelease:
        self.calls.append(f"fetch {resource}")
        raise KeyRetrievalError("stopped by the test at the key stage")


class Recorder:
    """The three factories as test doubles, recording their calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.specs: list[KeySourceSpec] = []
        self.attester = UnsafeSampleAttester(allow_insecure=True)
        self.device = UnsafeSampleDeviceAttester(allow_insecure=True)
        self.given: tuple[Attester | None, Sequence[DeviceAttester]] | None = None

    def attesters(
        self, name: str, *, allow_insecure: bool = False, sample_init_data: bytes | None = None
    ) -> Attester:
        self.calls.append(f"attester {name} insecure={allow_insecure}")
        return self.attester

    def devices(
        self, *, gpus: str = "auto", allow_insecure: bool = False, allow_gpu_cc_off: bool = False
    ) -> list[DeviceAttester]:
        self.calls.append(f"devices {gpus}")
        return [self.device]

    def key_sources(
        self, spec: KeySourceSpec, *, attester: Attester | None, devices: Sequence[DeviceAttester]
    ) -> KeySource:
        self.specs.append(spec)
        self.given = (attester, devices)
        return KeySourceDouble(self.calls)

    def seams(self) -> BootSeams:
        return BootSeams(
            attesters=self.attesters,
            devices=self.devices,
            key_sources=self.key_sources,
            gpus_present=lambda: False,
        )


def _config(model: Path, tmp_path: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {
        "model": str(model), "tee": "sample", "gpus": "sample", "allow_insecure_sample_tee": True,
        "key_source": "file", "key_file": tmp_path / "key", "allow_insecure_key_file": True,
        "tls": False, "port": 0, "exit_on_failure": True, "vllm_args": ARGS,
        "private_dir": Path("/dev/shm"), "allow_insecure_shared_private_dir": True,
    }  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def test_a_runtime_with_injected_factories_boots_its_early_stages(
    packed_demo: Path, tmp_path: Path, environment: None
) -> None:
    doubles = Recorder()
    config = _config(packed_demo, tmp_path)
    runtime = boot.Runtime(config, seams=doubles.seams())
    code = asyncio.run(runtime.run())
    assert code == boot.EXIT_BOOT_FAILED
    stages = {s["stage"]: s for s in runtime.status.to_json()["stages"]}
    assert stages["config"]["ok"] and stages["config"]["detail"].startswith("model sha256:")
    assert stages["attest"]["ok"]
    assert stages["attest"]["detail"].startswith("tee sample; 1 sampledevice device(s) verified locally")
    ready = runtime.status.readiness()
    assert ready["stage"] == "key" and "stopped by the test at the key stage" in ready["reason"]
    resource = "kbs:///enclave-serve/model-key/tiny"
    assert doubles.calls == ["attester sample insecure=True", "devices sample", f"fetch {resource}"]
    # The key-source factory got the configured source, and the attest stage's attesters.
    assert doubles.specs == [KeySourceSpec.file(tmp_path / "key", allow_insecure=True)]
    assert doubles.given == (doubles.attester, (doubles.device,))
    assert runtime.record is None  # the boot never reached serve


def test_the_kbs_spec_carries_the_private_ca_copy_and_the_init_data(
    packed_demo: Path, tmp_path: Path, environment: None
) -> None:
    from server.tls import generate_enclave_tls

    ca = tmp_path / "ca.pem"
    ca.write_bytes(generate_enclave_tls().cert_pem)
    doubles = Recorder()
    config = _config(
        packed_demo,
        tmp_path,
        key_source="kbs",
        kbs_url="http://127.0.0.1:1",
        kbs_cacert=ca,
        tee_key="rsa",
        kbs_deadline_s=7.0,
    )
    asyncio.run(boot.Runtime(config, seams=doubles.seams()).run())
    (spec,) = doubles.specs
    assert spec.uri == "kbs+http://127.0.0.1:1" and spec.scheme == "kbs"
    assert spec.tee_key == "rsa" and spec.deadline_s == 7.0 and spec.init_data is None
    # The CA the config stage copied into the private directory (read once), not the host's file.
    assert spec.cacert is not None and spec.cacert != ca and spec.cacert.name == "kbs-ca.pem"


def _record() -> BootRecord:
    from types import SimpleNamespace

    prepared: Any = SimpleNamespace(
        model=SimpleNamespace(digest="sha256:" + "aa" * 32),
        configuration=RunConfiguration.from_pins(workload_pins("sha256:" + "aa" * 32)),
        init_data=None,
    )
    return BootRecord(
        config=ConfigResult(prepared=prepared, tls_spki_sha256="bb" * 32),
        evidence=EvidenceResult(attester=UnsafeSampleAttester(allow_insecure=True)),
        key=KeyResult(source="kbs", resource=ResourceUri.parse("kbs:///r/t/x"), receipt=RECEIPT),
        load=LoadResult(ranks=(RankLoad(rank=0, ciphertext_bytes=2_000_000, gbps=1.5),)),
        canary=CanaryResult(
            claim=CanaryClaim(
                status="passed",
                tokens=8,
                reference_sha256="00" * 32,
                render="chat",
                reference_computed_on="cpu",
                served_on="cpu",
            ),
            detail="8 tokens",
        ),
        collateral=CollateralResult(),
    )


def test_the_boot_record_is_frozen_and_carries_each_stage() -> None:
    record = _record()
    for name in ("config", "evidence", "key", "load", "canary", "collateral"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.load.ranks = ()  # type: ignore[misc]
    assert record.evidence.attester.tee is TeeKind.SAMPLE
    assert record.key.receipt is RECEIPT and record.load.ciphertext_bytes == 2_000_000
    assert record.load.detail("2 MB") == "1 rank(s) decrypted parts of 2 MB: rank 0: 2.000 MB at 1.50 GB/s"
    assert record.collateral.for_tee(TeeKind.TDX) is None


def test_the_documents_are_made_from_the_record() -> None:
    record = _record()
    workload = record.workload(runtime_version="9.9", insecure_modes=["sample TEE"], keyset_not_after=123)
    claims = AttestationService(workload, attester=record.evidence.attester).document([bytes(32)]).claims
    assert claims.model_digest == "sha256:" + "aa" * 32 and claims.tls_spki_sha256 == "bb" * 32
    assert claims.key_release == RECEIPT.to_json()
    assert claims.runtime == {"name": "enclave-serve", "version": "9.9"}
    assert claims.insecure_modes == ("sample TEE",)
    # The canary claim, member for member in the order the runtime always published it.
    assert list(claims.canary.items()) == [
        ("status", "passed"),
        ("tokens", 8),
        ("reference_sha256", "00" * 32),
        ("render", "chat"),
        ("reference_computed_on", "cpu"),
        ("served_on", "cpu"),
    ]
    assert CanaryClaim(status="not-recorded").to_json() == {"status": "not-recorded"}


def test_the_load_result_reads_the_workers_reports_once() -> None:
    from loader.keyhandoff import LoadReport

    reports = [
        LoadReport(rank=1, pid=2, ok=True, stats={"ciphertext_bytes": 3, "gbps": 0.5}),
        LoadReport(rank=0, pid=1, ok=True, stats={"ciphertext_bytes": 5, "gbps": 2.0}),
    ]
    load = LoadResult.from_reports(reports)
    assert [r.rank for r in load.ranks] == [0, 1] and load.ciphertext_bytes == 8 and load.gbps == 0.5
    assert LoadResult().gbps == 0.0
