"""The manifest of an encrypted model: what was packed, and the model's identity.

``manifest.json`` is RFC 8785 canonical JSON. It lists every encrypted shard (sizes, plaintext,
ciphertext, shard-header and safetensors-header digests, tensor index) and every plaintext file
(config, tokenizer, chat template…) with its digest, and ends with a MAC keyed from the model key.
The SHA-256 of the exact file bytes is the model identity (:attr:`Manifest.digest`) that
attestation reports and KBS policy pins. Full specification: ``docs/format.md``.

Reading a manifest (:meth:`Manifest.load`) needs no key and checks structure only;
:meth:`Manifest.authenticate` checks the MAC with the key; :func:`loader.modelview.stage_model_view`
checks the plaintext files and copies the checked bytes where vLLM reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from foundation.errors import ConfigError, ModelDecryptionError, ModelFormatError
from foundation.resource import ResourceUri
from foundation.secret import SecretBytes
from loader.canary import CanaryReference
from loader.format import DTYPE_SIZES, FORMAT_VERSION, MODEL_KEY_SIZE, SALT_SIZE, TensorEntry

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_KDF_INFO",
    "MANIFEST_NAME",
    "Manifest",
    "PlainFile",
    "ShardEntry",
    "parse_key_resource",
]

#: File name of the manifest in an encrypted model directory.
MANIFEST_NAME = "manifest.json"
#: Value of the manifest's ``format`` member.
MANIFEST_FORMAT = "enclave-serve/encrypted-model"
#: HKDF info string for the manifest MAC key (RFC 5869, section 3.2).
MANIFEST_KDF_INFO = b"enclave-serve/manifest/v1"
_MAC_PREFIX = "hmac-sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_MAX_MANIFEST = 256 << 20


def parse_key_resource(key_id: str) -> ResourceUri:
    """Parse the KBS resource of a model key (``kbs:///repository/type/tag``).

    ``pack`` checks the key id it records with this function and ``run`` the resource it asks
    for: what one accepts, the other does.

    Raises:
        ConfigError: not a ``kbs:///`` resource URI (the message gives the expected form).
    """
    try:
        return ResourceUri.parse(key_id)
    except ValueError as exc:
        hint = ""
        if re.match(r"kbs(\+[^:]*)?://[^/]", key_id):
            hint = (
                " (what follows kbs:// is a host, which is ignored: write "
                "kbs:///<repository>/<type>/<tag>, three slashes)"
            )
        raise ConfigError(f"the key resource is not a kbs:/// URI: {exc}{hint}") from None


def _safe_relpath(name: object, what: str) -> str:
    """Return ``name`` if it is a clean relative POSIX path inside the model directory."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ModelFormatError(f"manifest: bad {what} path")
    path = PurePosixPath(name)
    if path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")) or str(path) != name:
        raise ModelFormatError(f"manifest: {what} path {name!r} is not a clean relative path")
    return name


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise ModelFormatError(f"manifest: bad {what} digest")
    return value


def _size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelFormatError(f"manifest: bad {what} size")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _get(obj: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise ModelFormatError(f"manifest: {what} lacks a valid {key!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainFile:
    """A file that stays plaintext in the model directory (vLLM and transformers read it there)."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """Return the manifest JSON object."""
        return {"name": self.name, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, obj: object) -> PlainFile:
        """Parse a manifest ``plain_files`` entry. Raises ModelFormatError."""
        if not isinstance(obj, dict):
            raise ModelFormatError("manifest: plain file entry is not an object")
        return cls(
            name=_safe_relpath(obj.get("name"), "plain file"),
            size=_size(obj.get("size"), "plain file"),
            sha256=_digest(obj.get("sha256"), "plain file"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardEntry:
    """One encrypted shard: its names, sizes, digests and tensor index."""

    name: str  # the plaintext shard's path in the source model directory
    file: str  # the encrypted file's path in the encrypted model directory
    plaintext_size: int
    plaintext_sha256: str
    ciphertext_size: int
    ciphertext_sha256: str
    header_sha256: str  # SHA-256 of the encrypted shard header (which binds salt and lengths)
    safetensors_header_sha256: str
    tensors: tuple[TensorEntry, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """Return the manifest JSON object."""
        return {
            "ciphertext_sha256": self.ciphertext_sha256,
            "ciphertext_size": self.ciphertext_size,
            "file": self.file,
            "header_sha256": self.header_sha256,
            "name": self.name,
            "plaintext_sha256": self.plaintext_sha256,
            "plaintext_size": self.plaintext_size,
            "safetensors_header_sha256": self.safetensors_header_sha256,
            "tensors": [
                {"data_offsets": [t.begin, t.end], "dtype": t.dtype, "name": t.name, "shape": list(t.shape)}
                for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, obj: object) -> ShardEntry:
        """Parse a manifest ``shards`` entry. Raises ModelFormatError."""
        if not isinstance(obj, dict):
            raise ModelFormatError("manifest: shard entry is not an object")
        tensors = []
        for t in _get(obj, "tensors", list, "shard"):
            if not isinstance(t, dict):
                raise ModelFormatError("manifest: tensor entry is not an object")
            name = _get(t, "name", str, "tensor")
            dtype = _get(t, "dtype", str, "tensor")
            shape = _get(t, "shape", list, "tensor")
            offsets = _get(t, "data_offsets", list, "tensor")
            if dtype not in DTYPE_SIZES or not all(_is_count(d) for d in shape):
                raise ModelFormatError(f"manifest: tensor {name!r} has a bad dtype or shape")
            if len(offsets) != 2 or not all(_is_count(o) for o in offsets):
                raise ModelFormatError(f"manifest: tensor {name!r} has bad data offsets")
            tensors.append(
                TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
            )
        return cls(
            name=_safe_relpath(obj.get("name"), "shard"),
            file=_safe_relpath(obj.get("file"), "encrypted shard"),
            plaintext_size=_size(obj.get("plaintext_size"), "plaintext"),
            plaintext_sha256=_digest(obj.get("plaintext_sha256"), "plaintext"),
            ciphertext_size=_size(obj.get("ciphertext_size"), "ciphertext"),
            ciphertext_sha256=_digest(obj.get("ciphertext_sha256"), "ciphertext"),
            header_sha256=_digest(obj.get("header_sha256"), "shard header"),
            safetensors_header_sha256=_digest(obj.get("safetensors_header_sha256"), "safetensors header"),
            tensors=tuple(tensors),
        )


def _mac_key(key: SecretBytes, salt: bytes) -> bytes:
    if len(key) != MODEL_KEY_SIZE:
        raise ModelDecryptionError(f"{MANIFEST_NAME}: the model key must be {MODEL_KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=MANIFEST_KDF_INFO)
    return hkdf.derive(key.reveal())


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A parsed ``manifest.json``. Build one with :meth:`create` (packer) or :meth:`load` (runtime).

    Warning:
        :meth:`load` checks structure only. Until :meth:`authenticate` has passed with the model
        key, nothing in it (names, sizes, digests) is trustworthy, except that :attr:`digest`
        identifies these exact bytes, which is what KBS policy pins.
    """

    key_id: str
    chunk_size: int
    salt: bytes
    shards: tuple[ShardEntry, ...]
    plain_files: tuple[PlainFile, ...]
    mac: str
    raw: bytes = field(repr=False)
    version: int = FORMAT_VERSION
    #: The packer's canary reference (:mod:`loader.canary`); None for models packed without one.
    canary: CanaryReference | None = None

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` of the exact manifest bytes: the model identity."""
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    @property
    def plaintext_bytes(self) -> int:
        """Total size of the plaintext safetensors shards."""
        return sum(s.plaintext_size for s in self.shards)

    @staticmethod
    def _body(
        *,
        key_id: str,
        chunk_size: int,
        salt: bytes,
        shards: Sequence[ShardEntry],
        plain_files: Sequence[PlainFile],
        version: int,
        canary: CanaryReference | None = None,
    ) -> dict[str, Any]:
        body = {
            "chunk_size": chunk_size,
            "format": MANIFEST_FORMAT,
            "key_id": key_id,
            "plain_files": [p.to_json() for p in plain_files],
            "salt": salt.hex(),
            "shards": [s.to_json() for s in shards],
            "version": version,
        }
        if canary is not None:  # optional: manifests packed before canaries stay byte-identical
            body["canary"] = canary.to_json()
        return body

    @classmethod
    def create(
        cls,
        *,
        key: SecretBytes,
        key_id: str,
        chunk_size: int,
        salt: bytes,
        shards: Sequence[ShardEntry],
        plain_files: Sequence[PlainFile],
        canary: CanaryReference | None = None,
    ) -> Manifest:
        """Build and MAC a manifest (packer side). ``salt`` must be fresh random bytes."""
        if len(salt) != SALT_SIZE:
            raise ValueError("manifest salt must be 32 bytes")
        body = cls._body(
            key_id=key_id,
            chunk_size=chunk_size,
            salt=salt,
            shards=shards,
            plain_files=plain_files,
            version=FORMAT_VERSION,
            canary=canary,
        )
        mac = _MAC_PREFIX + hmac.new(_mac_key(key, salt), rfc8785.dumps(body), hashlib.sha256).hexdigest()
        return cls.from_bytes(rfc8785.dumps({**body, "mac": mac}))

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes (structure only; no key needed).

        Raises:
            ModelFormatError: not canonical JSON, unknown format or version, or a bad member.
        """
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ModelFormatError(f"{MANIFEST_NAME} is not valid JSON") from exc
        if not isinstance(obj, dict):
            raise ModelFormatError(f"{MANIFEST_NAME} is not a JSON object")
        if obj.get("format") != MANIFEST_FORMAT:
            raise ModelFormatError(f"{MANIFEST_NAME} is not an enclave-serve encrypted model manifest")
        if obj.get("version") != FORMAT_VERSION:
            raise ModelFormatError(
                f"{MANIFEST_NAME}: unsupported format version {obj.get('version')!r} (this build reads 1)"
            )
        try:
            canonical = rfc8785.dumps(obj)
        except Exception as exc:  # rfc8785 raises its own errors for floats and the like
            raise ModelFormatError(f"{MANIFEST_NAME} is not canonical JSON") from exc
        if canonical != data:
            raise ModelFormatError(f"{MANIFEST_NAME} is not RFC 8785 canonical JSON (was it edited?)")
        chunk_size = _get(obj, "chunk_size", int, "manifest")
        key_id = _get(obj, "key_id", str, "manifest")
        mac = _get(obj, "mac", str, "manifest")
        try:
            salt = bytes.fromhex(_get(obj, "salt", str, "manifest"))
        except ValueError as exc:
            raise ModelFormatError(f"{MANIFEST_NAME}: bad salt") from exc
        if len(salt) != SALT_SIZE or not mac.startswith(_MAC_PREFIX) or not key_id:
            raise ModelFormatError(f"{MANIFEST_NAME}: bad salt, mac or key id")
        shards = tuple(ShardEntry.from_json(s) for s in _get(obj, "shards", list, "manifest"))
        plain = tuple(PlainFile.from_json(p) for p in _get(obj, "plain_files", list, "manifest"))
        canary = None if "canary" not in obj else CanaryReference.from_json(obj["canary"])
        names = [s.file for s in shards] + [p.name for p in plain] + [MANIFEST_NAME]
        if len(set(names)) != len(names) or len({s.name for s in shards}) != len(shards):
            raise ModelFormatError(f"{MANIFEST_NAME} lists a file twice")
        # The MAC covers the members we understand; anything else would change the model identity
        # (the digest of these bytes) without the key holder: refuse unknown members outright.
        body = cls._body(
            key_id=key_id,
            chunk_size=chunk_size,
            salt=salt,
            shards=shards,
            plain_files=plain,
            version=FORMAT_VERSION,
            canary=canary,
        )
        known = {**body, "mac": mac}
        if rfc8785.dumps(known) != data:
            raise ModelFormatError(f"{MANIFEST_NAME} has members this format does not define")
        return cls(
            key_id=key_id,
            chunk_size=chunk_size,
            salt=salt,
            shards=shards,
            plain_files=plain,
            mac=mac,
            raw=bytes(data),
            canary=canary,
        )

    @classmethod
    def load(cls, model_dir: Path) -> Manifest:
        """Read and parse ``model_dir/manifest.json`` (structure only; no key needed).

        Raises:
            ModelFormatError: missing, too large or malformed.
        """
        path = Path(model_dir) / MANIFEST_NAME
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_MANIFEST + 1)
        except OSError as exc:
            raise ModelFormatError(
                f"cannot read the model's {MANIFEST_NAME}", log_detail=f"{path}: {exc.strerror}"
            ) from None
        if len(data) > _MAX_MANIFEST:
            raise ModelFormatError(f"the model's {MANIFEST_NAME} is larger than {_MAX_MANIFEST} bytes")
        return cls.from_bytes(data)

    def check_files(self, model_dir: Path) -> None:
        """Check that every encrypted shard the manifest lists is in ``model_dir`` with its size.

        A courtesy for honest mistakes (an interrupted copy, a forgotten file), made before the
        key is asked for: it names the file and what is wrong with it. It verifies nothing: the
        manifest is not authenticated yet, and a shard of the right size may hold anything; the
        loader authenticates every chunk after the key release.

        Raises:
            ModelFormatError: a shard is missing, not a regular file, or of another size than
                the manifest records.
        """
        again = "copy the encrypted model directory again, whole (every file pack wrote)"
        for s in self.shards:
            path = Path(model_dir) / s.file
            try:
                info = os.stat(path)
            except FileNotFoundError:
                raise ModelFormatError(f"shard {s.file} is missing: {again}", log_detail=str(path)) from None
            except OSError as exc:
                raise ModelFormatError(
                    f"cannot read shard {s.file}: {exc.strerror}", log_detail=str(path)
                ) from None
            if not stat.S_ISREG(info.st_mode):
                raise ModelFormatError(f"shard {s.file} is not a regular file: {again}", log_detail=str(path))
            if info.st_size != s.ciphertext_size:
                raise ModelFormatError(
                    f"shard {s.file} is {info.st_size} bytes; the manifest records {s.ciphertext_size}: "
                    f"{again}",
                    log_detail=str(path),
                )

    def authenticate(self, key: SecretBytes, *, resource: str | None = None) -> None:
        """Check the manifest MAC with the model key: detects a wrong key before vLLM starts.

        Verifies that every member of the manifest was written by a holder of the key. Does not
        verify the shards or plaintext files themselves (the loader and
        :func:`loader.modelview.stage_model_view` do). ``resource`` is the key resource the key
        was released for (named in the refusal beside the one the manifest records).

        Raises:
            ModelDecryptionError: the MAC does not match (wrong key or tampered manifest).
        """
        body = self._body(
            key_id=self.key_id,
            chunk_size=self.chunk_size,
            salt=self.salt,
            shards=self.shards,
            plain_files=self.plain_files,
            version=self.version,
            canary=self.canary,
        )
        expected = (
            _MAC_PREFIX + hmac.new(_mac_key(key, self.salt), rfc8785.dumps(body), hashlib.sha256).hexdigest()
        )
        if hmac.compare_digest(expected.encode(), self.mac.encode()):
            return
        if resource is not None and resource != self.key_id:
            raise ModelDecryptionError(
                f"{MANIFEST_NAME} does not authenticate with the key released for '{resource}'; the "
                f"manifest records the key resource '{self.key_id}': ask for that one (or upload this "
                f"model's key to '{resource}'), unless the model directory was modified"
            )
        if resource is not None:
            raise ModelDecryptionError(
                f"{MANIFEST_NAME} does not authenticate with the key released for '{resource}', the "
                "resource the manifest records: the key stored there is not this model's (upload the "
                "key pack wrote), or the model directory was modified"
            )
        raise ModelDecryptionError(
            f"{MANIFEST_NAME} does not authenticate with the key given (the manifest records the key "
            f"resource '{self.key_id}'): the key is not this model's, or the model directory was modified"
        )

    def shard(self, name: str) -> ShardEntry:
        """Return the shard entry whose plaintext name is ``name``. Raises KeyError."""
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)
