"""The staging ring: the only host memory that holds plaintext on the way to a GPU.

Decrypt threads write a chunk's plaintext into a free slot; one copy thread per device
(:class:`CopyLane`) issues its copy to the destination and returns the slot once the copy has
completed, so several copies are in flight and no thread waits for the GPU per chunk. Under
NVIDIA confidential computing the driver copies each slot through its encrypted bounce buffers,
so the slots are the only plaintext outside the GPU. Two kinds of host memory can back the
slots (:class:`StagingOptions`):

``pinned``
    page-locked memory from the CUDA host allocator (``cudaHostAlloc``, through torch's pinned
    allocator; never ``cudaHostRegister``): DMA-able, the usual fast path.
``pageable``
    ordinary anonymous memory (transparent huge pages requested). One CC-tuned vLLM fork
    turns pinned staging off under CC, where every copy is bounced anyway; measure both
    (``bench/load.py --device cuda``).

The ring is zeroed when the load ends (and on failure), before the memory goes back.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_SLOT_BYTES",
    "DEFAULT_STAGING_BYTES",
    "STAGING_MODES",
    "CopyLane",
    "CopyLaneFactory",
    "CudaCopyLane",
    "Slot",
    "StagingMode",
    "StagingOptions",
    "StagingRing",
    "anonymous_memory",
    "copy_lane",
]

logger = logging.getLogger(__name__)

StagingMode = Literal["pinned", "pageable"]
STAGING_MODES: tuple[StagingMode, ...] = ("pinned", "pageable")
#: Default size of one staging slot (at least one chunk; one host-to-device copy each).
DEFAULT_SLOT_BYTES = 8 << 20
#: Default bound on one device's staging memory (pinned memory is locked: keep it small).
DEFAULT_STAGING_BYTES = 256 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class StagingOptions:
    """How the GPU path stages plaintext: memory kind, slot count, slot size, and a memory bound.

    ``slots`` None: one per decrypt thread plus two (every thread can fill one while two are
    copied), but never more than ``max_bytes`` of staging memory per device, and at least two.
    """

    mode: StagingMode = "pinned"
    slots: int | None = None
    slot_bytes: int = DEFAULT_SLOT_BYTES
    max_bytes: int = DEFAULT_STAGING_BYTES

    def __post_init__(self) -> None:
        if self.mode not in STAGING_MODES:
            raise ValueError(f"staging mode must be one of {', '.join(STAGING_MODES)}, not {self.mode!r}")
        if self.slots is not None and self.slots < 1:
            raise ValueError("the staging ring needs at least one slot")
        if self.slot_bytes < 1:
            raise ValueError("staging slots must hold at least one byte")
        if self.max_bytes < 1:
            raise ValueError("the staging memory bound must be at least one byte")

    def slot_count(self, threads: int, slot_bytes: int | None = None) -> int:
        """Slots for ``threads`` decrypt threads and slots of ``slot_bytes`` (default: this size)."""
        if self.slots is not None:
            return self.slots
        size = max(1, slot_bytes or self.slot_bytes)
        return max(2, min(threads + 2, self.max_bytes // size))


def anonymous_memory(nbytes: int) -> torch.Tensor:
    """Return a uint8 tensor over fresh anonymous memory, with transparent huge pages requested."""
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or THP disabled
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8, count=nbytes)


@dataclass(slots=True, eq=False)
class Slot:
    """One staging buffer: the tensor the copy reads and its NumPy view the decrypt writes."""

    tensor: torch.Tensor
    array: np.ndarray[Any, np.dtype[np.uint8]]


class StagingRing:
    """A fixed set of staging slots shared by the decrypt threads and one copy thread."""

    def __init__(self, *, slots: int, slot_bytes: int, mode: StagingMode) -> None:
        self.mode = mode
        self.slot_bytes = slot_bytes
        self._slots = [self._alloc(slot_bytes) for _ in range(slots)]
        self._free = list(self._slots)
        self._cond = threading.Condition()

    def _alloc(self, nbytes: int) -> Slot:
        if self.mode == "pinned":
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            if not t.is_pinned():
                logger.warning("torch returned unpinned host memory for pinned staging")
        else:
            t = anonymous_memory(nbytes)
        return Slot(tensor=t, array=t.numpy())

    @property
    def pinned(self) -> bool:
        """Whether every slot is page-locked."""
        return all(s.tensor.is_pinned() for s in self._slots)

    @property
    def nbytes(self) -> int:
        """Host memory the ring holds."""
        return len(self._slots) * self.slot_bytes

    def take(self) -> Slot:
        """Block until a slot is free, and take it."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def give_back(self, slot: Slot) -> None:
        """Return a slot to the ring."""
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def wipe(self) -> None:
        """Zero every slot."""
        for slot in self._slots:
            slot.tensor.zero_()

    def close(self) -> None:
        """Zero and forget every slot (the memory goes back when no copy uses it)."""
        self.wipe()
        self._slots.clear()
        self._free.clear()


class _Batch:
    """The copies of one destination tensor: how many were handed in, issued, and the last one."""

    __slots__ = ("error", "issued", "last", "mark", "submitted")

    def __init__(self, mark: Any) -> None:
        self.mark = mark  # the consumer's position when the copy began (CUDA: an event)
        self.submitted = 0
        self.issued = 0
        self.last: Any = None
        self.error: BaseException | None = None


class CopyLane:
    """One destination device's copy thread: moves filled slots into their destinations, in order.

    Decrypt threads fill a slot (:meth:`StagingRing.take`) and hand it over with :meth:`submit`;
    the lane's one thread issues the copy and gives the slot back to the ring when the copy has
    *completed* (not when it was issued), so several copies are in flight and nothing waits per
    chunk. The consumer (the thread that called ``copy_``) opens a batch with :meth:`begin`
    before the first piece and closes it with :meth:`finish`, which returns once every copy of the
    batch has been issued and ordered before the consumer's later work.

    This base class copies into host memory, synchronously (the "staged" path: all of the GPU
    path but the device copy). :class:`CudaCopyLane` copies to a GPU. The hooks (``_bind``,
    ``_consumer_mark``, ``_copy``, ``_completed``, ``_wait``, ``_consumer_wait``) are the only
    device-specific part.
    """

    def __init__(self, ring: StagingRing, device: torch.device) -> None:
        self.ring = ring
        self.device = device
        self._jobs: deque[tuple[_Batch, Slot, torch.Tensor]] = deque()
        self._inflight: deque[tuple[Any, Slot]] = deque()  # copy thread only
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"enclave-copy-{device}", daemon=True)
        self._thread.start()

    # -- device hooks ----------------------------------------------------------------------

    def _bind(self) -> None:
        """Set up the copy thread (runs on it, once, before any copy)."""

    def _consumer_mark(self) -> Any:
        """Mark the consumer's position (runs on the consumer's thread); None for host copies."""
        return None

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """Issue one copy after ``after`` (a mark, or None); return what :meth:`_wait` waits on."""
        dst.copy_(src)
        return None

    def _completed(self, event: Any) -> bool:
        return True

    def _wait(self, event: Any) -> None:
        return None

    def _consumer_wait(self, event: Any) -> None:
        """Order the consumer's later work after the copy ``event`` (consumer's thread)."""

    # -- consumer and decrypt threads ------------------------------------------------------

    def begin(self) -> _Batch:
        """Open the batch of one destination tensor (on the consumer's thread)."""
        return _Batch(self._consumer_mark())

    def submit(self, batch: _Batch, slot: Slot, dst: torch.Tensor) -> None:
        """Queue ``slot``'s first ``dst.numel()`` bytes for ``dst`` (a uint8 view); the lane owns the slot."""
        with self._cond:
            if self._stopping:
                self.ring.give_back(slot)
                raise RuntimeError("the copy lane is closed")
            batch.submitted += 1
            self._jobs.append((batch, slot, dst))
            self._cond.notify_all()

    def finish(self, batch: _Batch) -> None:
        """Wait until every copy of ``batch`` was issued; order the consumer after them.

        Raises the first error a copy of the batch raised.
        """
        with self._cond:
            while batch.issued < batch.submitted:
                self._cond.wait()
        if batch.last is not None:
            self._consumer_wait(batch.last)
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        """Issue what is queued, wait for every copy to complete, stop the thread (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    # -- the copy thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._bind()
            bound: BaseException | None = None
        except BaseException as exc:  # every copy of this lane fails with it
            bound = exc
        while True:
            with self._cond:
                while not self._jobs and not self._inflight and not self._stopping:
                    self._cond.wait()
                job = self._jobs.popleft() if self._jobs else None
                if job is None and not self._inflight:
                    return  # stopping, and nothing left
            if job is None:  # nothing to issue: free the oldest slot as soon as its copy is done
                self._release_oldest(block=True)
                continue
            self._issue(*job, bound)
            while self._inflight and self._release_oldest(block=False):
                pass

    def _issue(self, batch: _Batch, slot: Slot, dst: torch.Tensor, bound: BaseException | None) -> None:
        event: Any = None
        error = bound
        if error is None and batch.error is None:
            after, batch.mark = batch.mark, None  # the consumer is waited for once, before the first copy
            try:
                event = self._copy(dst, slot.tensor[: dst.numel()], after)
            except BaseException as exc:
                error = exc
        if event is None:
            self.ring.give_back(slot)
        else:
            self._inflight.append((event, slot))
        with self._cond:
            if error is not None and batch.error is None:
                batch.error = error
            if event is not None:
                batch.last = event
            batch.issued += 1
            self._cond.notify_all()

    def _release_oldest(self, *, block: bool) -> bool:
        event, slot = self._inflight[0]
        if block:
            self._wait(event)
        elif not self._completed(event):
            return False
        self._inflight.popleft()
        self.ring.give_back(slot)
        return True


class CudaCopyLane(CopyLane):
    """Copies to one CUDA device on its own stream, bound to that device.

    * The copy thread makes the destination's device current before any CUDA call, so a
      tensor-parallel rank never creates a context on another GPU (a new thread starts on
      device 0).
    * Before a tensor's first copy the copy stream waits for the consumer's stream as it was
      when ``copy_`` was called: a ``fill_``/``zero_``/``torch.zeros`` queued just before cannot
      land after the decrypted bytes.
    * No host synchronisation per chunk: each copy records an event; a slot goes back to the ring
      when its event has completed; :meth:`finish` makes the consumer's stream wait for the last
      copy, so the consumer's later work sees the bytes without the host waiting for them.

    Under NVIDIA confidential computing the driver moves each copy through encrypted bounce
    buffers; the copy call then returns only when the slot has been consumed, on this thread.
    """

    def __init__(self, ring: StagingRing, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        super().__init__(ring, device)

    def _bind(self) -> None:
        torch.cuda.set_device(self.device)
        torch.cuda.set_stream(self.stream)  # thread-local

    def _consumer_mark(self) -> Any:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        if after is not None:
            self.stream.wait_event(after)
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.stream)
        return event

    def _completed(self, event: Any) -> bool:
        return bool(event.query())

    def _wait(self, event: Any) -> None:
        event.synchronize()

    def _consumer_wait(self, event: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


#: Makes the copy lane of a destination device (a test seam: :class:`LazyCheckpoint`'s ``copy_lanes``).
CopyLaneFactory = Callable[[StagingRing, torch.device], CopyLane]


def copy_lane(ring: StagingRing, device: torch.device) -> CopyLane:
    """Return the copy lane for ``device``: CUDA copies on a stream, anything else synchronously."""
    return CudaCopyLane(ring, device) if device.type == "cuda" else CopyLane(ring, device)
