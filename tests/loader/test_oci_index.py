"""Encrypted OCI images through the one decrypt engine: one authenticating pass in the runtime
(:mod:`loader.oci.index`), then each rank reads, checks and decrypts only its units
(:mod:`loader.oci.windows`) inside :class:`loader.lazy.LazyCheckpoint`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from foundation.errors import ModelDecryptionError, ModelFormatError
from foundation.secret import SecretBytes
from loader.lazy import LazyCheckpoint
from loader.oci.blobs import LayoutStore, open_store
from loader.oci.image import OciImage, load_image
from loader.oci.index import (
    ImageIndex,
    ctr_decrypt_at,
    handoff_bundle,
    index_image,
    indexable,
    new_index_key,
    open_bundle,
)
from loader.oci.layers import LayerKeys, read_side_files
from loader.oci.ocicrypt import LayerKey, private_key_from_pem
from loader.oci.reference import ImageReference
from loader.oci.stream import STREAM_PIECE_BYTES, StreamedLayer
from loader.oci.windows import OciTensorSource, image_sources
from tests import oci_support as oci
from tests.loader.conftest import as_bytes

pytestmark = pytest.mark.skipif(oci.SKOPEO is None, reason="needs skopeo (apt-get install skopeo)")

UNIT = 4096  # small units: several per tensor of the test model


def _indexed(store: object, image: OciImage, pem: Path) -> tuple[LayerKeys, ImageIndex, SecretBytes]:
    keys = LayerKeys(image, private_key_from_pem(pem.read_bytes()))
    root, _ = read_side_files(store, image, keys, layers=[x for x in image.layers if x.role == "files"])  # type: ignore[arg-type]
    index_key = new_index_key()
    index = index_image(store, image, keys.get, root=root, index_key=index_key, unit_bytes=UNIT)  # type: ignore[arg-type]
    return keys, index, index_key


def _sources(
    store: object, image: OciImage, keys: LayerKeys, index: ImageIndex, index_key: SecretBytes
) -> list[OciTensorSource]:
    layer_keys = {layer.index: keys.get(layer) for layer in image.layers if keys.get(layer) is not None}
    return list(image_sources(store, image, index, layer_keys, index_key))  # type: ignore[arg-type]


def _copy(images: dict[str, tuple[Path, str]], name: str, tmp_path: Path) -> tuple[Path, str]:
    layout, digest = images[name]
    shutil.copytree(layout, tmp_path / name)
    return tmp_path / name, digest


def _damaged(images: dict[str, tuple[Path, str]], tmp_path: Path, edit: str) -> tuple[LayoutStore, OciImage]:
    """A copy of the EC image whose weight layer 3 fails its HMAC, its digest, or is truncated."""
    layout, digest = _copy(images, "ec", tmp_path)
    size = int(str(oci.layer(layout, digest, 3)["size"]))
    if edit == "hmac":
        digest = oci.flip_layer_byte(layout, digest, 3, offset=size - 40, redigest=True)
    elif edit == "digest":
        oci.flip_layer_byte(layout, digest, 3, offset=size - 40)
    else:
        oci.truncate_layer(layout, digest, 3, keep=size - 1000)
    store = LayoutStore(layout)
    return store, load_image(store, digest)


def test_ctr_decryption_is_seekable() -> None:
    key = LayerKey(symkey=bytes(range(32)), nonce=b"\xff" * 15 + b"\xfe", plain_digest="sha256:x", hmac=b"")
    data = bytes(range(256)) * 8
    whole = ctr_decrypt_at(key, 0, data)
    assert whole is not None
    for offset in (0, 1, 15, 16, 17, 100, 1000):  # the counter also wraps past 2**128 here
        out = bytearray(len(data) - offset)
        ctr_decrypt_at(key, offset, data[offset:], out)
        assert bytes(out) == whole[offset:] == ctr_decrypt_at(key, offset, data[offset:])


def test_an_indexed_image_loads_through_the_engine_to_the_model(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], reference: dict[str, torch.Tensor]
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    assert indexable(image)
    layer_keys, index, index_key = _indexed(store, image, keys["ec"].private)
    assert index.weight_bytes == sum(t.numel() * t.element_size() for t in reference.values())
    assert max(u.length for li in index.layers for f in li.files for t in f.tensors for u in t.units) <= UNIT
    sources = _sources(store, image, layer_keys, index, index_key)
    loaded = {}
    with LazyCheckpoint(sources, threads=2, min_slot_bytes=UNIT, stage_host_copies=True) as lazy:
        for name, tensor in lazy.tensors():
            out = torch.empty(tensor.shape, dtype=tensor.dtype)
            out.copy_(tensor)
            loaded[name] = out
    assert sorted(loaded) == sorted(reference)
    for name, ref in reference.items():
        assert as_bytes(loaded[name]) == as_bytes(ref), name
    assert sum(s.bytes_read for s in sources) == index.weight_bytes  # every unit read exactly once


def test_a_rank_reads_and_decrypts_only_its_rows(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], reference: dict[str, torch.Tensor]
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    layer_keys, index, index_key = _indexed(store, image, keys["ec"].private)
    sources = _sources(store, image, layer_keys, index, index_key)
    name, ref = max(((n, t) for n, t in reference.items() if t.dim() == 2), key=lambda kv: kv[1].numel())
    rows = ref.shape[0] // 2
    with LazyCheckpoint(sources, threads=2) as lazy:
        tensor = dict(lazy.tensors())[name]
        half = torch.empty((rows, *ref.shape[1:]), dtype=ref.dtype)
        half.copy_(tensor[rows : 2 * rows])
    assert torch.equal(half, ref[rows : 2 * rows])
    nbytes = ref.numel() * ref.element_size()
    assert nbytes // 2 <= sum(s.bytes_read for s in sources) <= nbytes // 2 + 2 * UNIT


def test_a_unit_changed_after_the_pass_is_refused_and_its_destination_wiped(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path
) -> None:
    """The host swaps ciphertext bits after the runtime authenticated the layer (CTR is malleable)."""
    layout, digest = _copy(images, "ec", tmp_path)
    store = LayoutStore(layout)
    image = load_image(store, digest)
    layer_keys, index, index_key = _indexed(store, image, keys["ec"].private)
    victim = index.layers[-1].files[0].tensors[-1]
    unit = victim.units[-1]
    blob = oci.blob(layout, index.layers[-1].digest)
    data = bytearray(blob.read_bytes())
    data[unit.offset + 5] ^= 0x01
    blob.write_bytes(bytes(data))
    sources = _sources(store, image, layer_keys, index, index_key)
    with LazyCheckpoint(sources, threads=2) as lazy:
        tensor = dict(lazy.tensors())[victim.entry.name]
        dst = torch.ones(tensor.shape, dtype=tensor.dtype)
        with pytest.raises(ModelDecryptionError, match="failed authentication"):
            dst.copy_(tensor)
            lazy.synchronize()
        assert not dst.reshape(-1).view(torch.uint8).any()


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [("hmac", ModelDecryptionError, "HMAC"), ("digest", ModelFormatError, "does not match its digest"),
     ("truncate", ModelFormatError, "truncated")],
)  # fmt: skip
def test_the_pass_refuses_a_bad_layer(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path,
    edit: str, error: type[Exception], message: str,
) -> None:  # fmt: skip
    store, image = _damaged(images, tmp_path, edit)
    with pytest.raises(error, match=message):
        _indexed(store, image, keys["ec"].private)


def test_compressed_images_are_not_indexable(images: dict[str, tuple[Path, str]]) -> None:
    for name in ("rsa-gzip", "ec-zstd"):
        layout, digest = images[name]
        assert not indexable(load_image(LayoutStore(layout), digest))


def test_the_handoff_bundle_round_trips(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient]
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    _, index, index_key = _indexed(store, image, keys["ec"].private)
    pem = SecretBytes(bytearray(keys["ec"].private.read_bytes()))
    back_pem, back_key, back_index = open_bundle(handoff_bundle(pem, index_key, index))
    assert back_pem.reveal() == pem.reveal() and back_key.reveal() == index_key.reveal()
    assert back_index == index
    with pytest.raises(ModelFormatError, match="no image index"):
        open_bundle(pem)


def test_a_registry_serves_the_units_by_range(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], reference: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:  # fmt: skip
    registry = oci.Registry(tmp_path)
    try:
        ref = ImageReference.parse(registry.push(images["ec"][0], "models/tiny"))
        store = open_store(ref, allow_http=True)
        try:
            image = load_image(store, ref.digest)
            layer_keys, index, index_key = _indexed(store, image, keys["ec"].private)
            with LazyCheckpoint(_sources(store, image, layer_keys, index, index_key), threads=2) as lazy:
                for name, tensor in lazy.tensors():
                    out = torch.empty(tensor.shape, dtype=tensor.dtype)
                    out.copy_(tensor)
                    lazy.synchronize()
                    assert as_bytes(out) == as_bytes(reference[name]), name
        finally:
            store.close()
    finally:
        registry.stop()


# -- one rank: the layer streamed once into private memory, decrypted by the engine -----------


def _streamed(store: LayoutStore, image: OciImage, pem: Path, **kw: object) -> list[StreamedLayer]:
    keys = LayerKeys(image, private_key_from_pem(pem.read_bytes()))
    root, _ = read_side_files(store, image, keys, layers=[x for x in image.layers if x.role == "files"])
    return [
        StreamedLayer(store, layer, keys.get(layer), root=root, **kw)  # type: ignore[arg-type]
        for layer in image.layers
        if layer.role != "files"
    ]


@pytest.mark.parametrize("budget", [1 << 30, 1])
def test_a_streamed_image_loads_through_the_engine_to_the_model(
    images: dict[str, tuple[Path, str]],
    keys: dict[str, oci.Recipient],
    reference: dict[str, torch.Tensor],
    budget: int,
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    sources = _streamed(store, image, keys["ec"].private, budget_bytes=budget)
    loaded = {}
    with LazyCheckpoint(sources, threads=2, overlap_host_copies=True) as lazy:
        for name, tensor in lazy.tensors():
            out = torch.empty(tensor.shape, dtype=tensor.dtype)
            out.copy_(tensor)
            loaded[name] = out
        lazy.synchronize()
    assert sorted(loaded) == sorted(reference)
    for name, ref in reference.items():
        assert as_bytes(loaded[name]) == as_bytes(ref), name
    assert sum(s.bytes_read for s in sources) == sum(t.numel() * t.element_size() for t in reference.values())


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [("hmac", ModelDecryptionError, "HMAC"), ("digest", ModelFormatError, "does not match its digest"),
     ("truncate", ModelFormatError, "truncated")],
)  # fmt: skip
def test_a_streamed_layer_that_fails_a_check_raises_at_its_end(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path,
    edit: str, error: type[Exception], message: str,
) -> None:  # fmt: skip
    """Written, then wiped: the engine raises from the iterator (the loader then zeroes every parameter)."""
    store, image = _damaged(images, tmp_path, edit)
    copied = 0
    with (
        pytest.raises(error, match=message),
        LazyCheckpoint(_streamed(store, image, keys["ec"].private), threads=2) as lazy,
    ):
        for _name, tensor in lazy.tensors():
            torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
            copied += 1
    assert copied  # tensors of the failing layer were handed out before its end


def test_a_streamed_tensor_copied_long_after_is_refused(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient]
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    with LazyCheckpoint(_streamed(store, image, keys["ec"].private), threads=1) as lazy:
        held = list(lazy.tensors())
        _, first = held[0]
        with pytest.raises(ModelDecryptionError, match="failed authentication"):
            torch.empty(first.shape, dtype=first.dtype).copy_(first)


def test_tensors_the_model_skips_are_dropped_without_stalling_the_stream(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], reference: dict[str, torch.Tensor]
) -> None:
    """A model that copies none of a file's tensors (as vLLM skips unused weights): the reader goes
    on within its bound, hashing and recycling what nobody will decrypt, and the layer checks run."""
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    sources = _streamed(store, image, keys["ec"].private, budget_bytes=2 * STREAM_PIECE_BYTES)
    with LazyCheckpoint(sources, threads=2) as lazy:
        names = [name for name, _ in lazy.tensors()]
    assert sorted(names) == sorted(reference)
    assert all(s._pool.count <= s._pool.limit for s in sources)  # never grew past its bound


def test_a_streamed_tensor_is_decrypted_once(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient]
) -> None:
    layout, digest = images["ec"]
    store = LayoutStore(layout)
    image = load_image(store, digest)
    with LazyCheckpoint(_streamed(store, image, keys["ec"].private), threads=1) as lazy:
        _, tensor = next(iter(lazy.tensors()))
        torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
        with pytest.raises(ModelDecryptionError):
            torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
