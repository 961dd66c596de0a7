"""The packer: atomic, refuses to overwrite, streams, skips unknown files; the CLI never prints the key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loader.packer
from foundation.errors import ConfigError, ModelFormatError
from foundation.secret import SecretBytes
from loader.manifest import Manifest
from loader.modelview import stage_model_view
from loader.packer import generate_model_key, pack_model
from loader.pipeline import decrypted_tensors
from tests.loader.conftest import CHUNK, KEY, KEY_ID, as_bytes

REPO = Path(__file__).resolve().parents[2]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_to_overwrite_without_the_flag(
    packed_pristine: Path, source_model: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"
    pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    first = Manifest.load(dst).digest
    with pytest.raises(ConfigError, match="--force"):
        pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    assert Manifest.load(dst).digest == first
    pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK, overwrite=True)
    assert Manifest.load(dst).digest != first  # fresh salts
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(source_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    import shutil

    shutil.copytree(source_model, src)
    (src / "model-00003-of-00003.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    )
    dst = tmp_path / "out"
    with pytest.raises(ModelFormatError, match="model-00003"):
        pack_model(src, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_interrupt_midway_leaves_nothing_and_keeps_the_old_output(
    source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "out"
    pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    before = Manifest.load(dst).digest
    real = loader.packer.encrypt_shard
    calls = []

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader.packer, "encrypt_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_model(source_model, dst, key=KEY, key_id=KEY_ID, chunk_size=CHUNK, overwrite=True)
    assert Manifest.load(dst).digest == before
    assert leftovers(tmp_path) == []


def test_streams_a_shard_larger_than_its_buffers(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    save_file({"w": torch.zeros(4 << 20, dtype=torch.float32)}, src / "model.safetensors")  # 16 MiB
    (src / "config.json").write_text("{}")
    tracemalloc.start()
    try:
        pack_model(src, tmp_path / "out", key=KEY, key_id=KEY_ID, chunk_size=64 << 10, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 2 x threads chunk buffers (plain + cipher) = 512 KiB + a 1 MiB side-file copy block,
    # far below the 16 MiB shard.
    assert peak < 3 << 20


def test_skips_files_that_may_be_plaintext_weights(
    source_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_model, src)
    (src / "pytorch_model.bin").write_bytes(b"weights")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    manifest = pack_model(src, tmp_path / "out", key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert "pytorch_model.bin" in caplog.text
    assert {p.name for p in manifest.plain_files} == {
        "config.json",
        "tokenizer.json",
        "generation_config.json",
    }
    stage_model_view(tmp_path / "out", manifest, tmp_path / "view")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": SecretBytes(b"short")}, "32 bytes"),
        ({"key_id": ""}, "not a kbs:/// URI"),
        ({"key_id": "my-model-key"}, "not a kbs:/// URI"),
        ({"key_id": "kbs://repo/type/tag"}, "three slashes"),
        ({"chunk_size": 100}, "chunk size"),
    ],
)
def test_rejects_bad_arguments(
    source_model: Path, tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"key": KEY, "key_id": KEY_ID, "chunk_size": CHUNK} | kwargs
    with pytest.raises(ConfigError, match=match):
        pack_model(source_model, tmp_path / "out", **args)  # type: ignore[arg-type]


def test_generate_model_key_uses_the_injected_randomness() -> None:
    assert generate_model_key(randbytes=lambda n: b"\x07" * n) == SecretBytes(b"\x07" * 32)
    assert len(generate_model_key()) == 32


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # These synthetic models have no tokenizer: the canary is tested in tests/loader/test_canary.py.
        [sys.executable, "-m", "runtime.cli", "pack", "--no-canary", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_packs_with_a_generated_key_and_never_prints_it(source_model: Path, tmp_path: Path) -> None:
    key_file, dst = tmp_path / "model.key", tmp_path / "out"
    done = cli(source_model, dst, "--key-id", KEY_ID, "--generate-key", key_file, "--chunk-size", "64KiB")
    assert done.returncode == 0, done.stderr
    key = key_file.read_bytes()
    assert len(key) == 32 and (key_file.stat().st_mode & 0o777) == 0o600
    manifest = Manifest.load(dst)
    assert manifest.digest in done.stdout and manifest.chunk_size == 64 << 10
    for secret in (key.hex(), key.hex().upper(), repr(key), key.decode("latin-1")):
        assert secret not in done.stdout + done.stderr
    names = [n for n, _ in decrypted_tensors(dst, manifest, SecretBytes(key))]
    assert len(names) == 14
    # Again without --force: refused, output untouched; with --key-file and --force: replaced.
    again = cli(source_model, dst, "--key-id", KEY_ID, "--key-file", key_file)
    assert again.returncode == 1 and "--force" in again.stderr
    assert Manifest.load(dst).digest == manifest.digest
    forced = cli(source_model, dst, "--key-id", KEY_ID, "--key-file", key_file, "--force", "--threads", "1")
    assert forced.returncode == 0, forced.stderr
    assert Manifest.load(dst).digest != manifest.digest


def test_cli_rejects_a_bad_key_file(source_model: Path, tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"0" * 31)
    done = cli(source_model, tmp_path / "out", "--key-id", KEY_ID, "--key-file", tmp_path / "k")
    assert done.returncode == 1 and "32 raw bytes" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_killed_midway_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(4):
        save_file(
            {"w": torch.ones(4 << 20, dtype=torch.float32)}, src / f"model-{i}.safetensors"
        )  # 16 MiB each
    (src / "config.json").write_text("{}")
    dst = tmp_path / "out"
    (tmp_path / "k").write_bytes(bytes(32))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "pack", "--no-canary", src, dst, "--key-id", KEY_ID,
         "--key-file", tmp_path / "k", "--chunk-size", "4KiB", "--threads", "1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()  # only the hidden partial directory can remain after SIGKILL


def test_packed_model_round_trips_through_decrypted_tensors(
    packed_pristine: Path, reference: dict[str, torch.Tensor]
) -> None:
    manifest = Manifest.load(packed_pristine)
    got = {n: as_bytes(t) for n, t in decrypted_tensors(packed_pristine, manifest, KEY)}
    assert got == {n: as_bytes(t) for n, t in reference.items()}
