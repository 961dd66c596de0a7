"""A test double of CUDA streams and events on the CPU, and a copy lane that uses it.

:class:`StreamDouble` runs the work queued on it in order on its own thread, as a CUDA stream
runs kernels and copies after the host queued them; an event is a :class:`threading.Event` set
when the stream reaches it; ``wait_event`` queues a wait. :class:`AsyncCopyLaneDouble` is
:class:`loader.staging.CopyLane` with CUDA's semantics on that double: copies return before they
happen (after ``delay_s``), and the consumer has its own stream. It lets the CPU tests prove the
ordering that the CUDA lane relies on (slots reused only after their copy completed, the copy
stream waiting for the consumer's stream, the consumer waiting for the copies). It proves nothing
about CUDA itself: the GPU tests do that.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from loader.staging import CopyLane, StagingRing

__all__ = ["AsyncCopyLaneDouble", "StreamDouble"]


class StreamDouble:
    """In-order work on one thread (a CUDA stream, for tests)."""

    def __init__(self, name: str) -> None:
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (fn := self._work.get()) is not None:
            fn()

    def enqueue(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def record(self) -> threading.Event:
        event = threading.Event()
        self.enqueue(event.set)
        return event

    def wait_event(self, event: threading.Event) -> None:
        def wait() -> None:
            event.wait(10)

        self.enqueue(wait)

    def synchronize(self) -> None:
        self.record().wait(10)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join()


class AsyncCopyLaneDouble(CopyLane):
    """A copy lane whose copies run later, on a stream double (see the module docstring).

    ``early_release`` reproduces the bug the lane must not have (a slot given back when its copy
    is issued, not when it completed), so that a test can show it would notice.
    """

    def __init__(
        self,
        ring: StagingRing,
        device: torch.device,
        *,
        consumer: StreamDouble,
        delay_s: float = 0.001,
        early_release: bool = False,
    ) -> None:
        self.consumer = consumer
        self.copies = StreamDouble("copy-stream-double")
        self.delay_s = delay_s
        self.early_release = early_release
        self.bound_thread: int | None = None
        self.copy_threads: set[int] = set()
        self.outstanding = 0
        self.max_outstanding = 0
        self._count = threading.Lock()
        super().__init__(ring, device)

    def _bind(self) -> None:
        self.bound_thread = threading.get_ident()

    def _consumer_mark(self) -> Any:
        return self.consumer.record()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        self.copy_threads.add(threading.get_ident())
        if after is not None:
            self.copies.wait_event(after)
        with self._count:
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)

        def run() -> None:
            time.sleep(self.delay_s)
            dst.copy_(src)
            with self._count:
                self.outstanding -= 1

        self.copies.enqueue(run)
        done = self.copies.record()
        return None if self.early_release else done

    def _completed(self, event: Any) -> bool:
        return bool(event.is_set())

    def _wait(self, event: Any) -> None:
        event.wait(10)

    def _consumer_wait(self, event: Any) -> None:
        self.consumer.wait_event(event)

    def close(self) -> None:
        super().close()
        self.copies.synchronize()
        self.copies.close()
