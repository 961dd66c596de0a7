"""The TEE registry (attest/tee/__init__.py): one backend per kind, and what derives from it."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import pytest

from attest.evidence import TeeKind
from attest.tee import BACKENDS, SnpCollateral, backend, collateral_from_json, insecure_kinds, kinds
from attest.tee.select import device_choices, primary_choices
from foundation.errors import ConfigError, MalformedEvidence
from runtime.collateral import add_collateral_arguments, collateral_files, parse_collateral, typed_collateral


def test_every_kind_has_exactly_one_backend_that_names_it() -> None:
    assert set(BACKENDS) == set(TeeKind)
    for kind, found in BACKENDS.items():
        assert found.kind is kind
        assert found.verifier.tee is kind
        assert found.evidence_type.tee is kind  # type: ignore[attr-defined]
        assert found.insecure == found.verifier.insecure


def test_the_choices_and_sets_derive_from_the_registry() -> None:
    assert primary_choices() == ("auto", "tdx", "snp", "sample")
    assert device_choices() == ("auto", "none", "nvidia", "sample")
    assert insecure_kinds() == {TeeKind.SAMPLE, TeeKind.SAMPLE_DEVICE}
    assert kinds(collateral=True) == ("tdx", "snp")


def test_an_unknown_tee_is_refused() -> None:
    with pytest.raises(MalformedEvidence, match="unknown TEE"):
        backend("sgx")
    with pytest.raises(MalformedEvidence, match="unknown TEE 'nvidia'"):
        collateral_from_json({"nvidia": {}})


def test_collateral_tee_file_reads_an_snp_vcek(tmp_path: Path) -> None:
    vcek = tmp_path / "vcek.der"
    vcek.write_bytes(b"\x30\x82der")
    parser = argparse.ArgumentParser()
    add_collateral_arguments(parser)
    args = parser.parse_args(["--collateral", f"snp={vcek}"])
    files = collateral_files(args.collateral, {TeeKind.TDX: args.tdx_collateral})
    assert files == {TeeKind.SNP: vcek}
    assert typed_collateral(files) == {TeeKind.SNP: SnpCollateral(vek=b"\x30\x82der")}
    assert collateral_from_json({"snp": {"vcek": base64.b64encode(b"\x30\x82der").decode()}}) == {
        TeeKind.SNP: SnpCollateral(vek=b"\x30\x82der")
    }


@pytest.mark.parametrize("text", ["tdx", "nvidia=x.json", "sample=x", "=x"])
def test_collateral_needs_tee_equals_file_with_a_tee_that_takes_collateral(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_collateral(text)


def test_one_tee_given_two_collateral_files_is_refused() -> None:
    with pytest.raises(ConfigError, match="two collateral files"):
        collateral_files([(TeeKind.TDX, Path("a.json"))], {TeeKind.TDX: Path("b.json")})


def test_detect_devices_attaches_each_backends_gate_and_gate_device_runs_it() -> None:
    from attest.tee.select import detect_devices, gate_device

    (device,) = detect_devices(gpus="sample", allow_insecure=True)
    assert device.tee is TeeKind.SAMPLE_DEVICE
    assert device._attached_gate is BACKENDS[TeeKind.SAMPLE_DEVICE].gate
    assert gate_device(device).devices == 1
    assert device.recheck().devices == 1
    assert all((b.gate is not None) == b.device for b in BACKENDS.values())


def test_detect_devices_offers_the_registrys_device_kinds() -> None:
    from attest.tee.select import detect_devices

    with pytest.raises(ConfigError, match="choose auto, none, nvidia or sample"):
        detect_devices(gpus="tpu")
    with pytest.raises(ConfigError, match="insecure"):
        detect_devices(gpus="sample")
