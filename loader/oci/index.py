"""Authenticate an encrypted image's weight layers once, and index where every tensor lies.

ocicrypt's layer cipher (``AES_256_CTR_HMAC_SHA256``) authenticates a layer only as a whole: its
HMAC, like the blob's SHA-256, can be checked only after the last byte. AES-CTR is malleable, so
bytes re-read from the host *after* that check could have been changed (a flipped ciphertext bit
flips the same plaintext bit) without anything noticing. The runtime therefore makes **one
streaming pass** over every uncompressed weight layer (:func:`index_layer`), in guest memory:

1. the blob's size and SHA-256 (the pin, through the manifest digest) and the layer's HMAC are
   computed over every ciphertext byte and checked at the end (fail: the layer is refused);
2. only the tar headers and the safetensors headers are CTR-decrypted (CTR is seekable), to find
   each tensor's byte range in the layer: no weight is decrypted in this pass;
3. every tensor's ciphertext is cut into units of at most ``unit_bytes`` (units never cross a
   tensor boundary) and each unit gets a GMAC tag (AES-GCM with no plaintext) under a **per-boot
   index key** that only the runtime and its workers hold, with a nonce naming the layer and the
   unit.

The result, an :class:`ImageIndex`, reaches the workers with the index key over the key handoff
(:func:`handoff_bundle`). A worker (:mod:`loader.oci.windows`) re-reads only the units its
tensor-parallel rank needs, checks each unit's tag against the bytes it just read, and only then
CTR-decrypts exactly those bytes. Changing a unit after the pass changes its tag; moving one
changes its nonce; so what a worker decrypts is exactly what the pass authenticated.

Compressed layers (gzip, zstd) cannot be indexed this way (no offset in the compressed stream
maps to a tensor) and are streamed whole instead (:func:`loader.oci.layers.image_tensors`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import ModelDecryptionError, ModelError, ModelFormatError
from foundation.secret import SecretBytes
from loader.format import MAX_SAFETENSORS_HEADER, TensorEntry, parse_safetensors_header
from loader.oci.blobs import BlobStore
from loader.oci.ctr import ctr_xor
from loader.oci.image import OciImage, OciLayer
from loader.oci.ocicrypt import LayerKey
from loader.oci.tar import BLOCK, member_name, member_size, padded, parse_header, pax_records, read_exact

__all__ = [
    "DEFAULT_UNIT_BYTES",
    "ImageIndex",
    "IndexedFile",
    "IndexedTensor",
    "LayerIndex",
    "Unit",
    "ctr_decrypt_at",
    "handoff_bundle",
    "index_image",
    "index_layer",
    "indexable",
    "new_index_key",
    "open_bundle",
    "unit_nonce",
    "walk_layer",
]

#: Largest unit of ciphertext one tag covers (and one staging slot must hold).
DEFAULT_UNIT_BYTES = 4 << 20
_SKIP = 4 << 20
_BUNDLE_MAGIC = b"ESOCIIX1"
_INDEX_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class Unit:
    """Bytes ``[offset, offset + length)`` of a layer (one tensor's), and their tag."""

    serial: int  # the unit's number within its layer (the tag's nonce)
    offset: int  # in the layer (= in its ciphertext: CTR keeps offsets)
    rel: int  # in the tensor
    length: int
    tag: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class IndexedTensor:
    """One tensor of a safetensors member, and the units holding its ciphertext in order."""

    entry: TensorEntry
    units: tuple[Unit, ...]


@dataclass(frozen=True, slots=True)
class IndexedFile:
    """One ``*.safetensors`` member of a layer (its name relative to the model root)."""

    name: str
    tensors: tuple[IndexedTensor, ...]


@dataclass(frozen=True, slots=True)
class LayerIndex:
    """One authenticated weight layer: its files, tensors and units."""

    layer: int  # the layer's index in the manifest
    digest: str
    files: tuple[IndexedFile, ...]

    @property
    def weight_bytes(self) -> int:
        """The tensors' bytes in this layer."""
        return sum(t.entry.nbytes for f in self.files for t in f.tensors)


@dataclass(frozen=True, slots=True)
class ImageIndex:
    """Every indexed weight layer of one image (pinned by ``digest``)."""

    digest: str
    unit_bytes: int
    layers: tuple[LayerIndex, ...]
    #: The model directory inside the layers (:func:`loader.oci.layers.model_root_of`).
    root: str = ""
    #: Not indexed (compressed weight layers): every rank streams every weight layer whole.
    streamed: bool = False

    @property
    def weight_bytes(self) -> int:
        """The tensors' bytes of the image."""
        return sum(layer.weight_bytes for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        """The index as JSON (tags in base64)."""
        return {
            "digest": self.digest,
            "unit_bytes": self.unit_bytes,
            "root": self.root,
            "streamed": self.streamed,
            "layers": [
                {
                    "layer": li.layer,
                    "digest": li.digest,
                    "files": [
                        {
                            "name": f.name,
                            "tensors": [
                                {
                                    "name": t.entry.name,
                                    "dtype": t.entry.dtype,
                                    "shape": list(t.entry.shape),
                                    "begin": t.entry.begin,
                                    "end": t.entry.end,
                                    "units": [
                                        [
                                            u.serial,
                                            u.offset,
                                            u.rel,
                                            u.length,
                                            base64.b64encode(u.tag).decode(),
                                        ]
                                        for u in t.units
                                    ],
                                }
                                for t in f.tensors
                            ],
                        }
                        for f in li.files
                    ],
                }
                for li in self.layers
            ],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageIndex:
        """Rebuild an index from :meth:`to_json` (the runtime's own output, over the key handoff)."""
        try:
            return cls(
                digest=str(obj["digest"]),
                unit_bytes=int(obj["unit_bytes"]),
                root=str(obj["root"]),
                streamed=bool(obj["streamed"]),
                layers=tuple(
                    LayerIndex(
                        layer=int(li["layer"]),
                        digest=str(li["digest"]),
                        files=tuple(
                            IndexedFile(
                                name=str(f["name"]),
                                tensors=tuple(
                                    IndexedTensor(
                                        entry=TensorEntry(
                                            name=str(t["name"]),
                                            dtype=str(t["dtype"]),
                                            shape=tuple(int(d) for d in t["shape"]),
                                            begin=int(t["begin"]),
                                            end=int(t["end"]),
                                        ),
                                        units=tuple(
                                            Unit(int(s), int(o), int(r), int(n), base64.b64decode(tag))
                                            for s, o, r, n, tag in t["units"]
                                        ),
                                    )
                                    for t in f["tensors"]
                                ),
                            )
                            for f in li["files"]
                        ),
                    )
                    for li in obj["layers"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError("the image index from the runtime is malformed") from exc


def unit_nonce(layer: int, serial: int) -> bytes:
    """The GMAC nonce of unit ``serial`` of layer ``layer`` (unique per boot key)."""
    return struct.pack(">IQ", layer, serial)


def ctr_decrypt_at(key: LayerKey, offset: int, data: Any, out: Any | None = None) -> bytes | None:
    """CTR-decrypt ``data``, the ciphertext at byte ``offset`` of a layer (the counter is seekable).

    Writes into ``out`` (exactly ``len(data)`` bytes) when given and returns None; else returns
    the plaintext.
    """
    if out is not None:
        ctr_xor(key.symkey, key.nonce, offset, data, out)  # without the GIL: all decrypt threads at once
        return None
    counter = (int.from_bytes(key.nonce, "big") + offset // 16) % (1 << 128)
    dec = Cipher(algorithms.AES(key.symkey), modes.CTR(counter.to_bytes(16, "big"))).decryptor()
    skip = offset % 16
    if skip:
        dec.update(bytes(skip))
    return dec.update(bytes(data)) + dec.finalize()


# -- the walk: what to read next, decided from the headers decrypted so far ---------------------

#: A request of the walk: ("plain", n) read n bytes and send their plaintext; ("skip", n) read
#: n bytes; ("unit", n, entry, rel) read n bytes (bytes ``rel…`` of tensor ``entry``) and send
#: their tag; ("empty", 0, entry, 0) a tensor with no bytes; ("announce", 0, entry, 0) a tensor
#: of the file whose header was just read (all of them, in order, before their bytes);
#: ("rest", 0) read to the end.
_Request = tuple[str, int, TensorEntry | None, int]


def _relative(name: str, root: str) -> str | None:
    if root:
        if not name.startswith(root + "/"):
            return None
        name = name[len(root) + 1 :]
    if not name or "/" in name or name in (".", ".."):
        return None
    return name


def walk_layer(
    root: str, label: str, unit_bytes: int, files: list[IndexedFile]
) -> Generator[_Request, bytes, None]:
    """Walk one layer's tar stream, decrypting only headers; append its safetensors to ``files``."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    serial = 0
    pos = 0
    while True:
        raw = yield ("plain", BLOCK, None, 0)
        pos += BLOCK
        header = parse_header(raw, label)
        if header is None:
            yield ("rest", 0, None, 0)
            return
        if header.kind in (b"x", b"L"):
            data = yield ("plain", header.size, None, 0)
            tail = padded(header.size) - header.size
            pos += header.size
            if tail:
                yield ("skip", tail, None, 0)
                pos += tail
            if header.size > 1 << 20:
                raise ModelFormatError(f"{label}: a tar extension header is too large")
            if header.kind == b"x":
                pax = pax_records(data, label)
            else:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if header.extension:
            if header.size:
                yield ("skip", padded(header.size), None, 0)
                pos += padded(header.size)
            continue
        name = member_name(header, pax, long_name)
        size = member_size(header, pax, label)
        pax, long_name = {}, None
        relative = _relative(name, root) if header.regular else None
        if relative is None or not relative.endswith(".safetensors"):
            if padded(size):
                yield ("skip", padded(size), None, 0)
                pos += padded(size)
            continue
        flabel = f"{label}: {relative}"
        if size < 8:
            raise ModelFormatError(f"{flabel} is truncated")
        head = yield ("plain", 8, None, 0)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ModelFormatError(f"{flabel}: safetensors header length out of range")
        index = parse_safetensors_header(head + (yield ("plain", n, None, 0)))
        for entry in index.tensors:  # every tensor of the file, before any of their bytes
            yield ("announce", 0, entry, 0)
        data_start = pos + 8 + n
        cursor = data_start
        if index.data_length > size - 8 - n:
            raise ModelFormatError(f"{flabel}: the tensors run past the end of the file")
        tensors = []
        for entry in index.tensors:  # in data-offset order, not overlapping (the parser checks)
            begin = data_start + entry.begin
            if begin > cursor:
                yield ("skip", begin - cursor, None, 0)
            units = []
            if not entry.nbytes:
                yield ("empty", 0, entry, 0)
            for rel in range(0, entry.nbytes, unit_bytes):
                length = min(unit_bytes, entry.nbytes - rel)
                tag = yield ("unit", length, entry, rel)
                units.append(Unit(serial, begin + rel, rel, length, tag))
                serial += 1
            cursor = begin + entry.nbytes
            tensors.append(IndexedTensor(entry, tuple(units)))
        end = pos + padded(size)
        if end > cursor:
            yield ("skip", end - cursor, None, 0)
        pos = end
        files.append(IndexedFile(relative, tuple(tensors)))


def index_layer(
    store: BlobStore,
    layer: OciLayer,
    key: LayerKey,
    *,
    root: str,
    index_key: SecretBytes,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
) -> LayerIndex:
    """Authenticate one uncompressed encrypted layer and index its tensors (see the module docstring).

    Raises:
        ModelFormatError: the blob is truncated or does not match its digest, or its tar or
            safetensors headers are malformed.
        ModelDecryptionError: the layer fails its HMAC.
    """
    if layer.compression != "none":
        raise ModelFormatError(f"{layer.label} is compressed ({layer.compression}): it cannot be indexed")
    gmac = AESGCM(index_key.reveal())
    blob = store.open_blob(layer.digest, layer.size, layer.label)
    mac = hmac.new(key.symkey, digestmod=hashlib.sha256)
    files: list[IndexedFile] = []
    walk = walk_layer(root, layer.label, unit_bytes, files)
    buf = bytearray(max(unit_bytes, _SKIP))
    pos = serial = 0
    try:
        request = next(walk)
        while True:
            what, n = request[0], request[1]
            if what == "rest":
                view = memoryview(buf)
                while k := blob.readinto(view):
                    mac.update(view[:k])
                break
            answer = b""
            if what in ("empty", "announce"):
                pass
            elif what == "skip":
                while n > 0:
                    view = memoryview(buf)[: min(n, len(buf))]
                    read_exact(blob, view, f"{layer.label}: the tar stream")
                    mac.update(view)
                    n -= len(view)
                    pos += len(view)
            else:
                view = memoryview(buf)[:n] if n <= len(buf) else memoryview(bytearray(n))
                read_exact(blob, view, f"{layer.label}: the tar stream")
                mac.update(view)
                if what == "plain":
                    answer = ctr_decrypt_at(key, pos, view) or b""
                else:
                    answer = gmac.encrypt(unit_nonce(layer.index, serial), b"", view)
                    serial += 1
                pos += n
            request = walk.send(answer)
    except StopIteration:
        pass
    except ModelFormatError as exc:  # a parse error: a tampered layer is reported as such
        try:
            while blob.readinto(buf):
                pass
        except ModelError as integrity:
            raise integrity from None
        raise exc from None
    finally:
        walk.close()
        blob.close()
    if not hmac.compare_digest(mac.digest(), key.hmac):
        raise ModelDecryptionError(
            f"{layer.label} failed its HMAC: the encrypted layer was modified or truncated; "
            "nothing from it is used"
        )
    return LayerIndex(layer=layer.index, digest=layer.digest, files=tuple(files))


def indexable(image: OciImage) -> bool:
    """Whether every weight layer of ``image`` is uncompressed (and so can be indexed)."""
    return all(layer.compression == "none" for layer in image.layers if layer.role != "files")


def index_image(
    store: BlobStore,
    image: OciImage,
    keys: Callable[[OciLayer], LayerKey | None],
    *,
    root: str,
    index_key: SecretBytes,
    threads: int = 2,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
) -> ImageIndex:
    """Index every weight layer of ``image`` (layers in parallel on ``threads``).

    Raises:
        ModelFormatError / ModelDecryptionError: a layer failed (the first failure, named).
    """
    layers = [layer for layer in image.layers if layer.role != "files"]

    def one(layer: OciLayer) -> LayerIndex:
        key = keys(layer)
        if key is None:
            raise ModelFormatError(f"{layer.label} is not encrypted")
        return index_layer(store, layer, key, root=root, index_key=index_key, unit_bytes=unit_bytes)

    # Every layer at once (up to four per thread): each layer's hashes are sequential, so fewer
    # layers than threads, or unequal layers, would leave cores idle at the end.
    workers = max(1, min(len(layers), 4 * threads))
    with ThreadPoolExecutor(workers, thread_name_prefix="enclave-index") as pool:
        indexed = list(pool.map(one, layers))
    return ImageIndex(digest=image.digest, unit_bytes=unit_bytes, layers=tuple(indexed), root=root)


def new_index_key() -> SecretBytes:
    """A fresh per-boot index key."""
    return SecretBytes(bytearray(secrets.token_bytes(_INDEX_KEY_BYTES)))


def handoff_bundle(recipient_pem: SecretBytes, index_key: SecretBytes, index: ImageIndex) -> SecretBytes:
    """What the key handoff gives an image's workers: the recipient key, the index key, the index."""
    pem = recipient_pem.reveal()
    body = json.dumps(index.to_json(), separators=(",", ":")).encode()
    data = bytearray(_BUNDLE_MAGIC + struct.pack(">I", len(pem)) + pem + index_key.reveal() + body)
    try:
        return SecretBytes(data)
    finally:
        data[:] = bytes(len(data))


def open_bundle(bundle: SecretBytes) -> tuple[SecretBytes, SecretBytes, ImageIndex]:
    """Split :func:`handoff_bundle`'s output into the recipient key, the index key and the index."""
    data = bundle.reveal()
    if not data.startswith(_BUNDLE_MAGIC) or len(data) < len(_BUNDLE_MAGIC) + 4:
        raise ModelFormatError("the runtime handed over no image index (a runtime and loader mismatch)")
    at = len(_BUNDLE_MAGIC)
    (n,) = struct.unpack_from(">I", data, at)
    at += 4
    pem = SecretBytes(bytearray(data[at : at + n]))
    at += n
    index_key = SecretBytes(bytearray(data[at : at + _INDEX_KEY_BYTES]))
    at += _INDEX_KEY_BYTES
    try:
        obj = json.loads(bytes(data[at:]))
    except ValueError:
        raise ModelFormatError("the image index from the runtime is malformed") from None
    return pem, index_key, ImageIndex.from_json(obj)
