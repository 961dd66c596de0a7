"""The init-data is the configuration: ``run`` resolves every attested setting from it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from foundation.errors import ConfigError
from runtime.config import RunConfig
from runtime.settings import declared_settings, given_settings, resolve
from tests.attest.support import workload_pins

MODEL = "sha256:" + "ab" * 32


def declared(**settings: Any) -> InitData:
    config = RunConfig(
        model="/models/tiny",
        tee="sample",
        allow_insecure_sample_tee=True,
        gpus="none",
        kbs_url="https://kbs.example",
        **settings,
    )
    pins = workload_pins(
        MODEL,
        settings=declared_settings(config, kbs_ca_pem=None),
        vllm_args=("--max-model-len", "512"),
    )
    return InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())])


def run_args(*argv: str) -> dict[str, Any]:
    """What ``enclave-serve run ARGV`` gives, through the real parser."""
    from runtime.commands import run as run_command

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    run_command.add_parser(parser.add_subparsers())
    args = [*argv]
    passthrough: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, passthrough = args[:cut], args[cut + 1 :]
    namespace = parser.parse_args(["run", *args])
    namespace.passthrough = passthrough
    return given_settings(namespace)


def test_only_init_data_gives_every_attested_setting() -> None:
    config, pins = resolve(run_args("--init-data", "/i", "--port", "9000"), declared(watchdog_interval_s=5.0))
    assert pins is not None and pins.model == MODEL
    assert config.model == "/models/tiny" and config.tee == "sample" and config.port == 9000
    assert config.vllm_args == ("--max-model-len", "512") and config.watchdog_interval_s == 5.0
    assert config.key_id == "kbs:///enclave-serve/model-key/tiny"
    assert config.insecure_modes[0] == "sample TEE (evidence proves nothing)"  # pinned by init-data


def test_repeating_a_pinned_value_is_accepted() -> None:
    given = run_args("/models/tiny", "--init-data", "/i", "--tee", "sample", "--allow-insecure-sample-tee",
                     "--", "--max-model-len", "512")  # fmt: skip
    config, _ = resolve(given, declared())
    assert config.tee == "sample"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--tee", "tdx"), "--tee: the init-data pins sample, the command line gives tdx"),
        (("--watchdog-interval", "0"), "--watchdog-interval: the init-data pins 60.0, the command line gives 0"),
        (("--no-tls",), "--no-tls: the init-data pins true, the command line gives false"),
        (("--key-id", "kbs:///other/key/x"), "--key-id: the init-data pins kbs:///enclave-serve/model-key/tiny"),
        (("/models/other",), "MODEL: the init-data pins /models/tiny, the command line gives /models/other"),
        (("--", "--max-model-len", "512", "--enforce-eager"),
         "the vLLM options (after --): the init-data pins --max-model-len 512, the command line gives "
         "--max-model-len 512 --enforce-eager"),
        (("--expected-gpus", "2"), "--expected-gpus: the init-data pins (not set), the command line gives 2"),
    ],
)  # fmt: skip
def test_a_setting_other_than_the_pinned_one_is_refused_naming_both(
    argv: tuple[str, ...], named: str
) -> None:
    with pytest.raises(ConfigError, match="the command line sets what the init-data pins") as info:
        resolve(run_args("--init-data", "/i", *argv), declared())
    assert named in str(info.value)


def test_operational_settings_are_the_operators() -> None:
    given = run_args("--init-data", "/i", "--host", "0.0.0.0", "--drain-timeout", "5", "--log-format", "json",
                     "--exit-on-failure", "--attestation-rate", "2", "--tls-hostname", "model.example")  # fmt: skip
    config, _ = resolve(given, declared())
    assert (config.host, config.drain_timeout_s, config.log_format) == ("0.0.0.0", 5.0, "json")
    assert config.exit_on_failure and config.tls_hostnames == ("model.example",)


def test_a_kbs_ca_on_the_command_line_must_be_the_declared_one(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    ca, other = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.write_text(pem)
    other.write_text(pem.replace("MIIB", "MIIC"))
    config = RunConfig(
        model="/models/tiny", tee="sample", allow_insecure_sample_tee=True, kbs_url="https://k"
    )
    pins = workload_pins(MODEL, settings=declared_settings(config, kbs_ca_pem=pem))
    init = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())])
    resolve(run_args("--init-data", "/i", "--kbs-cacert", str(ca)), init)
    with pytest.raises(ConfigError, match="--kbs-cacert: the init-data pins another CA bundle"):
        resolve(run_args("--init-data", "/i", "--kbs-cacert", str(other)), init)


def test_an_init_data_without_the_entry_or_with_unknown_settings_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"has no enclave-serve\.toml entry"):
        resolve({}, InitData.build(entries=[("policy.rego", "package agent_policy\n")]))
    pins = workload_pins(MODEL, settings={"tee": "sample", "turbo": True})
    with pytest.raises(ConfigError, match="does not have: turbo"):
        resolve({}, InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())]))
    pins = workload_pins(MODEL, settings={"tee": "sample"})  # no gpus, no tls, ...
    with pytest.raises(ConfigError, match="declares no value for"):
        resolve({}, InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())]))
    settings = declared_settings(RunConfig(model="/m", kbs_url="https://k"), kbs_ca_pem=None)
    pins = workload_pins(MODEL, settings={**settings, "tee": "quantum"})
    with pytest.raises(ConfigError, match="tee must be one of"):
        resolve({}, InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())]))


def test_without_init_data_the_command_line_decides_and_says_so() -> None:
    config, pins = resolve(run_args("/m", "--tee", "sample", "--allow-insecure-sample-tee"), None)
    assert pins is None and config.tee == "sample" and config.model == "/m"
    assert "configuration not pinned by init-data" in config.insecure_modes[0]
