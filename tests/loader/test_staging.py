"""The staging ring and copy lanes: bounded memory, slot lifetimes and stream ordering.

The ordering tests run the engine's GPU path on the CPU with :class:`AsyncCopyLaneDouble`
(copies that complete after they were issued, as on a CUDA stream); the GPU tests in
``test_roundtrip.py`` check the same properties on a real device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from foundation.errors import ModelDecryptionError
from loader.lazy import LazyCheckpoint
from loader.manifest import Manifest
from loader.staging import CopyLane, StagingOptions, StagingRing
from tests.loader.conftest import CHUNK, KEY, as_bytes
from tests.loader.stream_double import AsyncCopyLaneDouble, StreamDouble


@pytest.fixture
def consumer() -> Iterator[StreamDouble]:
    stream = StreamDouble("consumer-stream-double")
    yield stream
    stream.close()


def _open(
    model: Path, lanes: list[AsyncCopyLaneDouble], consumer: StreamDouble, **kw: object
) -> LazyCheckpoint:
    def factory(ring: StagingRing, device: torch.device) -> CopyLane:
        lane = AsyncCopyLaneDouble(ring, device, consumer=consumer, **kw)  # type: ignore[arg-type]
        lanes.append(lane)
        return lane

    return LazyCheckpoint.open(
        model,
        Manifest.load(model),
        KEY,
        threads=2,
        stage_host_copies=True,
        staging=StagingOptions(slot_bytes=CHUNK, slots=3),
        copy_lanes=factory,
    )


def _load(checkpoint: LazyCheckpoint) -> dict[str, torch.Tensor]:
    out = {}
    with checkpoint:
        for name, lazy in checkpoint.tensors():
            dst = torch.full(lazy.shape, 7, dtype=lazy.dtype) if lazy.numel() else torch.empty(lazy.shape)
            dst.copy_(lazy)
            out[name] = dst
    return out


def test_slots_are_reused_only_after_their_copy_completed(
    packed_pristine: Path, reference: dict[str, torch.Tensor], consumer: StreamDouble
) -> None:
    lanes: list[AsyncCopyLaneDouble] = []
    out = _load(_open(packed_pristine, lanes, consumer))
    for name, ref in reference.items():
        assert as_bytes(out[name]) == as_bytes(ref), name
    (lane,) = lanes
    assert lane.max_outstanding >= 2  # several copies in flight: no wait per chunk


def test_the_slot_lifetime_check_notices_a_slot_released_at_issue(
    packed_pristine: Path, reference: dict[str, torch.Tensor], consumer: StreamDouble
) -> None:
    """The test above can fail: releasing a slot when its copy is issued corrupts the load."""
    lanes: list[AsyncCopyLaneDouble] = []
    out = _load(_open(packed_pristine, lanes, consumer, early_release=True, delay_s=0.002))
    wrong = [name for name, ref in reference.items() if as_bytes(out[name]) != as_bytes(ref)]
    assert wrong


def test_copies_wait_for_work_the_consumer_queued_before_copy(
    packed_pristine: Path, reference: dict[str, torch.Tensor], consumer: StreamDouble
) -> None:
    """A fill queued on the consumer's stream just before ``copy_`` lands before the bytes."""
    lanes: list[AsyncCopyLaneDouble] = []
    checkpoint = _open(packed_pristine, lanes, consumer, delay_s=0.005)
    name = "model.embed_tokens.weight"
    with checkpoint:
        lazy = dict(checkpoint.tensors())[name]
        dst = torch.empty(lazy.shape, dtype=lazy.dtype)

        def slow_fill() -> None:
            time.sleep(0.05)
            dst.fill_(7)

        consumer.enqueue(slow_fill)  # as torch.zeros / fill_ on a busy CUDA stream
        dst.copy_(lazy)
        consumer.synchronize()  # the consumer's later work: after the copies (finish)
        assert as_bytes(dst) == as_bytes(reference[name])


def test_the_copy_thread_is_bound_before_its_first_copy(
    packed_pristine: Path, consumer: StreamDouble
) -> None:
    lanes: list[AsyncCopyLaneDouble] = []
    _load(_open(packed_pristine, lanes, consumer))
    (lane,) = lanes
    assert lane.bound_thread is not None and lane.copy_threads == {lane.bound_thread}


def test_a_failed_copy_fails_the_tensor_and_zeroes_it(packed_pristine: Path, consumer: StreamDouble) -> None:
    class FailingLane(AsyncCopyLaneDouble):
        def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> object:
            if self.copy_threads:
                raise RuntimeError("device lost")
            return super()._copy(dst, src, after)

    def factory(ring: StagingRing, device: torch.device) -> CopyLane:
        return FailingLane(ring, device, consumer=consumer)

    model = packed_pristine
    checkpoint = LazyCheckpoint.open(
        model, Manifest.load(model), KEY, threads=2, stage_host_copies=True,
        staging=StagingOptions(slot_bytes=CHUNK, slots=3), copy_lanes=factory,
    )  # fmt: skip
    with checkpoint:
        lazy = dict(checkpoint.tensors())["model.embed_tokens.weight"]
        dst = torch.full(lazy.shape, 7, dtype=lazy.dtype)
        with pytest.raises(ModelDecryptionError):
            dst.copy_(lazy)
        consumer.synchronize()
        assert not dst.view(torch.uint8).any()


def test_the_ring_is_bounded_by_the_staging_memory_limit() -> None:
    options = StagingOptions(slot_bytes=8 << 20, max_bytes=64 << 20)
    assert options.slot_count(threads=2) == 4  # threads + 2
    assert options.slot_count(threads=32) == 8  # 64 MiB / 8 MiB
    assert options.slot_count(threads=32, slot_bytes=64 << 20) == 2  # never fewer than two
    assert StagingOptions(slots=5, max_bytes=1).slot_count(threads=32) == 5  # explicit wins
    with pytest.raises(ValueError, match="bound"):
        StagingOptions(max_bytes=0)


def test_a_closed_lane_refuses_work_and_returns_the_slot() -> None:
    ring = StagingRing(slots=1, slot_bytes=16, mode="pageable")
    lane = CopyLane(ring, torch.device("cpu"))
    lane.close()
    slot = ring.take()
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(lane.begin(), slot, torch.empty(16, dtype=torch.uint8))
    assert ring.take() is slot  # given back
