"""The CPU KV cache's derived default: sized from the model and the options, never the machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from runtime.kv_cache import GIB, SEQUENCES, cpu_kv_cache_default, derive_kv_cache_size
from runtime.vllm_args import parse_vllm_arguments

# Llama 3 8B's shape: 32 layers, 8 KV heads of 128, bfloat16: 128 KiB of K and V per token.
LLAMA_8B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}
# The demo model (runtime.demo_model): 2 layers, 1 KV head of 64, 512 positions, bfloat16.
DEMO = {
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_size": 128,
    "max_position_embeddings": 512,
    "dtype": "bfloat16",
}


def test_llama_8b_at_8k_context_gets_room_for_four_full_sequences() -> None:
    size = derive_kv_cache_size(LLAMA_8B, max_model_len=8192)
    assert size is not None
    assert size.per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert (size.context, size.sequences) == (8192, SEQUENCES)
    assert size.nbytes == 4 * GIB and size.gib == 4


def test_a_tiny_model_gets_one_whole_gib_the_unit_vllm_cpu_takes() -> None:
    size = derive_kv_cache_size(DEMO)
    assert size is not None
    assert size.per_token == 2 * 2 * 1 * 64 * 2
    assert size.context == 512  # the model's own positions when --max-model-len is not given
    assert size.nbytes == GIB


def test_fewer_sequences_tensor_parallel_ranks_and_narrower_dtypes_shrink_it() -> None:
    one = derive_kv_cache_size(LLAMA_8B, max_model_len=8192, max_num_seqs=1)
    assert one is not None and (one.sequences, one.nbytes) == (1, GIB)
    halves = derive_kv_cache_size(LLAMA_8B, max_model_len=8192, tensor_parallel_size=2)
    assert halves is not None and halves.per_token == 64 * 1024
    fp8 = derive_kv_cache_size(LLAMA_8B, max_model_len=8192, kv_cache_dtype="fp8")
    assert fp8 is not None and fp8.per_token == 64 * 1024
    wide = derive_kv_cache_size(LLAMA_8B, max_model_len=8192, dtype="float32")
    assert wide is not None and wide.per_token == 256 * 1024 and wide.nbytes == 8 * GIB


def test_a_multimodal_config_is_sized_by_its_language_model() -> None:
    size = derive_kv_cache_size({"architectures": ["X"], "text_config": LLAMA_8B}, max_model_len=8192)
    assert size is not None and size.nbytes == 4 * GIB


def test_a_config_without_dtype_is_float32_and_head_dim_wins_over_hidden_size() -> None:
    shape = {k: v for k, v in LLAMA_8B.items() if k != "torch_dtype"} | {"head_dim": 256}
    size = derive_kv_cache_size(shape, max_model_len=1024)
    assert size is not None and size.per_token == 2 * 32 * 8 * 256 * 4


@pytest.mark.parametrize(
    "config",
    [
        {k: v for k, v in LLAMA_8B.items() if k != "num_hidden_layers"},
        {k: v for k, v in LLAMA_8B.items() if k != "hidden_size"},
        {k: v for k, v in LLAMA_8B.items() if k != "max_position_embeddings"},
        LLAMA_8B | {"torch_dtype": "float8_e3m4_exotic"},
        LLAMA_8B | {"num_hidden_layers": True},
        LLAMA_8B | {"num_hidden_layers": "32"},
    ],
    ids=["no layers", "no head dim", "no context", "unknown dtype", "bool layers", "string layers"],
)
def test_a_shape_it_cannot_read_leaves_vllms_default(config: dict[str, object]) -> None:
    assert derive_kv_cache_size(config) is None


def _args(**values: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "max_model_len": 512, "max_num_seqs": None, "dtype": "auto", "kv_cache_dtype": "auto",
        "tensor_parallel_size": 1, "kv_cache_memory_bytes": None, "gpu_memory_utilization": 0.92,
    }  # fmt: skip
    return argparse.Namespace(**(base | values))


@pytest.fixture
def view(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(DEMO))
    return tmp_path


def test_an_engine_nothing_sizes_gets_the_derived_bytes(view: Path) -> None:
    args = _args()
    size = cpu_kv_cache_default(args, given=frozenset({"max_model_len"}), model_view=view, environ={})
    assert size is not None and args.kv_cache_memory_bytes == size.nbytes == GIB
    assert size.describe().startswith("1 GiB: 4 sequence(s) of 512 tokens at 512 bytes per token")


@pytest.mark.parametrize(
    "given, environ",
    [
        (frozenset({"gpu_memory_utilization"}), {}),
        (frozenset({"kv_cache_memory_bytes"}), {}),
        (frozenset(), {"VLLM_CPU_KVCACHE_SPACE": "3"}),
    ],
    ids=["a memory fraction", "a byte count", "the environment variable"],
)
def test_the_operators_own_sizing_wins(view: Path, given: frozenset[str], environ: dict[str, str]) -> None:
    args = _args(gpu_memory_utilization=0.5)
    assert cpu_kv_cache_default(args, given=given, model_view=view, environ=environ) is None
    assert args.kv_cache_memory_bytes is None and args.gpu_memory_utilization == 0.5


def test_a_model_view_without_a_readable_config_leaves_vllms_default(tmp_path: Path) -> None:
    args = _args()
    assert cpu_kv_cache_default(args, given=frozenset(), model_view=tmp_path, environ={}) is None
    (tmp_path / "config.json").write_text("[1, 2")
    assert cpu_kv_cache_default(args, given=frozenset(), model_view=tmp_path, environ={}) is None
    assert args.kv_cache_memory_bytes is None


RUNTIME = ["--model", "/private/model", "--host", "127.0.0.1", "--port", "8000"]


@pytest.mark.parametrize(
    "user, expected",
    [
        ([], frozenset()),
        (["--gpu-memory-utilization", "0.5"], frozenset({"gpu_memory_utilization"})),
        (
            ["--kv-cache-memory-bytes", "2G", "--max-model-len", "512"],
            frozenset({"kv_cache_memory_bytes", "max_model_len"}),
        ),
    ],
)
def test_the_parsed_arguments_record_what_the_operator_set(
    parser: argparse.ArgumentParser, user: list[str], expected: frozenset[str]
) -> None:
    parsed = parse_vllm_arguments(
        user, runtime_args=RUNTIME, side_files={}, served_model_name="tiny", parser=parser
    )
    assert parsed.given == expected  # the runtime's own options (--model, --port...) are not the operator's
