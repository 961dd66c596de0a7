"""Hardware marks, decided in one place.

A test marked ``gpu``, ``tdx`` or ``snp`` runs only where that hardware is present, and is
skipped elsewhere with the reason; no test repeats the check in a ``skipif`` of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


#: mark → (probe, why the test is skipped without it).
HARDWARE: dict[str, tuple[Callable[[], bool], str]] = {
    "gpu": (_cuda, "needs an NVIDIA GPU (CUDA)"),
    "tdx": (Path("/dev/tdx_guest").exists, "needs an Intel TDX guest (/dev/tdx_guest)"),
    "snp": (Path("/dev/sev-guest").exists, "needs an AMD SEV-SNP guest (/dev/sev-guest)"),
}


@functools.cache
def present(mark: str) -> bool:
    """Whether the hardware behind ``mark`` is present (probed once per session)."""
    probe, _reason = HARDWARE[mark]
    return probe()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark, (_probe, reason) in HARDWARE.items():
        if item.get_closest_marker(mark) is not None and not present(mark):
            pytest.skip(reason)
