"""The runtime's guest-private working directory, in memory inside the confidential VM.

Everything the runtime or vLLM would otherwise read from or write to a path the host may back
(the model volume, ``$HOME``, ``/tmp``, cache directories) goes here instead: the model view
with the attested side files (:mod:`loader.modelview`), the key handoff socket, vLLM's and the
libraries' caches, ``TMPDIR``. The directory is created fresh for each boot with mode ``0700``
on a memory-backed filesystem (``tmpfs``/``ramfs``), which inside a confidential VM is
encrypted guest memory the host cannot read or change. A host-backed filesystem (virtio-fs,
9p, NFS, a block device) is refused. It is removed when the runtime stops.

Not protected: other processes of the same uid (or root) in the container can read and write
it like any of the runtime's files; the agent policy must deny ``exec`` into the container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attest.errors import ConfigError

__all__ = ["MEMORY_FILESYSTEMS", "PrivateDirectory", "filesystem_type"]

#: Filesystems whose contents live in (guest) memory only.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})

_SUBDIRS = ("cache", "config", "home", "key", "tmp")


def _unescape_mount_path(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal (proc(5)).
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: Path, *, mountinfo: str | None = None) -> str:
    """Return the type of the filesystem that holds ``path`` (per ``/proc/self/mountinfo``).

    Raises:
        ConfigError: the mount table cannot be read or names no mount for ``path``.
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the mount table: {exc.strerror}") from exc
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount_point = _unescape_mount_path(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # Later lines over-mount earlier ones at the same point: >= keeps the last.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), right.split()[0])
    if best is None:
        raise ConfigError(f"no mount holds {path}")
    return best[1]


@dataclass(frozen=True, slots=True)
class PrivateDirectory:
    """A fresh ``0700`` directory on a memory-backed filesystem, with the runtime's subdirectories.

    Create one with :meth:`create`; :meth:`remove` deletes it and everything in it.
    """

    root: Path
    filesystem: str

    @classmethod
    def create(cls, base: Path, *, mountinfo: str | None = None) -> PrivateDirectory:
        """Create the directory under ``base``.

        Raises:
            ConfigError: ``base`` is missing or not memory-backed (names the filesystem found).
        """
        if not base.is_dir():
            raise ConfigError(f"the private directory base {base} does not exist")
        fs = filesystem_type(base, mountinfo=mountinfo)
        if fs not in MEMORY_FILESYSTEMS:
            raise ConfigError(
                f"{base} is on {fs}, not in guest memory (tmpfs): the runtime's private files would "
                "be visible to the host; point --private-dir at a tmpfs such as /dev/shm"
            )
        root = Path(tempfile.mkdtemp(prefix="enclave-serve-", dir=base))
        os.chmod(root, 0o700)
        for name in _SUBDIRS:
            (root / name).mkdir(mode=0o700)
        return cls(root=root, filesystem=fs)

    @property
    def model_view(self) -> Path:
        """Where the model view goes (created by :func:`loader.modelview.stage_model_view`)."""
        return self.root / "model"

    @property
    def key_dir(self) -> Path:
        """Where the key handoff socket lives."""
        return self.root / "key"

    def sub(self, name: str) -> Path:
        """Return one of the fixed subdirectories (``cache``, ``config``, ``home``, ``tmp``)."""
        if name not in _SUBDIRS:
            raise KeyError(name)
        return self.root / name

    def remove(self) -> None:
        """Delete the directory and its contents (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)
