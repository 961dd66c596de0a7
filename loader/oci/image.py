"""The pinned image: its OCI manifest, config and layers, parsed strictly.

Only OCI image manifests are accepted. Docker's media types (schema 2 manifests, the
``…rootfs.diff.tar.gzip`` layers, encrypted or not) are refused with the reason: CoCo's own
decoders do not support encrypted Docker layers either, and ``skopeo copy --format oci`` converts
them. An image index is refused too: pin the image manifest itself.

``pack --oci`` records the layers' roles in the config's labels
(:data:`LABEL_LAYERS`: per layer ``{"diff_id", "role": "files"|"weights", "files": [...]}``). The
config is covered by the manifest digest, so the labels are as trustworthy as the pin; an image
without them is handled too (every layer is scanned for side files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from foundation.errors import ModelFormatError
from loader.canary import CanaryReference
from loader.oci.blobs import BlobStore

__all__ = [
    "ENC_KEYS_JWE",
    "ENC_PUBOPTS",
    "LABEL_LAYERS",
    "OCI_CONFIG",
    "OCI_MANIFEST",
    "OciImage",
    "OciLayer",
    "json_object",
    "load_image",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar"
_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
#: Layer annotation holding the JWE-wrapped key of each recipient (comma-separated base64).
ENC_KEYS_JWE = "org.opencontainers.image.enc.keys.jwe"
#: Layer annotation holding the public cipher options (base64 JSON).
ENC_PUBOPTS = "org.opencontainers.image.enc.pubopts"
#: Config label written by ``enclave-serve pack --oci``.
LABEL_LAYERS = "dev.enclave-serve.layers"
#: Config label with the packer's canary reference (:mod:`loader.canary`), as JSON.
LABEL_CANARY = "dev.enclave-serve.canary"
_MAX_LAYERS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class OciLayer:
    """One layer: where its blob is, how it is compressed, and whether (and how) it is encrypted."""

    index: int
    digest: str
    size: int
    media_type: str
    compression: str  # "none" | "gzip" | "zstd"
    encrypted: bool
    annotations: Mapping[str, str]
    diff_id: str | None
    role: str | None  # from the config label: "files" | "weights"; None when unlabelled
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How errors name the layer."""
        return f"layer {self.index} ({self.digest[:19]}…)"


@dataclass(frozen=True, slots=True, kw_only=True)
class OciImage:
    """A parsed image manifest and config; ``digest`` is the model identity."""

    digest: str
    manifest: bytes
    config: Mapping[str, Any]
    layers: tuple[OciLayer, ...]

    @property
    def encrypted(self) -> bool:
        """Whether every layer is encrypted."""
        return all(layer.encrypted for layer in self.layers)

    @property
    def canary(self) -> CanaryReference | None:
        """The canary reference ``pack --oci`` labelled (covered by the pinned digest), or None."""
        labels = (self.config.get("config") or {}).get("Labels") or {}
        raw = labels.get(LABEL_CANARY) if isinstance(labels, dict) else None
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
        except (TypeError, ValueError):
            raise ModelFormatError(f"the config label {LABEL_CANARY} is not JSON") from None
        return CanaryReference.from_json(obj)

    @property
    def labelled(self) -> bool:
        """Whether ``pack --oci`` labelled the layers' roles."""
        return all(layer.role is not None for layer in self.layers)

    @property
    def side_files(self) -> tuple[str, ...]:
        """The side files the labels announce (empty for an unlabelled image)."""
        return tuple(f for layer in self.layers if layer.role == "files" for f in layer.files)

    @property
    def compressed_bytes(self) -> int:
        """The layers' blob sizes together."""
        return sum(layer.size for layer in self.layers)


def _media(media_type: str, index: int) -> tuple[str, bool]:
    if media_type.startswith("application/vnd.docker."):
        raise ModelFormatError(
            f"layer {index} has Docker's media type {media_type!r}, which is not supported (encrypted "
            "Docker layers are not decoded by CoCo either); copy the image with skopeo --format oci"
        )
    base, encrypted = media_type, False
    if base.endswith("+encrypted"):
        base, encrypted = base[: -len("+encrypted")], True
    for prefix in (_LAYER, _NONDIST):
        if base == prefix:
            return "none", encrypted
        if base == prefix + "+gzip":
            return "gzip", encrypted
        if base == prefix + "+zstd":
            return "zstd", encrypted
    raise ModelFormatError(f"layer {index} has the unsupported media type {media_type!r}")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse ``data`` as a JSON object; :class:`ModelFormatError` naming ``what`` otherwise."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise ModelFormatError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{what} is not a JSON object")
    return obj


def _descriptor(obj: object, what: str) -> tuple[str, int, str, dict[str, str]]:
    if not isinstance(obj, dict):
        raise ModelFormatError(f"the manifest's {what} is not a descriptor")
    digest, size, media = obj.get("digest"), obj.get("size"), obj.get("mediaType")
    annotations = obj.get("annotations") or {}
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0 or not isinstance(media, str):
        raise ModelFormatError(f"the manifest's {what} lacks a digest, size or media type")
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise ModelFormatError(f"the manifest's {what} has malformed annotations")
    return digest, size, media, annotations


def _roles(config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    labels = (config.get("config") or {}).get("Labels") or {}
    raw = labels.get(LABEL_LAYERS) if isinstance(labels, dict) else None
    if raw is None:
        return None
    try:
        roles = json.loads(raw)
    except (TypeError, ValueError):
        raise ModelFormatError(f"the config label {LABEL_LAYERS} is not JSON") from None
    if not isinstance(roles, list) or not all(
        isinstance(r, dict) and r.get("role") in ("files", "weights") and isinstance(r.get("diff_id"), str)
        for r in roles
    ):
        raise ModelFormatError(f"the config label {LABEL_LAYERS} is malformed")
    return roles


def load_image(store: BlobStore, digest: str) -> OciImage:
    """Fetch and parse the manifest pinned by ``digest``, and its config.

    Raises:
        ModelFormatError: the manifest or config does not match its digest, is not an OCI image
            manifest, or names an unsupported layer type.
    """
    data, served_type = store.manifest(digest)
    manifest = json_object(data, "the manifest")
    media = manifest.get("mediaType") or served_type
    if (
        media in (OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json")
        or "manifests" in manifest
    ):
        raise ModelFormatError(f"{digest} is an image index; pin the digest of one image manifest")
    if media != OCI_MANIFEST or manifest.get("schemaVersion") != 2:
        raise ModelFormatError(
            f"{digest} is not an OCI image manifest ({media or 'no media type'}); Docker manifests are "
            "not supported: copy the image with skopeo --format oci"
        )
    c_digest, c_size, c_media, _ = _descriptor(manifest.get("config"), "config")
    if c_media != OCI_CONFIG:
        raise ModelFormatError(f"the image config has media type {c_media!r}, not {OCI_CONFIG}")
    config = json_object(store.small_blob(c_digest, c_size, "the image config"), "the image config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers or len(raw_layers) > _MAX_LAYERS:
        raise ModelFormatError("the manifest lists no layers (or too many)")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if not isinstance(diff_ids, list) or len(diff_ids) != len(raw_layers):
        raise ModelFormatError("the image config's diff_ids do not match the manifest's layers")
    roles = _roles(config)
    if roles is not None and [r["diff_id"] for r in roles] != diff_ids:
        raise ModelFormatError(f"the config label {LABEL_LAYERS} does not describe the image's layers")
    layers = []
    for i, raw in enumerate(raw_layers):
        l_digest, l_size, l_media, annotations = _descriptor(raw, f"layer {i}")
        compression, encrypted = _media(l_media, i)
        role = roles[i] if roles is not None else None
        files = tuple(str(f) for f in (role or {}).get("files", []))
        layers.append(
            OciLayer(
                index=i,
                digest=l_digest,
                size=l_size,
                media_type=l_media,
                compression=compression,
                encrypted=encrypted,
                annotations=annotations,
                diff_id=str(diff_ids[i]),
                role=None if role is None else str(role["role"]),
                files=files,
            )
        )
    return OciImage(digest=digest, manifest=data, config=config, layers=tuple(layers))
