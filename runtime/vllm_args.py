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

Values, not only names: every allowed option has a typed check (an enumeration, a range, a
short pattern), and **no host text reaches a prompt**. The strings that can reach the model's
input are the chat template's variables (``--default-chat-template-kwargs``: a few switches
taking a boolean or a number, :data:`CHAT_TEMPLATE_SWITCHES`), the answer's role
(``--response-role``: clients send it back as the next turn's role) and the chat template
itself (an authenticated side file); ``--override-generation-config`` takes sampling numbers
only (:data:`GENERATION_DEFAULTS`); names that clients see (``--served-model-name``) are
plain. Log-probabilities are capped at 20 per token and only processed ones are returned.

Where vLLM's default opens a channel, the runtime has its own (:data:`RUNTIME_DEFAULTS`:
prefix caching off, processed log-probabilities): the comparison runs against it, so an
explicit ``--enable-prefix-caching`` is allowed and attested and ``--logprobs-mode
raw_logits`` is refused.

A chat template, the one file a user legitimately passes, must be one of the model's
authenticated side files: ``--chat-template NAME`` names it in the manifest and is pointed at
the private copy.

The options the runtime sets itself (model path, load format, loader configuration, host,
port, TLS files) are added after the check. The attested configuration carries the options as
declared (:func:`redact_secret_options`: secrets redacted); :attr:`VllmArguments.attested` is
every allowed option's effective value, secrets redacted, as the declared vLLM version gives it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError
from loader import LOAD_FORMAT

__all__ = [
    "ALLOWED_OPTIONS",
    "CHAT_TEMPLATE_SWITCHES",
    "GENERATION_DEFAULTS",
    "REFUSED_OPTIONS",
    "RUNTIME_DEFAULTS",
    "SECRET_OPTIONS",
    "VllmArguments",
    "default_served_name",
    "normalize_option_value",
    "parse_vllm_arguments",
    "redact_secret_options",
    "runtime_argv",
    "secret_options",
    "vllm_parser",
]

Check = Callable[[Any], str | None]  # returns why a value is refused, or None

_MISSING = object()
_REDACTED = "<redacted>"
#: Options whose values are secrets (vLLM's API keys, one or more): redacted wherever the
#: options are declared or attested, and never put into an init-data.
SECRET_OPTIONS = ("--api-key",)


def secret_options(argv: Sequence[str]) -> list[str]:
    """The secret options (:data:`SECRET_OPTIONS`) ``argv`` gives, in either spelling."""
    return [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in SECRET_OPTIONS]


def redact_secret_options(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` with every value of a secret option replaced by ``<redacted>``.

    ``--api-key=K`` and ``--api-key K1 K2 …`` (the option takes one or more values: every token
    up to the next option is one).
    """
    out: list[str] = []
    secret = False
    for arg in argv:
        name, eq, _value = arg.partition("=")
        if arg.startswith("-"):
            secret = name in SECRET_OPTIONS and not eq
            out.append(f"{name}={_REDACTED}" if eq and name in SECRET_OPTIONS else arg)
        else:
            out.append(_REDACTED if secret else arg)
    return tuple(out)


# -- Value checks ---------------------------------------------------------------------------
# Every allowed option gets one: the value argparse produced (already typed by vLLM's parser)
# must have the expected type and lie in a safe range, and no option takes free text. The
# messages never repeat the host's value (it may be long, or aimed at whoever reads the reason).


class _OneOf:
    """A value from a fixed enumeration (``values`` is read by a test against vLLM's choices)."""

    def __init__(self, *values: object) -> None:
        self.values = values

    def __call__(self, value: Any) -> str | None:
        if isinstance(value, Enum):
            value = value.value
        return None if value in self.values else f"must be one of {', '.join(map(str, self.values))}"


def _boolean(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "must be a boolean"


def _integer(low: int, high: int | None = None, *, optional: bool = False) -> Check:
    span = f"at least {low}" if high is None else f"from {low} to {high}"

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and low <= value
            and (high is None or value <= high)
        ):
            return None
        return f"must be an integer {span}"

    return check


def _number(low: float, high: float | None = None, *, above: bool = False) -> Check:
    """A finite number ``>= low`` (``> low`` with ``above``) and ``<= high``; booleans are not numbers."""
    span = f"{'above' if above else 'at least'} {low:g}" + ("" if high is None else f" and at most {high:g}")

    def check(value: Any) -> str | None:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > low if above else value >= low)
            and (high is None or value <= high)
        ):
            return None
        return f"must be a finite number {span}"

    return check


def _text(pattern: str, what: str, *, optional: bool = False) -> Check:
    """A string matching ``pattern`` in full (ASCII only: ``re.ASCII``)."""
    compiled = re.compile(pattern, re.ASCII)

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        return None if isinstance(value, str) and compiled.fullmatch(value) else f"must be {what}"

    return check


def _list_of(item: Check, *, most: int, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, list | tuple) or len(value) > most:
            return f"must be a list of at most {most} values"
        for entry in value:
            if (problem := item(entry)) is not None:
                return f"has an entry that {problem}"
        return None

    return check


def _shown_key(key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", key, re.ASCII):
        return repr(key)
    return "(not a short identifier)"


def _json_object(allowed: Mapping[str, Check], what: str, values: str = "booleans or numbers") -> Check:
    """A JSON object whose every key is in ``allowed`` and whose value passes that key's check.

    The checks in ``allowed`` take booleans or numbers only: no string reaches vLLM this way.
    """
    names = ", ".join(sorted(allowed))

    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            return f"must be a JSON object of {what}"
        for key in sorted(value, key=str):
            if key not in allowed:
                return f"key {_shown_key(key)} is not allowed (allowed: {names}; values are {values})"
            if (problem := allowed[key](value[key])) is not None:
                return f"key {key!r} {problem}"
        return None

    return check


def _optimization_level(value: Any) -> str | None:
    if isinstance(value, Enum):  # vLLM's default is OptimizationLevel.O2; -O3 parses to "3"
        value = value.value
    return (
        None if not isinstance(value, bool) and str(value) in {"0", "1", "2", "3"} else "must be 0, 1, 2 or 3"
    )


def _max_model_len(value: Any) -> str | None:
    if value == -1 and not isinstance(value, bool):  # "auto" parses to -1
        return None
    return None if _integer(1, optional=True)(value) is None else "must be a positive integer or auto"


def _built_in_parser(kind: str) -> Check:
    """The name of one of vLLM's built-in tool-call or reasoning parsers (no plugin is loaded)."""

    def check(value: Any) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value, re.ASCII):
            return f"must name one of vLLM's built-in {kind} parsers"
        if kind == "tool-call":
            from vllm.tool_parsers import ToolParserManager as manager
        else:
            from vllm.reasoning import ReasoningParserManager as manager  # type: ignore[assignment]
        registered = set(manager.list_registered())
        return None if value in registered else f"must name one of vLLM's built-in {kind} parsers"

    return check


def _attention_backend(value: Any) -> str | None:
    """``auto`` or the name of one of vLLM's built-in backends (``CUSTOM`` needs a plugin)."""
    if value is None:
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if isinstance(value, AttentionBackendEnum):
        value = value.name
    names = {member.name for member in AttentionBackendEnum} - {"CUSTOM"}
    if isinstance(value, str) and (value.lower() == "auto" or value.upper() in names):
        return None
    return "must be auto or name one of vLLM's built-in attention backends"


#: ``--override-generation-config``: the sampling defaults vLLM reads from it
#: (``ModelConfig.get_diff_sampling_param``: it ignores every other key) with the ranges
#: ``SamplingParams`` accepts. Numbers only: stop strings, a system prompt or anything else
#: textual cannot be set this way.
GENERATION_DEFAULTS: Mapping[str, Check] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, above=True),
    "top_k": _integer(-1),  # 0 or -1: off
    "min_p": _number(0, 1),
    "repetition_penalty": _number(0, above=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "max_new_tokens": _integer(1),
}

#: ``--default-chat-template-kwargs``: the switches model families' chat templates read, with a
#: boolean or number each. Every string a template receives is rendered into every prompt (a
#: ``date_string`` carrying instructions is the attack), so no key takes a string.
CHAT_TEMPLATE_SWITCHES: Mapping[str, Check] = {
    "enable_thinking": _boolean,  # Qwen3 and most hybrid-reasoning templates
    "thinking": _boolean,  # DeepSeek-V3.1, Granite
    "thinking_budget": _integer(-1),  # Seed-OSS (-1: unlimited)
    "tools_in_user_message": _boolean,  # Llama 3.x
    "add_vision_id": _boolean,  # Qwen2-VL family
}

# Multimodal limits: a count, or a count with the dummy input's size (vLLM's *DummyOptions).
_MM_LIMIT = _json_object(
    {
        "count": _integer(0),
        "width": _integer(1),
        "height": _integer(1),
        "num_frames": _integer(1),
        "length": _integer(1),
    },
    "multimodal limits",
    "integers",
)


def _mm_limits(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be a JSON object of modality limits"
    for modality, limit in value.items():
        if not isinstance(modality, str) or not re.fullmatch(r"[a-z_]{1,32}", modality, re.ASCII):
            return f"key {_shown_key(modality)} is not a modality name"
        problem = _MM_LIMIT(limit) if isinstance(limit, dict) else _integer(0)(limit)
        if problem is not None:
            return f"key {modality!r} {problem}"
    return None


#: A served model name: it is returned in every response and listed at ``/v1/models``, where
#: clients and agent frameworks pick it up (some put it into their own prompts).
_SERVED_NAME = _text(
    r"[A-Za-z0-9._:/@+-]{1,256}", "a model name of letters, digits and ._:/@+- (at most 256)"
)
#: The role name of the model's answers: clients send it back as the role of the assistant's
#: turn in the next request, and templates render roles into the prompt verbatim.
_ROLE = _text(
    r"(?!(?:system|developer|user|tool|function|ipython)\Z)[a-z][a-z0-9_]{0,31}",
    "a lowercase role name (not system, developer, user, tool, function or ipython)",
)
#: RFC 6750 b64token: what an ``Authorization: Bearer`` header can carry.
_BEARER = _text(r"[A-Za-z0-9._~+/-]{1,512}=*", "a bearer token (letters, digits and ._~+/-)")
_URL_PATH = r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+"
_CPU_LIST = r"\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*"


#: Options that may differ from vLLM's default, with the check their value must pass.
ALLOWED_OPTIONS: Mapping[str, Check] = {
    # What is served and under which name.
    "served_model_name": _list_of(_SERVED_NAME, most=8, optional=True),  # the default too, below
    "runner": _OneOf("auto", "generate", "pooling"),
    "convert": _OneOf("auto", "classify", "embed", "none"),
    "dtype": _OneOf("auto", "bfloat16", "float", "float16", "float32", "half"),
    "quantization": _OneOf(None, "fp8"),
    "kv_cache_dtype": _OneOf("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "seed": _integer(0, 2**32 - 1),  # NumPy's seed range; vLLM seeds NumPy, PyTorch and random
    "max_model_len": _max_model_len,
    "max_logprobs": _integer(0, 20),  # -1 would mean the whole vocabulary
    # Log-probabilities after the request's processing only; logits (raw, or processed: the
    # same for a greedy request without penalties or bias) are the projection's own output.
    "logprobs_mode": _OneOf("processed_logprobs"),
    "tokenizer_mode": _OneOf("auto", "hf"),
    "config_format": _OneOf("auto", "hf"),
    "generation_config": _OneOf("auto", "vllm"),  # "auto" reads the model's attested file
    "override_generation_config": _json_object(GENERATION_DEFAULTS, "sampling defaults", "numbers"),
    "model_impl": _OneOf("auto", "vllm", "transformers"),
    "skip_tokenizer_init": _boolean,
    "disable_sliding_window": _boolean,
    "disable_cascade_attn": _boolean,
    # Chat and tools (parsers by built-in name; plugin files are refused).
    "chat_template": _text(  # and one of the manifest's side files: parse_vllm_arguments
        r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,3}",
        "the name of one of the model's authenticated files",
        optional=True,
    ),
    "chat_template_content_format": _OneOf("auto", "openai", "string"),
    "default_chat_template_kwargs": _json_object(CHAT_TEMPLATE_SWITCHES, "chat template switches"),
    "response_role": _ROLE,
    "enable_auto_tool_choice": _boolean,
    "exclude_tools_when_tool_choice_none": _boolean,
    "tool_call_parser": _built_in_parser("tool-call"),
    "tool_strict_level": _OneOf("auto", "function", "parameter"),
    "reasoning_parser": _built_in_parser("reasoning"),
    "return_tokens_as_token_ids": _boolean,
    "enable_prompt_tokens_details": _boolean,
    "enable_force_include_usage": _boolean,
    "enable_server_load_tracking": _boolean,
    "enable_tokenizer_info_endpoint": _boolean,
    "sse_keep_alive_interval": _integer(0, 3600),
    # HTTP front end.
    "api_key": _list_of(_BEARER, most=16, optional=True),  # attested as <redacted>
    "root_path": _text(_URL_PATH, "a URL path such as /llm", optional=True),
    "allowed_origins": _list_of(
        _text(
            r"\*|https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:\d{1,5})?",
            "an origin (scheme://host[:port]) or *",
        ),
        most=64,
    ),
    "allowed_methods": _list_of(_text(r"\*|[A-Za-z]{1,16}", "an HTTP method or *"), most=16),
    "allowed_headers": _list_of(_text(r"\*|[A-Za-z0-9-]{1,64}", "a header name or *"), most=64),
    "allow_credentials": _boolean,
    "enable_request_id_headers": _boolean,
    "disable_fastapi_docs": _boolean,
    "h11_max_incomplete_event_size": _integer(1),
    "h11_max_header_count": _integer(1),
    "disable_uvicorn_access_log": _boolean,
    "disable_access_log_for_endpoints": _text(
        f"{_URL_PATH}(,{_URL_PATH})*", "comma-separated URL paths", optional=True
    ),
    "uvicorn_log_level": _OneOf("critical", "error", "warning", "info"),  # debug/trace log bodies
    "disable_log_stats": _boolean,
    "aggregate_engine_logging": _boolean,
    "show_hidden_metrics_for_version": _text(
        r"\d{1,3}\.\d{1,3}(\.\d{1,3})?", "a version such as 0.31", optional=True
    ),
    "shutdown_timeout": _integer(0),
    # Parallelism inside the one confidential VM.
    "tensor_parallel_size": _integer(1),
    "pipeline_parallel_size": _integer(1),
    "enable_expert_parallel": _boolean,
    "distributed_executor_backend": _OneOf(None, "mp", "uni"),
    "disable_custom_all_reduce": _boolean,
    "max_parallel_loading_workers": _integer(1, optional=True),
    "distributed_timeout_seconds": _integer(1, optional=True),
    "cpu_distributed_timeout_seconds": _integer(1, optional=True),
    "device_ids": _list_of(_integer(0), most=64, optional=True),
    "numa_bind": _boolean,
    "numa_bind_nodes": _list_of(_integer(0), most=64, optional=True),
    "numa_bind_cpus": _list_of(_text(_CPU_LIST, "a CPU list such as 0-31,64-95"), most=64, optional=True),
    # Memory and cache sizes.
    "block_size": _integer(1, optional=True),
    "gpu_memory_utilization": _number(0, 1, above=True),
    "kv_cache_memory_bytes": _integer(1, optional=True),
    "num_gpu_blocks_override": _integer(1, optional=True),
    # Off unless given (RUNTIME_DEFAULTS): shared prefix blocks are a cross-user timing channel.
    "enable_prefix_caching": _boolean,
    "prefix_caching_hash_algo": _OneOf("sha256", "sha256_cbor"),  # xxhash collides on purpose
    "cpu_offload_gb": _number(0),
    "mm_processor_cache_gb": _number(0),
    "limit_mm_per_prompt": _mm_limits,
    # Scheduling and execution.
    "max_num_seqs": _integer(1, optional=True),
    "max_num_batched_tokens": _integer(1, optional=True),
    "max_num_scheduled_tokens": _integer(1, optional=True),
    "max_num_queued_reqs": _integer(1, optional=True),
    "long_prefill_token_threshold": _integer(0),
    "scheduling_policy": _OneOf("fcfs", "priority"),
    "enable_chunked_prefill": _boolean,
    "async_scheduling": _boolean,
    "stream_interval": _integer(1),
    "enforce_eager": _boolean,
    "cudagraph_capture_sizes": _list_of(_integer(1), most=512, optional=True),
    "max_cudagraph_capture_size": _integer(1, optional=True),
    "optimization_level": _optimization_level,
    "performance_mode": _OneOf("balanced", "interactivity", "throughput"),
    "attention_backend": _attention_backend,
    "renderer_num_workers": _integer(1),
    "use_tqdm_on_load": _boolean,
    "fail_on_environ_validation": _boolean,
}

#: The runtime's own defaults where vLLM's open a channel to clients or between them. They
#: replace vLLM's defaults before the comparison, so an option given explicitly is checked
#: against them (``--logprobs-mode raw_logprobs`` is refused; ``--enable-prefix-caching`` is
#: allowed and attested as ``true``).
RUNTIME_DEFAULTS: Mapping[str, Any] = {
    # vLLM enables prefix caching for generative models; a request that reuses another's cached
    # prefix is answered measurably sooner, which tells one API client another's prompt prefix.
    "enable_prefix_caching": False,
    # vLLM's default, raw_logprobs, is refused above.
    "logprobs_mode": "processed_logprobs",
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
    #: The options the pass-through arguments set to other than their default (by ``dest``).
    given: frozenset[str] = frozenset()


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
    """Parse ``argv`` with :data:`RUNTIME_DEFAULTS` in place of vLLM's defaults for those options."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            # argparse sets a default only where the namespace lacks the attribute.
            return parser.parse_args(list(argv), namespace=argparse.Namespace(**RUNTIME_DEFAULTS))
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


def default_served_name(model: str) -> str:
    """Derive the name served by default from the model argument of ``run`` (attested).

    A directory: its base name (``/models/tiny-encrypted`` → ``tiny-encrypted``). An image: the
    repository name without the registry, tag or digest (``docker://registry.example/org/llama@sha256:…``
    → ``org/llama``), or the layout directory's base name (``oci:/images/llama@sha256:…`` →
    ``llama``). Deterministic from the argument alone, so the run configuration that claims it
    is still computed from the declaration.
    """
    if model.startswith("docker://"):
        name = model[len("docker://") :].rpartition("@")[0] or model[len("docker://") :]
        _host, _, repository = name.partition("/")
        head, slash, last = repository.rpartition("/")
        return head + slash + last.partition(":")[0]
    if model.startswith("oci:"):
        model = model[len("oci:") :].rpartition("@")[0] or model[len("oci:") :]
    return os.path.basename(os.path.normpath(model)) if model else ""


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
    must name one); ``served_model_name`` is the model argument of ``run``, from which the name
    served when the user sets none is derived (:func:`default_served_name`).

    Every option that differs from its default must be allowed and pass its value check
    (:data:`ALLOWED_OPTIONS`); the defaults are vLLM's except :data:`RUNTIME_DEFAULTS` (prefix
    caching off, processed log-probabilities). Not checked: what the model's own authenticated
    files (chat template, generation config) contain, and any option's effect on performance.

    Raises:
        ConfigError: naming every refused option (by its flag) and why, or vLLM's own
            complaint about the arguments. A failed value check names the option (and a key
            that is a short identifier), never the host's value.
    """
    parser = parser if parser is not None else vllm_parser()
    # (1) --config would make vLLM read a host file into the arguments: refuse it unread.
    for arg in user_args:
        if re.fullmatch(r"--config(=.*)?", arg):
            raise ConfigError(f"vLLM option --config is refused: it {_FILES} (pass the options themselves)")
    # (2) Parse the pass-through alone and compare every option with its default (vLLM's, or
    #     the runtime's own where vLLM's opens a channel: RUNTIME_DEFAULTS).
    given = _parse(parser, user_args)
    defaults = _parse(parser, [])
    refused: list[str] = []
    changed: set[str] = set()
    for dest in sorted(set(vars(given)) | set(vars(defaults))):
        value, default = getattr(given, dest, _MISSING), getattr(defaults, dest, _MISSING)
        if value == default:
            continue
        changed.add(dest)
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
        # From the model argument of `run` (host text as well): the same check as --served-model-name.
        default_name = default_served_name(served_model_name)
        if default_name in ("", ".", "..") or _SERVED_NAME(default_name) is not None:
            raise ConfigError(
                "the served model name defaults to the model's directory or repository name, which "
                "is not a plain name here (letters, digits and ._:/@+-, at most 256): pass "
                "--served-model-name NAME after '--'"
            )
        final.served_model_name = [default_name]
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
    return VllmArguments(namespace=final, attested=attested, given=frozenset(changed))


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
