"""Plaintext buffers of one load: host slabs that back yielded tensors, and the pinned staging ring.

Every buffer that ever holds plaintext is allocated here, so one :meth:`Buffers.wipe` can zero
all of them that are still alive when a load fails.

Recycling rule: a host slab returns to the free list only when its storage's reference count shows
that no tensor outside this module still points into it (the consumer dropped every view). A slab
still referenced is abandoned to the consumer: it is freed when their last view dies, and it is
still zeroed if the load fails (a weak reference is kept).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "ALIGNMENT",
    "Buffers",
    "Slab",
    "copy_slot_to_device",
    "storage_refs",
]

logger = logging.getLogger(__name__)

#: Alignment of every tensor in a slab: cudaMalloc's 256-byte alignment (CUDA C Programming Guide,
#: "Device Memory Accesses"), which also covers every dtype and AVX-512 loads.
ALIGNMENT = 256

_use_count: Callable[[Any], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _anonymous(nbytes: int) -> torch.Tensor:
    """Return a uint8 tensor over fresh anonymous memory, with transparent huge pages requested.

    Huge pages cut first-touch page faults 512-fold, which matters at several GB/s.
    """
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or THP disabled
        mem.madvise(mmap.MADV_HUGEPAGE)
    return (
        torch.frombuffer(mem, dtype=torch.uint8, count=nbytes)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )


def storage_refs(t: torch.Tensor) -> int | None:
    """Return the reference count of ``t``'s storage, or None when torch cannot tell."""
    if _use_count is None:
        return None
    return int(_use_count(t.untyped_storage()._cdata))


@dataclass(slots=True, eq=False)
class Slab:
    """A uint8 buffer, its NumPy view (for ``decrypt_into``), and its reference-count baseline."""

    tensor: torch.Tensor
    array: np.ndarray[Any, np.dtype[np.uint8]] | None
    baseline: int | None
    pooled: bool


class Buffers:
    """All plaintext buffers of one load.

    ``slab_bytes`` is the size of a pooled host slab; larger requests get a one-off slab. At most
    ``max_free`` idle slabs are kept. ``pin`` allocates host memory through the CUDA host
    allocator (``cudaHostAlloc``), never ``cudaHostRegister``.
    """

    def __init__(self, *, slab_bytes: int, max_free: int, pin: bool) -> None:
        self.slab_bytes = slab_bytes
        self._max_free = max_free
        self._pin = pin
        self._free: list[Slab] = []
        self._live: list[Slab] = []  # acquired and not yet released
        self._pending: list[list[Any]] = []  # [slab, age in batches]
        # Weak references to storages: a storage object outlives the slab tensor while any view of
        # it lives (a dtype-changing view does not keep its base tensor, but keeps the storage).
        self._abandoned: list[weakref.ref[torch.UntypedStorage]] = []
        self._device: list[weakref.ref[torch.UntypedStorage]] = []
        self._ring: list[Slab] = []
        self._ring_free: list[Slab] = []
        self._ring_cond = threading.Condition()
        self.pinned: bool | None = None
        self.allocated = 0

    def _alloc_host(self, nbytes: int, pooled: bool) -> Slab:
        if self._pin:
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            pinned = bool(t.is_pinned())
            if self.pinned is None and not pinned:
                logger.warning(
                    "torch returned unpinned host memory for staging (seen under NVIDIA CC mode); "
                    "host-to-device copies will be slower"
                )
            self.pinned = pinned if self.pinned is None else self.pinned and pinned
        else:
            t = _anonymous(nbytes)
        self.allocated += nbytes
        return Slab(tensor=t, array=t.numpy(), baseline=storage_refs(t), pooled=pooled)

    def acquire(self, nbytes: int) -> Slab:
        """Return a host slab of at least ``nbytes``: the smallest idle one that fits, else a new one."""
        fits = [s for s in self._free if s.tensor.numel() >= nbytes]
        if fits:
            slab = min(fits, key=lambda s: s.tensor.numel())
            self._free.remove(slab)
        else:
            slab = self._alloc_host(max(nbytes, self.slab_bytes), pooled=True)
        self._live.append(slab)
        return slab

    def release(self, slab: Slab) -> None:
        """Mark a slab whose tensors were all handed out; it is reused once nobody holds them.

        The consumer's loop variable usually still holds the last tensor when the next one is
        requested, so the check is deferred: :meth:`reclaim` retries on later calls.
        """
        self._live.remove(slab)
        self._pending.append([slab, 0])
        self.reclaim()

    def reclaim(self, *, new_batch: bool = False) -> None:
        """Recycle handed-out slabs nobody references any more; abandon those held too long.

        ``new_batch`` ages the pending slabs: one still referenced two batches later is left to
        the consumer (kept only through a weak reference, for :meth:`wipe`).
        """
        keep: list[list[Any]] = []
        for item in self._pending:
            slab: Slab = item[0]
            if new_batch:
                item[1] += 1
            if slab.baseline is not None and storage_refs(slab.tensor) == slab.baseline:
                if slab.pooled and len(self._free) < self._max_free:
                    self._free.append(slab)
            elif item[1] >= 2 or slab.baseline is None:
                self._abandoned.append(weakref.ref(slab.tensor.untyped_storage()))
                slab.array = None
            else:
                keep.append(item)
        self._pending = keep

    def track_device(self, t: torch.Tensor) -> None:
        """Remember a device buffer so that :meth:`wipe` can zero it while it is alive."""
        self._device.append(weakref.ref(t.untyped_storage()))

    # Pinned staging ring (GPU path).
    def make_ring(self, slots: int, slot_bytes: int) -> None:
        """Allocate the pinned staging ring."""
        self._ring = [self._alloc_host(slot_bytes, pooled=False) for _ in range(slots)]
        self._ring_free = list(self._ring)

    def take_slot(self) -> Slab:
        """Block until a staging slot is free, and take it."""
        with self._ring_cond:
            while not self._ring_free:
                self._ring_cond.wait()
            return self._ring_free.pop()

    def return_slot(self, slot: Slab) -> None:
        """Return a staging slot to the ring."""
        with self._ring_cond:
            self._ring_free.append(slot)
            self._ring_cond.notify()

    def wipe(self, *, include_handed_out: bool) -> None:
        """Zero every plaintext buffer still alive.

        ``include_handed_out`` also zeroes slabs whose tensors the consumer still holds (after a
        failed load they hold plaintext of an untrusted model).
        """
        for slab in self._free + self._ring:
            slab.tensor.zero_()
        for slab in self._live + [item[0] for item in self._pending]:
            if include_handed_out or slab.baseline is None or storage_refs(slab.tensor) == slab.baseline:
                slab.tensor.zero_()
        if include_handed_out:
            for ref in self._abandoned + self._device:
                storage = ref()
                if storage is not None:
                    storage.fill_(0)  # type: ignore[attr-defined]  # exists; missing from the stubs
            if self._device and torch.cuda.is_available():
                torch.cuda.synchronize()

    def drop(self) -> None:
        """Forget every buffer (the memory is freed when no tensor uses it)."""
        self._free.clear()
        self._live.clear()
        self._pending.clear()
        self._ring.clear()
        self._ring_free.clear()
        self._abandoned.clear()
        self._device.clear()


def copy_slot_to_device(buffers: Buffers, slot: Slab, dst: torch.Tensor, stream: Any) -> None:
    """Copy the first ``dst.numel()`` bytes of pinned ``slot`` into the uint8 device view ``dst``,
    wait for it on ``stream``, and return the slot to ``buffers``' ring.

    Under NVIDIA CC a host-to-device copy is host-synchronous: call this from the device's one
    copy thread, never from a decrypt thread.
    """
    try:
        with torch.cuda.stream(stream):
            dst.copy_(slot.tensor[: dst.numel()], non_blocking=True)
        stream.synchronize()
    finally:
        buffers.return_slot(slot)
