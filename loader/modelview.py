"""The model directory vLLM reads: the attested bytes of the side files, in guest-private memory.

The plaintext side files of an encrypted model (config, tokenizer, chat template, generation
config…) are authenticated by the manifest, not encrypted. vLLM and transformers open them *by
path*, minutes after the runtime checked them and possibly several times, and the model
directory is usually a host-backed volume whose server (virtiofsd) can answer each read
differently. Hashing the host's files and letting vLLM read them later is a time-of-check /
time-of-use hole: a chat template swapped after the check would be rendered for every chat
request.

:func:`stage_model_view` closes it: each side file is read **once**, through one file
descriptor, with a size bound; those bytes are hashed and compared with the manifest, and
exactly those bytes are written into a *view* directory that the caller places in
guest-private memory (:mod:`runtime.private`). The manifest written there is the exact bytes
that were parsed. The encrypted shards stay where they are and are referenced from the view
by symbolic links: AES-GCM authenticates every chunk the loader reads, whenever it reads it.
vLLM is pointed at the view; nothing the host changes in its directory afterwards has an effect.

Verified: every listed side file is a regular file of the manifest's size and SHA-256, and the
host directory holds nothing but the manifest, the listed side files and the encrypted shards
(a plaintext shard left beside them, an extra ``generation_config.json``). Not verified here:
the manifest's MAC (:meth:`loader.manifest.Manifest.authenticate`), without which the digests
prove nothing; the shards (the loader, chunk by chunk).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from foundation.errors import ModelFormatError
from loader.manifest import MANIFEST_NAME, Manifest

__all__ = ["stage_model_view", "write_view_file"]

_READ_BLOCK = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _side_file_refused(name: str, why: str) -> ModelFormatError:
    """One public reason whatever went wrong (missing, unreadable, modified): the host learns
    nothing about its own files from the readiness reason; the log says which."""
    return ModelFormatError(
        f"plain file {name!r} does not match the manifest (missing, unreadable or modified)",
        log_detail=why,
    )


def _read_once(path: Path, size: int, name: str) -> bytes:
    """Return the bytes of ``path`` read through one descriptor, refusing more than ``size``."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError as exc:
        raise _side_file_refused(name, f"cannot open: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _side_file_refused(name, "not a regular file")
        chunks: list[bytes] = []
        got = 0
        while got <= size:
            block = os.read(fd, min(_READ_BLOCK, size + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        return b"".join(chunks)
    except OSError as exc:
        raise _side_file_refused(name, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o400)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_view_file(view: Path, name: str, data: bytes) -> None:
    """Write one file (a side file read from an image layer) into the existing view, read-only.

    Raises:
        ModelFormatError: ``name`` is not a plain file name, or the file exists already.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ModelFormatError(f"{name!r} is not a file name for the model view")
    try:
        _write_new(view / name, data)
    except FileExistsError:
        raise ModelFormatError(f"{name!r} is in the model view already") from None


def _check_listing(model_dir: Path, manifest: Manifest) -> None:
    expected = {p.name for p in manifest.plain_files} | {s.file for s in manifest.shards} | {MANIFEST_NAME}
    for dirpath, _dirs, files in os.walk(model_dir):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(model_dir).as_posix()
            if rel not in expected:
                raise ModelFormatError(f"unexpected file {rel!r} in the encrypted model directory")


def stage_model_view(model_dir: Path, manifest: Manifest, view: Path) -> Path:
    """Write the attested side files, the manifest and links to the shards into ``view``.

    ``view`` must not exist yet; its parent should be guest-private memory. Returns ``view``.

    Raises:
        ModelFormatError: a side file is missing, not a regular file, or differs from the
            manifest (named); an unexpected file is present; ``view`` exists.
    """
    root = Path(model_dir).absolute()
    _check_listing(root, manifest)
    staged: list[tuple[str, bytes]] = []
    for plain in manifest.plain_files:
        data = _read_once(root / plain.name, plain.size, plain.name)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != plain.size or not hmac.compare_digest(digest, plain.sha256):
            raise _side_file_refused(plain.name, "its bytes do not match the manifest")
        staged.append((plain.name, data))
    try:
        view.mkdir(mode=0o700)
    except FileExistsError as exc:
        raise ModelFormatError(f"the model view {view} exists already") from exc
    for name, data in staged:
        _write_new(view / name, data)
    _write_new(view / MANIFEST_NAME, manifest.raw)
    for shard in manifest.shards:
        link = view / shard.file
        link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        link.symlink_to(root / shard.file)
    return view
