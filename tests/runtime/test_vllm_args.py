"""vLLM's options: checked on vLLM's parsed namespace, so no spelling gets around the allowlist."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from attest.errors import ConfigError
from runtime.vllm_args import ALLOWED_OPTIONS, REFUSED_OPTIONS, parse_vllm_arguments, runtime_argv

VIEW = Path("/nonexistent/view")
RUNTIME = runtime_argv(model_view=VIEW, host="127.0.0.1", port=8000, extra={"key_socket": ""})
BENIGN = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16",
          "--served-model-name", "tiny"]  # fmt: skip


def parse(parser: argparse.ArgumentParser, args: list[str], side_files: dict[str, Path] | None = None):  # type: ignore[no-untyped-def]
    return parse_vllm_arguments(
        args,
        runtime_args=RUNTIME,
        side_files=side_files or {},
        served_model_name="/models/tiny",
        parser=parser,
    )


@pytest.mark.parametrize(
    ("args", "named", "why"),
    [
        (["--enable-log-requests"], "--enable-log-requests", "logs prompts or outputs"),
        (["--enable-log-req"], "--enable-log-requests", "logs prompts or outputs"),  # a prefix
        (["--enable_log_requests"], "--enable-log-requests", "logs prompts or outputs"),  # underscores
        (["--enable-log-requests", "--enable-log-outputs"], "--enable-log-outputs", "logs prompts"),
        (["--trust-remote-code"], "--trust-remote-code", "loads code"),
        (["--load_format", "dummy"], "--load-format", "set by enclave-serve"),
        (["--load-format=safetensors"], "--load-format", "set by enclave-serve"),
        (["--ssl_keyfile", "/host/key.pem"], "--ssl-keyfile", "set by enclave-serve"),
        (["--model", "/host/other-model"], "--model", "set by enclave-serve"),
        (
            ["/host/other-model"],
            "positional argument (model_tag)",
            "set by enclave-serve",
        ),  # vllm serve's positional model
        (["--model-loader-extra-config", '{"key_socket": "/x"}'], "--model-loader-extra-config", "set by"),
        (["--tokenizer", "/host/tokenizer"], "--tokenizer", "changes what is loaded"),
        (["--hf-overrides", '{"num_hidden_layers": 1}'], "--hf-overrides", "changes what is loaded"),
        (["--generation-config", "/host/dir"], "--generation-config", "must be one of auto, vllm"),
        (["--lora-modules", "x=/host/lora"], "--lora-modules", "changes what is loaded"),
        (["--enable-lora"], "--enable-lora", "changes what is loaded"),
        (["--middleware", "host.module.Middleware"], "--middleware", "loads code"),
        (["--worker-extension-cls", "host.Ext"], "--worker-extension-cls", "loads code"),
        (["--logits-processors", "host.LP"], "--logits-processors", "loads code"),
        (["--tool-parser-plugin", "/host/parser.py"], "--tool-parser-plugin", "loads code"),
        (["-cc", '{"cache_dir": "/host"}'], "--compilation-config", "loads code"),
        (["--compilation-config.cache_dir", "/host"], "--compilation-config", "loads code"),  # dotted
        (
            ["--kv-transfer-config", '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'],
            "--kv-transfer-config",
            "network",
        ),
        (["--otlp-traces-endpoint", "http://host:4317"], "--otlp-traces-endpoint", "network"),
        (["--data-parallel-size", "2"], "--data-parallel-size", "network"),
        (["--distributed-executor-backend", "ray"], "--distributed-executor-backend", "must be one of"),
        (["--uvicorn-log-level", "trace"], "--uvicorn-log-level", "must be one of"),
        (["--enable-prompt-embeds"], "--enable-prompt-embeds", "loads code"),
        (["--speculative-config", '{"model": "/host/draft"}'], "--speculative-config", "changes what"),
        (["--enable-sleep-mode"], "--enable-sleep-mode", "engine state"),
        (["--enable-ssl-refresh"], "--enable-ssl-refresh", "set by enclave-serve"),
        (["--api-server-count", "2"], "--api-server-count", "set by enclave-serve"),
        (["--safetensors-prefetch-num-threads", "2"], "--safetensors-prefetch-num-threads", "allowlist"),
    ],
)
def test_refused_option_names_the_option_and_why(
    parser: argparse.ArgumentParser, args: list[str], named: str, why: str
) -> None:
    with pytest.raises(ConfigError, match="refused vLLM option") as info:
        parse(parser, [*args, *BENIGN])
    assert named in str(info.value) and why in str(info.value)


def test_config_file_is_refused_before_vllm_reads_it(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    hostile = tmp_path / "c.yaml"
    hostile.write_text("enable-log-requests: true\n")
    hostile.chmod(0)  # a read would fail loudly with another message (as root it would succeed)
    for args in (["--config", str(hostile)], [f"--config={hostile}"]):
        with pytest.raises(ConfigError, match="--config is refused"):
            parse(parser, args)


def test_several_refusals_are_reported_together(parser: argparse.ArgumentParser) -> None:
    with pytest.raises(ConfigError) as info:
        parse(parser, ["--trust-remote-code", "--enable-log-requests", "--tokenizer", "/x"])
    assert all(f in str(info.value) for f in ("--trust-remote-code", "--enable-log-requests", "--tokenizer"))


def test_benign_options_pass_and_the_runtime_sets_its_own(parser: argparse.ArgumentParser) -> None:
    extra = ["-tp", "2", "--max-num-batched-tokens", "2048", "--enable-prefix-caching", "-O3",
             "--override-generation-config", '{"temperature": 0.5}', "--tool-call-parser", "hermes",
             "--enable-auto-tool-choice", "--gpu-memory-utilization", "0.8", "--seed", "7"]  # fmt: skip
    result = parse(parser, [*BENIGN, *extra])
    ns = result.namespace
    assert ns.model == str(VIEW) and ns.load_format == "enclave-encrypted"
    assert ns.tensor_parallel_size == 2 and ns.served_model_name == ["tiny"]
    assert result.attested["tensor_parallel_size"] == 2
    assert result.attested["override_generation_config"] == {"temperature": 0.5}
    assert set(result.attested) == set(ALLOWED_OPTIONS)


def test_served_name_defaults_to_the_operators_model_argument(parser: argparse.ArgumentParser) -> None:
    assert parse(parser, []).namespace.served_model_name == ["/models/tiny"]


def test_chat_template_must_be_an_authenticated_side_file(
    parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    private = tmp_path / "chat_template.jinja"
    private.write_text("{{ messages }}")
    side = {"chat_template.jinja": private}
    with pytest.raises(ConfigError, match="not one of the model's authenticated files"):
        parse(parser, ["--chat-template", "/host/evil.jinja"], side)
    with pytest.raises(ConfigError, match="not one of the model's authenticated files"):
        parse(parser, ["--chat-template", "{{ messages }}"], side)  # an inline template
    result = parse(parser, ["--chat-template", "chat_template.jinja"], side)
    assert result.namespace.chat_template == str(private)
    assert result.attested["chat_template"] == "chat_template.jinja"


def test_the_api_key_is_redacted_in_the_attested_view(parser: argparse.ArgumentParser) -> None:
    result = parse(parser, ["--api-key", "sk-operator-secret"])
    assert result.namespace.api_key == ["sk-operator-secret"]
    assert result.attested["api_key"] == "<redacted>"


def test_attested_view_is_stable_and_changes_with_any_option(parser: argparse.ArgumentParser) -> None:
    a, b = parse(parser, BENIGN).attested, parse(parser, BENIGN).attested
    assert a == b
    assert parse(parser, [*BENIGN, "--max-num-seqs", "8"]).attested != a
    # Spellings do not matter, only the effective value.
    assert parse(parser, ["--enforce_eager", "--max_model_len=512", "--max-num-seqs", "4",
                          "--dtype", "bfloat16", "--served-model-name", "tiny"]).attested == a  # fmt: skip


def test_invalid_arguments_give_vllms_complaint_without_the_usage_dump(
    parser: argparse.ArgumentParser,
) -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments: --no-such-option") as info:
        parse(parser, ["--no-such-option"])
    assert "usage:" not in str(info.value)


def test_every_listed_option_exists_in_this_vllm(parser: argparse.ArgumentParser) -> None:
    """A renamed option would silently drop out of its rule: every name we list must exist."""
    dests = {a.dest for a in parser._actions}
    assert set(ALLOWED_OPTIONS) - dests == set()
    assert set(REFUSED_OPTIONS) - dests == set()
    assert not set(ALLOWED_OPTIONS) & set(REFUSED_OPTIONS)


def test_the_documented_allowlist_is_the_allowlist(parser: argparse.ArgumentParser) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    flags = {
        a.dest: next((o for o in a.option_strings if o.startswith("--")), a.dest) for a in parser._actions
    }
    undocumented = [flags[d] for d in ALLOWED_OPTIONS if f"`{flags[d]}`" not in doc]
    assert undocumented == []
