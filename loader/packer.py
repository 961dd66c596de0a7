"""Pack a Hugging Face model directory into an encrypted model directory (``enclave-serve pack``).

Each ``*.safetensors`` shard becomes ``<shard>.esenc`` (format in :mod:`loader.format`); plaintext
side files (config, tokenizer, generation config, chat template…) are copied and listed with
their digests; ``manifest.json`` ties everything together. The packer streams: it holds at most
``2 x threads`` chunks in memory, whatever the shard size. It writes into a hidden sibling
directory and renames it into place only when everything succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import ConfigError, ModelFormatError
from foundation.secret import SecretBytes
from loader.canary import CanaryReference
from loader.format import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    GCM_TAG_SIZE,
    MAX_CHUNK_SIZE,
    MAX_SAFETENSORS_HEADER,
    MIN_CHUNK_SIZE,
    MODEL_KEY_SIZE,
    SALT_SIZE,
    SHARD_SUFFIX,
    Chunk,
    SafetensorsIndex,
    ShardHeader,
    chunk_aad,
    chunk_layout,
    chunk_nonce,
    ciphertext_length,
    derive_shard_keys,
    parse_safetensors_header,
)
from loader.manifest import MANIFEST_NAME, Manifest, PlainFile, ShardEntry, parse_key_resource

__all__ = [
    "PLAIN_FILE_SUFFIXES",
    "RandBytes",
    "SourceModel",
    "check_destination",
    "check_source",
    "encrypt_shard",
    "generate_model_key",
    "pack_model",
    "scan_model_dir",
]

logger = logging.getLogger(__name__)

#: Source of randomness (salts, keys); ``os.urandom`` unless a test injects a fixed one.
RandBytes = Callable[[int], bytes]

#: Side files copied in plaintext: what vLLM and transformers read from the model directory.
#: Anything else (``*.bin``, ``*.pt``, ``*.gguf``… which may be plaintext weights) is skipped.
PLAIN_FILE_SUFFIXES = frozenset({".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".md", ".vocab"})
_COPY_BLOCK = 1 << 20


def generate_model_key(*, randbytes: RandBytes = os.urandom) -> SecretBytes:
    """Return a fresh 256-bit model key."""
    return SecretBytes(randbytes(MODEL_KEY_SIZE))


class _Progress:
    """A one-line progress bar on a terminal stream (no dependency)."""

    def __init__(
        self, total: int, stream: TextIO | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._total = max(total, 1)
        self._done = 0
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = self._clock()
            if self._stream is None or (now - self._last < 0.2 and self._done < self._total):
                return
            self._last = now
            frac = min(self._done / self._total, 1.0)
            rate = self._done / max(now - self._start, 1e-9) / 1e9
            bar = "#" * int(frac * 30)
            self._stream.write(
                f"\rpacking [{bar:<30}] {frac:6.1%} "
                f"{self._done / 1e9:.2f}/{self._total / 1e9:.2f} GB {rate:.2f} GB/s"
            )
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()


@dataclass(slots=True, eq=False)
class _Buffers:
    plain: bytearray
    cipher: bytearray


def encrypt_shard(
    src: Path,
    dst: Path,
    *,
    name: str,
    model_key: bytes,
    key_id: str,
    chunk_size: int,
    salt: bytes,
    pool: ThreadPoolExecutor,
    window: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> ShardEntry:
    """Encrypt one safetensors file ``src`` into ``dst`` (created, must not exist); return its entry.

    Chunks are read, encrypted and written by ``pool`` with at most ``window`` chunks in memory;
    this thread hashes plaintext and ciphertext in order.

    Warning:
        ``salt`` must be fresh random bytes for every file: nonce uniqueness rests on it.

    Raises:
        ModelFormatError: ``src`` is not a valid safetensors file or changed while being read.
    """
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        prefix = fin.read(8)
        if len(prefix) < 8:
            raise ModelFormatError(f"{name}: not a safetensors file (too short)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ModelFormatError(f"{name}: not a safetensors file (bad header length)")
        st_header = prefix + fin.read(n)
    try:
        index = parse_safetensors_header(st_header)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{name}: {exc}") from None
    header = ShardHeader(
        chunk_size=chunk_size,
        plaintext_length=size,
        safetensors_header_length=len(st_header),
        safetensors_header_sha256=hashlib.sha256(st_header).digest(),
        salt=salt,
        shard_name=name,
        key_id=key_id,
    )
    keys = derive_shard_keys(model_key, salt)
    raw = header.to_bytes(keys.mac_key)
    digest = hashlib.sha256(raw).digest()
    chunks = chunk_layout(plaintext_length=size, index=index, chunk_size=chunk_size, header_length=len(raw))
    aead = AESGCM(keys.enc_key)
    free: list[_Buffers] = [
        _Buffers(bytearray(chunk_size), bytearray(chunk_size + GCM_TAG_SIZE)) for _ in range(window)
    ]
    lock = threading.Lock()
    pt_hash, ct_hash = hashlib.sha256(), hashlib.sha256(raw)
    inflight: deque[Future[tuple[_Buffers, Chunk]]] = deque()
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(dst_fd, raw, 0)

        def work(c: Chunk) -> tuple[_Buffers, Chunk]:
            with lock:
                bufs = free.pop()
            pt = memoryview(bufs.plain)[: c.length]
            ct = memoryview(bufs.cipher)[: c.ct_length]
            if os.preadv(src_fd, [pt], c.start) != c.length:
                raise ModelFormatError(f"{name}: file changed while packing")
            aead.encrypt_into(chunk_nonce(c.index), pt, chunk_aad(digest, c.index, last=c.last), ct)
            if os.pwrite(dst_fd, ct, c.ct_offset) != c.ct_length:
                raise OSError(f"short write to {dst}")
            return bufs, c

        todo: Iterator[Chunk] = iter(chunks)
        while True:
            while len(inflight) < window and (c := next(todo, None)) is not None:
                inflight.append(pool.submit(work, c))
            if not inflight:
                break
            bufs, c = inflight.popleft().result()
            pt_hash.update(memoryview(bufs.plain)[: c.length])
            ct_hash.update(memoryview(bufs.cipher)[: c.ct_length])
            with lock:
                free.append(bufs)
            on_bytes(c.length)
        if os.fstat(src_fd).st_size != size:
            raise ModelFormatError(f"{name}: file changed while packing")
        os.fsync(dst_fd)
    except BaseException:
        for f in inflight:
            f.cancel()
        for f in inflight:
            if not f.cancelled():
                f.exception()
        raise
    finally:
        os.close(src_fd)
        os.close(dst_fd)
        for b in free:  # plaintext of the provider's model: do not leave it in freed memory
            b.plain[:] = bytes(len(b.plain))
    return ShardEntry(
        name=name,
        file=name + SHARD_SUFFIX,
        plaintext_size=size,
        plaintext_sha256="sha256:" + pt_hash.hexdigest(),
        ciphertext_size=ciphertext_length(len(raw), chunks),
        ciphertext_sha256="sha256:" + ct_hash.hexdigest(),
        header_sha256="sha256:" + digest.hex(),
        safetensors_header_sha256="sha256:" + header.safetensors_header_sha256.hex(),
        tensors=index.tensors,
    )


def _copy_plain(src: Path, dst: Path, name: str, on_bytes: Callable[[int], None]) -> PlainFile:
    h = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("xb") as fout:
        while block := fin.read(_COPY_BLOCK):
            h.update(block)
            fout.write(block)
            size += len(block)
            on_bytes(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    return PlainFile(name=name, size=size, sha256="sha256:" + h.hexdigest())


def scan_model_dir(src: Path) -> tuple[list[str], list[str]]:
    """Return the safetensors shards and the side files of ``src`` (relative paths), warning
    about (and leaving out) files that are neither: they may be plaintext weights."""
    shards: list[str] = []
    plain: list[str] = []
    skipped: list[str] = []
    for dirpath, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            rel = (Path(dirpath) / f).relative_to(src).as_posix()
            if f.startswith("."):
                continue
            if f.endswith(".safetensors"):
                shards.append(rel)
            elif Path(f).suffix in PLAIN_FILE_SUFFIXES:
                plain.append(rel)
            else:
                skipped.append(rel)
    if skipped:
        logger.warning(
            "not packing %d file(s) that are neither safetensors nor known side files: %s",
            len(skipped),
            ", ".join(skipped[:10]),
        )
    return shards, plain


#: Safetensors dtypes an engine converts to the dtype it loads the model in.
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: Bytes per element of the dtypes a canary can load a model in (torch names).
_LOAD_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceModel:
    """A Hugging Face model directory that passed :func:`check_source`, and what its headers say."""

    directory: Path
    shards: tuple[str, ...]
    plain_files: tuple[str, ...]
    #: The dtype ``config.json`` names (``dtype`` or ``torch_dtype``), None when it names none.
    config_dtype: str | None
    #: Elements of all tensors, and of the floating-point ones (which a load converts).
    parameters: int
    float_parameters: int
    #: Bytes of the tensors that are not floating point (kept as they are by a load).
    other_bytes: int
    #: Bytes of every file pack reads.
    total_bytes: int

    def weight_bytes(self, dtype: str) -> int:
        """Return the memory the weights take loaded in ``dtype`` (``float32``, ``bfloat16``…)."""
        return self.float_parameters * _LOAD_DTYPE_SIZES[dtype] + self.other_bytes


def _config_dtype(config: dict[str, object]) -> str | None:
    text = config.get("text_config")
    for holder in (config, text if isinstance(text, dict) else {}):
        value = holder.get("dtype") or holder.get("torch_dtype")
        if isinstance(value, str):
            return value
    return None


def _read_config(src: Path) -> dict[str, object]:
    path = src / "config.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(
            f"{src} has no config.json: pack needs a Hugging Face model directory (config.json, the "
            "tokenizer files and *.safetensors); vLLM reads the architecture from config.json"
        ) from None
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror}") from None
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(
            f"{path} is not valid JSON ({exc}): restore the model's own config.json"
        ) from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} is not a JSON object: restore the model's own config.json")
    return config


def _check_shard(path: Path, name: str) -> tuple[SafetensorsIndex, int]:
    """Read and parse one shard's safetensors header; return it and the file's size."""
    again = "copy or download it again"
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFormatError(f"shard {name} is empty (0 bytes): {again}")
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelFormatError(
                    f"shard {name} is {size} bytes, too short for a safetensors file: {again}"
                )
            n = int.from_bytes(prefix, "little")
            if n > MAX_SAFETENSORS_HEADER:
                raise ModelFormatError(
                    f"shard {name} is not a safetensors file (its first 8 bytes announce a {n}-byte "
                    f"header; safetensors allows {MAX_SAFETENSORS_HEADER}): {again}"
                )
            if 8 + n > size:
                raise ModelFormatError(
                    f"shard {name} is truncated: its header alone needs {8 + n} bytes and the file "
                    f"holds {size}: {again}"
                )
            header = prefix + f.read(n)
    except OSError as exc:
        raise ModelFormatError(f"cannot read shard {name}: {exc.strerror}") from None
    try:
        index = parse_safetensors_header(header)
    except ModelFormatError as exc:
        raise ModelFormatError(f"shard {name} is not a safetensors file ({exc}): {again}") from None
    needed = index.header_length + index.data_length
    if needed > size:
        raise ModelFormatError(
            f"shard {name} is truncated: its header describes {needed} bytes and the file holds {size}: "
            f"{again}"
        )
    return index, size


def check_source(src: Path) -> SourceModel:
    """Check that ``src`` is a model directory ``pack`` can encrypt, reading only small files and headers.

    Verifies, in order: ``src`` is a readable directory and not an encrypted model already; its
    ``config.json`` parses as a JSON object; it has ``*.safetensors`` shards, each readable and
    non-empty, whose safetensors header parses and whose tensors fit in the file; the side files
    can be opened. Does not read the tensor data (:func:`encrypt_shard` hashes it as it packs)
    nor check that an engine can run the model (the canary does).

    Raises:
        ConfigError: ``src`` is missing, not a directory, unreadable, or already an encrypted model.
        ModelFormatError: ``config.json`` is missing or malformed, there is no shard, or a shard is
            empty, truncated or not safetensors (the message names the file and the cause).
    """
    src = Path(src)
    try:
        with os.scandir(src):
            pass
    except FileNotFoundError:
        raise ConfigError(
            f"the model directory {src} does not exist: give a Hugging Face model directory "
            "(config.json, tokenizer, *.safetensors)"
        ) from None
    except NotADirectoryError:
        raise ConfigError(f"{src} is not a directory: give a Hugging Face model directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the model directory {src}: {exc.strerror}") from None
    shards, plain = scan_model_dir(src)
    if MANIFEST_NAME in plain:
        raise ConfigError(
            f"{src} holds {MANIFEST_NAME}: it is an encrypted model already (pack's output); give the "
            "plaintext Hugging Face model directory"
        )
    config = _read_config(src)
    if not shards:
        raise ModelFormatError(
            f"no *.safetensors files in {src}: pack encrypts safetensors weights only (convert "
            "*.bin or *.pt weights to safetensors first)"
        )
    parameters = float_parameters = other_bytes = total = 0
    for name in shards:
        index, size = _check_shard(src / name, name)
        total += size
        for t in index.tensors:
            numel = t.nbytes // DTYPE_SIZES[t.dtype]
            parameters += numel
            if t.dtype in _FLOAT_DTYPES:
                float_parameters += numel
            else:
                other_bytes += t.nbytes
    for name in plain:
        try:
            with (src / name).open("rb") as f:
                total += os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise ModelFormatError(f"cannot read {src / name}: {exc.strerror}") from None
    return SourceModel(
        directory=src,
        shards=tuple(shards),
        plain_files=tuple(plain),
        config_dtype=_config_dtype(config),
        parameters=parameters,
        float_parameters=float_parameters,
        other_bytes=other_bytes,
        total_bytes=total,
    )


def check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
    """Check that ``dst`` can be written with ``src`` as the source, before anything is computed.

    Raises:
        ConfigError: ``dst`` is or holds or is inside ``src``, exists without ``overwrite``, or
            cannot be created (the nearest existing parent is not a writable directory).
    """
    src, target = Path(src).resolve(), Path(dst).resolve()
    if target == src or src in target.parents:
        raise ConfigError(f"the destination {dst} must not be inside the source directory {src}")
    if target in src.parents:
        raise ConfigError(f"the destination {dst} must not contain the source directory {src}")
    if (Path(dst).exists() or Path(dst).is_symlink()) and not overwrite:
        raise ConfigError(f"{dst} already exists; pass --force to replace it")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create {dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {dst}: no permission to write in {parent}")


def pack_model(
    src: Path | SourceModel,
    dst: Path,
    *,
    key: SecretBytes,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    randbytes: RandBytes = os.urandom,
    canary: CanaryReference | None = None,
) -> Manifest:
    """Encrypt the Hugging Face model directory ``src`` into a new encrypted model directory ``dst``.

    ``src`` is a directory, or what :func:`check_source` found in one (then not checked again).

    Writes atomically: everything goes to a hidden sibling of ``dst`` that is renamed into place at
    the end, and removed on any error (a SIGKILL can leave that hidden directory behind, never a
    partial ``dst``). ``randbytes`` supplies the salts (inject it only for test vectors).
    ``canary`` (:func:`loader.canary.compute_reference` on ``src``) goes into the manifest.

    Warning:
        Files that are neither ``*.safetensors`` nor known plaintext side files
        (:data:`PLAIN_FILE_SUFFIXES`) are skipped with a warning: they may be plaintext weights.

    Checks everything cheap first (arguments, the key id as ``run`` parses it,
    :func:`check_destination`, :func:`check_source`), before it creates anything.

    Raises:
        ConfigError: bad arguments, or ``dst`` exists and ``overwrite`` is False.
        ModelFormatError: no ``config.json``, no shard, or a shard that is not valid safetensors.
    """
    checked = src if isinstance(src, SourceModel) else None
    src = Path(src.directory if isinstance(src, SourceModel) else src).resolve()
    dst = Path(dst).absolute()
    if len(key) != MODEL_KEY_SIZE:
        raise ConfigError(f"the model key must be {MODEL_KEY_SIZE} bytes")
    if len(key_id) > 1024:
        raise ConfigError("the key id must be at most 1024 characters")
    parse_key_resource(key_id)  # what run accepts
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    check_destination(src, dst, overwrite=overwrite)
    source = checked or check_source(src)
    shards, plain = list(source.shards), list(source.plain_files)
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    bar = _Progress(source.total_bytes, sys.stderr if progress else None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{randbytes(8).hex()}"
    tmp.mkdir(mode=0o755)
    model_key = key.reveal()
    try:
        plain_entries = [_copy_plain(src / n, tmp / n, n, bar.advance) for n in plain]
        entries = []
        with ThreadPoolExecutor(threads, thread_name_prefix="enclave-pack") as pool:
            for n in shards:
                (tmp / n).parent.mkdir(parents=True, exist_ok=True)
                entries.append(
                    encrypt_shard(
                        src / n,
                        tmp / (n + SHARD_SUFFIX),
                        name=n,
                        model_key=model_key,
                        key_id=key_id,
                        chunk_size=chunk_size,
                        salt=randbytes(SALT_SIZE),
                        pool=pool,
                        window=2 * threads,
                        on_bytes=bar.advance,
                    )
                )
        manifest = Manifest.create(
            key=key,
            key_id=key_id,
            chunk_size=chunk_size,
            salt=randbytes(SALT_SIZE),
            shards=entries,
            plain_files=plain_entries,
            canary=canary,
        )
        with (tmp / MANIFEST_NAME).open("xb") as f:
            f.write(manifest.raw)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, dst, overwrite=overwrite, randbytes=randbytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    logger.info(
        "packed %d shard(s), %d plain file(s) into %s; identity %s",
        len(entries),
        len(plain_entries),
        dst,
        manifest.digest,
    )
    return manifest


def _replace(tmp: Path, dst: Path, *, overwrite: bool, randbytes: RandBytes) -> None:
    old = None
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise ConfigError(f"{dst} already exists; pass --force to replace it")
        old = dst.parent / f".{dst.name}.old-{randbytes(8).hex()}"
        dst.rename(old)
    tmp.rename(dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
