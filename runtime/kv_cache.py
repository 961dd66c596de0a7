"""The CPU KV cache's size when nothing sets it: derived from the model, not from the machine.

vLLM's CPU backend, told nothing, reserves ``--gpu-memory-utilization`` (0.92) of the machine's
*total* memory and fails to start on any machine where other processes use more than a tenth of
it ("Available memory … is less than desired CPU memory utilization"). Every CPU boot then
needed ``VLLM_CPU_KVCACHE_SPACE`` declared in the init-data and set in the pod.

The runtime instead sizes the cache for :data:`SEQUENCES` sequences of the full context length,
from the model's shape (its authenticated ``config.json``) and the attested vLLM options:

    bytes = 2 (K and V) * layers * KV heads per rank * head dim * dtype bytes * context * sequences

rounded up to whole GiB (at least 1 GiB), the unit ``VLLM_CPU_KVCACHE_SPACE`` takes. The
result depends only on attested inputs (the model digest pins ``config.json``; the options are
declared), so it needs no declaration of its own, and it is the same on every machine. Anything
that sets the size (``VLLM_CPU_KVCACHE_SPACE``, ``--kv-cache-memory-bytes``) or asks for a
fraction of memory (``--gpu-memory-utilization``) wins; GPUs are never touched.

Overestimates (never under): sliding-window and MLA models, and pipeline parallelism, need less.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GIB", "SEQUENCES", "KvCacheSize", "cpu_kv_cache_default", "derive_kv_cache_size"]

GIB = 1 << 30
#: Full-length sequences the derived cache holds (fewer when ``--max-num-seqs`` is smaller).
SEQUENCES = 4
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "float16": 2, "half": 2, "fp16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class KvCacheSize:
    """A derived KV cache size and how it was reached."""

    nbytes: int  # whole GiB
    per_token: int
    context: int
    sequences: int

    @property
    def gib(self) -> int:
        return self.nbytes // GIB

    def describe(self) -> str:
        return (
            f"{self.gib} GiB: {self.sequences} sequence(s) of {self.context} tokens at {self.per_token} "
            "bytes per token, derived from the model (set VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes "
            "to choose)"
        )


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a (possibly multimodal) Hugging Face config."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def _positive_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dtype_bytes(kv_cache_dtype: str | None, dtype: str | None, config: Mapping[str, Any]) -> int | None:
    for name in (kv_cache_dtype, dtype, config.get("torch_dtype"), config.get("dtype")):
        if isinstance(name, str) and name != "auto":
            return _DTYPE_BYTES.get(name.removeprefix("torch."))
    return 4 if dtype in (None, "auto") else None  # a config without a dtype loads as float32


def derive_kv_cache_size(
    config: Mapping[str, Any],
    *,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
    tensor_parallel_size: int = 1,
) -> KvCacheSize | None:
    """Size a KV cache for :data:`SEQUENCES` full-length sequences of the model ``config`` describes.

    ``config`` is the model's ``config.json``; the keyword arguments are vLLM's options of the same
    names (None: not given). Returns None when the config lacks the shape (layers, heads, a
    context length where ``max_model_len`` is not given) or names an unknown dtype: the caller
    then leaves vLLM's own default.
    """
    text = _text_config(config)
    layers = _positive_int(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _positive_int(text, "num_attention_heads", "n_head")
    if layers is None or heads is None:
        return None
    kv_heads = _positive_int(text, "num_key_value_heads", "multi_query_group_num") or heads
    head_dim = _positive_int(text, "head_dim")
    if head_dim is None:
        hidden = _positive_int(text, "hidden_size", "n_embd")
        if hidden is None:
            return None
        head_dim = hidden // heads
    context = max_model_len or _positive_int(text, *_CONTEXT_KEYS)
    width = _dtype_bytes(kv_cache_dtype, dtype, text)
    if context is None or width is None or head_dim < 1:
        return None
    per_rank_heads = max(1, math.ceil(kv_heads / max(1, tensor_parallel_size)))
    per_token = 2 * layers * per_rank_heads * head_dim * width
    sequences = min(SEQUENCES, max_num_seqs) if max_num_seqs else SEQUENCES
    nbytes = max(1, math.ceil(per_token * context * sequences / GIB)) * GIB
    return KvCacheSize(nbytes=nbytes, per_token=per_token, context=context, sequences=sequences)


def cpu_kv_cache_default(
    args: argparse.Namespace, *, given: Collection[str], model_view: Path, environ: Mapping[str, str]
) -> KvCacheSize | None:
    """Set ``args.kv_cache_memory_bytes`` for a CPU engine that nothing else sizes; return the size.

    Call it only for vLLM's CPU platform. ``args`` are the parsed, checked vLLM options and
    ``given`` the options the operator set (:attr:`runtime.vllm_args.VllmArguments.given`);
    ``model_view`` the private model directory vLLM reads (its authenticated ``config.json``);
    ``environ`` the environment the engine starts with. Leaves ``args`` as they are (returns None)
    when ``VLLM_CPU_KVCACHE_SPACE`` is set, ``--kv-cache-memory-bytes`` or
    ``--gpu-memory-utilization`` is given, or the model's shape cannot be read.
    """
    if environ.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        return None
    if {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(given):
        return None
    if getattr(args, "kv_cache_memory_bytes", None) is not None:
        return None
    try:
        config = json.loads((model_view / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, Mapping):
        return None
    size = derive_kv_cache_size(
        config,
        max_model_len=getattr(args, "max_model_len", None),
        max_num_seqs=getattr(args, "max_num_seqs", None),
        dtype=getattr(args, "dtype", None),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None) or 1,
    )
    if size is not None:
        args.kv_cache_memory_bytes = size.nbytes
    return size
