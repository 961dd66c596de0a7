"""Pure parsers and layout: arbitrary bytes give a clean error, never a crash; layout invariants."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from foundation.errors import ModelFormatError
from loader.format import (
    SafetensorsIndex,
    ShardHeader,
    TensorEntry,
    chunk_layout,
    parse_safetensors_header,
)
from loader.manifest import Manifest


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_shard_header_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ModelFormatError):
        ShardHeader.from_bytes(data)


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_shard_header_parser_on_mutated_magic(data: bytes) -> None:
    with contextlib.suppress(ModelFormatError):
        ShardHeader.from_bytes(b"\x89ESENC\r\n\x01\x00" + data)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_safetensors_header_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ModelFormatError):
        parse_safetensors_header(len(data).to_bytes(8, "little") + data)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_manifest_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ModelFormatError):
        Manifest.from_bytes(data)


def test_header_round_trip() -> None:
    h = ShardHeader(
        chunk_size=4096,
        plaintext_length=100,
        safetensors_header_length=50,
        safetensors_header_sha256=b"\x01" * 32,
        salt=b"\x02" * 32,
        shard_name="model.safetensors",
        key_id="kbs:///a/b/c",
    )
    raw = h.to_bytes(b"k" * 32)
    parsed, mac = ShardHeader.from_bytes(raw)
    assert parsed == h and parsed.length == len(raw)
    assert parsed.verify_mac(b"k" * 32, mac) and not parsed.verify_mac(b"j" * 32, mac)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=20000), min_size=0, max_size=8),
    chunk=st.sampled_from([4096, 5000, 65536]),
    header=st.integers(min_value=10, max_value=9000),
)
def test_chunks_cover_the_file_and_never_straddle_a_tensor(sizes: list[int], chunk: int, header: int) -> None:
    tensors, pos = [], 0
    for i, n in enumerate(sizes):
        tensors.append(TensorEntry(name=f"t{i}", dtype="U8", shape=(n,), begin=pos, end=pos + n))
        pos += n
    index = SafetensorsIndex(header_length=header, tensors=tuple(tensors))
    total = header + pos
    chunks = chunk_layout(plaintext_length=total, index=index, chunk_size=chunk, header_length=100)
    assert chunks[0].start == 0 and chunks[-1].stop == total and chunks[-1].last
    assert sum(c.last for c in chunks) == 1
    for a, b in itertools.pairwise(chunks):
        assert a.stop == b.start and b.ct_offset == a.ct_offset + a.ct_length
    bounds = {header} | {header + t.begin for t in tensors} | {header + t.end for t in tensors}
    for c in chunks:
        assert 0 < c.length <= chunk
        assert not any(c.start < b < c.stop for b in bounds)
