"""Regenerate the encrypted-format test vectors (run from the repository root):

    python tests/vectors/format/generate_vectors.py

Writes ``source/`` (a plaintext Hugging Face-style model) and ``encrypted/`` (its packing with a
fixed key and fixed salts). Only rerun when the format version changes: the committed bytes pin
format version 1.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from foundation.secret import SecretBytes  # noqa: E402
from loader.packer import pack_model  # noqa: E402

KEY = bytes(range(32))  # 000102…1f
KEY_ID = "kbs:///enclave-serve/model-key/vector"
CHUNK_SIZE = 4096
SHARD_SALT = b"\x11" * 32
MANIFEST_SALT = b"\x22" * 32


def fixed_randbytes() -> object:
    """Randomness for the packer: the two fixed salts, in the order the packer asks for them."""
    salts = [SHARD_SALT, MANIFEST_SALT]

    def randbytes(n: int) -> bytes:
        if n == 32:
            return salts.pop(0)
        return b"\x00" * n  # temporary directory names: not part of the output

    return randbytes


def write_source(path: Path) -> None:
    path.mkdir(parents=True)
    tensors = {
        "a.weight": (torch.arange(3000, dtype=torch.float32) * 0.001).reshape(50, 60).to(torch.bfloat16),
        "b.bias": torch.arange(10, dtype=torch.float32),
        "c.empty": torch.zeros(0, 4),
        "d.ids": torch.arange(1500, dtype=torch.int32),
    }
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text('{"architectures": ["VectorModel"]}\n')


def main() -> None:
    for d in ("source", "encrypted"):
        shutil.rmtree(HERE / d, ignore_errors=True)
    write_source(HERE / "source")
    manifest = pack_model(
        HERE / "source",
        HERE / "encrypted",
        key=SecretBytes(KEY),
        key_id=KEY_ID,
        chunk_size=CHUNK_SIZE,
        threads=1,
        randbytes=fixed_randbytes(),  # type: ignore[arg-type]
    )
    print(manifest.digest)


if __name__ == "__main__":
    main()
