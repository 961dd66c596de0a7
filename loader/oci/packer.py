"""``enclave-serve pack --oci``: write a model as a *plain* OCI image layout for skopeo to encrypt.

Layer 0 holds the side files (config, tokenizer, templates); every safetensors shard gets a layer
of its own, so each layer's HMAC covers one shard and shards decrypt in parallel. The layers are
uncompressed tars (``application/vnd.oci.image.layer.v1.tar``): safetensors barely compress, and
gzip would cost more CPU than the decryption (keep them so with ``skopeo copy
--dest-oci-accept-uncompressed-layers``; gzip and zstd layers load too). Tar members are written
deterministically (mtime 0, uid/gid 0, mode 0644), so the same model gives the same image.

The image config labels each layer's role and files (:data:`loader.oci.image.LABEL_LAYERS`),
which lets the runtime read the side files without decrypting the weight layers twice. The
layout is written next to ``out`` and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError
from loader.canary import CanaryReference
from loader.oci.image import LABEL_CANARY, LABEL_LAYERS, OCI_CONFIG, OCI_MANIFEST
from loader.packer import scan_model_dir

__all__ = ["OciPackResult", "check_flat_model", "pack_oci_layout"]

_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_BLOCK = 8 << 20


class _HashingWriter:
    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return int(self._f.write(data))

    def tell(self) -> int:
        return self.size


class OciPackResult:
    """What was written: the manifest digest (the model identity) and the layout path."""

    def __init__(self, layout: Path, digest: str, layers: int) -> None:
        self.layout, self.digest, self.layers = layout, digest, layers


def _blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _tar_layer(root: Path, src: Path, names: list[str]) -> tuple[str, int]:
    """Write one tar layer of ``names`` (relative to ``src``); return its digest and size."""
    tmp = root / "blobs" / "sha256" / ".layer.tmp"
    with tmp.open("wb") as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name in names:
                path = src / name
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
                info.uname = info.gname = ""
                with path.open("rb") as data:
                    tar.addfile(info, data)
    digest = writer.sha.hexdigest()
    tmp.rename(root / "blobs" / "sha256" / digest)
    return f"sha256:{digest}", writer.size


def check_flat_model(src: Path) -> tuple[list[str], list[str]]:
    """The shards and side files of ``src``, refusing files in subdirectories (cheap: names only).

    ``pack --oci`` calls it before the canary, and :func:`pack_oci_layout` again.

    Raises:
        ConfigError: a file lies in a subdirectory (images carry the model directory's top level).
    """
    shards, plain = scan_model_dir(src)
    nested = [n for n in shards + plain if "/" in n]
    if nested:
        raise ConfigError(
            f"files in subdirectories are not loaded from images: {', '.join(nested[:5])}: move them to "
            "the top of the model directory or leave them out"
        )
    return shards, plain


def pack_oci_layout(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    tag: str = "latest",
    canary: CanaryReference | None = None,
) -> OciPackResult:
    """Write the plain OCI image layout of the Hugging Face model in ``src`` to ``out``.

    ``canary`` (:func:`loader.canary.compute_reference`) goes into a config label, covered by the
    manifest digest the runtime pins.

    Raises:
        ConfigError: ``src`` has no safetensors or no config.json, or ``out`` exists (without
            ``overwrite``).
    """
    shards, plain = check_flat_model(src)
    if not shards or "config.json" not in plain:
        raise ConfigError(f"{src} has no safetensors shards or no config.json")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        layers, roles = [], []
        for role, names in [("files", plain), *(("weights", [s]) for s in shards)]:
            digest, size = _tar_layer(tmp, src, names)
            # An uncompressed layer's digest is its diff_id.
            layers.append({"mediaType": _LAYER_TAR, "digest": digest, "size": size})
            roles.append({"diff_id": digest, "role": role, "files": names})
        labels = {LABEL_LAYERS: json.dumps(roles, separators=(",", ":"))}
        if canary is not None:
            labels[LABEL_CANARY] = json.dumps(canary.to_json(), separators=(",", ":"))
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": [r["diff_id"] for r in roles]},
        }
        c_digest, c_size = _blob(tmp, json.dumps(config, separators=(",", ":")).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": c_digest, "size": c_size},
            "layers": layers,
        }
        m_digest, m_size = _blob(tmp, json.dumps(manifest, separators=(",", ":")).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": m_digest,
                    "size": m_size,
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        (tmp / "index.json").write_text(json.dumps(index, separators=(",", ":")))
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OciPackResult(out, m_digest, len(layers))
