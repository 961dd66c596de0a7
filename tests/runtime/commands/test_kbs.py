"""``enclave-serve kbs ...`` as processes, against ``enclave-serve kbs-dev`` as a real process."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kbs.support import ADMIN_TOKEN
from tests.runtime.commands.support import enclave_serve, es


@pytest.fixture(scope="module")
def kbs_dev_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("kbs-dev")
    token_file = directory / "admin-token"
    token_file.write_bytes(ADMIN_TOKEN + b"\n")
    preload = directory / "preloaded"
    preload.write_bytes(b"preloaded-key")
    proc = subprocess.Popen(
        [
            *enclave_serve(),
            "kbs-dev",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-token-file",
            str(token_file),
            "--allow-insecure-sample-evidence",
            "--resource",
            f"default/pre/key={preload}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if line.startswith("kbs-dev ready on ") or not line:
                    break
            if proc.poll() is not None:
                break
        stderr = proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
        assert line.startswith("kbs-dev ready on "), f"kbs-dev did not start: {line!r} {stderr}"
        assert "sample evidence ALLOWED" in line
        url = line.split()[3]
        yield url, directory
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_set_resource_then_fetch_with_the_sample_tee(kbs_dev_process: tuple[str, Path]) -> None:
    url, directory = kbs_dev_process
    key = os.urandom(32)
    (directory / "model.key").write_bytes(key)
    uploaded = es(
        "kbs",
        "set-resource",
        "--url",
        url,
        "--admin-token-file",
        str(directory / "admin-token"),
        "--path",
        "default/llama/key",
        "--resource-file",
        str(directory / "model.key"),
    )
    assert uploaded.returncode == 0, uploaded.stderr
    out, receipt = directory / "fetched.key", directory / "receipt.json"
    fetched = es(
        "kbs",
        "fetch",
        "kbs:///default/llama/key",
        "--url",
        url,
        "--tee",
        "sample",
        "--allow-insecure-sample-tee",
        "--gpus",
        "sample",
        "-o",
        str(out),
        "--receipt",
        str(receipt),
    )
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == key
    assert out.stat().st_mode & 0o077 == 0
    document = json.loads(receipt.read_text())
    assert document["source"] == "kbs" and document["insecure"] is True
    assert document["receipt"]["devices"] == ["sampledevice"]
    assert key.hex() not in fetched.stdout + fetched.stderr
