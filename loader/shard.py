"""Open one encrypted shard, verify it against the manifest, and decrypt its chunks into buffers.

:class:`EncryptedShard` is the encrypted-safetensors implementation of
:class:`loader.source.TensorSource`: it lists the shard's tensors and decrypts any chunk,
from any thread, straight into a caller-provided buffer with ``AESGCM.decrypt_into`` (which
releases the GIL in cryptography >= 50).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import ModelDecryptionError
from loader.format import (
    Chunk,
    SafetensorsIndex,
    ShardHeader,
    TensorEntry,
    chunk_aad,
    chunk_layout,
    chunk_nonce,
    ciphertext_length,
    derive_shard_keys,
    header_chunks,
    parse_safetensors_header,
)
from loader.manifest import Manifest, ShardEntry

__all__ = [
    "EncryptedShard",
    "Piece",
    "ReadMode",
    "shard_failure",
]

#: ``"mmap"`` decrypts straight from the page cache (no read copy); ``"pread"`` reads each
#: chunk into a reusable per-thread buffer first (for file systems where mmap is slow or unsafe).
ReadMode = Literal["mmap", "pread"]


def shard_failure(label: str) -> ModelDecryptionError:
    """Return the one opaque error for any failure of encrypted shard ``label``."""
    return ModelDecryptionError(
        f"encrypted shard {label!r} failed authentication: it was modified, truncated, extended "
        "or spliced, or the model key is wrong; the load was aborted and decrypted memory zeroed"
    )


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece of one tensor's bytes: ``[offset, offset + length)`` within the tensor.

    ``ref`` is the source's handle (a :class:`Chunk` here); ``None`` means "zero-fill" (bytes a
    selection left out).
    """

    offset: int
    length: int
    ref: Any = None


class EncryptedShard:
    """An open encrypted shard whose header, MAC and safetensors header have been verified.

    Use :meth:`open`; then :meth:`pieces` and :meth:`fill` from any thread; then :meth:`close`.

    Warning:
        Chunks are authenticated one at a time: bytes written by :meth:`fill` before a later chunk
        fails are plaintext of an *untrusted* file until the whole tensor is filled. The pipeline
        zeroes everything on any failure; do the same if you call :meth:`fill` yourself.
    """

    def __init__(
        self,
        *,
        path: Path,
        label: str,
        header: ShardHeader,
        header_digest: bytes,
        enc_key: bytes,
        index: SafetensorsIndex,
        chunks: tuple[Chunk, ...],
        fd: int,
        read_mode: ReadMode,
        unmap_consumed: bool = True,
    ) -> None:
        self.path = path
        self.label = label
        self.header = header
        self.index = index
        self.chunks = chunks
        self._starts = [c.start for c in chunks]
        self._digest = header_digest
        self._aead = AESGCM(enc_key)
        self._fd = fd
        self._read_mode = read_mode
        self._unmap_consumed = unmap_consumed
        self._local = threading.local()
        self._mmap: mmap.mmap | None = None
        self._view: memoryview | None = None
        if read_mode == "mmap" and os.fstat(fd).st_size > 0:
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._mmap)

    @classmethod
    def open(
        cls,
        model_dir: Path,
        manifest: Manifest,
        entry: ShardEntry,
        model_key: bytes,
        *,
        read_mode: ReadMode = "mmap",
        unmap_consumed: bool = True,
    ) -> EncryptedShard:
        """Open ``entry``'s file and verify everything that can be checked before the tensor data.

        Steps: (1) the file size equals the manifest's; (2) the shard header's SHA-256 equals the
        manifest's (this pins its salt, hence its key); (3) the header MAC verifies under the key
        derived from ``model_key``; (4) the header names this shard, key id, chunk size and
        plaintext length; (5) the safetensors-header chunks decrypt and hash to the digest in the
        header; (6) its tensor index equals the manifest's and the chunk layout gives exactly the
        file size. Tensor chunks are authenticated later, by :meth:`fill`.

        Raises:
            ModelDecryptionError: naming the file, whatever failed (opaque by design).
        """
        path = Path(model_dir) / entry.file
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise shard_failure(entry.file) from None
        try:
            shard = cls._verify(path, fd, manifest, entry, model_key, read_mode)
            shard._unmap_consumed = unmap_consumed
            return shard
        except Exception:  # whatever failed, the file is bad: one opaque error
            os.close(fd)
            raise shard_failure(entry.file) from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _verify(
        cls, path: Path, fd: int, manifest: Manifest, entry: ShardEntry, model_key: bytes, read_mode: ReadMode
    ) -> EncryptedShard:
        fail = ModelDecryptionError  # the message is replaced by shard_failure() in open()
        if os.fstat(fd).st_size != entry.ciphertext_size:  # 1
            raise fail()
        length = ShardHeader.peek_length(os.pread(fd, 12, 0))
        raw = os.pread(fd, length, 0)
        digest = hashlib.sha256(raw).digest()
        if not hmac.compare_digest("sha256:" + digest.hex(), entry.header_sha256):  # 2
            raise fail()
        header, mac = ShardHeader.from_bytes(raw)
        keys = derive_shard_keys(model_key, header.salt)
        if not header.verify_mac(keys.mac_key, mac):  # 3
            raise fail()
        if (  # 4
            header.shard_name != entry.name
            or header.key_id != manifest.key_id
            or header.chunk_size != manifest.chunk_size
            or header.plaintext_length != entry.plaintext_size
            or "sha256:" + header.safetensors_header_sha256.hex() != entry.safetensors_header_sha256
        ):
            raise fail()
        aead = AESGCM(keys.enc_key)
        st_header = bytearray(header.safetensors_header_length)
        for c in header_chunks(header):  # 5
            ct = os.pread(fd, c.ct_length, c.ct_offset)
            aead.decrypt_into(
                chunk_nonce(c.index),
                ct,
                chunk_aad(digest, c.index, last=c.last),
                memoryview(st_header)[c.start : c.stop],
            )
        if hashlib.sha256(st_header).digest() != header.safetensors_header_sha256:
            raise fail()
        index = parse_safetensors_header(st_header)  # 6
        if index.tensors != tuple(sorted(entry.tensors, key=lambda t: (t.begin, t.end))):
            raise fail()
        chunks = chunk_layout(
            plaintext_length=header.plaintext_length,
            index=index,
            chunk_size=header.chunk_size,
            header_length=length,
        )
        if ciphertext_length(length, chunks) != entry.ciphertext_size:
            raise fail()
        return cls(
            path=path,
            label=entry.file,
            header=header,
            header_digest=digest,
            enc_key=keys.enc_key,
            index=index,
            chunks=chunks,
            fd=fd,
            read_mode=read_mode,
        )

    def tensors(self) -> Sequence[TensorEntry]:
        """Return the shard's tensors in data-offset order."""
        return self.index.tensors

    def pieces(self, tensor: TensorEntry, start: int = 0, stop: int | None = None) -> list[Piece]:
        """Return the chunks holding bytes ``[start, stop)`` of ``tensor``, as tensor-relative pieces.

        A chunk that overlaps the range only partly is returned whole (GCM authenticates whole
        chunks), so the pieces may cover more than was asked.
        """
        base = self.index.header_length + tensor.begin
        stop = tensor.nbytes if stop is None else stop
        if stop <= start:
            return []
        first = bisect.bisect_right(self._starts, base + start) - 1
        out = []
        for c in self.chunks[first:]:
            if c.start >= base + stop:
                break
            out.append(Piece(c.start - base, c.length, c))
        return out

    def fill(self, piece: Piece, out: Any) -> None:
        """Decrypt ``piece``'s chunk into ``out`` (a writable buffer of exactly its length). Thread-safe.

        Raises:
            cryptography.exceptions.InvalidTag: the chunk does not authenticate.
            OSError: the file could not be read.
        """
        c: Chunk = piece.ref
        aad = chunk_aad(self._digest, c.index, last=c.last)
        if self._view is not None:
            end = c.ct_offset + c.ct_length
            self._aead.decrypt_into(chunk_nonce(c.index), self._view[c.ct_offset : end], aad, out)
            return
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < c.ct_length:
            buf = self._local.buf = bytearray(max(c.ct_length, self.header.chunk_size + 16))
        view = memoryview(buf)[: c.ct_length]
        got = os.preadv(self._fd, [view], c.ct_offset)
        if got != c.ct_length:
            raise OSError("short read")
        self._aead.decrypt_into(chunk_nonce(c.index), view, aad, out)

    def discard(self, pieces: Sequence[Piece]) -> None:
        """Unmap the ciphertext of ``pieces`` (already decrypted); it stays in the page cache.

        Keeps the mapping from growing the process's RSS by a whole shard (``unmap_consumed``).
        Called once per batch, from one thread. Measured on a 2-vCPU VM: this costs throughput
        (``madvise(MADV_DONTNEED)`` and the decrypt threads' page faults contend), so
        ``unmap_consumed=False`` trades RSS (mapped page-cache pages, shared and reclaimable)
        for speed.
        """
        chunks = [p.ref for p in pieces if p.ref is not None]
        if self._mmap is None or not chunks:
            return
        page = mmap.PAGESIZE
        first = -(-min(c.ct_offset for c in chunks) // page) * page
        last = max(c.ct_offset + c.ct_length for c in chunks) // page * page
        if last > first and self._unmap_consumed:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Release the file and its mapping."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
