"""Configuration is checked before anything boots; insecure modes need explicit flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.errors import ConfigError
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
    assert cfg(tmp_path).insecure_modes == [
        "configuration not pinned by init-data (set from the command line)"
    ]
    assert cfg(tmp_path, init_data=tmp_path / "initdata.toml").insecure_modes == []


def test_every_setting_is_declared_attested_or_argued_operational() -> None:
    """Each RunConfig field declares its setting; none escapes the attestation without a reason."""
    import dataclasses

    from runtime.settings import declared_name, settings

    assert [f.name for f, _ in settings()] == [f.name for f in dataclasses.fields(RunConfig)]
    attested = {f.name for f, s in settings() if s.attested}
    operational = {f.name: s.operational for f, s in settings() if not s.attested}
    assert all(reason and len(reason) > 20 for reason in operational.values())
    assert {"private_dir", "verbose", "allow_insecure_shared_private_dir", "tee", "vllm_args"} <= attested
    assert {"host", "port", "drain_timeout_s", "log_format", "init_data"} <= set(operational)
    # Each attested setting has one place in the init-data's declaration.
    places = [declared_name(f.name, s) for f, s in settings() if s.attested and s.in_initdata]
    assert len(places) == len(set(places))
    assert ("", "key_resource") in places and ("", "vllm_args") in places


def test_every_run_flag_is_a_declared_setting() -> None:
    """``run``'s options are derived from the declarations: nothing else reaches the command line."""
    import argparse
    import dataclasses

    from runtime.commands import run as run_command

    parser = argparse.ArgumentParser()
    run_command.add_parser(parser.add_subparsers())
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {a.dest for a in sub.choices["run"]._actions} - {"help", "print_config"}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert dests <= fields
    assert fields - dests == {"verbose", "vllm_args"}  # the global -v, and the options after --


def test_the_docs_table_is_the_declaration() -> None:
    from runtime.settings import markdown_table

    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert markdown_table() in docs, "regenerate it: python -m runtime.settings"
