"""The model view: side files read once and served from a private copy; shards linked in place."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from foundation.errors import ModelFormatError
from loader.lazy import LazyCheckpoint
from loader.manifest import MANIFEST_NAME, Manifest
from loader.modelview import stage_model_view
from tests.loader.conftest import KEY, as_bytes


def test_view_holds_exactly_the_attested_bytes(packed: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(packed)
    view = stage_model_view(packed, manifest, tmp_path / "view")
    assert stat.S_IMODE(view.stat().st_mode) == 0o700
    assert (view / MANIFEST_NAME).read_bytes() == manifest.raw
    for plain in manifest.plain_files:
        data = (view / plain.name).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == plain.sha256
        assert not (view / plain.name).is_symlink()
        assert stat.S_IMODE((view / plain.name).stat().st_mode) == 0o400
    for shard in manifest.shards:
        link = view / shard.file
        assert link.is_symlink() and Path(os.readlink(link)) == (packed / shard.file).absolute()
    assert sorted(p.name for p in view.iterdir()) == sorted(
        [MANIFEST_NAME] + [p.name for p in manifest.plain_files] + [s.file for s in manifest.shards]
    )


def test_a_side_file_changed_after_staging_has_no_effect(packed: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(packed)
    view = stage_model_view(packed, manifest, tmp_path / "view")
    original = (view / "generation_config.json").read_bytes()
    (packed / "generation_config.json").write_text('{"temperature": 2.0, "host": "was here"}')
    (packed / "extra_template.jinja").write_text("{{ exfiltrate(messages) }}")
    assert (view / "generation_config.json").read_bytes() == original
    assert not (view / "extra_template.jinja").exists()


def test_the_loader_reads_the_shards_through_the_view(
    packed: Path, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    manifest = Manifest.load(packed)
    view = stage_model_view(packed, manifest, tmp_path / "view")
    with LazyCheckpoint.open(view, Manifest.load(view), KEY, threads=2) as checkpoint:
        for name, lazy in checkpoint.tensors():
            dst = torch.empty(lazy.shape, dtype=lazy.dtype)
            dst.copy_(lazy)
            assert as_bytes(dst) == as_bytes(reference[name]), name


def test_an_oversized_side_file_is_refused_without_reading_it_all(packed: Path, tmp_path: Path) -> None:
    with (packed / "config.json").open("ab") as f:
        f.truncate(1 << 30)  # sparse: reading it all would take a while and a GiB of memory
    with pytest.raises(ModelFormatError, match=r"'config.json' does not match the manifest"):
        stage_model_view(packed, Manifest.load(packed), tmp_path / "view")
    assert not (tmp_path / "view").exists()


def test_a_fifo_in_place_of_a_side_file_is_refused(packed: Path, tmp_path: Path) -> None:
    (packed / "tokenizer.json").unlink()
    os.mkfifo(packed / "tokenizer.json")
    fd = os.open(packed / "tokenizer.json", os.O_RDWR | os.O_NONBLOCK)  # so the open does not block
    try:
        with pytest.raises(ModelFormatError, match=r"'tokenizer.json' does not match") as info:
            stage_model_view(packed, Manifest.load(packed), tmp_path / "view")
        assert info.value.log_detail == "not a regular file"
    finally:
        os.close(fd)


def test_an_existing_view_is_refused(packed: Path, tmp_path: Path) -> None:
    (tmp_path / "view").mkdir()
    with pytest.raises(ModelFormatError, match="exists already"):
        stage_model_view(packed, Manifest.load(packed), tmp_path / "view")


def test_a_plaintext_shard_left_beside_the_encrypted_model_is_refused(packed: Path, tmp_path: Path) -> None:
    (packed / "model-00001-of-00003.safetensors").write_bytes(b"plaintext weights")
    with pytest.raises(ModelFormatError, match=r"unexpected file 'model-00001-of-00003\.safetensors'"):
        stage_model_view(packed, Manifest.load(packed), tmp_path / "view")


def test_a_missing_and_a_modified_side_file_give_one_public_reason(packed: Path, tmp_path: Path) -> None:
    """The readiness reason is public: it must not tell the host whether a file it points at exists."""
    manifest = Manifest.load(packed)
    name = manifest.plain_files[0].name
    reasons, details = [], []
    for damage in ("modify", "remove", "directory"):
        model = tmp_path / damage
        shutil.copytree(packed, model)
        target = model / name
        if damage == "modify":
            target.write_bytes(target.read_bytes() + b" ")
        else:
            target.unlink()
            if damage == "directory":
                target.mkdir()
        with pytest.raises(ModelFormatError) as info:
            stage_model_view(model, manifest, tmp_path / f"view-{damage}")
        reasons.append(str(info.value))
        details.append(info.value.log_detail)
    assert len(set(reasons)) == 1 and str(tmp_path) not in reasons[0]
    assert len(set(details)) == 3  # the log says which
