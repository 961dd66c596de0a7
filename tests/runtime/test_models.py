"""The model sources by scheme (:data:`runtime.models.MODEL_SOURCES`): the one place that decides
how ``--model`` is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.errors import ConfigError
from runtime.models import MODEL_SOURCES, NativeModel, model_scheme, prepare_model


@pytest.mark.parametrize(
    ("model", "scheme"),
    [
        ("oci:/models/tiny@sha256:" + "a" * 64, "oci"),
        ("docker://registry.example/tiny@sha256:" + "a" * 64, "docker"),
        ("/models/tiny", "directory"),
        ("relative/dir", "directory"),
    ],
)
def test_the_scheme_picks_the_source(model: str, scheme: str) -> None:
    assert model_scheme(model) == scheme
    assert scheme in MODEL_SOURCES


def test_every_scheme_has_one_opener_and_images_share_theirs() -> None:
    assert set(MODEL_SOURCES) == {"oci", "docker", "directory"}
    assert MODEL_SOURCES["oci"] is MODEL_SOURCES["docker"]
    assert MODEL_SOURCES["directory"] is not MODEL_SOURCES["oci"]


def test_a_directory_opens_as_a_native_model(packed_demo: Path, tmp_path: Path) -> None:
    model, view = prepare_model(str(packed_demo), tmp_path / "view")
    assert isinstance(model, NativeModel) and (view / "config.json").exists()
    assert model.loader_source() == (None, False)


def test_plain_http_is_refused_for_anything_but_a_registry(packed_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="docker:// references only"):
        prepare_model(str(packed_demo), tmp_path / "view", allow_http=True)
    with pytest.raises(ConfigError, match="docker:// references only"):
        prepare_model(f"oci:{tmp_path}@sha256:" + "a" * 64, tmp_path / "view2", allow_http=True)


def test_the_boot_imports_no_torch_before_its_private_temporary_directory_exists() -> None:
    """torch imports dill, which asks tempfile for a directory at import time: in a read-only
    container that fails until the runtime has pointed tempfile at its private directory."""
    import subprocess
    import sys

    code = (
        "import sys, runtime.boot, runtime.commands.run, runtime.models; "
        "print(sorted(m for m in ('torch', 'vllm', 'dill') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
