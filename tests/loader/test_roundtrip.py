"""Pack → decrypt gives bit-identical tensors on every engine path; selection, references, stats."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loader.format import TensorEntry
from loader.manifest import Manifest
from loader.pipeline import RowRange, decrypted_tensors, load_tensors
from loader.shard import EncryptedShard
from loader.stats import StatsRecorder
from tests.loader.conftest import KEY, as_bytes, engine_load

Loader = Callable[..., dict[str, torch.Tensor]]


@pytest.mark.parametrize("read_mode", ["mmap", "pread"])
def test_round_trip_is_bit_identical(
    packed_pristine: Path, reference: dict[str, torch.Tensor], load_all: Loader, read_mode: str
) -> None:
    out = load_all(packed_pristine, read_mode=read_mode, threads=2)
    assert sorted(out) == sorted(reference)
    for name, ref in reference.items():
        assert out[name].dtype == ref.dtype, name
        assert out[name].shape == ref.shape, name
        assert as_bytes(out[name]) == as_bytes(ref), name


@pytest.mark.parametrize("read_mode", ["mmap", "pread"])
def test_shipping_path_round_trip_is_bit_identical(
    packed_pristine: Path, reference: dict[str, torch.Tensor], engine_path: str, read_mode: str
) -> None:
    out = engine_load(packed_pristine, path=engine_path, read_mode=read_mode)
    assert sorted(out) == sorted(reference)
    for name, ref in reference.items():
        assert out[name].dtype == ref.dtype and out[name].shape == ref.shape, name
        assert as_bytes(out[name]) == as_bytes(ref), name


def test_yielded_tensors_stay_valid_when_the_consumer_keeps_them(
    packed_pristine: Path, reference: dict[str, torch.Tensor]
) -> None:
    # Some models buffer weights before use: memory must never be recycled under a live tensor.
    manifest = Manifest.load(packed_pristine)
    kept = dict(decrypted_tensors(packed_pristine, manifest, KEY, threads=2))
    gc.collect()
    for name, ref in reference.items():
        assert as_bytes(kept[name]) == as_bytes(ref), name
    storages = {t.untyped_storage().data_ptr() for t in kept.values() if t.numel()}
    assert len(storages) == sum(1 for t in kept.values() if t.numel())  # each tensor is its own


def test_the_staging_ring_is_bounded_and_wiped(packed_pristine: Path) -> None:
    from loader.lazy import LazyCheckpoint
    from loader.staging import StagingOptions

    manifest = Manifest.load(packed_pristine)
    staging = StagingOptions(slots=2, slot_bytes=1)  # raised to one chunk by the engine
    with LazyCheckpoint.open(
        packed_pristine, manifest, KEY, threads=2, staging=staging, stage_host_copies=True
    ) as checkpoint:
        for _name, lazy in checkpoint.tensors():
            torch.empty(lazy.shape, dtype=lazy.dtype).copy_(lazy)
        (ring,) = checkpoint.lanes.values()
        assert ring.nbytes == 2 * manifest.chunk_size
        slots = list(ring._slots)
        assert any(s.tensor.any() for s in slots)  # the ring carried plaintext
    assert all(not s.tensor.any() for s in slots)  # and was zeroed on close


def test_select_skips_tensors_and_decrypts_only_selected_rows(
    packed_pristine: Path, reference: dict[str, torch.Tensor]
) -> None:
    manifest = Manifest.load(packed_pristine)
    name = "model.embed_tokens.weight"  # 100 x 64 bf16 = 12.5 KiB, four 4 KiB chunks

    def select(entry: TensorEntry) -> bool | RowRange:
        if entry.name == name:
            return RowRange(50, 60)
        return entry.name.endswith("norm.weight")

    stats = StatsRecorder()
    out = {
        n: t.clone() for n, t in decrypted_tensors(packed_pristine, manifest, KEY, select=select, stats=stats)
    }
    assert set(out) == {name, "model.layers.0.norm.weight", "model.layers.1.norm.weight"}
    ref = reference[name]
    assert torch.equal(out[name][50:60], ref[50:60])
    # Whole chunks are decrypted (rows 32..63 here); rows outside every decrypted chunk are zero.
    assert torch.count_nonzero(out[name][:32]) == 0
    assert torch.count_nonzero(out[name][96:]) == 0
    snap = stats.snapshot()
    assert snap.done and snap.tensors == 3
    assert snap.bytes < 12800  # a fraction of the embedding, not all of it


def test_stats_and_logs(packed_pristine: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = Manifest.load(packed_pristine)
    ticks = iter(range(1000))
    stats = StatsRecorder(clock=lambda: float(next(ticks)))
    caplog.set_level("INFO", logger="loader")
    n = sum(1 for _ in decrypted_tensors(packed_pristine, manifest, KEY, stats=stats))
    snap = stats.snapshot()
    assert snap.tensors == n == 14
    assert snap.bytes == sum(t.end - t.begin for s in manifest.shards for t in s.tensors)
    assert snap.ciphertext_bytes > snap.bytes
    assert [f.name for f in snap.files] == [s.file for s in manifest.shards]
    assert snap.seconds > 0 and snap.gbps > 0
    assert "loaded 14 tensors" in caplog.text


def test_closing_early_keeps_what_the_consumer_holds(
    packed_pristine: Path, reference: dict[str, torch.Tensor]
) -> None:
    manifest = Manifest.load(packed_pristine)
    gen = decrypted_tensors(packed_pristine, manifest, KEY)
    name, first = next(gen)
    gen.close()
    assert as_bytes(first) == as_bytes(reference[name])


def test_load_tensors_accepts_any_source(packed_pristine: Path, reference: dict[str, torch.Tensor]) -> None:
    manifest = Manifest.load(packed_pristine)
    entry = manifest.shards[2]
    shard = EncryptedShard.open(packed_pristine, manifest, entry, KEY.reveal())
    out = {n: t.clone() for n, t in load_tensors([shard], threads=1)}
    assert {t.name for t in entry.tensors} == set(out)
    for name, t in out.items():
        assert as_bytes(t) == as_bytes(reference[name])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pinned", "pageable"])
def test_round_trip_to_gpu_with_each_staging_mode(
    packed_pristine: Path, reference: dict[str, torch.Tensor], mode: str
) -> None:
    from loader.lazy import LazyCheckpoint
    from loader.staging import StagingOptions

    manifest = Manifest.load(packed_pristine)
    with LazyCheckpoint.open(
        packed_pristine,
        manifest,
        KEY,
        threads=2,
        staging=StagingOptions(mode=mode),  # type: ignore[arg-type]
    ) as checkpoint:
        out = {}
        for name, lazy in checkpoint.tensors():
            dst = torch.empty(lazy.shape, dtype=lazy.dtype, device="cuda")
            dst.copy_(lazy)
            out[name] = dst
        (ring,) = checkpoint.lanes.values()
        assert ring.pinned is (mode == "pinned")
    for name, ref in reference.items():
        assert out[name].device.type == "cuda"
        assert as_bytes(out[name]) == as_bytes(ref), name


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pinned", "pageable"])
def test_copies_land_after_a_fill_queued_on_the_consumers_stream(
    packed_pristine: Path, reference: dict[str, torch.Tensor], mode: str
) -> None:
    """The race probe: a sleep kernel and a fill queued just before ``copy_`` on the current
    stream; the decrypted bytes must land after the fill, not under it."""
    from loader.lazy import LazyCheckpoint
    from loader.staging import StagingOptions

    name = "model.embed_tokens.weight"
    manifest = Manifest.load(packed_pristine)
    staging = StagingOptions(mode=mode)  # type: ignore[arg-type]
    with LazyCheckpoint.open(packed_pristine, manifest, KEY, threads=2, staging=staging) as checkpoint:
        lazy = dict(checkpoint.tensors())[name]
        dst = torch.empty(lazy.shape, dtype=lazy.dtype, device="cuda")
        torch.cuda._sleep(100_000_000)  # type: ignore[no-untyped-call]  # ~0.05-0.1 s of GPU time
        dst.fill_(7)
        dst.copy_(lazy)
        after = dst.float().sum()  # consumer work queued after copy_: must see the bytes
        torch.cuda.synchronize()
    assert as_bytes(dst) == as_bytes(reference[name])
    assert after.item() == reference[name].float().sum().item()


@pytest.mark.gpu
def test_the_copy_thread_uses_the_destination_device_and_its_own_stream(packed_pristine: Path) -> None:
    from loader.lazy import LazyCheckpoint
    from loader.staging import CopyLane, CudaCopyLane, StagingRing

    seen: dict[str, int] = {}

    class Probe(CudaCopyLane):
        def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> object:
            seen["device"] = torch.cuda.current_device()
            seen["stream"] = torch.cuda.current_stream().cuda_stream
            seen["lane"] = self.stream.cuda_stream
            return super()._copy(dst, src, after)

    def factory(ring: StagingRing, device: torch.device) -> CopyLane:
        return Probe(ring, device)

    last = torch.cuda.device_count() - 1
    manifest = Manifest.load(packed_pristine)
    with LazyCheckpoint.open(packed_pristine, manifest, KEY, threads=2, copy_lanes=factory) as checkpoint:
        _name, lazy = next(checkpoint.tensors())
        torch.empty(lazy.shape, dtype=lazy.dtype, device=f"cuda:{last}").copy_(lazy)
    assert seen["device"] == last
    assert seen["stream"] == seen["lane"]
