"""A process vLLM spawns is non-dumpable before it unpickles anything (its key capabilities).

multiprocessing's spawn child imports the parent's main module (the ``enclave-serve`` script,
which imports :mod:`runtime.cli`) and only then unpickles its process object. The probe below is
an object whose unpickling reports whether the process was protected at that moment.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
{import_line}
import multiprocessing as mp


def _protected_now():
    from foundation.secret import process_is_protected

    return process_is_protected()


class UnpickleProbe:
    def __reduce__(self):
        return (_protected_now, ())


def target(state, queue):
    queue.put(state)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(UnpickleProbe(), queue))
    child.start()
    print(queue.get(timeout=60))
    child.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process protection is Linux's")
@pytest.mark.parametrize(("import_line", "expected"), [("import runtime.cli", "True"), ("", "False")])
def test_a_spawned_child_is_protected_before_it_unpickles_its_arguments(
    tmp_path: Path, import_line: str, expected: str
) -> None:
    """With the runtime's main module: protected at unpickling; without it (the control): not."""
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(PROBE.format(import_line=import_line)))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected
