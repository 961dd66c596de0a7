"""The staging ring: the only host memory that holds plaintext on the way to a GPU.

Decrypt threads write a chunk's plaintext into a free slot; one copy thread per device moves it
to the destination and returns the slot. Under NVIDIA confidential computing the driver copies
each slot through its encrypted bounce buffers, so the slots are the only plaintext outside the
GPU. Two kinds of host memory can back the slots (:class:`StagingOptions`):

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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_SLOT_BYTES",
    "STAGING_MODES",
    "Slot",
    "StagingMode",
    "StagingOptions",
    "StagingRing",
    "anonymous_memory",
    "copy_slot_to_device",
]

logger = logging.getLogger(__name__)

StagingMode = Literal["pinned", "pageable"]
STAGING_MODES: tuple[StagingMode, ...] = ("pinned", "pageable")
#: Default size of one staging slot (at least one chunk; one host-to-device copy each).
DEFAULT_SLOT_BYTES = 8 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class StagingOptions:
    """How the GPU path stages plaintext: memory kind, slot count (None: threads + 2), slot size."""

    mode: StagingMode = "pinned"
    slots: int | None = None
    slot_bytes: int = DEFAULT_SLOT_BYTES

    def __post_init__(self) -> None:
        if self.mode not in STAGING_MODES:
            raise ValueError(f"staging mode must be one of {', '.join(STAGING_MODES)}, not {self.mode!r}")
        if self.slots is not None and self.slots < 1:
            raise ValueError("the staging ring needs at least one slot")
        if self.slot_bytes < 1:
            raise ValueError("staging slots must hold at least one byte")

    def slot_count(self, threads: int) -> int:
        """Slots for ``threads`` decrypt threads: every thread can fill one while two are copied."""
        return self.slots if self.slots is not None else threads + 2


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


def copy_slot_to_device(ring: StagingRing, slot: Slot, dst: torch.Tensor, stream: Any | None) -> None:
    """Copy the first ``dst.numel()`` bytes of ``slot`` into the uint8 view ``dst``, wait for the
    copy, and give the slot back to ``ring``.

    ``stream`` is the device's copy stream (None for a host destination). Under NVIDIA CC a
    host-to-device copy is host-synchronous: call this from the device's one copy thread, never
    from a decrypt thread.
    """
    try:
        if stream is None:
            dst.copy_(slot.tensor[: dst.numel()])
        else:
            with torch.cuda.stream(stream):
                dst.copy_(slot.tensor[: dst.numel()], non_blocking=True)
            stream.synchronize()
    finally:
        ring.give_back(slot)
