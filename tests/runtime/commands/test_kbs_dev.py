"""``enclave-serve kbs-dev`` as a process: its flags, and SIGTERM and SIGINT as a requested stop
(exit 0, one line), not a death."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.kbs.support import ADMIN_TOKEN
from tests.runtime.commands.support import enclave_serve, es


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_kbs_dev_exits_0_on_a_stop_signal(signum: signal.Signals, tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("a-development-admin-token-of-some-length")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*enclave_serve(), "kbs-dev", "--host", "127.0.0.1", "--port", "0", "--admin-token-file", str(token)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while not any("kbs-dev ready on" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + out
    assert f"kbs-dev stopped on {signum.name}" in out
    assert "Traceback" not in out


def test_kbs_dev_has_no_reference_values_flag(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_bytes(ADMIN_TOKEN)
    refused = es("kbs-dev", "--admin-token-file", str(token), "--reference-values", str(tmp_path / "rv.json"))
    assert refused.returncode == 2 and "unrecognized arguments: --reference-values" in refused.stderr
