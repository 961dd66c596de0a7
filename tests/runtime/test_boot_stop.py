"""SIGTERM and SIGINT during the boot: the runtime as a real process, stopped while it waits for
a key broker that never answers (the ``key`` stage), and the pieces of that stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.boot import SignalWatcher, _descendants, _kill_descendants
from runtime.private import PrivateDirectory

ES = str(Path(sys.executable).parent / "enclave-serve")
#: A requested stop must end the process within this many seconds.
STOP_BUDGET_S = 2.0
ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class StallingKbsDouble:
    """Test double of a key broker: accepts connections and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def stalling_kbs() -> Iterator[StallingKbsDouble]:
    kbs = StallingKbsDouble()
    try:
        yield kbs
    finally:
        kbs.close()


@pytest.fixture
def private_base() -> Iterator[Path]:
    """A base for the private directory of its own (tmpfs: the pod-wide /dev/shm, said so)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm: no tmpfs for the private directory")
    base = Path(os.path.realpath(shm)) / f"enclave-serve-test-stop-{os.getpid()}-{time.monotonic_ns()}"
    base.mkdir(mode=0o700)
    try:
        yield base
    finally:
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        base.rmdir()


def _wait_for_stage(log: Path, proc: subprocess.Popen[bytes], stage: str, timeout: float = 120.0) -> str:
    """Wait until the boot document shows ``stage`` under way; return the log so far."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the runtime exited early:\n{log.read_text()[-3000:]}"
        text = log.read_text(errors="replace")
        if url is None:
            found = re.search(r"listening on (https://127\.0\.0\.1:(\d+)) \(booting\)", text)
            if found:
                url = found.group(1)
        if url is not None:
            try:
                boot = httpx.get(url + "/.well-known/enclave-serve/boot", verify=False, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                boot = {}
            if boot.get("stages") and boot["stages"][-1]["stage"] == stage:
                return text
        time.sleep(0.1)
    raise AssertionError(f"stage {stage} not reached in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_the_key_broker_stalls_stops_at_once_and_leaves_nothing(
    signum: signal.Signals,
    packed_demo: Path,
    stalling_kbs: StallingKbsDouble,
    private_base: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "runtime.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ES, "run", str(packed_demo), "--host", "127.0.0.1", "--port", "0", "--tee", "sample",
             "--gpus", "none", "--allow-insecure-sample-tee", "--private-dir", str(private_base),
             "--allow-insecure-shared-private-dir", "--kbs-url", f"http://127.0.0.1:{stalling_kbs.port}"],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        text = _wait_for_stage(log, proc, "key")
        # --port 0: the log names the port actually bound.
        assert "listening on https://127.0.0.1:0 " not in text
        assert list(private_base.iterdir()), "the boot made no private directory to remove"
        deadline = time.monotonic() + 30
        while stalling_kbs.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalling_kbs.connections > 0, "the runtime never reached the key broker"
        started = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert took < STOP_BUDGET_S, f"took {took:.2f} s"
    assert text.count(f"boot stopped at stage key on {signum.name}") == 1, text[-3000:]
    assert "Traceback" not in text
    assert "boot failed" not in text
    assert list(private_base.iterdir()) == []


def test_signal_watcher_hands_the_signal_to_its_thread() -> None:
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def on_signal(name: str) -> None:
        seen.append((name, threading.current_thread().name))
        done.set()

    watcher = SignalWatcher(on_signal)
    watcher.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert done.wait(5)
    finally:
        watcher.uninstall()
    assert seen == [("SIGTERM", "signal-watcher")]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_kill_descendants_kills_grandchildren_and_spares_what_it_is_told() -> None:
    # A child that starts a grandchild: both must die; a spared sibling must live.
    tree = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
         "print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    spared = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert tree.stdout is not None
        grandchild = int(tree.stdout.readline())
        assert {tree.pid, grandchild, spared.pid} <= set(_descendants(os.getpid()))
        assert _kill_descendants(spare=frozenset({spared.pid}), timeout_s=5)
        tree.wait(timeout=5)
        assert grandchild not in _descendants(os.getpid())
        assert (
            not Path(f"/proc/{grandchild}").exists()
            or b") Z " in Path(f"/proc/{grandchild}/stat").read_bytes()
        )
        assert spared.poll() is None
    finally:
        for proc in (tree, spared):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_descendants_reads_a_process_table_with_odd_names(tmp_path: Path) -> None:
    def entry(pid: int, comm: str, state: str, ppid: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} {ppid} 1 1 0\n")

    entry(10, "enclave-serve", "S", 1)
    entry(11, "VLLM::EngineCore", "S", 10)
    entry(12, "worker) S 1 (x", "R", 11)  # a name that looks like fields
    entry(13, "zombie", "Z", 10)
    entry(14, "other", "S", 1)
    (tmp_path / "self").mkdir()
    assert sorted(_descendants(10, proc=tmp_path)) == [11, 12]


def test_remove_private_directory_twice_is_quiet(private_base: Path) -> None:
    private = PrivateDirectory.create(private_base, allow_insecure_shared=True)
    (private.sub("cache") / "torchinductor").mkdir()
    private.remove()
    private.remove()
    assert list(private_base.iterdir()) == []
