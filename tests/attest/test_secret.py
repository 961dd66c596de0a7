"""Secrets: SecretBytes never prints; a protected process cannot be read by its own uid."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from foundation.secret import SecretBytes, process_is_protected, protect_process_memory

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def test_secret_bytes_never_show_or_pickle() -> None:
    secret = SecretBytes(b"k" * 32)
    assert "kkkk" not in repr(secret) + str(secret) + f"{secret}"
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    secret.wipe()
    with pytest.raises(ValueError, match="wiped"):
        secret.reveal()


def _as_nobody(job: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child that drops to uid nobody and runs ``job(write_fd)``; return (pid, read_fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            job(w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the two processes as another uid")
@pytest.mark.parametrize(("protect", "expected"), [(True, b"refused"), (False, b"read")])
def test_a_protected_process_refuses_its_own_uid(protect: bool, expected: bytes) -> None:
    """The control case shows that the same uid reads an unprotected (dumpable) process."""
    import ctypes

    def hold(out: int) -> None:
        if protect:
            protect_process_memory()
        else:  # changing uid made this process non-dumpable; undo that for the control
            ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)
        os.write(out, b"protected\n" if process_is_protected() else b"plain\n")
        time.sleep(30)

    def read(out: int) -> None:
        try:
            Path(f"/proc/{holder}/environ").read_bytes()
        except PermissionError:
            os.write(out, b"refused")
        else:
            os.write(out, b"read")

    holder, holder_out = _as_nobody(hold)
    try:
        with os.fdopen(holder_out, "rb") as f:
            assert f.readline().strip() == (b"protected" if protect else b"plain")
        reader, reader_out = _as_nobody(read)
        with os.fdopen(reader_out, "rb") as g:
            assert g.read() == expected
        os.waitpid(reader, 0)
        limits = Path(f"/proc/{holder}/limits").read_text()
        core = next(x for x in limits.splitlines() if x.startswith("Max core file size")).split()[4:6]
        # Protected: no core file. The control keeps what it inherited (an earlier test in this
        # pytest process may already have set the limit to 0; a non-root child cannot raise it).
        inherited = [
            "unlimited" if v == resource.RLIM_INFINITY else str(v)
            for v in resource.getrlimit(resource.RLIMIT_CORE)
        ]
        assert core == (["0", "0"] if protect else inherited)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_protecting_this_process_is_reported() -> None:
    out = subprocess.run(
        [sys.executable, "-c",
         "from foundation.secret import *; protect_process_memory(); print(process_is_protected())"],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert out.stdout.strip() == "True", out.stderr
    assert process_is_protected() in (True, False)
    _ = protect_process_memory
