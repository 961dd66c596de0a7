"""Decrypt each tensor straight into its final destination, at the moment vLLM copies it there.

vLLM's ``model.load_weights(iterator)`` receives ``(name, tensor)`` pairs, and every
parameter's ``weight_loader`` ends in ``param_slice.copy_(loaded_weight)`` after narrowing the
loaded weight to the rows this tensor-parallel rank keeps. :class:`EncryptedTensor` is a tensor
that holds *no data*: it carries the checkpoint tensor's shape and dtype and where its
ciphertext is. Copying it into a destination decrypts the chunks covering exactly the selected
rows, on all decrypt threads, directly into the destination's memory (CPU), or into a small
ring of pinned staging buffers and from there, on one dedicated copy thread per device, into
the destination (GPU). This is the one decrypt engine: the vLLM loader copies its tensors into
parameters, and :func:`loader.pipeline.load_tensors` (the streaming iterator) copies them into
fresh tensors. Hence:

* no buffer ever holds a whole tensor's plaintext besides its destination; on the GPU path the
  plaintext crosses only the staging ring (:mod:`loader.staging`: pinned or pageable,
  ``threads + 2`` slots by default);
* narrowing along dim 0 (column-parallel shards under tensor parallelism) stays lazy, so a rank
  decrypts only the chunks holding its rows (the format cuts chunks at tensor boundaries, so
  chunks are addressable per tensor); row-parallel shards (dim 1) are decrypted whole;
* any other operation a weight loader applies (a transpose, a dtype conversion, ``torch.cat``…)
  first *materialises* the tensor into ordinary host memory and runs on that: always correct,
  only not zero-copy (:attr:`LazyCheckpoint.materialized` counts them).

A failed chunk zeroes what was written to the destination and raises the one opaque
:class:`foundation.errors.ModelDecryptionError` naming the file.

The engine reads any :class:`loader.source.TensorSource`: :meth:`LazyCheckpoint.open` feeds it
the encrypted shards of a model directory; other sources (a decrypted OCI layer) are passed to
the constructor.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from foundation.errors import ModelFormatError
from foundation.secret import SecretBytes
from loader.format import TensorEntry
from loader.manifest import Manifest, ShardEntry
from loader.shard import EncryptedShard, Piece, ReadMode, shard_failure
from loader.source import TORCH_DTYPES, TensorSource, default_threads
from loader.staging import CopyLaneFactory, StagingOptions, StagingRing, copy_lane
from loader.stats import StatsRecorder

__all__ = ["EncryptedTensor", "LazyCheckpoint"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True, slots=True)
class _Region:
    """A window of one tensor of one shard: rows ``[row0, row1)`` and columns ``[col0, col1)``.

    Columns are along dim 1 (tensors of two or more dimensions); ``col1`` None means all. The
    window's bytes, in row-major order, are what a copy writes to its destination.
    """

    shard: TensorSource
    entry: TensorEntry
    row0: int
    row1: int
    col0: int = 0
    col1: int | None = None
    #: (row bytes, first selected byte of a row, end of the selected bytes of a row); computed once.
    _dims: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = self.entry.shape
        rows = shape[0] if shape else 1
        row_bytes = self.entry.nbytes // rows if rows else 0
        if len(shape) < 2:
            dims = (row_bytes, 0, row_bytes)
        else:
            unit = row_bytes // shape[1] if shape[1] else 0
            dims = (row_bytes, self.col0 * unit, (shape[1] if self.col1 is None else self.col1) * unit)
        object.__setattr__(self, "_dims", dims)

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


class _Lane:
    """One destination device's staging ring and copy lane (thread, and CUDA stream)."""

    def __init__(
        self,
        device: torch.device,
        slots: int,
        options: StagingOptions,
        slot_bytes: int,
        factory: CopyLaneFactory,
    ) -> None:
        # Pinning only helps DMA to a device (and needs an accelerator to allocate at all).
        mode = options.mode if device.type == "cuda" else "pageable"
        self.ring = StagingRing(slots=slots, slot_bytes=slot_bytes, mode=mode)
        try:
            self.copier = factory(self.ring, device)
        except BaseException:
            self.ring.close()
            raise

    def close(self) -> None:
        self.copier.close()  # every copy completed: nothing reads the slots any more
        self.ring.close()


@dataclass(eq=False)
class _Copy:
    """One overlapped host copy: its pieces, how many are still to finish, and its outcome."""

    region: _Region
    out: np.ndarray[Any, Any]
    pieces: Sequence[Piece]
    epoch: int
    remaining: int
    failed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class _Overlap:
    """Persistent decrypt threads for host copies that may finish after ``copy_`` returns.

    ``copy_`` queues its pieces, works on the queue itself until every piece of *its* copy has
    been started, and returns; the other threads finish the stragglers while the consumer already
    asks for the next tensor, whose pieces they then take. No thread idles at a tensor boundary.
    """

    def __init__(self, checkpoint: LazyCheckpoint, helpers: int) -> None:
        self._checkpoint = checkpoint
        self._jobs: deque[tuple[_Copy, Piece]] = deque()
        self._cond = threading.Condition()
        self._open: list[_Copy] = []
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"enclave-decrypt-{i}", daemon=True)
            for i in range(helpers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, copy: _Copy) -> None:
        with self._cond:
            self._open.append(copy)
            self._jobs.extend((copy, piece) for piece in copy.pieces)
            self._cond.notify_all()
        # Work on the queue (older copies first) until this copy's last piece has been taken.
        while True:
            with self._cond:
                if not any(c is copy for c, _ in self._jobs):
                    return
                job = self._jobs.popleft()
            self._run(*job)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._jobs:
                    return
                job = self._jobs.popleft()
            self._run(*job)

    def _run(self, copy: _Copy, piece: Piece) -> None:
        if not copy.failed:
            try:
                self._checkpoint._decrypt_piece(copy.region, piece, copy.out)
            except Exception:
                copy.failed = True
        with self._cond:
            copy.remaining -= 1
            last = copy.remaining == 0
        if last:
            self._checkpoint._finish_host(copy)
            copy.done.set()

    def settle(self, *, before_epoch: int | None = None) -> None:
        """Wait for the copies of epochs before ``before_epoch`` (all: None); raise on a failure.

        Raises:
            ModelDecryptionError: a waited copy failed (its destination was zeroed).
        """
        with self._cond:
            waiting = [c for c in self._open if before_epoch is None or c.epoch < before_epoch]
        for copy in waiting:
            copy.done.wait()
        with self._cond:
            self._open = [c for c in self._open if c not in waiting]
        failed = next((c for c in waiting if c.failed), None)
        if failed is not None:
            raise shard_failure(failed.region.shard.label)

    def stop(self) -> None:
        """Drop queued pieces, wait for those being decrypted, and stop the threads."""
        with self._cond:
            for copy, _ in self._jobs:
                copy.failed = True
                copy.remaining -= 1
            dropped = {id(c): c for c, _ in self._jobs}
            self._jobs.clear()
            self._stopping = True
            self._cond.notify_all()
        for copy in dropped.values():
            if copy.remaining == 0:
                self._checkpoint._finish_host(copy)
                copy.done.set()
        for copy in list(self._open):
            copy.done.wait()
        for t in self._threads:
            t.join()


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


class _ShardOpener:
    """Opens a model directory's encrypted shards in order, holding the key until :meth:`forget`."""

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        key: SecretBytes,
        read_mode: ReadMode,
        unmap_consumed: bool,
        shards: Callable[[ShardEntry], bool] | None,
    ) -> None:
        self._args = (model_dir, manifest, read_mode, unmap_consumed)
        self._entries = [e for e in manifest.shards if shards is None or shards(e)]
        self._key: bytes | None = key.reveal()

    def sources(self) -> Iterator[EncryptedShard]:
        model_dir, manifest, read_mode, unmap_consumed = self._args
        for entry in self._entries:
            if self._key is None:
                return
            yield EncryptedShard.open(
                model_dir, manifest, entry, self._key, read_mode=read_mode, unmap_consumed=unmap_consumed
            )

    def forget(self) -> None:
        self._key = None


class LazyCheckpoint:
    """Encrypted tensors opened for lazy, decrypt-on-copy loading: the decrypt engine.

    ::

        with LazyCheckpoint.open(model_dir, manifest, key, threads=8) as checkpoint:
            model.load_weights(checkpoint.tensors())
        checkpoint.stats.snapshot()

    Sources are opened (shards: their headers verified) as :meth:`tensors` reaches them; chunks
    are authenticated as they are decrypted. Copies into CUDA tensors go through the staging ring
    (``staging``); copies into host tensors are decrypted in place, unless
    ``stage_host_copies=True``, which sends them through the same ring and copy thread as GPU
    copies (what the GPU path does, minus the CUDA copy: for tests and benchmarks without a GPU).

    Warning:
        Destination memory written before a later chunk fails holds plaintext of an untrusted file:
        on :class:`ModelDecryptionError` the destination of that copy is zeroed, but earlier,
        successful copies stay; discard the whole model (the vLLM loader zeroes every parameter).

    Raises (from :meth:`tensors` and copies): :class:`ModelDecryptionError` naming the file.
    """

    def __init__(
        self,
        sources: Iterable[TensorSource],
        *,
        threads: int | None = None,
        unmap_consumed: bool = True,
        staging: StagingOptions | None = None,
        min_slot_bytes: int = 0,
        stage_host_copies: bool = False,
        overlap_host_copies: bool = False,
        stats: StatsRecorder | None = None,
        on_close: Callable[[], None] | None = None,
        copy_lanes: CopyLaneFactory = copy_lane,
    ) -> None:
        self._sources = iter(sources)
        self._copy_lanes = copy_lanes
        self._unmap_consumed = unmap_consumed
        self.threads = threads or default_threads()
        self.staging = staging if staging is not None else StagingOptions()
        self._slot_bytes = max(self.staging.slot_bytes, min_slot_bytes)
        self._chunk_bytes = min_slot_bytes
        self._stage_host = stage_host_copies
        self._overlap: _Overlap | None = None
        self._overlap_wanted = overlap_host_copies and not stage_host_copies
        self._epoch = 0
        self._on_close = on_close
        self.stats = stats if stats is not None else StatsRecorder()
        # The thread that calls copy_ decrypts as well, so the pool has one thread fewer.
        self._helpers = max(0, self.threads - 1)
        self._pool = ThreadPoolExecutor(max(1, self._helpers), thread_name_prefix="enclave-decrypt")
        self._lanes: dict[torch.device, _Lane] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._scratches: list[np.ndarray[Any, Any]] = []
        self._opened: list[TensorSource] = []
        #: Operations that forced a tensor to be materialised (op name -> count), for diagnostics.
        self.materialized_by: Counter[str] = Counter()

    @classmethod
    def open(
        cls,
        model_dir: Path,
        manifest: Manifest,
        key: SecretBytes,
        *,
        read_mode: ReadMode = "mmap",
        unmap_consumed: bool = True,
        shards: Callable[[ShardEntry], bool] | None = None,
        **options: Any,
    ) -> LazyCheckpoint:
        """Open the encrypted shards of ``model_dir`` (all, or those ``shards`` accepts).

        The manifest MAC is checked now: a wrong key fails here, before anything is decrypted.
        ``options`` are the constructor's (threads, staging, stats...).

        Raises:
            ModelDecryptionError: the manifest does not authenticate with ``key``.
        """
        manifest.authenticate(key)
        opener = _ShardOpener(Path(model_dir), manifest, key, read_mode, unmap_consumed, shards)
        return cls(
            opener.sources(),
            unmap_consumed=unmap_consumed,
            min_slot_bytes=manifest.chunk_size,
            on_close=opener.forget,
            **options,
        )

    @property
    def lanes(self) -> dict[str, StagingRing]:
        """The staging ring of each destination device used so far (for diagnostics and tests)."""
        return {str(device): lane.ring for device, lane in self._lanes.items()}

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def materialized(self) -> int:
        """How many tensors were materialised instead of decrypted straight into a destination."""
        return sum(self.materialized_by.values())

    def synchronize(self) -> None:
        """Wait until every copy made so far has landed in its destination.

        Only needed with ``overlap_host_copies``, where a host copy may still be finishing after
        ``copy_`` returned (:meth:`tensors` settles each copy before it yields the tensor after
        next, and everything when it is exhausted).

        Raises:
            ModelDecryptionError: a copy failed; its destination was zeroed.
        """
        if self._overlap is not None:
            self._overlap.settle()

    def close(self) -> None:
        """Stop the threads, wipe the staging ring, close the shards, forget the key.

        Copies still in flight are finished or dropped (their destinations zeroed) first; a
        failure among them is not raised here: call :meth:`synchronize` for that.
        """
        if self._overlap is not None:
            self._overlap.stop()
            self._overlap = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        for lane in self._lanes.values():
            lane.close()
        for scratch in self._scratches:
            scratch.fill(0)
        self._scratches.clear()
        for shard in self._opened:
            shard.close()
        self._opened.clear()
        if self._on_close is not None:
            self._on_close()
        self.stats.finish()

    def tensors(self) -> Iterator[tuple[str, EncryptedTensor]]:
        """Yield ``(checkpoint name, EncryptedTensor)`` for every tensor, shard by shard."""
        self.stats.start(threads=self.threads, device="destination")
        for shard in self._sources:
            self._opened.append(shard)
            self.stats.file_opened(shard.label)
            for tensor in shard.tensors():
                if tensor.dtype not in TORCH_DTYPES:
                    raise ModelFormatError(
                        f"{shard.label}: tensor dtype {tensor.dtype} is not supported by torch"
                    )
                rows = tensor.shape[0] if tensor.shape else 1
                if self._overlap is not None:  # the copies of the tensor before last have landed
                    self._overlap.settle(before_epoch=self._epoch)
                self._epoch += 1
                yield tensor.name, EncryptedTensor(_Region(shard, tensor, 0, rows), self)
        self.synchronize()

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
            buf = np.empty(max(nbytes, self._chunk_bytes), dtype=np.uint8)
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

    def _finish_host(self, copy: _Copy) -> None:
        """Account for a finished overlapped copy (zeroing its destination if it failed)."""
        shard, pieces = copy.region.shard, copy.pieces
        if copy.failed:
            copy.out.fill(0)
            return
        if self._unmap_consumed:
            shard.discard(pieces)
        self.stats.add(
            shard.label, plaintext=copy.out.size, ciphertext=sum(p.length + 16 for p in pieces), tensors=1
        )

    def decrypt_host(self, region: _Region, out: np.ndarray[Any, Any], *, overlap: bool = False) -> None:
        """Decrypt ``region`` into the uint8 host array ``out`` (exactly its window's bytes).

        ``overlap`` (with ``overlap_host_copies``) may return before the last pieces land.
        """
        if region.nbytes == 0:
            self.stats.add(region.shard.label, plaintext=0, ciphertext=0, tensors=1)
            return
        shard = region.shard
        lo, hi = region.byte_range
        pieces = shard.pieces(region.entry, lo, hi)
        if overlap and self._overlap_wanted:
            if self._overlap is None:
                self._overlap = _Overlap(self, self._helpers)
            self._overlap.submit(_Copy(region, out, pieces, self._epoch, len(pieces)))
            return
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

    @property
    def stages_host_copies(self) -> bool:
        """Whether host destinations go through the staging ring too."""
        return self._stage_host

    def decrypt_staged(self, region: _Region, dst: torch.Tensor) -> None:
        """Decrypt ``region`` through the staging ring into the contiguous tensor ``dst``."""
        if region.nbytes == 0:
            self.stats.add(region.shard.label, plaintext=0, ciphertext=0, tensors=1)
            return
        with self._lock:
            lane = self._lanes.get(dst.device)
            if lane is None:
                slots = self.staging.slot_count(self.threads, self._slot_bytes)
                lane = self._lanes[dst.device] = _Lane(
                    dst.device, slots, self.staging, self._slot_bytes, self._copy_lanes
                )
        flat = dst.reshape(-1).view(torch.uint8)
        shard = region.shard
        lo, hi = region.byte_range
        pieces = shard.pieces(region.entry, lo, hi)
        largest = max((p.length for p in pieces), default=0)
        if largest > lane.ring.slot_bytes:
            raise ModelFormatError(
                f"{shard.label}: a {largest}-byte piece does not fit the {lane.ring.slot_bytes}-byte "
                "staging slots"
            )
        queue = _Pieces(pieces)
        copier = lane.copier
        batch = copier.begin()  # the copies wait for what the consumer queued before this copy_

        def work() -> None:
            while (piece := queue.next()) is not None:
                slot = lane.ring.take()
                try:
                    staged = slot.array
                    a, b = piece.offset, piece.offset + piece.length
                    d0, d1 = region.out_offset(a), region.out_offset(b)
                    if region.full_width and lo <= a and b <= hi:
                        shard.fill(piece, staged[: d1 - d0])
                    else:
                        tmp = self._scratch(piece.length)
                        shard.fill(piece, tmp)
                        region.gather(tmp, a, staged[: d1 - d0])
                except BaseException:
                    lane.ring.give_back(slot)
                    raise
                copier.submit(batch, slot, flat[d0:d1])

        failed = False
        try:
            self._share(queue, len(pieces), work)
        except Exception:
            failed = True
        try:
            copier.finish(batch)  # every copy issued, and ordered before the consumer's next work
        except Exception:
            failed = True
        if failed:
            flat.zero_()  # after the copies already issued (the consumer waits for them first)
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

    @property
    def entry(self) -> TensorEntry:
        """The checkpoint tensor this is (a window of)."""
        return self._region.entry

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
            checkpoint = src._checkpoint
            if dst.device.type == "cpu" and not checkpoint.stages_host_copies:
                flat = dst.reshape(-1).view(torch.uint8).numpy()
                checkpoint.decrypt_host(src._region, flat, overlap=True)
            else:
                checkpoint.decrypt_staged(src._region, dst)
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
