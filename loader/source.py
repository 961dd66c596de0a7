"""What the decrypt engine reads from: a :class:`TensorSource`, plus the dtype table and defaults.

A source lists its tensors and fills any piece of them, from any thread, into a caller-provided
buffer, raising on any integrity failure. :class:`loader.shard.EncryptedShard` (the native
encrypted safetensors shard) is one; a decrypted OCI layer stream can be another.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from loader.format import TensorEntry
from loader.shard import Piece

__all__ = ["TORCH_DTYPES", "TensorSource", "default_threads"]

#: torch dtype of each safetensors dtype (safetensors ``Dtype``).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}


class TensorSource(Protocol):
    """One file or stream of tensors the engine can fill destinations from.

    ``fill`` must be safe to call from several threads at once and must raise on any integrity
    failure; the engine treats every error of ``fill`` as "this source is bad".
    """

    label: str

    def tensors(self) -> Iterable[TensorEntry]:
        """Return the tensors, in the order the engine should offer them (a stream may yield them
        as they arrive, and raise at its end when a check failed)."""
        ...

    def pieces(self, tensor: TensorEntry, start: int = 0, stop: int | None = None) -> list[Piece]:
        """Return pieces covering at least bytes ``[start, stop)`` of ``tensor``."""
        ...

    def fill(self, piece: Piece, out: Any) -> None:
        """Write ``piece``'s plaintext into ``out`` (exactly ``piece.length`` bytes)."""
        ...

    def discard(self, pieces: Sequence[Piece]) -> None:
        """Forget the input behind ``pieces`` (already filled), to bound memory; may do nothing."""
        ...

    def close(self) -> None:
        """Release the source."""
        ...


def default_threads() -> int:
    """Return the number of CPUs this process may run on (the default decrypt thread count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
