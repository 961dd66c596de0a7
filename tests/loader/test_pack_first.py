"""``pack`` validates first: every cheap check, each naming its cause, before the canary runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import loader.canary
from foundation.errors import ConfigError, Error, ModelFormatError
from loader.canary import CANARY_SAMPLING, CanaryReference, canary_dtype
from loader.manifest import Manifest, parse_key_resource
from loader.packer import check_destination, check_source
from runtime.commands import pack
from runtime.demo_model import build_demo_model
from tests.loader.conftest import KEY_ID, model_tensors

SHARD = "model.safetensors"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("pack-first") / "demo")


@pytest.fixture
def copy(demo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo model, free to damage."""
    return Path(shutil.copytree(demo, tmp_path / "src"))


def _damage(kind: str, src: Path) -> None:
    shard = src / SHARD
    data = shard.read_bytes()
    if kind == "no config.json":
        (src / "config.json").unlink()
    elif kind == "config.json not JSON":
        (src / "config.json").write_text('{"architectures": [')
    elif kind == "config.json not an object":
        (src / "config.json").write_text("[]")
    elif kind == "no shard":
        shard.unlink()
    elif kind == "empty shard":
        shard.write_bytes(b"")
    elif kind == "shard shorter than a length prefix":
        shard.write_bytes(data[:5])
    elif kind == "garbage shard":
        shard.write_bytes(bytes(range(256)) * 64)
    elif kind == "shard truncated in its header":
        shard.write_bytes(data[:100])
    elif kind == "shard truncated in its tensors":
        shard.write_bytes(data[: len(data) // 2])
    elif kind == "shard header not JSON":
        shard.write_bytes(struct.pack("<Q", 8) + b"not json" + data[16:])
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error", "cause"),
    [
        ("no config.json", ModelFormatError, "has no config.json"),
        ("config.json not JSON", ModelFormatError, "config.json is not valid JSON"),
        ("config.json not an object", ModelFormatError, "config.json is not a JSON object"),
        ("no shard", ModelFormatError, "no \\*.safetensors files"),
        ("empty shard", ModelFormatError, "shard model.safetensors is empty \\(0 bytes\\)"),
        ("shard shorter than a length prefix", ModelFormatError, "is 5 bytes, too short"),
        ("garbage shard", ModelFormatError, "shard model.safetensors is not a safetensors file"),
        ("shard truncated in its header", ModelFormatError, "is truncated: its header alone needs"),
        ("shard truncated in its tensors", ModelFormatError, "is truncated: its header describes"),
        ("shard header not JSON", ModelFormatError, "not a safetensors file \\(safetensors header is not"),
    ],
)
def test_a_broken_source_is_named_by_its_cause(copy: Path, kind: str, error: type[Error], cause: str) -> None:
    _damage(kind, copy)
    with pytest.raises(error, match=cause) as info:
        check_source(copy)
    assert "--no-canary" not in str(info.value)  # never steered to pack a broken model


def test_a_source_that_is_not_a_model_directory_is_named(tmp_path: Path, demo: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_source(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_source(tmp_path / "file")
    encrypted = tmp_path / "encrypted"
    shutil.copytree(demo, encrypted)
    (encrypted / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="encrypted model already"):
        check_source(encrypted)


def test_the_source_check_counts_what_a_load_converts(source_model: Path) -> None:
    found = check_source(source_model)
    tensors = [t for shard in model_tensors() for t in shard.values()]
    floats = sum(t.numel() for t in tensors if t.is_floating_point())
    others = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
    assert found.parameters == sum(t.numel() for t in tensors)
    assert (found.float_parameters, found.other_bytes) == (floats, others)
    assert found.weight_bytes("float32") == 4 * floats + others
    assert found.weight_bytes("bfloat16") == 2 * floats + others
    assert found.config_dtype is None and len(found.shards) == 3
    assert found.total_bytes == sum(p.stat().st_size for p in source_model.iterdir())


def test_the_canary_loads_the_models_own_dtype_unless_told(demo: Path, copy: Path) -> None:
    assert json.loads((demo / "config.json").read_text())["dtype"] == "bfloat16"
    assert canary_dtype(demo) == "bfloat16"
    assert canary_dtype(demo, "float32") == "float32"  # float32 remains choosable
    config = json.loads((copy / "config.json").read_text())
    del config["dtype"]
    (copy / "config.json").write_text(json.dumps(config))
    assert canary_dtype(copy) == "float32"  # a config that names none
    with pytest.raises(ModelFormatError, match="dtype must be one of"):
        canary_dtype(demo, "int8")


def test_the_destination_is_checked_before_anything_is_computed(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not be inside the source"):
        check_destination(demo, demo / "enc", overwrite=False)
    with pytest.raises(ConfigError, match="must not contain the source"):
        check_destination(demo, demo.parent, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="pass --force"):
        check_destination(demo, tmp_path / "taken", overwrite=False)
    check_destination(demo, tmp_path / "taken", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_destination(demo, tmp_path / "file" / "enc", overwrite=False)
    check_destination(demo, tmp_path / "new" / "deeper" / "enc", overwrite=False)


class CanaryEngineDouble:
    """Stands in for :func:`loader.canary.compute_reference`: records its calls and what had been
    printed on stderr when it was called, and returns a fixed reference."""

    def __init__(self, printed: Callable[[], str]) -> None:
        self.calls: list[dict[str, object]] = []
        self.printed_before: list[str] = []
        self._printed = printed

    def __call__(self, model_dir: Path, **kw: object) -> CanaryReference:
        self.calls.append({"model_dir": model_dir, **kw})
        self.printed_before.append(self._printed())
        return CanaryReference(
            prompt="p",
            prompt_token_ids=(1, 2),
            sampling=dict(CANARY_SAMPLING),
            token_ids=tuple(range(16)),
            reference="double",
            device="cpu",
            dtype=str(kw["dtype"]),
        )


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CanaryEngineDouble:
    double = CanaryEngineDouble(lambda: capsys.readouterr().err)
    monkeypatch.setattr(loader.canary, "compute_reference", double)
    return double


def pack_args(*argv: str | Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pack.add_parser(parser.add_subparsers())
    return parser.parse_args(
        ["pack", *map(str, argv), "--canary-engine", "transformers", "--canary-device", "cpu"]
    )


def test_the_canary_prints_its_memory_before_it_starts_and_its_time_after(
    demo: Path, tmp_path: Path, engine: CanaryEngineDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    args = pack_args(demo, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", tmp_path / "k")
    ticks = iter([100.0, 102.5])
    reference = pack._canary(args, check_source(demo), clock=lambda: next(ticks))
    assert reference is not None and reference.dtype == "bfloat16"
    (before,) = engine.printed_before
    found = check_source(demo)
    assert before.startswith(
        f"canary: loading {found.parameters / 1e6:.3g}M parameters with transformers on cpu in bfloat16"
    )
    assert f"about {found.weight_bytes('bfloat16') / 1000:.3g} kB of memory" in before
    assert engine.calls == [
        {"model_dir": demo, "device": "cpu", "dtype": "bfloat16", "engine": "transformers"}
    ]
    assert "canary: 16 reference tokens (double) in 2.5 s" in capsys.readouterr().err


def test_the_plan_line_sizes_a_large_model(source_model: Path) -> None:
    big = dataclasses.replace(
        check_source(source_model), parameters=8_030_000_000, float_parameters=8_030_000_000, other_bytes=0
    )
    line = pack.canary_plan(big, engine="transformers", device="cpu", dtype="float32")
    assert "8.03B parameters" in line and "about 32.1 GB of memory" in line
    assert "about 16.1 GB" in pack.canary_plan(big, engine="vllm", device="cpu", dtype="bfloat16")


@pytest.mark.parametrize(
    "kind", ["no config.json", "empty shard", "garbage shard", "shard truncated in its tensors"]
)
def test_the_cli_refuses_a_broken_source_before_the_canary_and_writes_nothing(
    copy: Path, tmp_path: Path, engine: CanaryEngineDouble, kind: str
) -> None:
    _damage(kind, copy)
    key = tmp_path / "model.key"
    args = pack_args(copy, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", key)
    with pytest.raises(ModelFormatError) as info:
        pack.run(args)
    assert engine.calls == [] and "--no-canary" not in str(info.value)
    assert not key.exists() and not (tmp_path / "enc").exists()


def test_without_a_canary_a_model_without_config_is_still_refused(copy: Path, tmp_path: Path) -> None:
    (copy / "config.json").unlink()
    args = pack_args(
        copy, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", tmp_path / "k", "--no-canary"
    )
    with pytest.raises(ModelFormatError, match=r"has no config\.json"):
        pack.run(args)
    assert not (tmp_path / "enc").exists() and not (tmp_path / "k").exists()


@pytest.mark.parametrize(
    "key_id",
    ["model-key", "kbs://repo/type/tag", "kbs:///repo/type", "kbs:///repo/type/tag?x=1", "https://kbs/a/b/c"],
)
def test_a_key_id_run_would_refuse_is_refused_by_pack_with_runs_message(
    demo: Path, tmp_path: Path, engine: CanaryEngineDouble, key_id: str
) -> None:
    with pytest.raises(ConfigError) as run_refusal:
        parse_key_resource(key_id)  # what the config stage of run calls (runtime/prepare.py)
    args = pack_args(demo, tmp_path / "enc", "--key-id", key_id, "--generate-key", tmp_path / "k")
    with pytest.raises(ConfigError) as pack_refusal:
        pack.run(args)
    assert str(pack_refusal.value) == str(run_refusal.value)
    assert str(pack_refusal.value).startswith("the key resource is not a kbs:/// URI: ")
    assert engine.calls == [] and not (tmp_path / "k").exists()


def test_a_bad_key_file_destination_or_new_key_path_is_refused_before_the_canary(
    demo: Path, tmp_path: Path, engine: CanaryEngineDouble
) -> None:
    (tmp_path / "hex.key").write_text("00" * 32)
    with pytest.raises(ConfigError, match="exactly 32 raw bytes \\(it holds more\\)"):
        pack.run(pack_args(demo, tmp_path / "enc", "--key-id", KEY_ID, "--key-file", tmp_path / "hex.key"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="pass --force"):
        pack.run(pack_args(demo, tmp_path / "taken", "--key-id", KEY_ID, "--generate-key", tmp_path / "k"))
    with pytest.raises(ConfigError, match="use --key-file"):
        pack.run(
            pack_args(demo, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", tmp_path / "hex.key")
        )
    with pytest.raises(ConfigError, match="is not a directory"):
        pack.run(
            pack_args(
                demo, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", tmp_path / "hex.key" / "k"
            )
        )
    assert engine.calls == [] and not (tmp_path / "enc").exists() and not (tmp_path / "k").exists()


def test_a_sound_source_packs_with_the_canary_after_the_checks(
    demo: Path, tmp_path: Path, engine: CanaryEngineDouble
) -> None:
    key = tmp_path / "model.key"
    assert pack.run(pack_args(demo, tmp_path / "enc", "--key-id", KEY_ID, "--generate-key", key)) == 0
    assert len(engine.calls) == 1 and len(key.read_bytes()) == 32
    manifest = Manifest.load(tmp_path / "enc")
    assert manifest.canary is not None and manifest.canary.reference == "double"


def test_pack_oci_validates_before_the_canary_too(
    copy: Path, tmp_path: Path, engine: CanaryEngineDouble
) -> None:
    _damage("shard truncated in its tensors", copy)
    with pytest.raises(ModelFormatError, match="is truncated"):
        pack.run(pack_args(copy, tmp_path / "layout", "--oci"))
    assert engine.calls == [] and not (tmp_path / "layout").exists()


def test_pack_oci_refuses_files_in_subdirectories_before_the_canary(
    copy: Path, tmp_path: Path, engine: CanaryEngineDouble
) -> None:
    (copy / "extra").mkdir()
    (copy / "extra" / "notes.json").write_text("{}")
    with pytest.raises(
        ConfigError, match=r"files in subdirectories are not loaded from images: extra/notes\.json"
    ):
        pack.run(pack_args(copy, tmp_path / "layout", "--oci"))
    assert engine.calls == [] and not (tmp_path / "layout").exists()
