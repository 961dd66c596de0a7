"""The mount table as the host left it: where a filesystem it controls could feed us code.

The host writes the pod spec: it can add volumes (a ``hostPath`` served over virtio-fs or 9p, an
NFS or FUSE share, an ``emptyDir`` another container fills) at any path of the container unless
the agent policy pins the mounts. A volume at a path from which the runtime, Python, vLLM or the
libraries read code or configuration runs the host's code inside the enclave: vLLM's stock app,
for one, imports ``/opt/ml/model/model.py`` whenever the file exists (SageMaker's convention).
At stage ``config`` the runtime reads ``/proc/self/mountinfo`` once and refuses to boot when

1. the root filesystem itself is served by the host (virtio-fs, 9p, NFS, FUSE...: not a
   confidential container's image), or
2. a mount replaces a code path or a directory above one (``/usr``, ``/opt``, a Python prefix,
   the site-packages, the packages that run, the working directory), or
3. a mount sits inside a code path and is served by the host, is a pod volume in memory
   (``tmpfs``/``ramfs``: ``emptyDir``, ConfigMap, Secret), or is writable. Read-only bind mounts
   of the guest's own filesystems stay allowed (that is how the NVIDIA container toolkit's CDI
   injects the driver libraries) and are reported.

Inside ``/opt`` the model directory and the init-data file may be mounts (SageMaker puts models
in ``/opt/ml/model``; the runtime never runs code from them: the model is authenticated and
``build_app`` skips the SageMaker bootstrap). Every mount is reported at
``/.well-known/enclave-serve/boot`` (type, place, read-only, host-served), so a verifier sees
what else the host attached.

Not covered: a read-only block device the host attached (a PVC) mounted inside a code path looks
like the guest's own filesystem from here; it is reported, and the agent policy must pin mounts.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError

__all__ = [
    "CONVENTIONAL_PATHS",
    "HOST_SERVED_FILESYSTEMS",
    "MEMORY_FILESYSTEMS",
    "SYSTEM_CODE_PATHS",
    "Mount",
    "check_mounts",
    "code_paths",
    "filesystem_of",
    "parse_mountinfo",
    "read_mount_table",
    "read_mountinfo",
]

MOUNTINFO = Path("/proc/self/mountinfo")
#: Filesystems a host serves to a guest (shared folders, network and user-space filesystems).
HOST_SERVED_FILESYSTEMS = frozenset(
    {"virtiofs", "9p", "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre",
     "afs", "ncpfs", "fuse", "fuseblk", "vboxsf", "vmhgfs"}
)  # fmt: skip
#: Filesystems whose contents live in (guest) memory: pod volumes when mounted in a container.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
#: System directories programs and the dynamic linker load code and its configuration from.
SYSTEM_CODE_PATHS = (
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin",
    "/etc/ld.so.preload", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ld.so.cache",
)  # fmt: skip
#: Where hosts conventionally mount volumes next to code (SageMaker's /opt/ml); the model
#: directory and the init-data file may be mounts here, nothing else that is not read-only.
CONVENTIONAL_PATHS = ("/opt",)
#: Packages whose code runs in the enclave (their directories are code paths wherever they live).
_PACKAGES = ("attest", "loader", "server", "runtime", "vllm", "torch", "transformers", "cryptography")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal (proc(5)).
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/self/mountinfo`` (proc(5)): what is mounted where."""

    mount_point: str
    root: str  # the path inside the filesystem that is mounted here ("/" unless a bind mount)
    fstype: str
    read_only: bool

    @property
    def host_served(self) -> bool:
        """Whether the host serves this filesystem (a shared folder, a network or FUSE share)."""
        return self.fstype in HOST_SERVED_FILESYSTEMS or self.fstype.startswith("fuse.")

    @property
    def in_memory(self) -> bool:
        return self.fstype in MEMORY_FILESYSTEMS

    def to_json(self) -> dict[str, Any]:
        """The public form (no source device or server name: those describe the host)."""
        return {
            "mount_point": self.mount_point,
            "fstype": self.fstype,
            "read_only": self.read_only,
            "host_served": self.host_served,
        }


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """Parse ``/proc/self/mountinfo``; lines that do not have its shape are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail:
            continue
        options = set(fields[5].split(","))
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=tail[0],
                read_only="ro" in options,
            )
        )
    return tuple(mounts)


def read_mountinfo(path: Path = MOUNTINFO) -> str:
    """Return this process's mount table as text (``/proc/self/mountinfo``).

    Raises:
        ConfigError: it cannot be read.
    """
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the mount table: {exc.strerror}") from exc


def read_mount_table(path: Path = MOUNTINFO) -> tuple[Mount, ...]:
    """Read and parse this process's mount table.

    Raises:
        ConfigError: it cannot be read.
    """
    return parse_mountinfo(read_mountinfo(path))


def filesystem_of(path: str | Path, mounts: Sequence[Mount]) -> Mount | None:
    """Return the mount that holds ``path`` (symbolic links resolved), or None."""
    target = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:  # later lines over-mount earlier ones at the same point: >= keeps the last
        if _within(target, mount.mount_point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def code_paths() -> tuple[str, ...]:
    """The directories this process loads code and configuration from, besides the system ones.

    The interpreter's prefixes and library directories, site-packages, the directories of the
    packages that run (enclave-serve's own, vLLM, PyTorch...), and the working directory.
    """
    paths: set[str] = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.getcwd()}
    paths.update(
        p for k, p in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")
    )
    paths.update(site.getsitepackages())
    for name in _PACKAGES:
        module = sys.modules.get(name)
        for location in getattr(module, "__path__", ()) or ():
            paths.add(str(Path(location).parent))
    runtime_root = Path(__file__).resolve().parents[1]
    paths.add(str(runtime_root))
    # "/" (a working directory of /) holds every mount; with ``python -I`` it is not on sys.path.
    return tuple(sorted({os.path.realpath(p) for p in paths if p} - {"/"}))


def _within(path: str, base: str) -> bool:
    """Whether ``path`` is ``base`` or below it (whole components)."""
    base = base.rstrip("/") or "/"
    return path == base or base == "/" or path.startswith(base + "/")


def check_mounts(
    mounts: Iterable[Mount],
    *,
    code: Iterable[str],
    allowed: Iterable[str] = (),
    conventional: Iterable[str] = CONVENTIONAL_PATHS,
) -> list[str]:
    """Return why each refused mount is refused (empty: the table is acceptable).

    ``code`` are the paths code is read from (:data:`SYSTEM_CODE_PATHS` plus :func:`code_paths`);
    ``allowed`` the paths that may be host mounts inside ``conventional`` ones (the model
    directory, the init-data file). The module docstring gives the rules. Reasons name guest
    paths and filesystem types only.
    """
    code = [c.rstrip("/") or "/" for c in code]
    conventional = [c.rstrip("/") or "/" for c in conventional]
    allowed = [os.path.realpath(a) for a in allowed]
    refused = []
    for mount in mounts:
        where = mount.mount_point
        if where == "/":
            if mount.host_served:
                refused.append(f"the root filesystem is {mount.fstype}, served by the host")
            continue
        kind = f"a {mount.fstype} mount at {where}"
        for protected in [*code, *conventional]:
            if not (_within(where, protected) or _within(protected, where)):
                continue
            if protected in conventional and any(_within(where, a) for a in allowed):
                continue  # the model directory or the init-data file, where SageMaker puts them
            if _within(protected, where):
                refused.append(f"{kind} replaces {protected}, where code is loaded from")
            elif mount.host_served:
                refused.append(f"{kind} (served by the host) sits inside {protected}")
            elif mount.in_memory:
                refused.append(f"{kind} (a pod volume) sits inside {protected}")
            elif not mount.read_only:
                refused.append(f"{kind} is writable and sits inside {protected}")
            else:
                continue
            break
    return refused
