"""Request TEE reports through the Linux configfs-tsm ABI (``/sys/kernel/config/tsm/report``).

The ABI (Documentation/ABI/testing/configfs-tsm-report; drivers/virt/coco/guest/report.c):
``mkdir`` an entry and the kernel creates its attributes; write the 64-byte ``inblob`` (and, for
SEV, ``privlevel`` first); read ``outblob`` (and ``auxblob``), which the kernel generates on read;
read ``generation``, which counts the writes to the entry: if it is not the number of writes
*we* made, another process wrote to our entry between our write and our read, and the report
may be theirs; ``rmdir`` the entry (never a recursive delete: configfs refuses it).

Transient ``EBUSY``/``EAGAIN`` and generation races are retried a bounded number of times with
a fresh entry each time. File-system access goes through :class:`TsmFilesystem`, so the logic
can be tested against a directory that behaves like the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from foundation.errors import BackendUnavailable, EvidenceCollectionError

__all__ = [
    "DEFAULT_TSM_REPORT_ROOT",
    "INBLOB_SIZE",
    "ConfigfsTsm",
    "OsFilesystem",
    "TsmFilesystem",
    "TsmReport",
    "guest_present",
]

logger = logging.getLogger(__name__)

#: Where configfs-tsm report entries are created (configfs-tsm-report ABI).
DEFAULT_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
#: tdx_guest and sev_guest require exactly 64 bytes of inblob (TDX_REPORTDATA_LEN,
#: SNP_REPORT_USER_DATA_SIZE); shorter writes fail with EINVAL when outblob is read.
INBLOB_SIZE = 64
#: Errors the kernel returns while another request is in flight.
_TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN})


class TsmFilesystem(Protocol):
    """The file operations the configfs-tsm client needs."""

    def make_entry(self, root: Path, prefix: str) -> Path:
        """Create a fresh, uniquely named entry directory under ``root`` and return it."""
        ...

    def read(self, path: Path) -> bytes:
        """Return the whole content of an attribute."""
        ...

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to an attribute in one ``write`` call."""
        ...

    def exists(self, path: Path) -> bool:
        """Return whether an attribute exists (some are provider-specific)."""
        ...

    def remove_entry(self, path: Path) -> None:
        """Remove an entry directory with ``rmdir``."""
        ...


class OsFilesystem:
    """:class:`TsmFilesystem` on the real file system (``mkdtemp``, ``open``, ``os.rmdir``)."""

    def make_entry(self, root: Path, prefix: str) -> Path:
        """Create the entry with ``tempfile.mkdtemp`` (configfs fills in the attributes)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))

    def read(self, path: Path) -> bytes:
        """Read the attribute."""
        with open(path, "rb") as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        """Write the attribute unbuffered, in one call.

        Raises:
            OSError: the write failed or was short.
        """
        with open(path, "wb", buffering=0) as f:
            written = f.write(data)
        if written != len(data):
            raise OSError(errno.EIO, f"short write to {path.name}: {written} of {len(data)} bytes")

    def exists(self, path: Path) -> bool:
        """Return whether ``path`` exists."""
        return path.exists()

    def remove_entry(self, path: Path) -> None:
        """``os.rmdir`` the entry (configfs removes its attributes with it)."""
        os.rmdir(path)


@dataclass(frozen=True, slots=True, kw_only=True)
class TsmReport:
    """One report read from configfs-tsm."""

    provider: str
    outblob: bytes
    auxblob: bytes | None
    generation: int


class _Race(Exception):
    """Someone else wrote to our entry; retry with a fresh one."""


class ConfigfsTsm:
    """A configfs-tsm report client for one report root.

    ``max_attempts`` bounds the retries on ``EBUSY``/``EAGAIN`` and generation races;
    ``sleep`` (injectable for tests) waits ``backoff_s * attempt`` between attempts.
    """

    def __init__(
        self,
        root: Path = DEFAULT_TSM_REPORT_ROOT,
        *,
        fs: TsmFilesystem | None = None,
        max_attempts: int = 5,
        backoff_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.root = root
        self._fs: TsmFilesystem = fs if fs is not None else OsFilesystem()
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._sleep = sleep

    def available(self) -> bool:
        """Return whether the report root exists (configfs mounted, kernel >= 6.7)."""
        return self.root.is_dir()

    def report(
        self, inblob: bytes, *, provider: str, privlevel: int | None = None, read_auxblob: bool = False
    ) -> TsmReport:
        """Return a fresh report over ``inblob`` from the TSM provider named ``provider``.

        Raises:
            ValueError: ``inblob`` is not exactly 64 bytes.
            BackendUnavailable: no configfs-tsm, or its provider is not ``provider``.
            EvidenceCollectionError: the kernel refused, or retries ran out.
        """
        if len(inblob) != INBLOB_SIZE:
            raise ValueError(f"inblob must be exactly {INBLOB_SIZE} bytes (pad the report data)")
        if not self.available():
            raise BackendUnavailable(
                f"configfs-tsm is not available at {self.root}; needs a TDX/SEV-SNP guest with Linux >= 6.7 "
                "and configfs mounted"
            )
        last = ""
        for attempt in range(1, self._max_attempts + 1):
            try:
                return self._attempt(inblob, provider, privlevel, read_auxblob)
            except _Race as exc:
                last = str(exc)
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise EvidenceCollectionError(
                        f"configfs-tsm {provider} report failed: {_describe(exc)}"
                        + (" (run as root)" if exc.errno in (errno.EACCES, errno.EPERM) else "")
                    ) from exc
                last = _describe(exc)
            logger.info("configfs-tsm attempt %d/%d: %s; retrying", attempt, self._max_attempts, last)
            if attempt < self._max_attempts:
                self._sleep(self._backoff_s * attempt)
        raise EvidenceCollectionError(
            f"configfs-tsm {provider} report failed {self._max_attempts} times ({last}); "
            "another process keeps using the TSM; retry later"
        )

    def _attempt(self, inblob: bytes, provider: str, privlevel: int | None, read_auxblob: bool) -> TsmReport:
        entry = self._fs.make_entry(self.root, "enclave-serve-")
        try:
            found = self._fs.read(entry / "provider").decode("ascii", "replace").strip()
            if found != provider:
                raise BackendUnavailable(f"the configfs-tsm provider is {found!r}, not {provider!r}")
            writes = 0
            if privlevel is not None:
                self._fs.write(entry / "privlevel", str(privlevel).encode())
                writes += 1
            self._fs.write(entry / "inblob", inblob)
            writes += 1
            outblob = self._fs.read(entry / "outblob")
            auxblob = None
            if read_auxblob and self._fs.exists(entry / "auxblob"):
                auxblob = self._fs.read(entry / "auxblob") or None
            raw_generation = self._fs.read(entry / "generation").strip()
            try:
                generation = int(raw_generation)
            except ValueError:
                raise EvidenceCollectionError(
                    f"configfs-tsm generation {raw_generation!r} is not a number"
                ) from None
            if generation != writes:
                raise _Race(f"generation is {generation}, expected {writes}: another writer raced us")
            if not outblob:
                raise EvidenceCollectionError(f"configfs-tsm {provider} returned an empty report")
            return TsmReport(provider=found, outblob=outblob, auxblob=auxblob, generation=generation)
        finally:
            try:
                self._fs.remove_entry(entry)
            except OSError as exc:
                logger.warning("could not remove configfs-tsm entry %s: %s", entry, _describe(exc))


def guest_present(tsm_root: Path, device_paths: Sequence[Path]) -> bool:
    """Return whether configfs-tsm and one of a TEE guest driver's paths exist.

    Only ``stat`` calls: nothing is created, so detection has no side effects.
    """
    try:
        return tsm_root.is_dir() and any(p.exists() for p in device_paths)
    except OSError:
        return False


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name} ({exc.strerror or exc})"
