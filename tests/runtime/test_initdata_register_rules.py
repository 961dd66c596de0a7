"""Fail closed on the init-data register (runtime.boot, stage ``attest``).

The register itself is read from what the host cannot forge (tests/attest/test_initdata_register.py);
here, what the runtime does with it in a TDX guest and in the sample TEE.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from foundation.errors import AttestationError
from runtime import boot
from runtime.config import RunConfig
from tests.attest.support import workload_pins

INIT = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, workload_pins().to_toml())])
OTHER = InitData.build(
    entries=[(ENCLAVE_SERVE_ENTRY, workload_pins(vllm_args=("--max-model-len", "64")).to_toml())]
)


def check(
    monkeypatch: pytest.MonkeyPatch, *, tee: TeeKind, register: bytes, init: InitData | None, **config: object
) -> None:
    """Run the register rules with ``register`` as what the hardware holds."""
    monkeypatch.setattr(boot, "init_data_register", lambda _attester: register)
    runtime = boot.Runtime(RunConfig(model="/m", **config))  # type: ignore[arg-type]
    attester = SimpleNamespace(tee=tee, insecure=tee is TeeKind.SAMPLE)
    runtime._check_init_data_register(attester, init)  # type: ignore[arg-type]


def test_the_launched_init_data_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    check(monkeypatch, tee=TeeKind.TDX, register=INIT.register(TeeKind.TDX), init=INIT, init_data=Path("/i"))
    check(monkeypatch, tee=TeeKind.SNP, register=INIT.register(TeeKind.SNP), init=INIT, init_data=Path("/i"))


def test_a_register_set_and_no_init_data_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AttestationError, match=r"launched with init-data .* no --init-data was given"):
        check(monkeypatch, tee=TeeKind.TDX, register=INIT.register(TeeKind.TDX), init=None)
    with pytest.raises(AttestationError, match="no --init-data was given"):  # the sample TEE the same
        check(monkeypatch, tee=TeeKind.SAMPLE, register=INIT.register(TeeKind.SAMPLE), init=None)


def test_another_file_than_the_launched_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AttestationError, match="not the one this tdx guest was launched with"):
        check(
            monkeypatch,
            tee=TeeKind.TDX,
            register=OTHER.register(TeeKind.TDX),
            init=INIT,
            init_data=Path("/i"),
        )
    with pytest.raises(AttestationError, match=r"zeros \(launched without init-data\)"):
        check(monkeypatch, tee=TeeKind.SNP, register=bytes(32), init=INIT, init_data=Path("/i"))


def test_a_zero_register_in_a_real_tee_needs_the_insecure_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AttestationError, match="launched without init-data: nothing pins what it runs"):
        check(monkeypatch, tee=TeeKind.TDX, register=bytes(48), init=None)
    check(monkeypatch, tee=TeeKind.TDX, register=bytes(48), init=None, allow_insecure_no_initdata=True)
    config = RunConfig(model="/m", allow_insecure_no_initdata=True)
    assert "configuration not pinned by init-data (set from the command line)" in config.insecure_modes
    # The sample TEE launched without --sample-init-data boots from flags (claimed the same way).
    check(monkeypatch, tee=TeeKind.SAMPLE, register=bytes(48), init=None)
