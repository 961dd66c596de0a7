"""vLLM's arguments: parsed by vLLM's own parser, then checked against an allowlist.

The options after ``--`` come from the pod spec, i.e. from the host. A denylist of spellings
cannot hold (vLLM's parser rewrites ``_`` to ``-``, accepts unambiguous prefixes, expands
``--config file.yaml`` and dotted ``--x.y`` forms), so the check runs on the **parsed
namespace**: the pass-through arguments are parsed alone and compared, option by option, with
vLLM's defaults. Every option whose value differs must be on :data:`ALLOWED_OPTIONS` (benign:
sizes, parallelism, scheduling, sampling defaults, names) and pass its value check; anything
else (options that load code or files, log prompts or outputs, open network paths, or change
what is loaded) is refused at stage ``config``, naming the option and why
(:data:`REFUSED_OPTIONS` gives the reason for the notable ones). ``--config`` is refused before
vLLM reads the file.

A chat template, the one file a user legitimately passes, must be one of the model's
authenticated side files: ``--chat-template NAME`` names it in the manifest and is pointed at
the private copy.

The options the runtime sets itself (model path, load format, loader configuration, host,
port, TLS files) are added after the check; :attr:`VllmArguments.attested` is what goes into
the attested configuration: every allowed option's effective value, secrets redacted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from attest.errors import ConfigError
from loader import LOAD_FORMAT

__all__ = [
    "ALLOWED_OPTIONS",
    "REFUSED_OPTIONS",
    "VllmArguments",
    "normalize_option_value",
    "parse_vllm_arguments",
    "runtime_argv",
    "vllm_parser",
]

Check = Callable[[Any], str | None]  # returns why a value is refused, or None

_MISSING = object()
_REDACTED = "<redacted>"


def _ok(value: Any) -> str | None:
    return None


def _one_of(*values: object) -> Check:
    def check(value: Any) -> str | None:
        return None if value in values else f"must be one of {', '.join(map(str, values))}"

    return check


def _positive_int(value: Any) -> str | None:
    return None if value is None or (isinstance(value, int) and value >= 1) else "must be a positive integer"


def _json_values(value: Any) -> str | None:
    try:
        json.dumps(normalize_option_value(value), allow_nan=False)
    except (TypeError, ValueError):
        return "must be plain JSON values"
    return None


def _sampling_defaults(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be a JSON object of sampling parameters"
    return _json_values(value)


#: Options that may differ from vLLM's default, with the check their value must pass.
ALLOWED_OPTIONS: Mapping[str, Check] = {
    # What is served and under which name.
    "served_model_name": _ok,
    "runner": _one_of("auto", "generate", "pooling"),
    "convert": _ok,
    "dtype": _ok,
    "quantization": _one_of(None, "fp8"),
    "kv_cache_dtype": _ok,
    "seed": _ok,
    "max_model_len": _ok,
    "max_logprobs": _ok,
    "logprobs_mode": _ok,
    "tokenizer_mode": _one_of("auto", "hf"),
    "config_format": _one_of("auto", "hf"),
    "generation_config": _one_of("auto", "vllm"),  # "auto" reads the model's attested file
    "override_generation_config": _sampling_defaults,
    "model_impl": _one_of("auto", "vllm", "transformers"),
    "skip_tokenizer_init": _ok,
    "disable_sliding_window": _ok,
    "disable_cascade_attn": _ok,
    # Chat and tools (parsers by built-in name; plugin files are refused).
    "chat_template": _ok,  # checked against the manifest's side files in parse_vllm_arguments
    "chat_template_content_format": _ok,
    "default_chat_template_kwargs": _json_values,
    "response_role": _ok,
    "enable_auto_tool_choice": _ok,
    "exclude_tools_when_tool_choice_none": _ok,
    "tool_call_parser": _ok,
    "tool_strict_level": _ok,
    "reasoning_parser": _ok,
    "return_tokens_as_token_ids": _ok,
    "enable_prompt_tokens_details": _ok,
    "enable_force_include_usage": _ok,
    "enable_server_load_tracking": _ok,
    "enable_tokenizer_info_endpoint": _ok,
    "sse_keep_alive_interval": _ok,
    # HTTP front end.
    "api_key": _ok,  # attested as <redacted>
    "root_path": _ok,
    "allowed_origins": _ok,
    "allowed_methods": _ok,
    "allowed_headers": _ok,
    "allow_credentials": _ok,
    "enable_request_id_headers": _ok,
    "disable_fastapi_docs": _ok,
    "h11_max_incomplete_event_size": _ok,
    "h11_max_header_count": _ok,
    "disable_uvicorn_access_log": _ok,
    "disable_access_log_for_endpoints": _ok,
    "uvicorn_log_level": _one_of("critical", "error", "warning", "info"),  # debug/trace log bodies
    "disable_log_stats": _ok,
    "aggregate_engine_logging": _ok,
    "show_hidden_metrics_for_version": _ok,
    "shutdown_timeout": _ok,
    # Parallelism inside the one confidential VM.
    "tensor_parallel_size": _positive_int,
    "pipeline_parallel_size": _positive_int,
    "enable_expert_parallel": _ok,
    "distributed_executor_backend": _one_of(None, "mp", "uni"),
    "disable_custom_all_reduce": _ok,
    "max_parallel_loading_workers": _ok,
    "distributed_timeout_seconds": _ok,
    "cpu_distributed_timeout_seconds": _ok,
    "device_ids": _ok,
    "numa_bind": _ok,
    "numa_bind_nodes": _ok,
    "numa_bind_cpus": _ok,
    # Memory and cache sizes.
    "block_size": _ok,
    "gpu_memory_utilization": _ok,
    "kv_cache_memory_bytes": _ok,
    "num_gpu_blocks_override": _ok,
    "enable_prefix_caching": _ok,
    "prefix_caching_hash_algo": _ok,
    "cpu_offload_gb": _ok,
    "mm_processor_cache_gb": _ok,
    "limit_mm_per_prompt": _json_values,
    # Scheduling and execution.
    "max_num_seqs": _ok,
    "max_num_batched_tokens": _ok,
    "max_num_scheduled_tokens": _ok,
    "max_num_queued_reqs": _ok,
    "long_prefill_token_threshold": _ok,
    "scheduling_policy": _ok,
    "enable_chunked_prefill": _ok,
    "async_scheduling": _ok,
    "stream_interval": _ok,
    "enforce_eager": _ok,
    "cudagraph_capture_sizes": _ok,
    "max_cudagraph_capture_size": _ok,
    "optimization_level": _ok,
    "performance_mode": _ok,
    "attention_backend": _ok,
    "renderer_num_workers": _ok,
    "use_tqdm_on_load": _ok,
    "fail_on_environ_validation": _ok,
}

_CODE = "loads code"
_FILES = "reads files the host controls"
_LOGS = "logs prompts or outputs"
_NET = "opens network paths"
_LOAD = "changes what is loaded"
_OURS = "is set by enclave-serve itself"
_STATE = "exposes or changes engine state at runtime"

#: Why the notable refused options are refused (every option not allowed is refused).
REFUSED_OPTIONS: Mapping[str, str] = {
    "model": _OURS, "model_tag": _OURS, "load_format": _OURS, "model_loader_extra_config": _OURS,
    "host": _OURS, "port": _OURS, "uds": _OURS, "ssl_keyfile": _OURS, "ssl_certfile": _OURS,
    "ssl_ca_certs": _OURS, "ssl_cert_reqs": _OURS, "ssl_ciphers": _OURS, "enable_ssl_refresh": _OURS,
    "api_server_count": _OURS, "headless": _OURS, "grpc": _NET, "grpc_port": _NET,
    "config": _FILES,
    "tokenizer": _LOAD, "hf_config_path": _LOAD, "revision": _LOAD, "code_revision": _LOAD,
    "tokenizer_revision": _LOAD, "hf_overrides": _LOAD, "model_class_overrides": _LOAD,
    "quantization_config": _LOAD, "download_dir": _LOAD, "ignore_patterns": _LOAD,
    "speculative_config": _LOAD, "spec_model": _LOAD, "spec_method": _LOAD, "spec_tokens": _LOAD,
    "pt_load_map_location": _LOAD, "safetensors_load_strategy": _LOAD, "weight_transfer_config": _NET,
    "trust_remote_code": _CODE, "logits_processors": _CODE, "middleware": _CODE,
    "worker_cls": _CODE, "worker_extension_cls": _CODE, "scheduler_cls": _CODE,
    "tool_parser_plugin": _CODE, "reasoning_parser_plugin": _CODE, "io_processor_plugin": _CODE,
    "compilation_config": _CODE, "additional_config": _CODE,
    "lora_modules": _LOAD, "enable_lora": _LOAD, "default_mm_loras": _LOAD,
    "enable_prompt_embeds": _CODE,
    "trust_request_chat_template": _CODE, "trust_request_mm_kwargs": _CODE,
    "enable_log_requests": _LOGS, "enable_log_outputs": _LOGS, "enable_log_deltas": _LOGS,
    "max_log_len": _LOGS, "log_error_stack": _LOGS, "logging_config": _FILES, "log_level": _LOGS,
    "log_config_file": _FILES, "enable_logging_iteration_details": _LOGS,
    "otlp_traces_endpoint": _NET, "collect_detailed_traces": _NET, "profiler_config": _FILES,
    "kv_transfer_config": _NET, "kv_events_config": _NET, "ec_transfer_config": _NET,
    "tool_server": _NET, "allowed_media_domains": _NET, "allowed_local_media_path": _FILES,
    "media_io_kwargs": _NET, "hf_token": _NET, "master_addr": _NET, "master_port": _NET,
    "nnodes": _NET, "node_rank": _NET, "data_parallel_size": _NET, "data_parallel_address": _NET,
    "data_parallel_rpc_port": _NET, "data_parallel_backend": _NET, "data_parallel_rank": _NET,
    "data_parallel_start_rank": _NET, "data_parallel_size_local": _NET,
    "data_parallel_hybrid_lb": _NET, "data_parallel_external_lb": _NET,
    "data_parallel_multi_port_external_lb": _NET, "data_parallel_supervisor_port": _NET,
    "kv_offloading_backend": _NET, "kv_offloading_size": _NET,
    "enable_sleep_mode": _STATE, "enable_cumem_allocator": _STATE, "enable_elastic_ep": _STATE,
    "enable_eplb": _STATE, "enable_fault_tolerance": _STATE, "enable_scale_out": _STATE,
    "mm_encoder_fp8_scale_path": _FILES, "mm_encoder_fp8_scale_save_path": _FILES,
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmArguments:
    """vLLM's final parsed arguments and the attested view of them."""

    namespace: argparse.Namespace
    #: Every allowed option with its effective value (plain JSON; secrets redacted).
    attested: dict[str, Any]


def vllm_parser() -> argparse.ArgumentParser:
    """Return vLLM's ``serve`` argument parser (imports vLLM)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser: argparse.ArgumentParser = make_arg_parser(FlexibleArgumentParser(prog="enclave-serve run --"))  # type: ignore[no-untyped-call]
    return parser


def normalize_option_value(value: Any) -> Any:
    """Return ``value`` as plain JSON data (enums by value, sets sorted, tuples as lists).

    Raises:
        TypeError: a value with no plain JSON form (a config object).
    """
    if isinstance(value, Enum):  # before int/str: IntEnum and StrEnum are both
        return normalize_option_value(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [normalize_option_value(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(normalize_option_value(v) for v in value)
    if isinstance(value, dict):
        return {
            str(k): normalize_option_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    raise TypeError(f"{type(value).__name__} has no plain JSON form")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(argv))
    except SystemExit:
        text = err.getvalue()
        # argparse prints the (very long) usage, then "prog: error: <what>" possibly over lines.
        detail = text.split(": error: ", 1)[1] if ": error: " in text else "cannot be parsed"
        detail = " ".join(detail.split())
        raise ConfigError(f"invalid vLLM arguments: {detail[:600]}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid vLLM arguments: {exc}") from None


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs:
                return longs[0]
            return action.option_strings[0] if action.option_strings else f"the positional argument ({dest})"
    return "--" + dest.replace("_", "-")


def parse_vllm_arguments(
    user_args: Sequence[str],
    *,
    runtime_args: Sequence[str],
    side_files: Mapping[str, Path],
    served_model_name: str,
    parser: argparse.ArgumentParser | None = None,
) -> VllmArguments:
    """Parse and check the pass-through arguments, then add the runtime's own.

    ``runtime_args`` are the options the runtime sets (``--model`` … ``--port``); ``side_files``
    maps each authenticated side file's manifest name to its private copy (``--chat-template``
    must name one); ``served_model_name`` is the name served when the user sets none.

    Raises:
        ConfigError: naming every refused option (by its flag) and why, or vLLM's own
            complaint about the arguments.
    """
    parser = parser if parser is not None else vllm_parser()
    # (1) --config would make vLLM read a host file into the arguments: refuse it unread.
    for arg in user_args:
        if re.fullmatch(r"--config(=.*)?", arg):
            raise ConfigError(f"vLLM option --config is refused: it {_FILES} (pass the options themselves)")
    # (2) Parse the pass-through alone and compare every option with vLLM's default.
    given = _parse(parser, user_args)
    defaults = _parse(parser, [])
    refused: list[str] = []
    for dest in sorted(set(vars(given)) | set(vars(defaults))):
        value, default = getattr(given, dest, _MISSING), getattr(defaults, dest, _MISSING)
        if value == default:
            continue
        flag = _flag(parser, dest)
        check = ALLOWED_OPTIONS.get(dest)
        if check is None:
            reason = REFUSED_OPTIONS.get(dest, "is not on enclave-serve's allowlist (docs/configuration.md)")
            refused.append(f"{flag} {reason}")
        elif (problem := check(value)) is not None:
            refused.append(f"{flag} {problem}")
    if refused:
        raise ConfigError("refused vLLM option(s): " + "; ".join(refused))
    # (3) A chat template must be one of the model's authenticated side files.
    template_name = given.chat_template
    if template_name is not None and template_name not in side_files:
        raise ConfigError(
            f"--chat-template {template_name!r} is not one of the model's authenticated files "
            f"({', '.join(sorted(side_files)) or 'none'}); pack the template with the model"
        )
    # (4) The runtime's own options last (they win), then vLLM's own consistency checks.
    final = _parse(parser, [*user_args, *runtime_args])
    if template_name is not None:
        final.chat_template = str(side_files[template_name])
    if final.served_model_name is None:
        final.served_model_name = [served_model_name]
    _validate(final)
    attested: dict[str, Any] = {}
    for dest in sorted(ALLOWED_OPTIONS):
        value = getattr(final, dest, None)
        if dest == "api_key" and value:
            value = _REDACTED
        elif dest == "chat_template":
            value = template_name
        try:
            attested[dest] = normalize_option_value(value)
        except TypeError as exc:
            raise ConfigError(f"{_flag(parser, dest)}: {exc}") from None
    return VllmArguments(namespace=final, attested=attested)


def _validate(args: argparse.Namespace) -> None:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    try:
        validate_parsed_serve_args(args)
    except Exception as exc:  # vLLM raises TypeError, ValueError and its own validation errors
        raise ConfigError(f"invalid vLLM arguments: {exc}") from None


def runtime_argv(
    *, model_view: Path, host: str, port: int, extra: Mapping[str, Any], tls_files: Collection[str] = ()
) -> list[str]:
    """Return the options the runtime sets itself (see :func:`parse_vllm_arguments`)."""
    argv = [
        "--model", str(model_view),
        "--load-format", LOAD_FORMAT,
        "--model-loader-extra-config", json.dumps(dict(extra)),
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if tls_files:
        keyfile, certfile = tls_files
        argv += ["--ssl-keyfile", keyfile, "--ssl-certfile", certfile]
    return argv
