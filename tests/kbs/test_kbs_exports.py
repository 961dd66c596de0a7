"""Every module of the KBS work declares a sorted ``__all__`` of names it really defines."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "attest.kbs",
    "attest.kbs.admin",
    "attest.kbs.appraisal",
    "attest.kbs.client",
    "attest.kbs.devserver",
    "attest.kbs.http",
    "attest.kbs.jwe",
    "attest.kbs.policy",
    "attest.kbs.retry",
    "attest.kbs.teekey",
    "attest.kbs.token",
    "attest.kbs.uri",
    "attest.kbs.wire",
    "attest.keysource",
    "attest.keysource.base",
    "attest.keysource.cdh",
    "attest.keysource.file",
    "attest.keysource.kbs",
    "runtime.commands.kbs",
    "runtime.commands.kbs_dev",
]


def _isort_key(name: str) -> tuple[int, str]:
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    # ruff RUF022 ("isort-style"): CONSTANTS, then Classes, then functions, each alphabetical.
    assert exported == sorted(exported, key=_isort_key)
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.{symbol}"
    assert not any("mock" in s.lower() or "fake" in s.lower() for s in dir(module))


def test_lead_api_names() -> None:
    from attest.kbs.client import KbsClient  # noqa: F401
    from attest.kbs.devserver import DevKbsConfig, create_app, serve  # noqa: F401
    from attest.keysource import (  # noqa: F401
        CdhKeySource,
        KbsKeySource,
        KeyRelease,
        KeyReleaseReceipt,
        KeySource,
        ResourceUri,
        UnsafeFileKeySource,
    )
