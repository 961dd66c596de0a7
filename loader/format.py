"""The encrypted shard format, version 1: pure layout, key derivation and parsing (no I/O).

One encrypted file (``<shard>.esenc``) per safetensors shard. The full specification, with the
rationale for every choice, is ``docs/format.md``; this docstring is its summary.

File = shard header ‖ chunk_0 ‖ chunk_1 ‖ … ‖ chunk_{n-1}, all integers little-endian::

    offset  size  field
    0       8     SHARD_MAGIC  b"\\x89ESENC\\r\\n"
    8       2     format version (1)
    10      2     header length H, MAC included
    12      4     chunk size C (largest chunk plaintext)
    16      8     plaintext length P (the safetensors file's size)
    24      8     safetensors header length L (8 + the JSON length N)
    32      32    SHA-256 of the safetensors header (the first L plaintext bytes)
    64      32    salt (random, per file)
    96      2     shard name length, then the UTF-8 shard name (its path in the model directory)
    ..      2     key id length, then the UTF-8 key id
    H-32    32    HMAC-SHA256(mac_key, header bytes [0, H-32))

Each chunk is ``AES-256-GCM(enc_key, nonce_i, plaintext_i, aad_i)``: the ciphertext (as long as
the plaintext) followed by its 16-byte tag, with::

    enc_key ‖ mac_key = HKDF-SHA256(ikm=model key, salt=salt, info=SHARD_KDF_INFO, length=64)
    nonce_i           = 0x00000000 ‖ u64be(i)
    aad_i             = CHUNK_AAD_LABEL ‖ SHA-256(shard header) ‖ u64be(i) ‖ u8(last)

Chunks never straddle a boundary of the safetensors layout: the plaintext is cut at the end of
the safetensors header and at the start and end of every tensor, then each piece into chunks of at
most C bytes. The layout is therefore a pure function of (P, L, tensor offsets, C), and every
tensor is a whole run of chunks that can be decrypted alone, straight into its destination.

What this module verifies: the header's structure and (given the key) its MAC; the consistency of
a safetensors header. What it does not: anything about chunks (see :mod:`loader.shard`).

Raises :class:`ModelFormatError` for malformed input.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from foundation.errors import ModelFormatError

__all__ = [
    "CHUNK_AAD_LABEL",
    "DEFAULT_CHUNK_SIZE",
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "HEADER_MAC_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_SAFETENSORS_HEADER",
    "MIN_CHUNK_SIZE",
    "MODEL_KEY_SIZE",
    "SALT_SIZE",
    "SHARD_KDF_INFO",
    "SHARD_MAGIC",
    "SHARD_SUFFIX",
    "Chunk",
    "SafetensorsIndex",
    "ShardHeader",
    "ShardKeys",
    "TensorEntry",
    "chunk_aad",
    "chunk_layout",
    "chunk_nonce",
    "ciphertext_length",
    "derive_shard_keys",
    "header_chunks",
    "parse_safetensors_header",
]

#: First bytes of every encrypted shard (PNG-style: a high byte and CR LF catch text-mode mangling).
SHARD_MAGIC = b"\x89ESENC\r\n"
#: Version of this format; readers reject any other value.
FORMAT_VERSION = 1
#: File name suffix of an encrypted shard.
SHARD_SUFFIX = ".esenc"
#: AES-256 key size in bytes (FIPS 197, section 5).
MODEL_KEY_SIZE = 32
#: Per-file HKDF salt, as long as the hash output (RFC 5869, section 3.1).
SALT_SIZE = 32
#: GCM nonce size: 96 bits, the only size with a deterministic construction (NIST SP 800-38D, 8.2.1).
GCM_NONCE_SIZE = 12
#: GCM tag size: 128 bits (NIST SP 800-38D, 5.2.1.2).
GCM_TAG_SIZE = 16
#: HMAC-SHA256 output size (RFC 2104; FIPS 180-4).
HEADER_MAC_SIZE = 32
#: HKDF info string for the per-file keys (RFC 5869, section 3.2: context binding).
SHARD_KDF_INFO = b"enclave-serve/shard/v1"
#: Domain label that starts every chunk's associated data.
CHUNK_AAD_LABEL = b"enclave-serve/chunk/v1"
#: Default chunk plaintext size: large enough to amortise a call, small enough to pipeline.
DEFAULT_CHUNK_SIZE = 4 << 20
#: Smallest accepted chunk size.
MIN_CHUNK_SIZE = 4 << 10
#: Largest accepted chunk size: cryptography's AEAD rejects or panics at 2**31 bytes per call.
MAX_CHUNK_SIZE = 1 << 30
#: Safetensors refuses headers larger than 100 MB (safetensors lib.rs, MAX_HEADER_SIZE).
MAX_SAFETENSORS_HEADER = 100_000_000

#: Bytes per element of each safetensors dtype (safetensors ``Dtype``; F4/F6 packed types excluded).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

_FIXED = struct.Struct("<8sHHIQQ32s32s")  # magic … salt, 96 bytes
_U16 = struct.Struct("<H")
_U64BE = struct.Struct(">Q")
_MAX_HEADER_LENGTH = 0xFFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardKeys:
    """The two keys of one encrypted file.

    Warning:
        Both are secret. Never log them, and never reuse them for another file: nonce uniqueness
        rests on each file having its own ``enc_key``.
    """

    enc_key: bytes
    mac_key: bytes

    def __repr__(self) -> str:
        return "<ShardKeys redacted>"


def derive_shard_keys(model_key: bytes, salt: bytes) -> ShardKeys:
    """Derive a file's AES-256-GCM key and header MAC key from the model key and the file's salt.

    Raises:
        ValueError: ``model_key`` or ``salt`` has the wrong length (a programming error).
    """
    if len(model_key) != MODEL_KEY_SIZE or len(salt) != SALT_SIZE:
        raise ValueError("model key and salt must be 32 bytes each")
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=SHARD_KDF_INFO).derive(model_key)
    return ShardKeys(enc_key=okm[:32], mac_key=okm[32:])


def chunk_nonce(index: int) -> bytes:
    """Return chunk ``index``'s 96-bit nonce: four zero bytes, then the index as u64 big-endian.

    Unique per key because every file has its own key and every chunk its own index.
    """
    return b"\x00\x00\x00\x00" + _U64BE.pack(index)


def chunk_aad(header_digest: bytes, index: int, *, last: bool) -> bytes:
    """Return chunk ``index``'s associated data: label ‖ SHA-256(header) ‖ u64be(index) ‖ last."""
    return CHUNK_AAD_LABEL + header_digest + _U64BE.pack(index) + (b"\x01" if last else b"\x00")


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardHeader:
    """The authenticated header of one encrypted shard.

    ``raw`` holds the exact bytes (MAC included) once parsed or serialised; its SHA-256 is
    :attr:`digest`, which every chunk's associated data binds.
    """

    chunk_size: int
    plaintext_length: int
    safetensors_header_length: int
    safetensors_header_sha256: bytes
    salt: bytes
    shard_name: str
    key_id: str
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise ModelFormatError(f"unsupported encrypted shard version {self.version}")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ModelFormatError(
                f"chunk size {self.chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        if not 10 <= self.safetensors_header_length <= min(self.plaintext_length, 8 + MAX_SAFETENSORS_HEADER):
            raise ModelFormatError("safetensors header length out of range")
        if len(self.safetensors_header_sha256) != 32 or len(self.salt) != SALT_SIZE:
            raise ModelFormatError("bad digest or salt length in shard header")
        if not self.shard_name or not self.key_id:
            raise ModelFormatError("empty shard name or key id in shard header")

    def _body(self) -> bytes:
        name = self.shard_name.encode()
        key_id = self.key_id.encode()
        body = (
            _FIXED.pack(
                SHARD_MAGIC,
                self.version,
                0,  # patched below
                self.chunk_size,
                self.plaintext_length,
                self.safetensors_header_length,
                self.safetensors_header_sha256,
                self.salt,
            )
            + _U16.pack(len(name))
            + name
            + _U16.pack(len(key_id))
            + key_id
        )
        length = len(body) + HEADER_MAC_SIZE
        if length > _MAX_HEADER_LENGTH:
            raise ModelFormatError("shard name or key id too long")
        return body[:10] + _U16.pack(length) + body[12:]

    def to_bytes(self, mac_key: bytes) -> bytes:
        """Serialise and MAC the header with ``mac_key``."""
        body = self._body()
        return body + hmac.new(mac_key, body, hashlib.sha256).digest()

    @property
    def length(self) -> int:
        """Length of the serialised header, MAC included."""
        return len(self._body()) + HEADER_MAC_SIZE

    @classmethod
    def peek_length(cls, prefix: bytes) -> int:
        """Return the header length announced by the first 12 bytes of a file.

        Raises:
            ModelFormatError: not an encrypted shard, or an unsupported version.
        """
        if len(prefix) < 12 or prefix[:8] != SHARD_MAGIC:
            raise ModelFormatError("not an enclave-serve encrypted shard (bad magic)")
        (version,) = _U16.unpack_from(prefix, 8)
        if version != FORMAT_VERSION:
            raise ModelFormatError(f"unsupported encrypted shard version {version}")
        (length,) = _U16.unpack_from(prefix, 10)
        if length < _FIXED.size + 4 + HEADER_MAC_SIZE:
            raise ModelFormatError("shard header too short")
        return int(length)

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ShardHeader, bytes]:
        """Parse a header; return it and its MAC. The MAC is *not* checked here (see :meth:`verify_mac`).

        Raises:
            ModelFormatError: malformed header.
        """
        length = cls.peek_length(data[:12])
        if len(data) != length:
            raise ModelFormatError("shard header length mismatch")
        try:
            (_, version, _, chunk_size, plen, stlen, stdigest, salt) = _FIXED.unpack_from(data, 0)
            pos = _FIXED.size
            (n,) = _U16.unpack_from(data, pos)
            name = data[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
            (k,) = _U16.unpack_from(data, pos)
            key_id = data[pos + 2 : pos + 2 + k].decode()
            pos += 2 + k
        except (struct.error, UnicodeDecodeError) as exc:
            raise ModelFormatError("malformed shard header") from exc
        if pos + HEADER_MAC_SIZE != length:
            raise ModelFormatError("malformed shard header")
        header = cls(
            version=version,
            chunk_size=chunk_size,
            plaintext_length=plen,
            safetensors_header_length=stlen,
            safetensors_header_sha256=stdigest,
            salt=salt,
            shard_name=name,
            key_id=key_id,
        )
        return header, data[pos:]

    def verify_mac(self, mac_key: bytes, mac: bytes) -> bool:
        """Return whether ``mac`` is this header's MAC under ``mac_key`` (constant time)."""
        expected = hmac.new(mac_key, self._body(), hashlib.sha256).digest()
        return hmac.compare_digest(expected, mac)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEntry:
    """One tensor of a safetensors file: ``begin``/``end`` are offsets in its data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass(frozen=True, slots=True, kw_only=True)
class SafetensorsIndex:
    """A parsed safetensors header: tensors in data-offset order, and the ``__metadata__`` map."""

    header_length: int  # 8 + JSON length
    tensors: tuple[TensorEntry, ...]
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def data_length(self) -> int:
        """Length of the data section (the end of the last tensor)."""
        return max((t.end for t in self.tensors), default=0)


def parse_safetensors_header(data: bytes | bytearray | memoryview) -> SafetensorsIndex:
    """Parse the first ``8 + N`` bytes of a safetensors file (the whole header, nothing more).

    Verifies: the length prefix, JSON syntax, every entry's dtype, shape and offsets, that sizes
    match dtype x shape and that tensors do not overlap. Does not verify that the data section
    has no holes (the chunk layout covers holes anyway).

    Raises:
        ModelFormatError: the bytes are not a valid safetensors header.
    """
    data = bytes(data)
    if len(data) < 8:
        raise ModelFormatError("safetensors header truncated")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_SAFETENSORS_HEADER or len(data) != 8 + n:
        raise ModelFormatError("safetensors header length out of range")
    try:
        obj = json.loads(data[8:].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError("safetensors header is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ModelFormatError("safetensors header is not a JSON object")
    tensors: list[TensorEntry] = []
    metadata: tuple[tuple[str, str], ...] = ()
    for name, info in obj.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelFormatError("safetensors __metadata__ must map strings to strings")
            metadata = tuple(sorted(info.items()))
            continue
        tensors.append(_parse_tensor_entry(name, info))
    tensors.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for t in tensors:
        if t.begin < position:
            raise ModelFormatError(f"safetensors tensor {t.name!r} overlaps another")
        position = t.end
    return SafetensorsIndex(header_length=8 + n, tensors=tuple(tensors), metadata=metadata)


def _parse_tensor_entry(name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise ModelFormatError(f"safetensors entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ModelFormatError(f"safetensors tensor {name!r} has an unsupported dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelFormatError(f"safetensors tensor {name!r} has a bad shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ModelFormatError(f"safetensors tensor {name!r} has bad data offsets")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise ModelFormatError(f"safetensors tensor {name!r} size does not match its dtype and shape")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk: plaintext range ``[start, stop)`` of the shard and where its ciphertext lies."""

    index: int
    start: int
    stop: int
    ct_offset: int
    last: bool

    @property
    def length(self) -> int:
        """Plaintext length of the chunk."""
        return self.stop - self.start

    @property
    def ct_length(self) -> int:
        """Ciphertext length of the chunk, tag included."""
        return self.stop - self.start + GCM_TAG_SIZE


def _split(boundaries: Sequence[int], chunk_size: int) -> list[tuple[int, int]]:
    pieces: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(boundaries):
        pos = a
        while pos < b:
            nxt = min(b, pos + chunk_size)
            pieces.append((pos, nxt))
            pos = nxt
    return pieces


def chunk_layout(
    *, plaintext_length: int, index: SafetensorsIndex, chunk_size: int, header_length: int
) -> tuple[Chunk, ...]:
    """Return every chunk of a shard, in order.

    Boundaries: 0, the end of the safetensors header, the start and end of every tensor, and
    ``plaintext_length``; each piece between two boundaries is cut into chunks of at most
    ``chunk_size`` bytes. ``header_length`` is the encrypted shard header's length.

    Raises:
        ModelFormatError: the tensors do not fit in ``plaintext_length``.
    """
    base = index.header_length
    if base + index.data_length > plaintext_length:
        raise ModelFormatError("safetensors tensors extend past the end of the file")
    marks = {0, base, plaintext_length}
    for t in index.tensors:
        marks.add(base + t.begin)
        marks.add(base + t.end)
    pieces = _split(sorted(marks), chunk_size)
    n = len(pieces)
    return tuple(
        Chunk(index=i, start=a, stop=b, ct_offset=header_length + a + GCM_TAG_SIZE * i, last=i == n - 1)
        for i, (a, b) in enumerate(pieces)
    )


def header_chunks(header: ShardHeader) -> tuple[Chunk, ...]:
    """Return the chunks holding the safetensors header (known before the header is decrypted)."""
    pieces = _split([0, header.safetensors_header_length], header.chunk_size)
    return tuple(
        Chunk(
            index=i,
            start=a,
            stop=b,
            ct_offset=header.length + a + GCM_TAG_SIZE * i,
            last=b == header.plaintext_length,
        )
        for i, (a, b) in enumerate(pieces)
    )


def ciphertext_length(header_length: int, chunks: Sequence[Chunk]) -> int:
    """Return the exact size of an encrypted shard file with these chunks."""
    plaintext = chunks[-1].stop if chunks else 0
    return header_length + plaintext + GCM_TAG_SIZE * len(chunks)
