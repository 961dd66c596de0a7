"""End to end: SIGTERM while real vLLM loads the model stops the boot at once and leaves nothing.

(The same stop during the ``key`` stage, SIGTERM and SIGINT, is tests/runtime/test_boot_stop.py.)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.boot import _descendants
from tests.e2e.conftest import BOOT_TIMEOUT, Launcher, Workspace, wait_stage_done

pytestmark = pytest.mark.e2e

#: A requested stop must end the process within this many seconds.
STOP_BUDGET_S = 2.0


@pytest.fixture
def private_base() -> Iterator[Path]:
    """A private-directory base of this test's own, on the development box's only tmpfs."""
    base = Path(os.path.realpath("/dev/shm")) / f"enclave-serve-test-interrupt-{os.getpid()}"
    base.mkdir(mode=0o700)
    try:
        yield base
    finally:
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        base.rmdir()


def test_sigterm_while_vllm_loads_stops_within_two_seconds_and_leaves_nothing(
    workspace: Workspace, launcher: Launcher, private_base: Path
) -> None:
    kbs_url = launcher.kbs("kbs-interrupt", workspace.key_file)
    url, proc = launcher.runtime(
        "runtime-interrupt", workspace.encrypted, kbs_url, "--private-dir", str(private_base)
    )
    wait_stage_done(url, proc, "key")
    # Into the load stage proper: vLLM's engine core process is up (and importing, compiling...).
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "EngineCore" not in proc.text():
        assert proc.popen.poll() is None, proc.text()[-4000:]
        assert time.monotonic() < deadline, "vLLM's engine core never started"
        time.sleep(0.1)
    time.sleep(1.0)
    engine = _descendants(proc.popen.pid)
    assert engine, "no vLLM process to stop"
    assert list(private_base.iterdir()), "the boot made no private directory to remove"

    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    code = proc.popen.wait(timeout=30)
    took = time.monotonic() - started

    log = proc.text()
    assert code == 0, log[-4000:]
    assert took < STOP_BUDGET_S, f"took {took:.2f} s"
    assert log.count("boot stopped at stage load on SIGTERM") == 1, log[-4000:]
    assert "Traceback" not in log
    assert "boot failed" not in log
    assert list(private_base.rglob("*")) == []
    # vLLM's processes died with the boot (the resource tracker ends once its last user is gone).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in engine):
        time.sleep(0.1)
    assert [pid for pid in engine if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        return b") Z " not in Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
