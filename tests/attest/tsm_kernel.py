"""A test double of the configfs-tsm kernel ABI over a temporary directory.

**This is not the kernel.** It implements :class:`attest.tee.tsm.TsmFilesystem` the way
``drivers/virt/coco/guest/report.c`` behaves, so the provider logic above the file operations
runs for real: ``make_entry`` creates the directory with its attribute files (``provider``,
``generation``, and for SEV ``privlevel_floor``), every write to ``inblob``/``privlevel`` bumps
``generation``, ``outblob`` is produced on read from the inblob (``EINVAL`` unless exactly 64
bytes were written), ``rmdir`` removes the entry and its attributes (a recursive delete is
never needed). Faults are injectable: ``busy`` reads of ``outblob`` fail with ``EBUSY``, and
``races`` simulate another writer bumping ``generation`` between our write and our read.
"""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

READ_ONLY = frozenset({"provider", "generation", "outblob", "auxblob", "privlevel_floor"})
WRITE_ONLY = frozenset({"inblob", "privlevel"})


@dataclass
class _Entry:
    generation: int = 0
    inblob: bytes | None = None
    privlevel: int | None = None


@dataclass
class KernelLikeTsm:
    """configfs-tsm semantics for one provider; ``respond(inblob, privlevel)`` makes the outblob."""

    root: Path
    provider: str
    respond: Callable[[bytes, int | None], bytes]
    auxblob: bytes | None = None
    busy: int = 0
    races: int = 0
    entries: dict[Path, _Entry] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    outblob_reads: int = 0

    def make_entry(self, root: Path, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        if self.provider == "sev_guest":
            (path / "privlevel_floor").write_text("0\n")
            if self.auxblob is not None:
                (path / "auxblob").write_bytes(b"")
        self.entries[path] = _Entry()
        self.created.append(path)
        return path

    def _entry(self, path: Path) -> _Entry:
        try:
            return self.entries[path.parent]
        except KeyError:
            raise OSError(errno.ENOENT, "no such entry", str(path)) from None

    def _bump(self, path: Path, entry: _Entry) -> None:
        entry.generation += 1
        (path.parent / "generation").write_text(f"{entry.generation}\n")

    def write(self, path: Path, data: bytes) -> None:
        entry = self._entry(path)
        name = path.name
        if name in READ_ONLY:
            raise OSError(errno.EACCES, "read-only attribute", str(path))
        if name == "inblob":
            if len(data) > 64:
                raise OSError(errno.EINVAL, "inblob too large", str(path))
            entry.inblob = data
        elif name == "privlevel":
            if self.provider != "sev_guest":
                raise OSError(errno.ENOENT, "no privlevel for this provider", str(path))
            entry.privlevel = int(data)
        else:
            raise OSError(errno.ENOENT, "no such attribute", str(path))
        self._bump(path, entry)

    def read(self, path: Path) -> bytes:
        entry = self._entry(path)
        name = path.name
        if name in WRITE_ONLY:
            raise OSError(errno.EACCES, "write-only attribute", str(path))
        if name == "outblob":
            self.outblob_reads += 1
            if self.busy:
                self.busy -= 1
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            if entry.inblob is None or len(entry.inblob) != 64:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            out = self.respond(entry.inblob, entry.privlevel)
            if self.races:
                self.races -= 1
                self._bump(path, entry)  # another process wrote to our entry
            return out
        if name == "auxblob":
            return self.auxblob or b""
        return path.read_bytes()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def remove_entry(self, path: Path) -> None:
        # configfs removes the attributes with the directory; rmdir of the entry is all it takes.
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
        self.entries.pop(path, None)
        self.removed.append(path)
