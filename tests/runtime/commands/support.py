"""Shared helpers for the command tests: ``enclave-serve`` in this process or as a process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime.cli import main

#: The repository root (relative paths in commands are resolved from it).
REPO = Path(__file__).resolve().parents[3]


def enclave_serve() -> list[str]:
    """Return the command line prefix of the installed ``enclave-serve`` (beside this interpreter).

    Falls back to ``python -m runtime.cli`` where the script is not installed.
    """
    exe = shutil.which("enclave-serve", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "runtime.cli"]


def es(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``enclave-serve ARGS`` as a process in the repository root; return its text output."""
    return subprocess.run(
        [*enclave_serve(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


def main_json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> dict[str, Any]:
    """Run ``enclave-serve ARGV`` through the CLI entry point; check its exit code, parse its JSON."""
    assert main(argv) == code
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out
