"""Configuration is checked before anything boots; insecure modes need explicit flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from attest.errors import ConfigError
from runtime.config import RunConfig


def cfg(tmp_path: Path | str, **kw: object) -> RunConfig:
    base: dict[str, object] = {"model": str(tmp_path), "kbs_url": "https://kbs.example"}
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tee": "sample"}, "allow-insecure-sample-tee"),
        ({"gpus": "sample"}, "allow-insecure-sample-tee"),
        ({"key_source": "file", "key_file": Path("/k")}, "allow-insecure-key-file"),
        ({"key_source": "file"}, "--key-file is required"),
        ({"key_source": "kbs", "kbs_url": None}, "--kbs-url is required"),
        ({"key_source": "vault"}, "unknown key source"),
        ({"expected_gpus": 0}, "--expected-gpus"),
        ({"expected_gpus": 2, "gpus": "none"}, "--expected-gpus"),
        ({"staging": "unified"}, "--staging"),
        ({"staging_slots": 0}, "--staging-slots"),
    ],
)
def test_unsafe_or_inconsistent_configs_are_refused(
    tmp_path: Path, kw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(tmp_path, **kw).validate()


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cfg(tmp_path / "nope").validate()


def test_insecure_modes_are_listed(tmp_path: Path) -> None:
    config = cfg(
        tmp_path, tee="sample", allow_insecure_sample_tee=True, tls=False, kbs_url="http://127.0.0.1:8080"
    )
    config.validate()
    modes = " ".join(config.insecure_modes)
    assert "sample TEE" in modes and "plain HTTP" in modes and "plain-HTTP key broker" in modes
    assert cfg(tmp_path).insecure_modes == []


def test_every_setting_is_attested_or_argued_operational(tmp_path: Path) -> None:
    """No runtime setting escapes the attested configuration without a stated reason."""
    import dataclasses

    from runtime.config import ATTESTED_AS, OPERATIONAL_SETTINGS

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    attested = set(cfg(tmp_path).attested_settings(resource="kbs:///r/t/x", kbs_ca_sha256=None))
    covered = (attested & fields) | set(ATTESTED_AS) | set(OPERATIONAL_SETTINGS)
    assert fields - covered == set(), "attest these, or argue them in OPERATIONAL_SETTINGS"
    assert not set(OPERATIONAL_SETTINGS) & attested  # one place each
    assert {"private_dir", "verbose", "allow_insecure_shared_private_dir"} <= attested


def test_every_run_flag_reaches_the_configuration() -> None:
    """Each option of ``enclave-serve run`` is a RunConfig setting (so the test above holds it)."""
    import argparse
    import dataclasses

    from runtime.commands import run as run_command

    parser = argparse.ArgumentParser()
    run_command.add_parser(parser.add_subparsers())
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {a.dest for a in sub.choices["run"]._actions} - {"help", "print_config", "model"}
    renamed = {"kbs_deadline": "kbs_deadline_s", "watchdog_interval": "watchdog_interval_s",
               "drain_timeout": "drain_timeout_s", "attestation_max_age": "attestation_max_age_s"}  # fmt: skip
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert {renamed.get(d, d) for d in dests} - fields == set()
