"""Walk an image's layers: decrypt, decompress, untar, and hand out side files and tensors.

For every layer: the blob stream (digest checked at its end) → AES-256-CTR with HMAC-SHA256
(checked at its end, with the plaintext digest) → gzip, zstd or nothing, by media type → the tar
stream → ``*.safetensors`` members parsed and their tensors read straight into tensors of their
own, other files of the model directory kept in memory as side files. Nothing is written to any
file system.

**When plaintext may be trusted.** A layer's HMAC and digests can be checked only when its last
byte has been read. :func:`image_tensors` therefore *writes, then wipes on failure*: tensors are
handed to the consumer (vLLM copies them into the parameters) as they are decrypted, and a layer
that then fails its checks makes the iterator raise; the loader plugin zeroes every parameter and
the boot fails, so nothing is ever served from an unverified layer. Every layer has been
verified before the iterator is exhausted. Side files (:func:`read_side_files`) are returned only
after their layer verified.

The model directory in a layer is the directory holding ``config.json`` (the layer root for
images written by ``pack --oci``, ``models/`` for modelcar-style images); files outside it and in
its subdirectories are ignored.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from foundation.errors import ModelDecryptionError, ModelError, ModelFormatError
from loader.format import MAX_SAFETENSORS_HEADER, parse_safetensors_header
from loader.oci.blobs import BlobStore
from loader.oci.image import OciImage, OciLayer
from loader.oci.ocicrypt import DecryptingReader, LayerKey, unwrap_layer_key
from loader.oci.tar import BLOCK, member_name, member_size, parse_header, pax_records, read_exact
from loader.source import TORCH_DTYPES
from loader.stats import StatsRecorder

__all__ = [
    "MAX_SIDE_FILE",
    "LayerKeys",
    "image_tensors",
    "model_root_of",
    "read_side_files",
]

logger = logging.getLogger(__name__)

#: Largest side file kept (config, tokenizer, templates); larger files are refused.
MAX_SIDE_FILE = 64 << 20
#: Files that would be plaintext weights: refused (the image must carry safetensors only).
_PLAINTEXT_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".pkl", ".npz", ".h5", ".msgpack")
_READ = 4 << 20


class LayerKeys:
    """Each encrypted layer's unwrapped key (the recipient private key never leaves this object)."""

    def __init__(self, image: OciImage, recipient: Any | None, *, require_encrypted: bool = True) -> None:
        self._keys: dict[int, LayerKey] = {}
        for layer in image.layers:
            if not layer.encrypted:
                if require_encrypted:
                    raise ModelFormatError(
                        f"{layer.label} is not encrypted ({layer.media_type}): an encrypted image was "
                        "required, and a plaintext layer would carry weights in the clear"
                    )
                continue
            if recipient is None:
                raise ModelDecryptionError(f"{layer.label} is encrypted and no recipient key was given")
            self._keys[layer.index] = unwrap_layer_key(layer, recipient)

    def get(self, layer: OciLayer) -> LayerKey | None:
        """The key of ``layer`` (None for an unencrypted layer)."""
        return self._keys.get(layer.index)


class _Gunzip:
    """A readable stream of gzip-decompressed bytes (concatenated members allowed)."""

    def __init__(self, source: Any, label: str) -> None:
        self._source = source
        self._label = label
        self._z = zlib.decompressobj(wbits=31)
        self._out = b""
        self._eof = False
        self._in = bytearray(_READ)

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._out) < n):
            got = self._source.readinto(self._in)
            if got == 0:
                if not self._z.eof:
                    raise ModelFormatError(f"{self._label}: the gzip stream is truncated")
                self._eof = True
                break
            data = bytes(memoryview(self._in)[:got])
            while data:
                try:
                    self._out += self._z.decompress(data)
                except zlib.error:
                    raise ModelFormatError(f"{self._label}: the gzip stream is corrupt") from None
                if self._z.eof:
                    data = self._z.unused_data
                    if data:
                        self._z = zlib.decompressobj(wbits=31)
                else:
                    data = b""
        if n < 0:
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:n], self._out[n:]
        return out

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class _Plain:
    """A readable view of a stream that has ``readinto`` only."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = bytearray()
            while chunk := self.read(_READ):
                out += chunk
            return bytes(out)
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._source.readinto(view[got:])
            if k == 0:
                break
            got += k
        return bytes(view[:got])

    def readinto(self, buf: Any) -> int:
        return int(self._source.readinto(buf))


def _decompressed(source: Any, layer: OciLayer) -> Any:
    if layer.compression == "gzip":
        return _Gunzip(source, layer.label)
    if layer.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ModelFormatError(
                f"{layer.label} is zstd-compressed and this build lacks zstandard"
            ) from None
        reader = _Plain(source)
        return zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)  # type: ignore[arg-type]
    return _Plain(source)


@dataclass(slots=True)
class _OpenLayer:
    blob: Any
    decrypted: Any
    stream: Any

    def finish(self) -> None:
        """Read both streams to their ends, so that every check has run (raises if one fails)."""
        while self.stream.read(_READ):
            pass
        self._drain()

    def _drain(self) -> None:
        buf = bytearray(_READ)
        while self.decrypted.readinto(buf):
            pass
        self.blob.drain()

    def integrity_error(self) -> ModelError | None:
        """After a parse error: read the rest of the layer and return its integrity failure, if
        any (a tampered layer is reported as such, not as the garbage it decrypts to)."""
        try:
            self._drain()
        except ModelError as exc:
            return exc
        return None

    def close(self) -> None:
        self.blob.close()


@contextmanager
def _opened(store: BlobStore, layer: OciLayer, key: LayerKey | None) -> Iterator[_OpenLayer]:
    """Open ``layer``; a format error inside is replaced by the layer's integrity failure, if any."""
    opened = _open(store, layer, key)
    try:
        yield opened
    except ModelFormatError as exc:
        cause = opened.integrity_error()
        raise (cause if cause is not None else exc) from None
    finally:
        opened.close()


def _open(store: BlobStore, layer: OciLayer, key: LayerKey | None) -> _OpenLayer:
    blob = store.open_blob(layer.digest, layer.size, layer.label)
    decrypted: Any = blob if key is None else DecryptingReader(blob, key, label=layer.label)
    return _OpenLayer(blob=blob, decrypted=decrypted, stream=_decompressed(decrypted, layer))


_BLOCK = BLOCK


def _read_full(source: Any, view: memoryview) -> int:
    got = 0
    while got < len(view):
        k = source.readinto(view[got:])
        if not k:
            break
        got += k
    return got


@dataclass(slots=True)
class _Member:
    """One tar member; ``readinto`` reads its data straight into the caller's buffer."""

    name: str
    size: int
    kind: bytes
    _tar: _TarReader
    _left: int = 0

    def isreg(self) -> bool:
        return self.kind in (b"0", b"\0", b"7")

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")[: self._left]
        if not view:
            return 0
        n = int(self._tar.source.readinto(view))
        if not n:
            raise ModelFormatError(f"{self._tar.label}: the tar stream ends inside {self.name!r}")
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        buf = bytearray(want)
        view = memoryview(buf)
        got = 0
        while got < want:
            got += self.readinto(view[got:])
        return bytes(buf)


class _TarReader:
    """A streaming reader of ustar, pax and GNU tar archives over a ``readinto`` source.

    Members come in order; member data goes straight into the caller's buffers (no copy through
    tarfile's buffers). Unread data of a member is skipped when the next one is asked for.
    """

    def __init__(self, source: Any, label: str) -> None:
        self.source = source
        self.label = label
        self._skip_buf = bytearray(_READ)

    def _skip(self, n: int) -> None:
        view = memoryview(self._skip_buf)
        while n > 0:
            k = self.source.readinto(view[: min(n, len(view))])
            if not k:
                raise ModelFormatError(f"{self.label}: the tar stream is truncated")
            n -= k

    def _data(self, size: int) -> bytes:
        if size > MAX_SIDE_FILE:
            raise ModelFormatError(f"{self.label}: a tar extension header is too large")
        buf = bytearray(size)
        if _read_full(self.source, memoryview(buf)) != size:
            raise ModelFormatError(f"{self.label}: the tar stream is truncated")
        self._skip(-size % _BLOCK)
        return bytes(buf)

    def members(self) -> Iterator[_Member]:
        header = bytearray(_BLOCK)
        pax: dict[str, str] = {}
        long_name: str | None = None
        member: _Member | None = None
        while True:
            if member is not None:
                self._skip(member._left + (-member.size % _BLOCK))
                member = None
            got = _read_full(self.source, memoryview(header))
            if got == 0:
                return  # no end-of-archive blocks: accepted, the layer checks still run
            parsed = parse_header(bytes(header[:got]), self.label)
            if parsed is None:
                return  # end of archive (the rest is read by the layer's checks)
            if parsed.kind == b"x":  # pax extended header for the next member
                pax = pax_records(self._data(parsed.size), self.label)
                continue
            if parsed.kind == b"L":  # GNU long name for the next member
                long_name = self._data(parsed.size).split(b"\0", 1)[0].decode("utf-8", "replace")
                continue
            if parsed.extension:  # a pax global header or a GNU long link name
                self._data(parsed.size)
                continue
            name = member_name(parsed, pax, long_name)
            size = member_size(parsed, pax, self.label)
            pax, long_name = {}, None
            member = _Member(name, size, parsed.kind, self, size)
            yield member


def _members(stream: Any, layer: OciLayer) -> Iterator[_Member]:
    return _TarReader(stream, layer.label).members()


def _relative(name: str, root: str) -> str | None:
    """``name`` inside the model directory ``root`` (None: outside it, or in a subdirectory)."""
    if root:
        if not name.startswith(root + "/"):
            return None
        name = name[len(root) + 1 :]
    if not name or "/" in name or name in (".", ".."):
        return None
    return name


def model_root_of(names: list[str]) -> str:
    """The directory holding the shallowest ``config.json`` among tar member ``names``."""
    found = sorted((n.count("/"), n) for n in (m.removeprefix("./").lstrip("/") for m in names)
                   if n == "config.json" or n.endswith("/config.json"))  # fmt: skip
    if not found:
        raise ModelFormatError("no layer holds a config.json: not a model image")
    return found[0][1].rpartition("/")[0]


def read_side_files(
    store: BlobStore, image: OciImage, keys: LayerKeys, *, layers: list[OciLayer] | None = None
) -> tuple[str, dict[str, bytes]]:
    """Return the model root and every side file (name → bytes) of ``layers`` (default: all),
    each layer verified before its files are returned.

    Raises:
        ModelFormatError / ModelDecryptionError: a layer failed a check (named), a side file is
            too large, or a file would be plaintext weights.
    """
    chosen = list(image.layers) if layers is None else layers
    seen: dict[int, list[tuple[str, bytes]]] = {}
    names: list[str] = []
    for layer in chosen:
        kept: list[tuple[str, bytes]] = []
        with _opened(store, layer, keys.get(layer)) as opened:
            for member in _members(opened.stream, layer):
                names.append(member.name)
                if (
                    member.isreg()
                    and not member.name.endswith(".safetensors")
                    and member.size <= MAX_SIDE_FILE
                ):
                    kept.append((member.name, member.read()))
            opened.finish()
        seen[layer.index] = kept
    root = model_root_of(names)
    files: dict[str, bytes] = {}
    for layer in chosen:
        for full, data in seen[layer.index]:
            name = _relative(full, root)
            if name is None:
                continue
            if name.endswith(_PLAINTEXT_WEIGHTS):
                raise ModelFormatError(f"{layer.label} carries {name!r}, which would be plaintext weights")
            if name in files:
                raise ModelFormatError(f"{name!r} appears in more than one layer")
            files[name] = data
    return root, files


class _Budget:
    """Bytes of tensors handed out but not yet consumed: workers wait while it is spent."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()
        self.aborted = False

    def take(self, n: int) -> None:
        with self._cond:
            while not self.aborted and self._used and self._used + n > self._limit:
                self._cond.wait()
            if self.aborted:
                raise _Aborted
            self._used += n

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


class _Aborted(Exception):
    pass


def _layer_tensors(
    store: BlobStore,
    layer: OciLayer,
    key: LayerKey | None,
    root: str,
    budget: _Budget,
    emit: Callable[[str, torch.Tensor, int], None],
    stats: StatsRecorder,
) -> None:
    with _opened(store, layer, key) as opened:
        for member in _members(opened.stream, layer):
            name = _relative(member.name, root) if member.isreg() else None
            if name is None or not name.endswith(".safetensors"):
                continue
            f = member
            label = f"{layer.label}: {name}"
            head = f.read(8)
            if len(head) != 8:
                raise ModelFormatError(f"{label} is truncated")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER:
                raise ModelFormatError(f"{label}: safetensors header length out of range")
            index = parse_safetensors_header(head + f.read(n))
            position = 0
            for entry in index.tensors:
                if entry.dtype not in TORCH_DTYPES:
                    raise ModelFormatError(f"{label}: tensor dtype {entry.dtype} is not supported by torch")
                skip = entry.begin - position
                while skip > 0:
                    chunk = f.read(min(skip, _READ))
                    if not chunk:
                        raise ModelFormatError(f"{label} is truncated")
                    skip -= len(chunk)
                budget.take(entry.nbytes)
                out = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
                if entry.nbytes:
                    read_exact(f, memoryview(out.reshape(-1).view(torch.uint8).numpy()), label)  # type: ignore[arg-type]
                position = entry.end
                stats.add(label, plaintext=entry.nbytes, ciphertext=0, tensors=1)
                emit(entry.name, out, entry.nbytes)
        opened.finish()
    stats.add(layer.label, plaintext=0, ciphertext=layer.size, tensors=0)


def image_tensors(
    store: BlobStore,
    image: OciImage,
    keys: LayerKeys,
    *,
    root: str,
    threads: int = 2,
    budget_bytes: int = 1 << 30,
    stats: StatsRecorder | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every safetensors tensor of the image, layers in parallel.

    ``threads`` layers are decrypted at a time; at most ``budget_bytes`` of tensors (or one
    tensor, if larger) wait for the consumer. Tensors come in no particular order. Layers that
    ``pack --oci`` labelled as side files only are skipped.

    Raises:
        ModelDecryptionError / ModelFormatError: a layer failed a check; every tensor already
            yielded and still alive is zeroed first (see the module docstring).
    """
    stats = stats if stats is not None else StatsRecorder()
    todo: queue.SimpleQueue[OciLayer] = queue.SimpleQueue()
    for layer in image.layers:
        if layer.role != "files":
            todo.put(layer)
            stats.file_opened(layer.label)
    workers = max(1, min(threads, todo.qsize()))
    out: queue.Queue[tuple[str, Any, int]] = queue.Queue()
    budget = _Budget(budget_bytes)

    def emit(name: str, tensor: torch.Tensor, nbytes: int) -> None:
        out.put(("tensor", (name, tensor), nbytes))

    def work() -> None:
        try:
            while True:
                try:
                    layer = todo.get_nowait()
                except queue.Empty:
                    break
                _layer_tensors(store, layer, keys.get(layer), root, budget, emit, stats)
        except _Aborted:
            pass
        except ModelError as exc:
            out.put(("error", exc, 0))
        except Exception as exc:  # a bug or an I/O failure: reported without detail that could leak
            out.put(("error", ModelFormatError(f"an image layer failed to load ({type(exc).__name__})"), 0))
        finally:
            out.put(("done", None, 0))

    stats.start(threads=workers, device="host")
    pool = [threading.Thread(target=work, name=f"enclave-oci-{i}", daemon=True) for i in range(workers)]
    for t in pool:
        t.start()
    handed: list[weakref.ref[torch.UntypedStorage]] = []
    running = workers
    ok = False
    try:
        while running:
            kind, item, nbytes = out.get()
            if kind == "done":
                running -= 1
                continue
            if kind == "error":
                raise item
            name, tensor = item
            handed.append(weakref.ref(tensor.untyped_storage()))
            yield name, tensor
            del tensor, item
            budget.give(nbytes)  # asking for the next tensor: the consumer is done with this one
        ok = True
    finally:
        budget.abort()
        for t in pool:
            t.join()
        stats.finish()
        if not ok:
            for ref in handed:
                storage = ref()
                if storage is not None:
                    storage.fill_(0)  # type: ignore[attr-defined]  # exists; missing from the stubs
