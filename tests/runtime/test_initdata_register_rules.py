"""Fail closed on the init-data register (runtime.boot, stage ``attest``).

The register itself is read from what the host cannot forge (tests/attest/test_initdata_register.py);
here, what the runtime does with it in a TDX guest and in the sample TEE. Each case boots
:class:`runtime.boot.Runtime` through its seams (:class:`runtime.seams.BootSeams`): the real config
stage on the packed demo model, an attester double of the TEE asked for, the register as the
hardware would hold it, and a key-source double that ends the boot once the rules passed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from attest.keysource import KeySource, KeySourceSpec
from attest.tee.attester import Attester, DeviceAttester
from attest.tee.sample.attester import UnsafeSampleAttester
from foundation.errors import AttestationError
from runtime import boot
from runtime.config import RunConfig
from runtime.seams import BootSeams
from tests.attest.support import workload_pins
from tests.runtime.test_boot_seams import ARGS, KeySourceDouble, environment  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("environment")

INIT = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, workload_pins().to_toml())])
OTHER = InitData.build(
    entries=[(ENCLAVE_SERVE_ENTRY, workload_pins(vllm_args=("--max-model-len", "64")).to_toml())]
)


class TdxAttesterDouble(UnsafeSampleAttester):
    """Test double: a TDX attester (its evidence is the sample TEE's; only its kind and that it is
    not insecure matter to the register rules, whose register comes from the seam)."""

    tee: ClassVar[TeeKind] = TeeKind.TDX
    insecure: ClassVar[bool] = False


class SnpAttesterDouble(TdxAttesterDouble):
    """Test double: an SNP attester, like :class:`TdxAttesterDouble`."""

    tee: ClassVar[TeeKind] = TeeKind.SNP


ATTESTERS: dict[TeeKind, type[UnsafeSampleAttester]] = {
    TeeKind.TDX: TdxAttesterDouble,
    TeeKind.SNP: SnpAttesterDouble,
    TeeKind.SAMPLE: UnsafeSampleAttester,
}


def check(
    packed_demo: Path, tmp_path: Path, *, tee: TeeKind, register: bytes, init: InitData | None, **config: Any
) -> None:
    """Boot with ``register`` as what the hardware holds and ``init`` as the host's init-data.

    Raises:
        AttestationError: the boot stopped at ``attest`` (its reason); otherwise the boot went on
            to the key stage.
    """
    calls: list[str] = []

    def key_sources(
        spec: KeySourceSpec, *, attester: Attester | None, devices: Sequence[DeviceAttester]
    ) -> KeySource:
        return KeySourceDouble(calls)

    seams = BootSeams(
        attesters=lambda *_a, **_kw: ATTESTERS[tee](allow_insecure=True),
        devices=lambda **_kw: [],
        key_sources=key_sources,
        gpus_present=lambda: False,
        init_data_register=lambda _attester: register,
    )
    run_config = RunConfig(
        model=str(packed_demo), tee="sample", gpus="none", allow_insecure_sample_tee=True,
        key_source="file", key_file=tmp_path / "key", allow_insecure_key_file=True, tls=False,
        port=0, exit_on_failure=True, vllm_args=ARGS, private_dir=Path("/dev/shm"),
        allow_insecure_shared_private_dir=True, **config,
    )  # fmt: skip
    runtime = boot.Runtime(run_config, loaded=boot.Loaded(config=run_config, init_data=init), seams=seams)
    saved = dict(os.environ)  # the config stage applies its environment: the next boot needs this one
    try:
        assert asyncio.run(runtime.run()) == boot.EXIT_BOOT_FAILED
    finally:
        os.environ.clear()
        os.environ.update(saved)
    ready = runtime.status.readiness()
    if ready["stage"] == "attest":
        raise AttestationError(ready["reason"])
    assert ready["stage"] == "key" and len(calls) == 1, ready


def test_the_launched_init_data_passes(packed_demo: Path, tmp_path: Path) -> None:
    check(
        packed_demo,
        tmp_path,
        tee=TeeKind.TDX,
        register=INIT.register(TeeKind.TDX),
        init=INIT,
        init_data=Path("/i"),
    )
    check(
        packed_demo,
        tmp_path,
        tee=TeeKind.SNP,
        register=INIT.register(TeeKind.SNP),
        init=INIT,
        init_data=Path("/i"),
    )


def test_a_register_set_and_no_init_data_is_refused(packed_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match=r"launched with init-data .* no --init-data was given"):
        check(packed_demo, tmp_path, tee=TeeKind.TDX, register=INIT.register(TeeKind.TDX), init=None)
    with pytest.raises(AttestationError, match="no --init-data was given"):  # the sample TEE the same
        check(packed_demo, tmp_path, tee=TeeKind.SAMPLE, register=INIT.register(TeeKind.SAMPLE), init=None)


def test_another_file_than_the_launched_one_is_refused(packed_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not the one this tdx guest was launched with"):
        check(
            packed_demo,
            tmp_path,
            tee=TeeKind.TDX,
            register=OTHER.register(TeeKind.TDX),
            init=INIT,
            init_data=Path("/i"),
        )
    with pytest.raises(AttestationError, match=r"zeros \(launched without init-data\)"):
        check(packed_demo, tmp_path, tee=TeeKind.SNP, register=bytes(32), init=INIT, init_data=Path("/i"))


def test_a_zero_register_in_a_real_tee_needs_the_insecure_flag(packed_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="launched without init-data: nothing pins what it runs"):
        check(packed_demo, tmp_path, tee=TeeKind.TDX, register=bytes(48), init=None)
    check(
        packed_demo, tmp_path, tee=TeeKind.TDX, register=bytes(48), init=None, allow_insecure_no_initdata=True
    )
    config = RunConfig(model="/m", allow_insecure_no_initdata=True)
    assert "configuration not pinned by init-data (set from the command line)" in config.insecure_modes
    # The sample TEE launched without --sample-init-data boots from flags (claimed the same way).
    check(packed_demo, tmp_path, tee=TeeKind.SAMPLE, register=bytes(48), init=None)
