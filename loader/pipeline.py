"""The read → decrypt → stage → copy pipeline that turns encrypted shards into tensors.

:func:`decrypted_tensors` is what the vLLM loader plugin calls: it yields ``(name, tensor)`` in
Hugging Face checkpoint names, ready for ``model.load_weights``. :func:`load_tensors` is the
format-independent core: any :class:`TensorSource` (today the encrypted shard; later e.g. an
ocicrypt OCI layer) feeds the same pipeline.

How bytes move::

    file (page cache) --mmap--> decrypt_into on N threads --> host slab        (CPU: the yielded
                                                          \\                    tensors are views)
                                                           -> pinned slot --1 copy thread/device-->
                                                              device slab      (GPU: yielded views)

Tensors are grouped, in file order, into batches of at most ``slab_bytes``; each batch gets one
buffer and every tensor a 256-byte-aligned view of it. At most ``depth`` slabs' worth of
batches are in flight, so memory is bounded by ``depth x slab_bytes`` (+ the pinned ring on GPU),
plus any tensor larger than a slab, which gets a buffer of its own.

Plaintext exists only in the slabs, the pinned staging ring and the tensors you receive; it is
never written to a file or logged. Any failure aborts the load, zeroes every buffer of the load
that is still alive, and raises one opaque :class:`ModelDecryptionError` naming the file.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from cryptography.exceptions import InvalidTag

from attest.errors import ModelDecryptionError, ModelError, ModelFormatError
from attest.secret import SecretBytes
from loader.format import TensorEntry
from loader.manifest import Manifest, ShardEntry
from loader.shard import EncryptedShard, Piece, ReadMode, shard_failure
from loader.staging import ALIGNMENT, Buffers, Slab, copy_slot_to_device
from loader.stats import StatsRecorder

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_RUN_BYTES",
    "DEFAULT_SLAB_BYTES",
    "DEFAULT_SLOT_BYTES",
    "TORCH_DTYPES",
    "RowRange",
    "Selection",
    "TensorSource",
    "decrypted_tensors",
    "default_threads",
    "load_tensors",
]

logger = logging.getLogger(__name__)

#: Host slab size: tensors are batched up to this many bytes per buffer.
DEFAULT_SLAB_BYTES = 16 << 20
#: Slabs' worth of bytes in flight (decrypting or being consumed).
DEFAULT_DEPTH = 4
#: Bytes of chunks one decrypt task handles on the CPU path (amortises the pool's overhead).
DEFAULT_RUN_BYTES = 8 << 20
#: Size of one pinned staging slot on the GPU path (one host-to-device copy each).
DEFAULT_SLOT_BYTES = 16 << 20
_PROGRESS_SECONDS = 5.0

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

#: Errors of a source's ``fill``/``open`` that mean "this file is bad": reported opaquely.
_SOURCE_ERRORS = (InvalidTag, ValueError, OSError, ModelError, BufferError, OverflowError)


@dataclass(frozen=True, slots=True)
class RowRange:
    """Rows ``[start, stop)`` along dim 0 of a tensor: the only part a rank needs decrypted."""

    start: int
    stop: int


#: What a selector returns for a tensor: True (all of it), False (skip it) or a row range.
Selection = bool | RowRange


class TensorSource(Protocol):
    """One file or stream of tensors the pipeline can fill buffers from.

    ``fill`` must be safe to call from several threads at once and must raise on any integrity
    failure; the pipeline treats every error of ``fill`` as "this source is bad".
    """

    label: str

    def tensors(self) -> Sequence[TensorEntry]:
        """Return the tensors, in the order the pipeline should read them."""
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


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(slots=True)
class _Placed:
    entry: TensorEntry
    offset: int


@dataclass(slots=True, eq=False)
class _Batch:
    source: TensorSource
    placed: list[_Placed]
    nbytes: int
    runs: list[list[tuple[Piece, int]]]
    device_zero: list[tuple[int, int]]
    plaintext: int
    ciphertext: int
    last_of_source: bool = False
    slab: Slab | None = None
    device_buf: torch.Tensor | None = None
    futures: list[Future[Any]] = field(default_factory=list)


def _pieces_for(source: TensorSource, entry: TensorEntry, selection: Selection) -> list[Piece]:
    if selection is True:
        return source.pieces(entry)
    assert isinstance(selection, RowRange)
    rows = entry.shape[0] if entry.shape else 1
    row_bytes = entry.nbytes // rows if rows else 0
    start, stop = max(0, selection.start) * row_bytes, min(rows, selection.stop) * row_bytes
    data = source.pieces(entry, start, stop)
    if not data:
        return [Piece(0, entry.nbytes)] if entry.nbytes else []
    lo, hi = data[0].offset, data[-1].offset + data[-1].length
    zeros = [Piece(0, lo)] if lo > 0 else []
    tail = [Piece(hi, entry.nbytes - hi)] if hi < entry.nbytes else []
    return zeros + data + tail


def _make_batch(
    source: TensorSource, items: list[tuple[_Placed, list[Piece]]], nbytes: int, *, gpu: bool, run_bytes: int
) -> _Batch:
    runs: list[list[tuple[Piece, int]]] = []
    device_zero: list[tuple[int, int]] = []
    run: list[tuple[Piece, int]] = []
    run_start = 0
    plaintext = ciphertext = 0
    for placed, pieces in items:
        for p in pieces:
            dst = placed.offset + p.offset
            if p.ref is None and gpu:
                device_zero.append((dst, dst + p.length))
                if run:
                    runs.append(run)
                    run = []
                continue
            if p.ref is not None:
                plaintext += p.length
                ciphertext += p.length + 16
            if run and dst + p.length - run_start > run_bytes:
                runs.append(run)
                run = []
            if not run:
                run_start = dst
            run.append((p, dst))
    if run:
        runs.append(run)
    return _Batch(
        source=source,
        placed=[placed for placed, _ in items],
        nbytes=nbytes,
        runs=runs,
        device_zero=device_zero,
        plaintext=plaintext,
        ciphertext=ciphertext,
    )


def _plan(
    sources: Iterable[TensorSource],
    opened: list[TensorSource],
    select: Callable[[TensorEntry], Selection] | None,
    *,
    slab_bytes: int,
    run_bytes: int,
    gpu: bool,
    stats: StatsRecorder,
) -> Iterator[_Batch]:
    for source in sources:
        opened.append(source)
        stats.file_opened(source.label)
        items: list[tuple[_Placed, list[Piece]]] = []
        size = 0
        batches: list[_Batch] = []
        for entry in source.tensors():
            if entry.dtype not in TORCH_DTYPES:
                raise ModelFormatError(
                    f"{source.label}: tensor dtype {entry.dtype} is not supported by torch"
                )
            selection = True if select is None else select(entry)
            if selection is False:
                continue
            need = _align(entry.nbytes)
            if items and size + need > slab_bytes:
                batches.append(_make_batch(source, items, size, gpu=gpu, run_bytes=run_bytes))
                items, size = [], 0
            items.append((_Placed(entry, size), _pieces_for(source, entry, selection)))
            size += need
        if items:
            batches.append(_make_batch(source, items, size, gpu=gpu, run_bytes=run_bytes))
        if not batches:  # nothing selected: still report the file as done
            batches.append(_Batch(source, [], 0, [], [], 0, 0))
        batches[-1].last_of_source = True
        yield from batches


def _fill_host(source: TensorSource, array: Any, run: list[tuple[Piece, int]]) -> None:
    for piece, dst in run:
        out = array[dst : dst + piece.length]
        if piece.ref is None:
            out.fill(0)
        else:
            source.fill(piece, out)


class _Device:
    """The GPU side of a load: the pinned ring and the one copy thread for this device."""

    def __init__(self, device: torch.device, buffers: Buffers, slot_bytes: int) -> None:
        self.device = device
        self.buffers = buffers
        self.slot_bytes = slot_bytes
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.copier = ThreadPoolExecutor(1, thread_name_prefix=f"enclave-copy-{device}")

    def fill(self, source: TensorSource, dev: torch.Tensor, run: list[tuple[Piece, int]]) -> Future[None]:
        slot = self.buffers.take_slot()
        try:
            assert slot.array is not None
            d0 = run[0][1]
            for piece, dst in run:
                source.fill(piece, slot.array[dst - d0 : dst - d0 + piece.length])
            d1 = run[-1][1] + run[-1][0].length
        except BaseException:
            self.buffers.return_slot(slot)
            raise
        return self.copier.submit(self._copy, slot, dev, d0, d1)

    def _copy(self, slot: Slab, dev: torch.Tensor, d0: int, d1: int) -> None:
        copy_slot_to_device(self.buffers, slot, dev[d0:d1], self.stream)

    def zero(self, dev: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        with torch.cuda.stream(self.stream):
            for a, b in ranges:
                dev[a:b].zero_()
        self.stream.synchronize()


def load_tensors(
    sources: Iterable[TensorSource],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    select: Callable[[TensorEntry], Selection] | None = None,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    depth: int = DEFAULT_DEPTH,
    run_bytes: int = DEFAULT_RUN_BYTES,
    slot_bytes: int = DEFAULT_SLOT_BYTES,
    stats: StatsRecorder | None = None,
    total_bytes: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every selected tensor of ``sources``, decrypted onto ``device``.

    Sources are opened lazily, in order. Yielded tensors are views into buffers of this load;
    see :func:`decrypted_tensors` for the reference contract.

    Raises:
        ModelDecryptionError: a source failed (opaque, naming it); everything is zeroed first.
    """
    dev = torch.device(device)
    gpu = dev.type != "cpu"
    threads = threads or default_threads()
    stats = stats if stats is not None else StatsRecorder(clock=clock)
    buffers = Buffers(slab_bytes=slab_bytes, max_free=depth, pin=gpu)
    gpu_side: _Device | None = None
    if gpu:
        slot_bytes = max(slot_bytes, max(run_bytes, 1))
        buffers.make_ring(threads + 2, slot_bytes)
        gpu_side = _Device(dev, buffers, slot_bytes)
        run_bytes = slot_bytes
    pool = ThreadPoolExecutor(threads, thread_name_prefix="enclave-decrypt")
    opened: list[TensorSource] = []
    inflight: deque[_Batch] = deque()
    budget = slab_bytes * depth
    stats.start(threads=threads, device=str(dev))
    planner = _plan(sources, opened, select, slab_bytes=slab_bytes, run_bytes=run_bytes, gpu=gpu, stats=stats)
    pending: _Batch | None = None
    current: _Batch | None = None
    next_report = clock() + _PROGRESS_SECONDS
    finished = False
    view: torch.Tensor | None = None
    base: torch.Tensor | None = None

    def charge(batch: _Batch) -> int:
        # A host batch occupies a whole slab; a device batch exactly its size.
        return batch.nbytes if gpu else max(batch.nbytes, slab_bytes)

    def submit(batch: _Batch) -> None:
        if gpu_side is not None:
            buf = torch.empty(batch.nbytes, dtype=torch.uint8, device=dev)
            buffers.track_device(buf)
            batch.device_buf = buf
            if batch.device_zero:
                batch.futures.append(gpu_side.copier.submit(gpu_side.zero, buf, batch.device_zero))
            for run in batch.runs:
                batch.futures.append(pool.submit(gpu_side.fill, batch.source, buf, run))
        else:
            batch.slab = buffers.acquire(batch.nbytes)
            for run in batch.runs:
                batch.futures.append(pool.submit(_fill_host, batch.source, batch.slab.array, run))

    try:
        while True:
            in_bytes = sum(charge(b) for b in inflight)
            while True:
                if pending is None:
                    pending = next(planner, None)
                if pending is None or (inflight and in_bytes + charge(pending) > budget):
                    break
                submit(pending)
                inflight.append(pending)
                in_bytes += charge(pending)
                pending = None
            if not inflight:
                break
            current = inflight.popleft()
            for f in current.futures:
                result = f.result()
                if isinstance(result, Future):
                    result.result()
            current.futures.clear()
            current.source.discard([p for run in current.runs for p, _ in run])
            base = current.device_buf if current.slab is None else current.slab.tensor
            buffers.reclaim(new_batch=True)
            for placed in current.placed:
                e = placed.entry
                assert base is not None
                view = (
                    base[placed.offset : placed.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape)
                )
                yield e.name, view
                del view
                buffers.reclaim()
            del base
            stats.add(
                current.source.label,
                plaintext=current.plaintext,
                ciphertext=current.ciphertext,
                tensors=len(current.placed),
            )
            if current.slab is not None:
                buffers.release(current.slab)
                current.slab = None
            current.device_buf = None
            if current.last_of_source:
                current.source.close()
                opened.remove(current.source)
                f_stats = next(f for f in stats.snapshot().files if f.name == current.source.label)
                logger.info(
                    "decrypted %s: %.3f GB in %.2f s (%.2f GB/s)",
                    f_stats.name,
                    f_stats.bytes / 1e9,
                    f_stats.seconds,
                    f_stats.gbps,
                )
            current = None
            now = clock()
            if now >= next_report:
                next_report = now + _PROGRESS_SECONDS
                snap = stats.snapshot()
                of_total = f" of {total_bytes / 1e9:.2f}" if total_bytes else ""
                logger.info("decrypting: %.2f%s GB, %.2f GB/s", snap.bytes / 1e9, of_total, snap.gbps)
        finished = True
    except GeneratorExit:
        view = base = None  # our own references must not count as the consumer's
        _shutdown(pool, gpu_side)
        buffers.wipe(include_handed_out=False)  # the consumer stopped; what it holds stays valid
        raise
    except (ModelDecryptionError, ModelFormatError):
        _shutdown(pool, gpu_side)
        buffers.wipe(include_handed_out=True)
        raise  # already names its file (opening a shard) or is not about a file's contents
    except _SOURCE_ERRORS:
        _shutdown(pool, gpu_side)
        buffers.wipe(include_handed_out=True)
        label = current.source.label if current is not None else opened[-1].label if opened else "?"
        raise shard_failure(label) from None
    except BaseException:
        _shutdown(pool, gpu_side)
        buffers.wipe(include_handed_out=True)
        raise
    finally:
        _shutdown(pool, gpu_side)
        if gpu and finished:
            buffers.wipe(include_handed_out=False)  # the pinned ring goes back to torch's cache
        for source in opened:
            source.close()
        stats.finish()
        buffers.drop()
    snap = stats.snapshot()
    logger.info("loaded %s", snap.summary())


def _shutdown(pool: ThreadPoolExecutor, gpu_side: _Device | None) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    if gpu_side is not None:
        gpu_side.copier.shutdown(wait=True)


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
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    depth: int = DEFAULT_DEPTH,
    stats: StatsRecorder | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Decrypt an encrypted model and yield ``(checkpoint name, tensor)`` for ``model.load_weights``.

    The manifest MAC is checked now (a wrong key fails here, before anything is decrypted); shard
    headers and chunks are checked as they are read. ``select`` chooses, per tensor, all of it
    (True), none (False) or a :class:`RowRange` (tensor parallelism: only the chunks holding those
    rows are decrypted; the other rows read as zeros). ``shards`` skips whole files. ``stats``
    receives live counters (snapshot it from any thread for metrics). ``unmap_consumed=False``
    keeps the ciphertext mapped until each file is done: faster, but RSS then counts up to a
    shard of (shared, reclaimable) page-cache pages.

    Reference contract: each yielded tensor is a view into a buffer shared with neighbouring
    tensors (a host slab on CPU, a device buffer on GPU). Keeping a tensor is safe: a buffer is
    reused only when no view of it is alive (checked with the storage reference count), so memory
    simply grows while you hold tensors. Copy what you keep if you want memory to stay bounded.

    Warning:
        If the load fails, every buffer of this load that is still alive is zeroed, including
        tensors you already received: treat them all as garbage and discard the model. Stopping
        early (closing the generator) zeroes only what you do not hold.

    Raises:
        ModelDecryptionError: the manifest does not authenticate with ``key``, or a shard fails
            (naming the file, never the reason).
        ModelFormatError: a tensor's dtype is not supported by this torch.
    """
    manifest.authenticate(key)
    entries = [e for e in manifest.shards if shards is None or shards(e)]
    total = sum(e.plaintext_size for e in entries)
    model_key = key.reveal()

    def sources() -> Iterator[EncryptedShard]:
        for entry in entries:
            yield EncryptedShard.open(
                model_dir, manifest, entry, model_key, read_mode=read_mode, unmap_consumed=unmap_consumed
            )

    return load_tensors(
        sources(),
        device=device,
        threads=threads,
        select=select,
        slab_bytes=slab_bytes,
        depth=depth,
        stats=stats,
        total_bytes=total,
        clock=clock,
    )
