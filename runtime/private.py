"""The runtime's guest-private working directory, in memory inside the confidential VM.

Everything the runtime or vLLM would otherwise read from or write to a path the host may back
(the model volume, ``$HOME``, ``/tmp``, cache directories) goes here instead: the model view
with the attested side files (:mod:`loader.modelview`), the key handoff socket, vLLM's and the
libraries' caches (compiled kernels the workers execute), ``TMPDIR``. The directory is created
fresh for each boot, owned by the runtime's uid with mode ``0700``, under a base directory that
must be:

1. memory-backed (``tmpfs``/``ramfs``), which inside a confidential VM is encrypted guest memory
   the host cannot read or change; a host-backed filesystem (virtio-fs, 9p, NFS, a block
   device, the image's overlay) is refused;
2. not the filesystem of ``/dev/shm``, which every container of a pod shares (containerd and
   Kata bind the sandbox's one ``/dev/shm`` into each); compared by device number, so a bind
   mount of it elsewhere is refused too. ``allow_insecure_shared`` accepts it for development
   machines whose only tmpfs is ``/dev/shm``, with a warning at every use;
3. safe from replacement: owned by the runtime's uid or by root, and writable by no other user
   unless it is sticky (``1777``, as a tmpfs or a Kubernetes memory ``emptyDir`` arrives), so
   no other user can rename the per-boot directory away and put one of its own in its place.

The deployment provides the base as a memory ``emptyDir`` mounted at ``/run/enclave-serve``
(:data:`runtime.config.DEFAULT_PRIVATE_DIR`) into the runtime's container only; the image runs
as the dedicated uid 10001 (``docs/operations.md``). It is removed when the runtime stops.

Not protected: what the runtime cannot see from inside its container. Another container that
mounts the same volume (the pod spec decides; the agent policy must pin every container's
mounts) and runs as root or as the runtime's uid can read and write it; so can other processes
of the runtime's uid or root in this container (the agent policy must deny ``exec``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import ConfigError
from runtime.mounts import MEMORY_FILESYSTEMS, filesystem_of, parse_mountinfo, read_mountinfo

__all__ = ["MEMORY_FILESYSTEMS", "SHARED_MEMORY", "PrivateDirectory", "filesystem_type"]

logger = logging.getLogger(__name__)

#: The pod-wide shared memory filesystem (one per pod sandbox, bound into every container).
SHARED_MEMORY = Path("/dev/shm")

_SUBDIRS = ("cache", "config", "home", "key", "tmp")
_PRIVATE_MODE = 0o700
#: How often :meth:`PrivateDirectory.remove` tries before it gives up.
_REMOVE_ATTEMPTS = 3


def filesystem_type(path: Path, *, mountinfo: str | None = None) -> str:
    """Return the type of the filesystem that holds ``path`` (per ``/proc/self/mountinfo``).

    Raises:
        ConfigError: the mount table cannot be read or names no mount for ``path``.
    """
    mounts = parse_mountinfo(read_mountinfo() if mountinfo is None else mountinfo)
    mount = filesystem_of(path, mounts)
    if mount is None:
        raise ConfigError(f"the mount table names no filesystem for {path}")
    return mount.fstype


def _check_base(
    base: Path, *, shared_memory: Path, allow_insecure_shared: bool, mountinfo: str | None
) -> str:
    """Check the base directory (steps 1-3 of the module docstring); return its filesystem type."""
    try:
        info = os.lstat(base)
    except OSError:
        info = None
    if info is None or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"the private directory base {base} does not exist: mount a memory emptyDir there "
            "(docs/operations.md) or pass --private-dir"
        )
    # 1. In guest memory.
    fs = filesystem_type(base, mountinfo=mountinfo)
    if fs not in MEMORY_FILESYSTEMS:
        raise ConfigError(
            f"{base} is on {fs}, not in guest memory (tmpfs): the runtime's private files would "
            "be visible to the host; mount a memory emptyDir there (docs/operations.md) or point "
            "--private-dir at another tmpfs"
        )
    # 2. Not the pod-wide /dev/shm (by device: a bind mount of it elsewhere is the same).
    try:
        shared_device: int | None = os.stat(shared_memory).st_dev
    except OSError:
        shared_device = None  # no /dev/shm here: nothing shared to be confused with
    if shared_device == info.st_dev:
        if not allow_insecure_shared:
            raise ConfigError(
                f"{base} is on the filesystem of {shared_memory}, which every container of the "
                "pod shares: mount a memory emptyDir into this container only "
                "(docs/operations.md), or for development add --allow-insecure-shared-private-dir"
            )
        logger.warning(
            "INSECURE: the private directory is on %s, which every container of the pod can "
            "reach (--allow-insecure-shared-private-dir: development only)",
            shared_memory,
        )
    # 3. Nobody else can rename what we create in it away and put their own in its place.
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise ConfigError(
            f"{base} belongs to uid {info.st_uid}, not to the runtime (uid {uid}) or root: its "
            "owner could replace the private directory; give it to the runtime's user"
        )
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not info.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{base} (mode {stat.S_IMODE(info.st_mode):04o}) is writable by other users without "
            "the sticky bit: they could replace the private directory; make it 0700 or 1777"
        )
    return fs


def _seal(path: Path, *, device: int) -> None:
    """Make the directory ``path`` mode 0700 and check it is the runtime's, on ``device``."""
    os.chmod(path, _PRIVATE_MODE)  # also clears a set-group-ID bit inherited from the base
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or stat.S_IMODE(info.st_mode) != _PRIVATE_MODE
        or info.st_dev != device
    ):
        raise ConfigError(
            f"{path} did not come out as a private directory (uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):04o}); the filesystem does not honour ownership or modes"
        )


@dataclass(frozen=True, slots=True)
class PrivateDirectory:
    """A fresh ``0700`` directory of the runtime's uid in guest memory, with its subdirectories.

    Create one with :meth:`create`; :meth:`remove` deletes it and everything in it.
    """

    root: Path
    filesystem: str

    @classmethod
    def create(
        cls,
        base: Path,
        *,
        allow_insecure_shared: bool = False,
        mountinfo: str | None = None,
        shared_memory: Path = SHARED_MEMORY,
    ) -> PrivateDirectory:
        """Check ``base`` (the steps in the module docstring) and create the directory under it.

        .. warning::
           ``allow_insecure_shared`` accepts a base on the pod-wide ``/dev/shm``, where any
           container of the pod running as root or as the runtime's uid can read and change
           the model view and the compiled kernels the workers run. Development only.

        Raises:
            ConfigError: ``base`` is missing, not memory-backed, on ``/dev/shm`` (without
                ``allow_insecure_shared``), owned by another user or writable by others without
                the sticky bit, or the new directory is not private (names what was found).
        """
        base = Path(os.path.realpath(base))
        fs = _check_base(
            base,
            shared_memory=shared_memory,
            allow_insecure_shared=allow_insecure_shared,
            mountinfo=mountinfo,
        )
        device = os.lstat(base).st_dev
        try:
            root = Path(tempfile.mkdtemp(prefix="enclave-serve-", dir=base))
        except OSError as exc:
            raise ConfigError(
                f"cannot create the private directory under {base}: {exc.strerror} (the "
                "runtime's user needs write access to it)"
            ) from exc
        try:
            _seal(root, device=device)
            for name in _SUBDIRS:
                (root / name).mkdir(mode=_PRIVATE_MODE)
                _seal(root / name, device=device)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
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
        """Delete the directory and its contents (idempotent).

        Tried again when something is created in it meanwhile (vLLM's import making its cache
        directories while a stop removes the tree).

        Raises:
            OSError: it is still there after the last attempt (the last error).
        """
        for attempt in range(_REMOVE_ATTEMPTS):
            try:
                shutil.rmtree(self.root)
            except FileNotFoundError:
                pass
            except OSError:
                if attempt == _REMOVE_ATTEMPTS - 1:
                    raise
            if not os.path.lexists(self.root):
                return
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(self.root))
