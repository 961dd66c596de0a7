"""Key material that refuses to be printed, and processes that refuse to be read.

Python cannot promise that no copy of a secret survives in memory, but it can make the easy
leaks impossible: ``repr``/``str``/``format``, pickling, and comparisons that short-circuit
(:class:`SecretBytes`); and it can close the easy ways *into* a process that holds one: core
dumps and same-uid ``ptrace``/``/proc/PID/mem`` (:func:`protect_process_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import logging
import resource
import sys
from typing import NoReturn

__all__ = ["SecretBytes", "process_is_protected", "protect_process_memory"]

logger = logging.getLogger(__name__)

# prctl(2) options (linux/prctl.h).
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result: int = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    return result


def protect_process_memory() -> None:
    """Make this process non-dumpable and disable its core dumps.

    ``PR_SET_DUMPABLE 0`` makes ``/proc/PID/mem``, ``/proc/PID/environ`` and ``ptrace`` refuse
    every process without ``CAP_SYS_PTRACE`` over this one, including processes of the same uid;
    ``RLIMIT_CORE 0`` stops a crash from writing memory (keys, weights) to a core file. The
    setting survives ``fork`` but not ``execve`` of a set-uid binary, and each vLLM process calls
    this itself (through the loader plugin).

    .. warning::
       Root with ``CAP_SYS_PTRACE`` in the same PID namespace can still read this process: the
       agent policy must deny ``exec`` into the container.

    Raises:
        OSError: the kernel refused (not on Linux, or a seccomp filter).
    """
    if not sys.platform.startswith("linux"):
        raise OSError("process memory protection needs Linux")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_DUMPABLE, 0)


def process_is_protected() -> bool:
    """Return whether this process is non-dumpable and has core dumps disabled."""
    try:
        dumpable = _prctl(_PR_GET_DUMPABLE)
    except OSError:
        return False
    return dumpable == 0 and resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


class SecretBytes:
    """Key bytes that never appear in ``repr``, logs, pickles or exception text.

    The bytes live in a private ``bytearray`` so :meth:`wipe` can overwrite them in place.

    .. warning::
       :meth:`reveal` returns a ``bytes`` copy; keep it in a local variable and never log it.
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)

    def reveal(self) -> bytes:
        """Return the secret bytes (a copy)."""
        if not self._buf:
            raise ValueError("secret has been wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        """Overwrite the secret with zeros and forget it."""
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf = bytearray()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)} redacted>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __bytes__(self) -> NoReturn:
        raise TypeError("use SecretBytes.reveal() explicitly")
