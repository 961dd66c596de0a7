"""Fixtures for the loader tests: small random safetensors models, packed with a fixed key."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from foundation.secret import SecretBytes
from loader.format import MIN_CHUNK_SIZE
from loader.manifest import Manifest
from loader.oci.packer import pack_oci_layout
from loader.packer import pack_model
from tests import oci_support as oci

KEY = SecretBytes(bytes(range(32)))
OTHER_KEY = SecretBytes(bytes(range(1, 33)))
KEY_ID = "kbs:///enclave-serve/model-key/test"
CHUNK = MIN_CHUNK_SIZE  # 4 KiB: most tensors span several chunks
MARKER = b"PLAINTEXT-MARKER-0123456789"


def model_tensors(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three shards: bf16, f16, f32, i64, u8, bool, a scalar, an empty tensor; the first two shards
    have identical layouts (for splicing tests)."""
    g = torch.Generator().manual_seed(seed)

    def layer(i: int) -> dict[str, torch.Tensor]:
        return {
            f"model.layers.{i}.attn.q_proj.weight": torch.randn(48, 64, generator=g).to(torch.bfloat16),
            f"model.layers.{i}.attn.o_proj.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
            f"model.layers.{i}.mlp.up.weight": torch.randn(40, 64, generator=g).half(),
            f"model.layers.{i}.norm.weight": torch.randn(64, generator=g),
        }

    shard3 = {
        "model.embed_tokens.weight": torch.randn(100, 64, generator=g).to(torch.bfloat16),
        "model.pos": torch.arange(3000, dtype=torch.int64),
        "model.marker": torch.frombuffer(bytearray(MARKER * 200), dtype=torch.uint8),
        "model.mask": torch.rand(777, generator=g) > 0.5,
        "model.scale": torch.tensor(0.125),
        "model.empty": torch.empty(0, 8),
    }
    return [layer(0), layer(1), shard3]


def write_model(path: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    """Write a Hugging Face-style directory: shards, config, tokenizer."""
    path.mkdir(parents=True)
    n = len(shards)
    for i, tensors in enumerate(shards, 1):
        save_file(tensors, path / f"model-{i:05d}-of-{n:05d}.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (path / "generation_config.json").write_text('{"temperature": 0.7}')
    return path


def as_bytes(t: torch.Tensor) -> bytes:
    """Return the raw bytes of a tensor (bit-exact comparison, NaN-safe)."""
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="session")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("hf") / "model", model_tensors())


@pytest.fixture(scope="session")
def reference(source_model: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in model_tensors():
        out.update(shard)
    return out


@pytest.fixture(scope="session")
def packed_pristine(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("enc") / "model"
    pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK, threads=2)
    return dst


@pytest.fixture
def packed(packed_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the packed model, free to tamper with."""
    dst = tmp_path / "enc"
    shutil.copytree(packed_pristine, dst)
    return dst


#: The ways the one decrypt engine delivers a tensor: straight into host memory ("host"),
#: through the staging ring and copy thread of the GPU path into host memory ("staged": all of
#: the GPU path but the CUDA copy), and into CUDA memory ("cuda", where a GPU is present).
ENGINE_PATHS = [
    "host",
    "staged",
    pytest.param(
        "cuda",
        marks=pytest.mark.gpu,
    ),
]


def path_options(path: str) -> dict[str, object]:
    """Engine options for one of :data:`ENGINE_PATHS` (4 KiB staging slots: the ring cycles)."""
    from loader.staging import StagingOptions

    return {
        "stage_host_copies": path == "staged",
        "staging": StagingOptions(slot_bytes=CHUNK, slots=3),
    }


def engine_load(
    model_dir: Path, key: SecretBytes = KEY, *, path: str = "host", **kw: object
) -> dict[str, torch.Tensor]:
    """Load as vLLM's loader does: copy every EncryptedTensor into a preallocated destination
    (host copies overlapped, as the loader plugin runs them)."""
    from loader.lazy import LazyCheckpoint

    device = "cuda" if path == "cuda" else "cpu"
    options = {"threads": 2, "overlap_host_copies": path == "host", **path_options(path), **kw}
    out: dict[str, torch.Tensor] = {}
    with LazyCheckpoint.open(model_dir, Manifest.load(model_dir), key, **options) as checkpoint:  # type: ignore[arg-type]
        for name, lazy in checkpoint.tensors():
            dst = torch.ones(lazy.shape, dtype=lazy.dtype, device=device)  # not zeros: prove the write
            dst.copy_(lazy)
            out[name] = dst
        checkpoint.synchronize()
        assert checkpoint.materialized == 0
    out = {name: t.cpu() for name, t in out.items()}
    return out


@pytest.fixture(params=ENGINE_PATHS)
def engine_path(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    return path


@pytest.fixture
def load_all(engine_path: str) -> Callable[..., dict[str, torch.Tensor]]:
    """The streaming adapter (``decrypted_tensors``) on each engine path."""
    from loader.pipeline import decrypted_tensors

    def run(model_dir: Path, key: SecretBytes = KEY, **kw: object) -> dict[str, torch.Tensor]:
        manifest = Manifest.load(model_dir)
        options = {"device": "cuda" if engine_path == "cuda" else "cpu", **path_options(engine_path), **kw}
        return {name: t.cpu().clone() for name, t in decrypted_tensors(model_dir, manifest, key, **options)}  # type: ignore[arg-type]

    return run


# -- encrypted OCI images (skopeo), shared by the OCI tests; tests copy them before editing --


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, oci.Recipient]:
    root = tmp_path_factory.mktemp("keys")
    return {kind: oci.make_recipient(root, kind) for kind in ("ec", "rsa")}


@pytest.fixture(scope="session")
def plain_layout(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("oci") / "plain"
    pack_oci_layout(source_model, out)
    return out


@pytest.fixture(scope="session")
def images(
    plain_layout: Path, keys: dict[str, oci.Recipient], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    """The same model encrypted four ways: (layout, manifest digest)."""
    root = tmp_path_factory.mktemp("enc")
    out = {}
    for name, kind, compression in (
        ("ec", "ec", "none"),
        ("rsa-gzip", "rsa", "gzip"),
        ("ec-zstd", "ec", "zstd"),
    ):
        out[name] = (root / name, oci.encrypt(plain_layout, root / name, keys[kind], compression=compression))
    return out
