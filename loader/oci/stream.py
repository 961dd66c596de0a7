"""An uncompressed encrypted layer read once, front to back, as a :class:`loader.source.TensorSource`.

What one rank that loads the whole image does (no tensor parallelism): no pass before the load,
so the per-byte work is what ocicrypt cannot avoid (the blob's SHA-256, the layer's HMAC, AES-CTR)
and nothing more. A reader thread streams the blob (SHA-256 as it reads) and a second thread
computes the HMAC over the same bytes; tensors' **ciphertext is read into this process's private
memory** and the decrypt engine (:class:`loader.lazy.LazyCheckpoint`) CTR-decrypts it from there,
on all its threads, straight into the parameters. What is decrypted is exactly what was hashed:
the bytes are never read from the host twice.

The layer's digest and HMAC are known only at its end, so this source **writes, then wipes on
failure**: its :meth:`tensors` raises after the last tensor when a check fails, and the loader
zeroes every parameter (the boot fails at stage ``load``; nothing is served). At most
``budget_bytes`` of ciphertext (or one tensor, if larger) wait for the engine; a tensor's buffer
is freed once the engine has copied it, or when the engine is three tensors past it (copying it
after that fails closed).
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from foundation.errors import ModelDecryptionError, ModelError, ModelFormatError
from loader.format import TensorEntry
from loader.oci.blobs import BlobStore
from loader.oci.image import OciLayer
from loader.oci.index import IndexedFile, ctr_decrypt_at, walk_layer
from loader.oci.ocicrypt import LayerKey
from loader.shard import Piece

__all__ = ["STREAM_PIECE_BYTES", "StreamedLayer"]

#: The largest piece the engine decrypts at once (and one staging slot must hold).
STREAM_PIECE_BYTES = _PIECE = 4 << 20
_SKIP = 4 << 20
_DONE = object()


@dataclass(eq=False)
class _Held:
    """One tensor's ciphertext in private memory, and how much of it the engine has consumed."""

    entry: TensorEntry
    offset: int  # of the tensor's first byte in the layer
    data: bytearray = field(repr=False)
    consumed: int = 0


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()
        self.stopped = False

    def take(self, n: int) -> bool:
        with self.cond:
            while not self.stopped and self.used and self.used + n > self.limit:
                self.cond.wait()
            if self.stopped:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class StreamedLayer:
    """One uncompressed encrypted weight layer, streamed (see the module docstring)."""

    def __init__(
        self,
        store: BlobStore,
        layer: OciLayer,
        key: LayerKey,
        *,
        root: str,
        budget_bytes: int = 1 << 30,
    ) -> None:
        if layer.compression != "none":
            raise ModelFormatError(f"{layer.label} is compressed: it cannot be decrypted out of order")
        self.label = layer.label
        self._store = store
        self._layer = layer
        self._key = key
        self._root = root
        self._budget = _Budget(budget_bytes)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._error: ModelError | None = None
        self._reader: threading.Thread | None = None
        #: Ciphertext bytes read from the store (the whole layer).
        self.bytes_read = 0

    # -- the reader ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="enclave-oci-read", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            self._stream()
        except ModelError as exc:
            self._error = exc
        except Exception as exc:  # a bug or an I/O failure: reported without detail that could leak
            self._error = ModelFormatError(f"{self.label} failed to load ({type(exc).__name__})")
        finally:
            self._ready.put(_DONE)

    def _stream(self) -> None:
        layer, key = self._layer, self._key
        blob = self._store.open_blob(layer.digest, layer.size, layer.label)
        macs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        mac = hmac.new(key.symkey, digestmod=hashlib.sha256)

        def hmac_thread() -> None:
            while (view := macs.get()) is not None:
                mac.update(view)

        hasher = threading.Thread(target=hmac_thread, name="enclave-oci-hmac", daemon=True)
        hasher.start()
        files: list[IndexedFile] = []
        walk = walk_layer(self._root, layer.label, 1 << 62, files)  # one unit = one whole tensor
        skip = bytearray(_SKIP)
        pos = 0
        try:
            request = next(walk)
            while True:
                what, n, entry = request[0], request[1], request[2]
                answer = b""
                if what == "rest":
                    buf = bytearray(_SKIP)
                    while k := blob.readinto(buf):
                        macs.put(bytes(memoryview(buf)[:k]))
                    break
                if what == "skip":
                    while n > 0:
                        k = min(n, len(skip))
                        chunk = bytearray(k)
                        _read_exact(blob, memoryview(chunk), layer.label)
                        macs.put(chunk)
                        n -= k
                        pos += k
                elif what == "plain":
                    data = bytearray(n)
                    _read_exact(blob, memoryview(data), layer.label)
                    macs.put(data)
                    answer = ctr_decrypt_at(key, pos, data) or b""
                    pos += n
                elif what == "empty":
                    assert entry is not None
                    with self._lock:
                        self._held[entry.name] = _Held(entry, pos, bytearray())
                    self._ready.put(entry)
                else:
                    assert entry is not None
                    if not self._budget.take(n):
                        return  # closed
                    data = bytearray(n)
                    view = memoryview(data)
                    for at in range(0, n, _PIECE):  # in pieces, so the HMAC thread keeps pace
                        part = view[at : at + _PIECE]
                        _read_exact(blob, part, layer.label)
                        macs.put(part)
                    with self._lock:
                        self._held[entry.name] = _Held(entry, pos, data)
                        self.bytes_read += n
                    self._ready.put(entry)
                    pos += n
                request = walk.send(answer)
        except StopIteration:
            pass
        except ModelFormatError:  # a parse error: a tampered layer is reported as such
            macs.put(None)
            hasher.join()
            try:
                while blob.readinto(skip):
                    pass
            except ModelError as integrity:
                raise integrity from None
            raise
        finally:
            walk.close()
            blob.close()
            macs.put(None)
            hasher.join()
        if not hmac.compare_digest(mac.digest(), key.hmac):
            raise ModelDecryptionError(
                f"{layer.label} failed its HMAC: the encrypted layer was modified or truncated; "
                "every weight loaded from it was wiped"
            )

    # -- TensorSource --------------------------------------------------------------------------

    def tensors(self) -> Iterator[TensorEntry]:
        """The layer's tensors as their ciphertext arrives; raises at the end if a check failed."""
        if self._reader is None:
            self._start()
        seen: list[str] = []
        while (item := self._ready.get()) is not _DONE:
            seen.append(item.name)
            if len(seen) > 3:  # the engine has settled the copies of this tensor (see above)
                self._release(seen[-4])
            yield item
        if self._reader is not None:
            self._reader.join()
        if self._error is not None:
            raise self._error

    def pieces(self, tensor: TensorEntry, start: int = 0, stop: int | None = None) -> list[Piece]:
        stop = tensor.nbytes if stop is None else stop
        first = start // _PIECE * _PIECE
        return [Piece(a, min(_PIECE, tensor.nbytes - a), tensor.name) for a in range(first, stop, _PIECE)]

    def fill(self, piece: Piece, out: Any) -> None:
        with self._lock:
            held = self._held.get(piece.ref)
        if held is None:
            raise ModelFormatError(
                f"{self.label}: a tensor was copied after the loader had moved three tensors past it "
                "(a streamed image is decrypted in order)"
            )
        view = memoryview(held.data)[piece.offset : piece.offset + piece.length]
        ctr_decrypt_at(self._key, held.offset + piece.offset, view, out)

    def discard(self, pieces: Sequence[Piece]) -> None:
        done = []
        with self._lock:
            for piece in pieces:
                held = self._held.get(piece.ref)
                if held is not None:
                    held.consumed += piece.length
                    if held.consumed >= held.entry.nbytes:
                        done.append(piece.ref)
        for name in done:
            self._release(name)

    def _release(self, name: str) -> None:
        with self._lock:
            held = self._held.pop(name, None)
        if held is not None:
            self._budget.give(len(held.data))

    def close(self) -> None:
        self._budget.stop()  # a reader waiting for room returns
        if self._reader is not None:
            self._reader.join(timeout=30)
        with self._lock:
            for held in self._held.values():
                held.data[:] = bytes(len(held.data))  # ciphertext only, but leave nothing behind
            self._held.clear()


def _read_exact(blob: Any, view: memoryview, label: str) -> None:
    got = 0
    while got < len(view):
        k = blob.readinto(view[got:])
        if not k:
            raise ModelFormatError(f"{label}: the tar stream is truncated")
        got += k
