"""The streaming iterator: decrypted ``(name, tensor)`` pairs, as a thin adapter over the engine.

:func:`decrypted_tensors` yields every tensor of an encrypted model directory, decrypted onto a
device, in Hugging Face checkpoint names; :func:`load_tensors` does the same for any
:class:`loader.source.TensorSource` (a decrypted OCI layer, for instance). Both allocate each
tensor and copy the engine's :class:`loader.lazy.EncryptedTensor` into it, so every byte goes
through the one decrypt engine that vLLM's loader uses (:class:`loader.lazy.LazyCheckpoint`):
the same chunk authentication, staging ring and failure handling.

Each yielded tensor is the caller's own (no buffer is shared or recycled under it). Plaintext
exists only in those tensors, the engine's staging ring and scratch buffers; it is never written
to a file or logged. Any failure aborts the load, zeroes every tensor already yielded that is
still alive, and raises one opaque :class:`ModelDecryptionError` naming the file.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from foundation.secret import SecretBytes
from loader.format import TensorEntry
from loader.lazy import EncryptedTensor, LazyCheckpoint
from loader.manifest import Manifest, ShardEntry
from loader.shard import ReadMode
from loader.source import TensorSource
from loader.staging import StagingOptions
from loader.stats import StatsRecorder

__all__ = ["RowRange", "Selection", "decrypted_tensors", "load_tensors"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RowRange:
    """Rows ``[start, stop)`` along dim 0 of a tensor: the only part a rank needs decrypted."""

    start: int
    stop: int


#: What a selector returns for a tensor: True (all of it), False (skip it) or a row range.
Selection = bool | RowRange


def _copy_out(lazy: EncryptedTensor, selection: Selection, device: torch.device) -> torch.Tensor:
    if selection is True:
        dst = torch.empty(lazy.shape, dtype=lazy.dtype, device=device)
        dst.copy_(lazy)
        return dst
    assert isinstance(selection, RowRange)
    dst = torch.zeros(lazy.shape, dtype=lazy.dtype, device=device)
    rows = lazy.shape[0] if lazy.dim() else 1
    start, stop = max(0, selection.start), min(rows, selection.stop)
    if lazy.dim() and stop > start:
        dst[start:stop].copy_(lazy[start:stop])
    return dst


def _stream(
    checkpoint: LazyCheckpoint,
    device: torch.device,
    select: Callable[[TensorEntry], Selection] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    handed: list[weakref.ref[torch.UntypedStorage]] = []
    ok = False
    try:
        with checkpoint:
            for name, lazy in checkpoint.tensors():
                selection = True if select is None else select(lazy.entry)
                if selection is False:
                    continue
                out = _copy_out(lazy, selection, device)
                handed.append(weakref.ref(out.untyped_storage()))
                yield name, out
                del out
            ok = True
    except GeneratorExit:
        ok = True  # the consumer stopped early: what it holds stays valid
        raise
    finally:
        if not ok:
            for ref in handed:
                storage = ref()
                if storage is not None:
                    storage.fill_(0)  # type: ignore[attr-defined]  # exists; missing from the stubs
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    logger.info("loaded %s", checkpoint.stats.snapshot().summary())


def load_tensors(
    sources: Iterable[TensorSource],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    select: Callable[[TensorEntry], Selection] | None = None,
    staging: StagingOptions | None = None,
    min_slot_bytes: int = 0,
    stats: StatsRecorder | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every selected tensor of ``sources``, decrypted onto ``device``.

    Sources are opened lazily, in order. See :func:`decrypted_tensors` for selection and failures.
    """
    checkpoint = LazyCheckpoint(
        sources, threads=threads, staging=staging, min_slot_bytes=min_slot_bytes, stats=stats
    )
    return _stream(checkpoint, torch.device(device), select)


def decrypted_tensors(
    model_dir: Path,
    manifest: Manifest,
    key: SecretBytes,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    select: Callable[[TensorEntry], Selection] | None = None,
    shards: Callable[[ShardEntry], bool] | None = None,
    read_mode: ReadMode = "mmap",
    unmap_consumed: bool = True,
    staging: StagingOptions | None = None,
    stage_host_copies: bool = False,
    stats: StatsRecorder | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Decrypt an encrypted model and yield ``(checkpoint name, tensor)`` for ``model.load_weights``.

    The manifest MAC is checked now (a wrong key fails here, before anything is decrypted); shard
    headers and chunks are checked as they are read. ``select`` chooses, per tensor, all of it
    (True), none (False) or a :class:`RowRange` (tensor parallelism: only the chunks holding those
    rows are decrypted; the other rows are zeros). ``shards`` skips whole files. ``stats``
    receives live counters (snapshot it from any thread for metrics). ``staging`` and
    ``stage_host_copies`` are the engine's (:class:`loader.lazy.LazyCheckpoint`).

    Warning:
        If the load fails, every tensor already yielded that is still alive is zeroed: treat
        them all as garbage and discard the model. Stopping early (closing the generator) keeps
        what you hold.

    Raises:
        ModelDecryptionError: the manifest does not authenticate with ``key``, or a shard fails
            (naming the file, never the reason).
        ModelFormatError: a tensor's dtype is not supported by this torch.
    """
    checkpoint = LazyCheckpoint.open(
        model_dir,
        manifest,
        key,
        read_mode=read_mode,
        unmap_consumed=unmap_consumed,
        shards=shards,
        threads=threads,
        staging=staging,
        stage_host_copies=stage_host_copies,
        stats=stats,
    )
    return _stream(checkpoint, torch.device(device), select)
