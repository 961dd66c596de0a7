"""Load statistics: bytes, seconds and throughput, overall and per file, for logs and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "FileStats",
    "LoadStats",
    "StatsRecorder",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class FileStats:
    """What the loader did with one file."""

    name: str
    bytes: int  # plaintext bytes delivered (selected tensors only)
    ciphertext_bytes: int  # ciphertext bytes authenticated
    seconds: float  # from opening the file to its last tensor being ready

    @property
    def gbps(self) -> float:
        """Plaintext throughput in GB/s (10**9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadStats:
    """A snapshot of one load (possibly still running: ``done`` is False)."""

    bytes: int
    ciphertext_bytes: int
    tensors: int
    seconds: float
    threads: int
    device: str
    done: bool
    files: tuple[FileStats, ...] = field(default=())

    @property
    def gbps(self) -> float:
        """Plaintext throughput in GB/s (10**9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """Return one log line (no tensor names, no contents)."""
        size = f"{self.bytes / 1e9:.3f} GB" if self.bytes >= 1e8 else f"{self.bytes / 1e6:.3f} MB"
        return (
            f"{self.tensors} tensors, {size} from {len(self.files)} files "
            f"in {self.seconds:.2f} s ({self.gbps:.2f} GB/s, {self.threads} threads, {self.device})"
        )


class StatsRecorder:
    """Thread-safe counters a load updates and any thread may :meth:`snapshot` (for metrics).

    ``clock`` returns seconds (monotonic); injected for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._end: float | None = None
        self._bytes = 0
        self._ct = 0
        self._tensors = 0
        self._threads = 0
        self._device = ""
        self._files: dict[str, list[float]] = {}  # name -> [bytes, ct, start, end]

    def start(self, *, threads: int, device: str) -> None:
        """Mark the start of a load."""
        with self._lock:
            self._start, self._end = self._clock(), None
            self._threads, self._device = threads, device

    def file_opened(self, name: str) -> None:
        """Mark that ``name`` was opened."""
        now = self._clock()
        with self._lock:
            self._files[name] = [0, 0, now, now]

    def add(self, name: str, *, plaintext: int, ciphertext: int, tensors: int) -> None:
        """Account a finished batch of ``name``."""
        now = self._clock()
        with self._lock:
            f = self._files.setdefault(name, [0, 0, now, now])
            f[0] += plaintext
            f[1] += ciphertext
            f[3] = now
            self._bytes += plaintext
            self._ct += ciphertext
            self._tensors += tensors

    def finish(self) -> None:
        """Mark the end of the load."""
        with self._lock:
            self._end = self._clock()

    def snapshot(self) -> LoadStats:
        """Return the current statistics."""
        with self._lock:
            end = self._end if self._end is not None else self._clock()
            seconds = end - self._start if self._start is not None else 0.0
            files = tuple(
                FileStats(name=n, bytes=int(f[0]), ciphertext_bytes=int(f[1]), seconds=f[3] - f[2])
                for n, f in self._files.items()
            )
            return LoadStats(
                bytes=self._bytes,
                ciphertext_bytes=self._ct,
                tensors=self._tensors,
                seconds=seconds,
                threads=self._threads,
                device=self._device,
                done=self._end is not None,
                files=files,
            )
