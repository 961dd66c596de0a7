"""Decrypt each tensor straight into its final destination, at the moment vLLM copies it there.

vLLM's ``model.load_weights(iterator)`` receives ``(name, tensor)`` pairs, and every
parameter's ``weight_loader`` ends in ``param_slice.copy_(loaded_weight)`` after narrowing the
loaded weight to the rows this tensor-parallel rank keeps. :class:`EncryptedTensor` is a tensor
that holds *no data*: it carries the checkpoint tensor's shape and dtype and where its
ciphertext is. Copying it into a destination decrypts the chunks covering exactly the selected
rows, on all decrypt threads, directly into the destination's memory (CPU), or into a small
ring of pinned staging buffers and from there, on one dedicated copy thread per device, into
the destination (GPU). Hence:

* no buffer ever holds a whole tensor's plaintext besides its destination; on the GPU path the
  plaintext crosses only the staging ring (``threads + 2`` buffers of one chunk each);
* narrowing along dim 0 (column-parallel shards under tensor parallelism) stays lazy, so a rank
  decrypts only the chunks holding its rows (the format cuts chunks at tensor boundaries, so
  chunks are addressable per tensor); row-parallel shards (dim 1) are decrypted whole;
* any other operation a weight loader applies (a transpose, a dtype conversion, ``torch.cat``…)
  first *materialises* the tensor into ordinary host memory and runs on that: always correct,
  only not zero-copy (:attr:`LazyCheckpoint.materialized` counts them).

A failed chunk zeroes what was written to the destination and raises the one opaque
:class:`attest.errors.ModelDecryptionError` naming the file.

Use :class:`LazyCheckpoint` for random-access sources (the encrypted shards on disk); sequential
streams (a future ocicrypt OCI layer) go through :func:`loader.pipeline.load_tensors`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from attest.errors import ModelFormatError
from attest.secret import SecretBytes
from loader.format import TensorEntry
from loader.manifest import Manifest
from loader.pipeline import TORCH_DTYPES, default_threads
from loader.shard import EncryptedShard, Piece, ReadMode, shard_failure
from loader.staging import Buffers, Slab, copy_slot_to_device
from loader.stats import StatsRecorder

__all__ = ["EncryptedTensor", "LazyCheckpoint"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: Default size of one pinned staging buffer on the GPU path (at least one chunk).
DEFAULT_STAGING_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class _Region:
    """A window of one tensor of one shard: rows ``[row0, row1)`` and columns ``[col0, col1)``.

    Columns are along dim 1 (tensors of two or more dimensions); ``col1`` None means all. The
    window's bytes, in row-major order, are what a copy writes to its destination.
    """

    shard: EncryptedShard
    entry: TensorEntry
    row0: int
    row1: int
    col0: int = 0
    col1: int | None = None

    @property
    def _dims(self) -> tuple[int, int, int]:
        """(row bytes, first selected byte of a row, end of the selected bytes of a row)."""
        shape = self.entry.shape
        rows = shape[0] if shape else 1
        row_bytes = self.entry.nbytes // rows if rows else 0
        if len(shape) < 2:
            return row_bytes, 0, row_bytes
        unit = row_bytes // shape[1] if shape[1] else 0
        return row_bytes, self.col0 * unit, (shape[1] if self.col1 is None else self.col1) * unit

    @property
    def nbytes(self) -> int:
        """Size of the window's bytes."""
        _, c0, c1 = self._dims
        return (self.row1 - self.row0) * (c1 - c0)

    @property
    def full_width(self) -> bool:
        row_bytes, c0, c1 = self._dims
        return c0 == 0 and c1 == row_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.entry.shape
        if not shape:
            return ()
        if len(shape) == 1:
            return (self.row1 - self.row0,)
        cols = (shape[1] if self.col1 is None else self.col1) - self.col0
        return (self.row1 - self.row0, cols, *shape[2:])

    @property
    def byte_range(self) -> tuple[int, int]:
        """The span of the tensor's bytes that holds the window (tensor-relative)."""
        row_bytes, c0, c1 = self._dims
        return self.row0 * row_bytes + c0, max(self.row0 * row_bytes + c0, (self.row1 - 1) * row_bytes + c1)

    def out_offset(self, pos: int) -> int:
        """Return how many window bytes lie before tensor byte ``pos`` (the destination offset)."""
        row_bytes, c0, c1 = self._dims
        width = c1 - c0
        if row_bytes == 0:
            return 0
        r = min(max(pos // row_bytes, self.row0), self.row1)
        within = 0 if r >= self.row1 else min(max(pos - r * row_bytes - c0, 0), width)
        return (r - self.row0) * width + within

    def gather(self, src: np.ndarray[Any, Any], a: int, out: np.ndarray[Any, Any]) -> None:
        """Copy the window's bytes found in ``src`` (tensor bytes ``[a, a + len(src))``) to ``out``.

        ``out`` receives them contiguously, in row-major order (it must hold exactly that many).
        """
        row_bytes, c0, c1 = self._dims
        b = a + src.size
        if self.full_width:
            lo, hi = self.byte_range
            s, e = max(a, lo), min(b, hi)
            out[:] = src[s - a : e - a]
            return
        width = c1 - c0
        first = max(self.row0, a // row_bytes)
        last = min(self.row1, -(-b // row_bytes))
        # Rows lying wholly inside [a, b): one strided copy; the (at most two) others one by one.
        full0 = max(first, -(-a // row_bytes))
        full1 = max(full0, min(last, b // row_bytes))
        pos = 0
        for r in range(first, last):
            if full0 <= r < full1:
                if r == full0:
                    k = full1 - full0
                    block = src[full0 * row_bytes - a : full1 * row_bytes - a].reshape(k, row_bytes)
                    out[pos : pos + k * width].reshape(k, width)[:] = block[:, c0:c1]
                    pos += k * width
                continue
            s, e = max(a, r * row_bytes + c0), min(b, r * row_bytes + c1)
            if e > s:
                out[pos : pos + e - s] = src[s - a : e - a]
                pos += e - s
        if pos != out.size:
            raise AssertionError("window gather size mismatch")


class _GpuLane:
    """One device's pinned staging ring (:class:`loader.staging.Buffers`), copy thread and stream."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int) -> None:
        self.ring = Buffers(slab_bytes=slot_bytes, max_free=0, pin=True)
        self.ring.make_ring(slots, slot_bytes)
        self.copier = ThreadPoolExecutor(1, thread_name_prefix=f"enclave-copy-{device}")
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.copier.shutdown(wait=True)
        self.ring.wipe(include_handed_out=False)
        self.ring.drop()


class _Pieces:
    """A thread-safe queue of pieces that any worker can abort (the first failure stops the rest)."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self._it = iter(pieces)
        self._lock = threading.Lock()
        self._aborted = False

    def next(self) -> Piece | None:
        with self._lock:
            return None if self._aborted else next(self._it, None)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True


class LazyCheckpoint:
    """An encrypted model opened for lazy, decrypt-on-copy loading.

    ::

        with LazyCheckpoint(model_dir, manifest, key, threads=8) as checkpoint:
            model.load_weights(checkpoint.tensors())
        checkpoint.stats.snapshot()

    Shards are opened (and their headers verified) as :meth:`tensors` reaches them; chunks are
    authenticated as they are decrypted.

    Warning:
        Destination memory written before a later chunk fails holds plaintext of an untrusted file:
        on :class:`ModelDecryptionError` the destination of that copy is zeroed, but earlier,
        successful copies stay; discard the whole model (the vLLM loader zeroes every parameter).

    Raises (from :meth:`tensors` and copies): :class:`ModelDecryptionError` naming the file.
    """

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        key: SecretBytes,
        *,
        threads: int | None = None,
        read_mode: ReadMode = "mmap",
        unmap_consumed: bool = True,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        stats: StatsRecorder | None = None,
    ) -> None:
        manifest.authenticate(key)
        self._model_dir = Path(model_dir)
        self._manifest = manifest
        self._model_key = key.reveal()
        self._read_mode: ReadMode = read_mode
        self._unmap_consumed = unmap_consumed
        self.threads = threads or default_threads()
        self._staging_bytes = max(staging_bytes, manifest.chunk_size)
        self.stats = stats if stats is not None else StatsRecorder()
        # The thread that calls copy_ decrypts as well, so the pool has one thread fewer.
        self._helpers = max(0, self.threads - 1)
        self._pool = ThreadPoolExecutor(max(1, self._helpers), thread_name_prefix="enclave-decrypt")
        self._lanes: dict[torch.device, _GpuLane] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._scratches: list[np.ndarray[Any, Any]] = []
        self._opened: list[EncryptedShard] = []
        #: Operations that forced a tensor to be materialised (op name -> count), for diagnostics.
        self.materialized_by: Counter[str] = Counter()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def materialized(self) -> int:
        """How many tensors were materialised instead of decrypted straight into a destination."""
        return sum(self.materialized_by.values())

    def close(self) -> None:
        """Stop the threads, wipe the staging ring, close the shards, forget the key."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for lane in self._lanes.values():
            lane.close()
        for scratch in self._scratches:
            scratch.fill(0)
        self._scratches.clear()
        for shard in self._opened:
            shard.close()
        self._opened.clear()
        self._model_key = b""
        self.stats.finish()

    def tensors(self) -> Iterator[tuple[str, EncryptedTensor]]:
        """Yield ``(checkpoint name, EncryptedTensor)`` for every tensor, shard by shard."""
        self.stats.start(threads=self.threads, device="destination")
        for entry in self._manifest.shards:
            shard = EncryptedShard.open(
                self._model_dir, self._manifest, entry, self._model_key, read_mode=self._read_mode,
                unmap_consumed=self._unmap_consumed,
            )  # fmt: skip
            self._opened.append(shard)
            self.stats.file_opened(shard.label)
            for tensor in shard.tensors():
                if tensor.dtype not in TORCH_DTYPES:
                    raise ModelFormatError(
                        f"{shard.label}: tensor dtype {tensor.dtype} is not supported by torch"
                    )
                rows = tensor.shape[0] if tensor.shape else 1
                yield tensor.name, EncryptedTensor(_Region(shard, tensor, 0, rows), self)

    # -- decryption (called from EncryptedTensor) -------------------------------------------

    def _share(self, queue: _Pieces, count: int, work: Any) -> None:
        """Run ``work()`` on the calling thread and on up to ``count - 1`` pool threads, then wait.

        ``work`` pulls pieces from ``queue`` until it is empty, so no core idles while pieces remain
        and nothing waits on a hand-off; the first failure aborts the queue for every thread.
        """

        def guarded() -> None:
            try:
                work()
            except BaseException:
                queue.abort()
                raise

        futures = [self._pool.submit(guarded) for _ in range(min(self._helpers, max(0, count - 1)))]
        try:
            guarded()
        finally:
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _scratch(self, nbytes: int) -> np.ndarray[Any, Any]:
        """Return this thread's scratch buffer for partly selected chunks (zeroed on close)."""
        buf: np.ndarray[Any, Any] | None = getattr(self._local, "scratch", None)
        if buf is None or buf.size < nbytes:
            buf = np.empty(max(nbytes, self._manifest.chunk_size), dtype=np.uint8)
            self._local.scratch = buf
            with self._lock:
                self._scratches.append(buf)
        return buf[:nbytes]

    def _decrypt_piece(self, region: _Region, piece: Piece, out: np.ndarray[Any, Any]) -> tuple[int, int]:
        """Decrypt ``piece`` and put the window's bytes it holds into ``out`` at their offset.

        ``out`` is the whole window's destination, or None to get the bytes back compacted at the
        start of the scratch buffer (GPU path). Returns the destination byte range.
        """
        a, b = piece.offset, piece.offset + piece.length
        d0, d1 = region.out_offset(a), region.out_offset(b)
        lo, hi = region.byte_range
        if region.full_width and lo <= a and b <= hi:
            region.shard.fill(piece, out[d0:d1])  # the common case: straight into the destination
            return d0, d1
        tmp = self._scratch(piece.length)
        region.shard.fill(piece, tmp)
        region.gather(tmp, a, out[d0:d1])
        return d0, d1

    def decrypt_host(self, region: _Region, out: np.ndarray[Any, Any]) -> None:
        """Decrypt ``region`` into the uint8 host array ``out`` (exactly its window's bytes)."""
        if region.nbytes == 0:
            return
        shard = region.shard
        lo, hi = region.byte_range
        pieces = shard.pieces(region.entry, lo, hi)
        queue = _Pieces(pieces)

        def work() -> None:
            while (piece := queue.next()) is not None:
                self._decrypt_piece(region, piece, out)

        failed = False
        try:
            self._share(queue, len(pieces), work)
        except Exception:
            out.fill(0)
            failed = True
        if failed:  # raised outside the handler: not even __context__ says which check failed
            raise shard_failure(shard.label)
        if self._unmap_consumed:
            shard.discard(pieces)
        self.stats.add(
            shard.label, plaintext=out.size, ciphertext=sum(p.length + 16 for p in pieces), tensors=1
        )

    def decrypt_device(self, region: _Region, dst: torch.Tensor) -> None:
        """Decrypt ``region`` through the pinned ring into the contiguous device tensor ``dst``."""
        if region.nbytes == 0:
            return
        with self._lock:
            lane = self._lanes.get(dst.device)
            if lane is None:
                lane = self._lanes[dst.device] = _GpuLane(dst.device, self.threads + 2, self._staging_bytes)
        flat = dst.reshape(-1).view(torch.uint8)
        shard = region.shard
        lo, hi = region.byte_range
        pieces = shard.pieces(region.entry, lo, hi)
        queue = _Pieces(pieces)
        lock = threading.Lock()
        copies: list[Future[None]] = []

        def copy(slot: Slab, d0: int, d1: int) -> None:
            copy_slot_to_device(lane.ring, slot, flat[d0:d1], lane.stream)

        def work() -> None:
            while (piece := queue.next()) is not None:
                slot = lane.ring.take_slot()
                try:
                    staged = slot.array
                    assert staged is not None
                    a, b = piece.offset, piece.offset + piece.length
                    d0, d1 = region.out_offset(a), region.out_offset(b)
                    if region.full_width and lo <= a and b <= hi:
                        shard.fill(piece, staged[: d1 - d0])
                    else:
                        tmp = self._scratch(piece.length)
                        shard.fill(piece, tmp)
                        region.gather(tmp, a, staged[: d1 - d0])
                except BaseException:
                    lane.ring.return_slot(slot)
                    raise
                with lock:
                    copies.append(lane.copier.submit(copy, slot, d0, d1))

        failed = False
        try:
            self._share(queue, len(pieces), work)
            for f in copies:
                f.result()
        except Exception:
            for f in copies:
                with contextlib.suppress(Exception):
                    f.result()
            flat.zero_()
            failed = True
        if failed:
            raise shard_failure(shard.label)
        if self._unmap_consumed:
            shard.discard(pieces)
        self.stats.add(
            shard.label, plaintext=flat.numel(), ciphertext=sum(p.length + 16 for p in pieces), tensors=1
        )


def _direct_target(dst: Any, src: EncryptedTensor) -> bool:
    """Whether ``dst.copy_(src)`` can decrypt straight into ``dst``'s memory."""
    return (
        isinstance(dst, torch.Tensor)
        and not isinstance(dst, EncryptedTensor)
        and dst.dtype == src.dtype
        and tuple(dst.shape) == tuple(src.shape)
        and dst.is_contiguous()
        and (dst.device.type == "cpu" or (dst.device.type == "cuda" and torch.cuda.is_available()))
    )


class EncryptedTensor(torch.Tensor):
    """A tensor whose plaintext does not exist until it is copied somewhere.

    Metadata (``shape``, ``dtype``, ``device`` = cpu) is real; the data is decrypted by
    ``destination.copy_(encrypted_tensor)`` straight into ``destination``. Slicing along dim 0
    stays lazy; any other operation materialises the tensor first. ``repr`` never shows data.

    Warning:
        Materialising (any operation other than ``copy_`` and dim-0 slicing) decrypts into a fresh
        host tensor owned by the caller.
    """

    _region: _Region
    _checkpoint: LazyCheckpoint

    @staticmethod
    def __new__(cls, region: _Region, checkpoint: LazyCheckpoint) -> EncryptedTensor:
        dtype = TORCH_DTYPES[region.entry.dtype]
        t = torch.Tensor._make_wrapper_subclass(cls, region.shape, dtype=dtype, device=torch.device("cpu"))
        t._region = region
        t._checkpoint = checkpoint
        return t

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        r = self._region
        return (
            f"EncryptedTensor({r.entry.name!r}, rows {r.row0}:{r.row1}, cols {r.col0}:{r.col1}, "
            f"shape={tuple(self.shape)}, dtype={self.dtype})"
        )

    def materialize(self, reason: str = "materialize") -> torch.Tensor:
        """Decrypt into a fresh host tensor (``reason`` is recorded for diagnostics)."""
        self._checkpoint.materialized_by[reason] += 1
        out = torch.empty(self.shape, dtype=self.dtype)
        self._checkpoint.decrypt_host(self._region, out.reshape(-1).view(torch.uint8).numpy())
        return out

    def _window(self, dim: int, start: int | None, end: int | None) -> EncryptedTensor:
        """Return the lazy slice ``[start:end]`` along ``dim`` (0 = rows, 1 = columns)."""
        r = self._region
        n = self.shape[dim]
        start = 0 if start is None else (start + n if start < 0 else start)
        end = n if end is None else (end + n if end < 0 else end)
        start, end = max(0, min(start, n)), max(0, min(end, n))
        end = max(start, end)
        if dim == 0:
            region = _Region(r.shard, r.entry, r.row0 + start, r.row0 + end, r.col0, r.col1)
        else:
            region = _Region(r.shard, r.entry, r.row0, r.row1, r.col0 + start, r.col0 + end)
        return EncryptedTensor(region, self._checkpoint)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if (
            func is aten.copy_.default
            and isinstance(args[1], EncryptedTensor)
            and _direct_target(args[0], args[1])
        ):
            dst, src = args[0], args[1]
            if dst.device.type == "cpu":
                src._checkpoint.decrypt_host(src._region, dst.reshape(-1).view(torch.uint8).numpy())
            else:
                src._checkpoint.decrypt_device(src._region, dst)
            return dst
        if func is aten.slice.Tensor and isinstance(args[0], EncryptedTensor):
            self: EncryptedTensor = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            start = kwargs.get("start", args[2] if len(args) > 2 else None)
            end = kwargs.get("end", args[3] if len(args) > 3 else None)
            step = kwargs.get("step", args[4] if len(args) > 4 else 1)
            ndim = self.dim()
            if ndim > 0 and step == 1 and (dim % ndim) in (0, 1):
                return self._window(dim % ndim, start, end)
        if func in (aten.detach.default, aten.alias.default):
            # A view op must return a new tensor object (torch checks), still lazy.
            return EncryptedTensor(args[0]._region, args[0]._checkpoint)

        def materialize(x: Any) -> Any:
            return x.materialize(str(func)) if isinstance(x, EncryptedTensor) else x

        return func(*tree_map(materialize, args), **tree_map(materialize, kwargs))
