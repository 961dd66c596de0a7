"""Every module of the four packages declares a sorted ``__all__`` of exactly its public names,
and nothing named mock or fake ships."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

PACKAGES = ("foundation", "attest", "loader", "server", "runtime")
ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 ("isort-style"): SCREAMING_CASE, then CamelCase, then the rest, each alphabetical.
    if name.isupper():
        return 0, name
    if name[:1].isupper():
        return 1, name
    return 2, name


@pytest.mark.parametrize("name", _modules())
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(getattr(module, "__all__", []))
    assert exported == sorted(exported, key=_isort_key), "__all__ is not sorted"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"__all__ names what the module lacks: {missing}"
    defined_here = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and getattr(v, "__module__", None) == name
    }
    assert defined_here <= set(exported), f"public but not in __all__: {sorted(defined_here - set(exported))}"


def test_nothing_named_mock_or_fake_ships() -> None:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert not any(w in path.name.lower() for w in ("mock", "fake")), path
            text = path.read_text()
            assert "class Mock" not in text and "class Fake" not in text, path


#: Public exceptions outside the tree, each a signal between two functions of one component that
#: its caller translates before any user sees it (kept out so that ``except Error`` never swallows
#: a retry or a refusal that is still being decided).
CONTROL_FLOW = {
    "attest.client.verdict.StepFailed": "a verification step's refusal, recorded into the verdict",
    "attest.kbs.http.PlainHttpAnswer": "a plain-HTTP answer on a TLS port, worded by the transport",
    "attest.kbs.retry.TransientFault": "a fault the retry loop retries until its deadline",
    "attest.kbs.dev.appraisal.AppraisalFailed": "kbs-dev's refusal, turned into an HTTP status",
    "attest.kbs.dev.policy.PolicyDenied": "kbs-dev's refusal, turned into an HTTP status",
    "server.freshness.QueueFull": "a full evidence queue, turned into a 503 with Retry-After",
}


def test_every_public_exception_is_in_the_error_tree() -> None:
    from foundation.errors import Error

    outside = []
    for name in _modules():
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            value = getattr(module, public)
            exception = (
                inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name
            )
            if exception and not issubclass(value, Error) and f"{name}.{public}" not in CONTROL_FLOW:
                outside.append(f"{name}.{public}")
    assert not outside, f"public exceptions outside foundation.errors.Error: {outside}"
    for qualified in CONTROL_FLOW:  # the exemptions name classes that exist and are still outside
        where, _, public = qualified.rpartition(".")
        assert not issubclass(getattr(importlib.import_module(where), public), Error), qualified
