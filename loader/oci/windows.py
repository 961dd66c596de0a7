"""An indexed OCI layer as a :class:`loader.source.TensorSource`: the one decrypt engine reads images.

Each ``*.safetensors`` member of an indexed weight layer (:mod:`loader.oci.index`) becomes one
source for :class:`loader.lazy.LazyCheckpoint`, exactly like a native encrypted shard: the engine
asks for the pieces covering the rows its tensor-parallel rank keeps, and :meth:`fill` re-reads
each unit's ciphertext from the blob store, **checks its tag against the bytes just read**, and
only then CTR-decrypts those same bytes into the destination. A rank therefore reads and decrypts
only its units, and the engine's staging ring and wipe-on-failure path apply unchanged.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import ModelDecryptionError
from foundation.secret import SecretBytes
from loader.format import TensorEntry
from loader.oci.blobs import BlobStore
from loader.oci.image import OciImage, OciLayer
from loader.oci.index import ImageIndex, IndexedFile, LayerIndex, Unit, ctr_decrypt_at, unit_nonce
from loader.oci.ocicrypt import LayerKey
from loader.shard import Piece

__all__ = ["OciTensorSource", "image_sources"]


class OciTensorSource:
    """One indexed safetensors member of one layer (see the module docstring). Thread-safe."""

    def __init__(
        self, store: BlobStore, layer: OciLayer, key: LayerKey, index_key: SecretBytes, file: IndexedFile
    ) -> None:
        self.label = f"{layer.label}: {file.name}"
        self._store = store
        self._layer = layer
        self._key = key
        self._index_key = index_key
        self._gmac = AESGCM(index_key.reveal())
        self._file = file
        self._units = {t.entry.name: t.units for t in file.tensors}
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Ciphertext bytes read from the store so far (what this rank fetched).
        self.bytes_read = 0

    def fresh(self) -> OciTensorSource:
        """Another source over the same member (its own counter): another rank's view."""
        return OciTensorSource(self._store, self._layer, self._key, self._index_key, self._file)

    def tensors(self) -> Sequence[TensorEntry]:
        return [t.entry for t in self._file.tensors]

    def pieces(self, tensor: TensorEntry, start: int = 0, stop: int | None = None) -> list[Piece]:
        """The whole units holding bytes ``[start, stop)`` of ``tensor`` (tensor-relative)."""
        stop = tensor.nbytes if stop is None else stop
        if stop <= start:
            return []
        return [
            Piece(u.rel, u.length, u)
            for u in self._units[tensor.name]
            if u.rel < stop and u.rel + u.length > start
        ]

    def fill(self, piece: Piece, out: Any) -> None:
        """Read the unit, check its tag, decrypt it into ``out``.

        Raises:
            ModelDecryptionError: the bytes read are not the ones the runtime authenticated.
            ModelFormatError: the store could not serve them.
        """
        unit: Unit = piece.ref
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < unit.length:
            buf = self._local.buf = bytearray(unit.length)
        view = memoryview(buf)[: unit.length]
        self._store.read_range(self._layer.digest, unit.offset, view, self.label)
        with self._lock:
            self.bytes_read += unit.length
        tag = self._gmac.encrypt(unit_nonce(self._layer.index, unit.serial), b"", view)
        if not hmac.compare_digest(tag, unit.tag):
            raise ModelDecryptionError(f"{self.label} changed after it was authenticated")
        ctr_decrypt_at(self._key, unit.offset, view, out)

    def discard(self, pieces: Sequence[Piece]) -> None:
        return None

    def close(self) -> None:
        self._local = threading.local()


def image_sources(
    store: BlobStore,
    image: OciImage,
    index: ImageIndex,
    keys: dict[int, LayerKey],
    index_key: SecretBytes,
) -> Iterator[OciTensorSource]:
    """The sources of every indexed member, layer by layer (``keys``: each indexed layer's key)."""
    if index.digest != image.digest:
        raise ModelDecryptionError(f"the runtime's index is of {index.digest}, not {image.digest}")
    by_index = {layer.index: layer for layer in image.layers}
    for li in index.layers:
        layer = _layer(by_index, li)
        for file in li.files:
            yield OciTensorSource(store, layer, keys[li.layer], index_key, file)


def _layer(by_index: dict[int, OciLayer], li: LayerIndex) -> OciLayer:
    layer = by_index.get(li.layer)
    if layer is None or layer.digest != li.digest:
        raise ModelDecryptionError("the runtime's index does not describe this image's layers")
    return layer
