"""Every module of this issue declares a sorted ``__all__`` naming exactly its public names."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "attest.formats",
    "attest.formats.nvidia_report",
    "attest.formats.snp_report",
    "attest.formats.tdx_quote",
    "attest.providers.nvidia",
    "attest.providers.snp",
    "attest.providers.tdx",
    "attest.providers.tsm",
    "attest.verify",
    "attest.verify.api",
    "attest.verify.base",
    "attest.verify.claims",
    "attest.verify.nvidia",
    "attest.verify.policy",
    "attest.verify.result",
    "attest.verify.sample",
    "attest.verify.snp",
    "attest.verify.tdx",
    "runtime.commands.evidence",
    "runtime.commands.inspect",
]


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 order: SCREAMING_CASE, then CamelCase, then the rest.
    if name.isupper():
        return 0, name
    if name[:1].isupper():
        return 1, name
    return 2, name


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=_isort_key)
    assert all(hasattr(module, n) for n in exported)
    defined_here = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and getattr(v, "__module__", None) == name
    }
    assert defined_here <= set(exported), defined_here - set(exported)


def test_nothing_named_mock_or_fake_ships() -> None:
    from pathlib import Path

    import attest

    names = [p.name.lower() for p in Path(attest.__file__).parent.rglob("*.py")]
    assert not [n for n in names if "mock" in n or "fake" in n]
