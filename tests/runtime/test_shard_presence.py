"""The config stage names a missing or resized shard before any key request.

The manifest records every shard's size; a copy that lost or cut a shard is refused at ``config``
with the file's name, not at ``load`` (after the key release and the engine start) as an
authentication failure. The manifest is not authenticated yet at that point: this is a courtesy
for honest mistakes, and the authenticated checks of the load stage stay.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import pytest

from foundation.errors import ConfigError, ModelFormatError
from loader.manifest import Manifest
from runtime.config import RunConfig
from runtime.environment import decide_environment
from runtime.prepare import prepare
from runtime.private import PrivateDirectory

ENV = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture
def model(packed_demo: Path, tmp_path: Path) -> Path:
    """A private copy of the packed demo model, free to damage."""
    return Path(shutil.copytree(packed_demo, tmp_path / "encrypted"))


def shard_of(model: Path) -> tuple[str, int]:
    (shard,) = Manifest.load(model).shards
    return shard.file, shard.ciphertext_size


def damage(model: Path, kind: str) -> None:
    name, size = shard_of(model)
    path = model / name
    if kind == "missing":
        path.unlink()
    elif kind == "short":
        os.truncate(path, size - 16)
    elif kind == "long":
        with path.open("ab") as f:
            f.write(b"\0" * 7)
    elif kind == "a directory":
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "shard {name} is missing"),
        ("short", "shard {name} is {short} bytes; the manifest records {size}"),
        ("long", "shard {name} is {long} bytes; the manifest records {size}"),
        ("a directory", "shard {name} is not a regular file"),
    ],
)
def test_each_damage_is_named(model: Path, kind: str, message: str) -> None:
    name, size = shard_of(model)
    manifest = Manifest.load(model)
    manifest.check_files(model)  # intact: passes
    damage(model, kind)
    expected = message.format(name=name, size=size, short=size - 16, long=size + 7)
    with pytest.raises(ModelFormatError) as info:
        manifest.check_files(model)
    assert str(info.value).startswith(expected)
    assert "copy the encrypted model directory again" in str(info.value)
    assert str(model) not in str(info.value)  # host paths only in the log detail
    assert info.value.log_detail == str(model / name)


def run_config(model: Path, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "model": str(model), "tee": "sample", "gpus": "none", "allow_insecure_sample_tee": True,
        "kbs_url": "http://127.0.0.1:8080",
        "vllm_args": ("--enforce-eager", "--max-model-len", "512", "--served-model-name", "tiny"),
    }  # fmt: skip
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def stage(config: RunConfig, private: PrivateDirectory, parser: argparse.ArgumentParser) -> None:
    decision = decide_environment(ENV, private_root=str(private.root), python_dir="/opt/venv/bin")
    prepare(config, private, environment=decision.attested, parser=parser)


@pytest.mark.parametrize("kind", ["missing", "short"])
def test_the_config_stage_refuses_a_damaged_copy(
    model: Path, private: PrivateDirectory, parser: argparse.ArgumentParser, kind: str
) -> None:
    stage(run_config(model), private, parser)  # intact: the config stage passes
    damage(model, kind)
    other = PrivateDirectory.create(Path("/dev/shm"), allow_insecure_shared=True)
    try:
        with pytest.raises(ModelFormatError, match=f"shard {re.escape(shard_of(model)[0])} is"):
            stage(run_config(model), other, parser)
    finally:
        other.remove()


def test_the_config_stage_refuses_the_key_resources_pack_refuses(
    model: Path, private: PrivateDirectory, parser: argparse.ArgumentParser
) -> None:
    with pytest.raises(ConfigError, match="three slashes"):
        stage(run_config(model, key_id="kbs://enclave-serve/model-key/tiny"), private, parser)
