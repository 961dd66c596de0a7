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
``budget_bytes`` of ciphertext wait for the engine, in recycled blocks of one piece each; a tensor
is handed to the engine at its first block and each piece decrypted as soon as it has been read.
A block is recycled once the engine has copied it and both hashes have consumed it; a tensor the
model does not copy before asking for the next one (an unused weight) is dropped then, and any
tensor three tensors back (copying it after that fails closed).
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
from loader.oci.tar import read_exact
from loader.shard import Piece

__all__ = ["STREAM_PIECE_BYTES", "StreamedLayer"]

#: The largest piece the engine decrypts at once (and one staging slot must hold).
STREAM_PIECE_BYTES = _PIECE = 4 << 20
_SKIP = 4 << 20
_DONE = object()


@dataclass(eq=False)
class _Held:
    """One tensor's ciphertext in private memory (one pool block per piece), and how much of it
    the engine has consumed."""

    entry: TensorEntry
    offset: int  # of the tensor's first byte in the layer
    #: One per piece read so far; None once the engine has claimed it (a piece is decrypted once).
    blocks: list[bytearray | None] = field(repr=False)
    consumed: int = 0
    #: Whether the engine asked for its pieces (a copy began) before moving on.
    requested: bool = False


class _Pool:
    """Blocks of private memory of one piece each, recycled (not freed: no page faults, no
    zeroing per tensor) once the engine has consumed a block **and** both hash threads hashed it.

    At most ``limit`` blocks, except that a reader left waiting for ``patience_s`` (the engine
    holds every block, e.g. tensors the model does not use) gets a new one: the bound is soft, a
    stalled load is not.
    """

    def __init__(self, limit: int, patience_s: float = 2.0) -> None:
        self.limit = max(2, limit)
        self.patience_s = patience_s
        self.count = 0
        self.free: list[bytearray] = []
        #: id(block) -> how many of its three uses (consumed, SHA-256, HMAC) are still due
        self.waiting: dict[int, int] = {}
        self.cond = threading.Condition()
        self.stopped = False

    def take(self) -> bytearray | None:
        """A free block; waits while ``limit`` are in use (at most ``patience_s``)."""
        with self.cond:
            waited = 0.0
            while (
                not self.stopped and not self.free and self.count >= self.limit and waited < self.patience_s
            ):
                self.cond.wait(0.1)
                waited += 0.1
            if self.stopped:
                return None
            if self.free:
                block = self.free.pop()
            else:
                block = bytearray(_PIECE)
                self.count += 1
            self.waiting[id(block)] = 3
            return block

    def done(self, block: bytearray) -> None:
        """One of the block's three uses is over (consumed, or hashed by one of the two threads)."""
        with self.cond:
            left = self.waiting.get(id(block), 1) - 1
            if left > 0:
                self.waiting[id(block)] = left
                return
            self.waiting.pop(id(block), None)
            if self.count > self.limit:  # made beyond the bound: let it go
                self.count -= 1
            else:
                self.free.append(block)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            for block in self.free:
                block[:] = bytes(len(block))  # ciphertext only, but leave nothing behind
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
        budget_bytes: int = 16 << 20,
    ) -> None:
        if layer.compression != "none":
            raise ModelFormatError(f"{layer.label} is compressed: it cannot be decrypted out of order")
        self.label = layer.label
        self._store = store
        self._layer = layer
        self._key = key
        self._root = root
        self._pool = _Pool(budget_bytes // _PIECE)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a block was read, or the reader ended
        self._finished = False
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
            with self._arrived:
                self._finished = True
                self._arrived.notify_all()
            self._ready.put(_DONE)

    def _stream(self) -> None:
        layer, key = self._layer, self._key
        blob = self._store.open_blob(layer.digest, layer.size, layer.label)
        # The blob's SHA-256 and the layer's HMAC each on a thread of their own, over the same
        # private bytes, while this thread reads on: the three run side by side.
        digest = blob.detach_hash()
        mac = hmac.new(key.symkey, digestmod=hashlib.sha256)
        hashes = _Hashes(self._pool, (digest.update, mac.update))
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
                        hashes.put((bytes(memoryview(buf)[:k]), None))
                    break
                if what == "skip":
                    while n > 0:
                        k = min(n, len(skip))
                        chunk = bytearray(k)
                        read_exact(blob, memoryview(chunk), f"{layer.label}: the tar stream")
                        hashes.put((chunk, None))
                        n -= k
                        pos += k
                elif what == "plain":
                    data = bytearray(n)
                    read_exact(blob, memoryview(data), f"{layer.label}: the tar stream")
                    hashes.put((data, None))
                    answer = ctr_decrypt_at(key, pos, data) or b""
                    pos += n
                elif what == "announce":
                    # Every tensor of the file is handed out as soon as its header is read: the
                    # engine decrypts each piece as soon as it has been read, and a tensor the
                    # model skips (it asks for the next one) is dropped while it is read.
                    assert entry is not None
                    with self._lock:
                        self._held[entry.name] = _Held(entry, -1, [])
                    self._ready.put(entry)
                elif what == "unit":
                    assert entry is not None
                    with self._lock:
                        held = self._held.get(entry.name) or _Held(entry, pos, [])
                        held.offset = pos
                    for at in range(0, n, _PIECE):
                        block = self._pool.take()
                        if block is None:
                            return  # closed
                        part = memoryview(block)[: min(_PIECE, n - at)]
                        read_exact(blob, part, f"{layer.label}: the tar stream")
                        hashes.put((part, block))
                        with self._arrived:
                            self.bytes_read += len(part)
                            released = self._held.get(entry.name) is not held
                            if not released:
                                held.blocks.append(block)
                                self._arrived.notify_all()
                        if released:  # the engine is already past this tensor: nothing will copy it
                            self._pool.done(block)
                    pos += n
                request = walk.send(answer)
        except StopIteration:
            pass
        except ModelFormatError:  # a parse error: a tampered layer is reported as such
            try:
                while k := blob.readinto(skip):
                    hashes.put((bytes(memoryview(skip)[:k]), None))
                hashes.close()
                digest.verify()
            except ModelError as integrity:
                raise integrity from None
            raise
        finally:
            walk.close()
            blob.close()
            hashes.close()
        digest.verify()
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
            if seen:
                with self._lock:
                    previous = self._held.get(seen[-1])
                if previous is not None and not previous.requested:  # the model skips it
                    self._release(seen[-1])
            seen.append(item.name)
            if len(seen) > 3:  # the engine has settled the copies of this tensor
                self._release(seen[-4])
            yield item
        if self._reader is not None:
            self._reader.join()
        if self._error is not None:
            raise self._error

    def pieces(self, tensor: TensorEntry, start: int = 0, stop: int | None = None) -> list[Piece]:
        with self._lock:
            held = self._held.get(tensor.name)
            if held is not None:
                held.requested = True
        stop = tensor.nbytes if stop is None else stop
        first = start // _PIECE * _PIECE
        return [Piece(a, min(_PIECE, tensor.nbytes - a), tensor.name) for a in range(first, stop, _PIECE)]

    def fill(self, piece: Piece, out: Any) -> None:
        index = piece.offset // _PIECE
        with self._arrived:
            held = self._held.get(piece.ref)
            while held is not None and len(held.blocks) <= index and not self._finished:
                self._arrived.wait()
            if held is not None and len(held.blocks) <= index:
                raise ModelFormatError(f"{self.label} ended inside a tensor")
            # Claimed under the lock: nothing recycles the block while it is decrypted.
            block = None if held is None else held.blocks[index]
            if held is not None:
                held.blocks[index] = None
        if held is None or block is None:
            raise ModelFormatError(
                f"{self.label}: a tensor was copied twice, or after the loader had moved past it "
                "(a streamed image is decrypted once, in order)"
            )
        try:
            ctr_decrypt_at(self._key, held.offset + piece.offset, memoryview(block)[: piece.length], out)
        finally:
            self._pool.done(block)  # decrypted: the block goes back once both hashes have it too

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
            for block in held.blocks:
                if block is not None:  # never claimed by the engine
                    self._pool.done(block)

    def close(self) -> None:
        self._pool.stop()  # a reader waiting for room returns
        if self._reader is not None:
            self._reader.join(timeout=30)
        with self._lock:
            for held in self._held.values():
                for block in held.blocks:
                    if block is not None:
                        block[:] = bytes(len(block))  # ciphertext only, but leave nothing behind
            self._held.clear()


class _Hashes:
    """Threads that each feed every byte read, in order, to one hash; blocks go back to the pool."""

    def __init__(self, pool: _Pool, updates: Sequence[Any]) -> None:
        self._pool = pool
        self._queues: list[queue.SimpleQueue[Any]] = []
        self._threads = []
        for update in updates:
            q: queue.SimpleQueue[Any] = queue.SimpleQueue()
            t = threading.Thread(target=self._run, args=(q, update), name="enclave-oci-hash", daemon=True)
            t.start()
            self._queues.append(q)
            self._threads.append(t)

    def _run(self, q: queue.SimpleQueue[Any], update: Any) -> None:
        while (item := q.get()) is not None:
            view, block = item
            update(view)
            if block is not None:
                self._pool.done(block)

    def put(self, item: tuple[Any, bytearray | None]) -> None:
        for q in self._queues:
            q.put(item)

    def close(self) -> None:
        """Wait until every byte put has been hashed (idempotent)."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
