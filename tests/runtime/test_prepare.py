"""The config stage through the runtime's own code: model view, CA copy, options, attested config."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from attest.runconfig import RunConfiguration
from foundation.errors import ConfigError, ModelFormatError
from loader.manifest import Manifest
from runtime.config import RunConfig
from runtime.environment import decide_environment
from runtime.prepare import Prepared, prepare
from runtime.private import PrivateDirectory

ENV = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "VLLM_CPU_KVCACHE_SPACE": "1"}
ARGS = ("--enforce-eager", "--max-model-len", "512", "--served-model-name", "tiny")


def run_config(model: Path, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "model": str(model), "tee": "sample", "gpus": "none", "allow_insecure_sample_tee": True,
        "kbs_url": "http://127.0.0.1:8080", "vllm_args": ARGS,
    }  # fmt: skip
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def stage(
    config: RunConfig, private: PrivateDirectory, parser: argparse.ArgumentParser, env: dict[str, str] = ENV
) -> Prepared:
    decision = decide_environment(env, private_root=str(private.root), python_dir="/opt/venv/bin")
    return prepare(config, private, environment=decision.attested, parser=parser)


def test_config_stage_builds_the_view_and_the_attested_configuration(
    packed_demo: Path, private: PrivateDirectory, parser: argparse.ArgumentParser
) -> None:
    prepared = stage(run_config(packed_demo), private, parser)
    view = Path(prepared.vllm.namespace.model)
    assert view == private.model_view and (view / "chat_template.jinja").is_file()
    config = RunConfiguration.from_bytes(prepared.configuration.raw)
    body = config.to_json()
    assert body["model"]["manifest_digest"] == Manifest.load(packed_demo).digest
    assert prepared.vllm.namespace.max_model_len == 512
    assert body["vllm"]["args"] == list(run_config(packed_demo).vllm_args)
    assert body["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "1" and "HOME" not in body["environment"]
    assert body["settings"]["kbs_url"] == "http://127.0.0.1:8080"
    assert body["settings"]["key_resource"] == "kbs:///enclave-serve/model-key/tiny"
    assert body["settings"]["tee"] == "sample" and body["settings"]["model_source"] == str(packed_demo)
    assert body["runtime"]["vllm"] and prepared.pins is not None
    assert prepared.configuration == prepared.pins.configuration()
    raw = prepared.configuration.raw.decode()
    assert str(private.root) not in raw and "key_socket" not in raw


def test_same_inputs_same_digest_any_change_another(
    packed_demo: Path, parser: argparse.ArgumentParser
) -> None:
    def digest(config: RunConfig, env: dict[str, str] = ENV) -> str:
        directory = PrivateDirectory.create(Path("/dev/shm"), allow_insecure_shared=True)
        try:
            return stage(config, directory, parser, env).configuration.sha256
        finally:
            directory.remove()

    base = digest(run_config(packed_demo))
    assert digest(run_config(packed_demo)) == base  # a fresh private directory, same bytes
    assert digest(run_config(packed_demo, port=9999, host="0.0.0.0")) == base  # placement only
    assert digest(run_config(packed_demo), {**ENV, "HOSTNAME": "pod-2"}) == base  # removed variable
    changed = {
        "an option": run_config(packed_demo, vllm_args=(*ARGS, "--max-num-seqs", "2")),
        "an allowed variable": None,
        "the KBS": run_config(packed_demo, kbs_url="http://127.0.0.1:8081"),
        "the key resource": run_config(packed_demo, key_id="kbs:///other/model-key/tiny"),
    }
    digests = {
        name: digest(cfg)
        if cfg is not None
        else digest(run_config(packed_demo), {**ENV, "OMP_NUM_THREADS": "2"})
        for name, cfg in changed.items()
    }
    assert base not in digests.values() and len(set(digests.values())) == len(digests)


def test_pinned_kbs_ca_is_read_once_and_its_digest_attested(
    packed_demo: Path, private: PrivateDirectory, parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    from server.tls import generate_enclave_tls

    ca = tmp_path / "ca.pem"
    ca.write_bytes(generate_enclave_tls().cert_pem)
    prepared = stage(run_config(packed_demo, kbs_cacert=ca), private, parser)
    assert prepared.kbs_cacert is not None and prepared.kbs_cacert.read_bytes() == ca.read_bytes()
    assert prepared.kbs_cacert.is_relative_to(private.root)
    import hashlib

    settings = json.loads(prepared.configuration.raw)["settings"]
    assert (
        hashlib.sha256(settings["kbs_ca_pem"].encode()).digest() == hashlib.sha256(ca.read_bytes()).digest()
    )
    ca.write_text("swapped by the host later")
    assert prepared.kbs_cacert.read_bytes() != ca.read_bytes()


def test_a_modified_side_file_stops_the_config_stage(
    packed_demo: Path, private: PrivateDirectory, parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(packed_demo, model)
    (model / "chat_template.jinja").write_text("{{ exfiltrate(messages) }}")
    with pytest.raises(ModelFormatError, match=r"chat_template\.jinja"):
        stage(run_config(model), private, parser)


def test_a_refused_option_stops_the_config_stage(
    packed_demo: Path, private: PrivateDirectory, parser: argparse.ArgumentParser
) -> None:
    with pytest.raises(ConfigError, match="--enable-log-requests"):
        stage(run_config(packed_demo, vllm_args=(*ARGS, "--enable-log-req")), private, parser)


def test_an_api_key_on_the_command_line_never_reaches_the_configuration(
    packed_demo: Path, private: PrivateDirectory, parser: argparse.ArgumentParser
) -> None:
    prepared = stage(
        run_config(packed_demo, vllm_args=(*ARGS, "--api-key", "sk-operator-secret")), private, parser
    )
    assert prepared.vllm.namespace.api_key == ["sk-operator-secret"]  # vLLM still gets it
    raw = prepared.configuration.raw.decode()
    assert "sk-operator-secret" not in raw and '"--api-key","<redacted>"' in raw


def test_every_value_of_a_secret_option_is_redacted() -> None:
    from runtime.vllm_args import redact_secret_options, secret_options

    argv = ("--max-model-len", "512", "--api-key", "sk-1", "sk-2", "--dtype", "bfloat16", "--api-key=sk-3")
    assert redact_secret_options(argv) == (
        "--max-model-len", "512", "--api-key", "<redacted>", "<redacted>", "--dtype", "bfloat16",
        "--api-key=<redacted>",
    )  # fmt: skip
    assert secret_options(argv) == ["--api-key", "--api-key"] and secret_options(("--dtype", "x")) == []
