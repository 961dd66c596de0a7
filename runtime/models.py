"""The model a boot serves: the native encrypted format, or an encrypted OCI image.

Both give the ``config`` stage an identity (the manifest digest of either kind) and the side
files' names, and the ``key`` stage one operation, :meth:`unlock`, that proves the released key
opens this model and completes the guest-private model view vLLM reads:

* :class:`NativeModel` — the view (side files, manifest) was staged at the config stage; the key
  authenticates the manifest's MAC.
* :class:`ImageModel` — the manifest and config were fetched and checked against the pinned
  digest at the config stage; the key is the image's recipient private key, which must unwrap
  every layer's key, and the side files are read from their (verified) layers into the view,
  with a marker (:data:`loader.oci.image.VIEW_MARKER`) telling the loader where the weight
  layers are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from foundation.errors import ConfigError, ModelFormatError
from foundation.secret import SecretBytes
from loader.canary import CanaryReference
from loader.manifest import Manifest
from loader.modelview import stage_model_view, write_view_file
from loader.oci.blobs import BlobStore, open_store
from loader.oci.image import VIEW_MARKER, OciImage, load_image
from loader.oci.reference import ImageReference

__all__ = ["ImageModel", "NativeModel", "PreparedModel", "prepare_model"]


class PreparedModel(Protocol):
    """What the stages after ``config`` need of the model."""

    @property
    def digest(self) -> str:
        """The model identity (``sha256:…``), claimed in every attestation document."""
        ...

    @property
    def source(self) -> str:
        """Where it came from, for logs and the attested settings."""
        ...

    @property
    def side_files(self) -> tuple[str, ...]:
        """The side files (config, tokenizer, templates) the view will hold."""
        ...

    @property
    def default_key_id(self) -> str | None:
        """The key resource the model names (None: ``--key-id`` is required)."""
        ...

    @property
    def canary(self) -> CanaryReference | None:
        """The packer's canary reference; for the native format trustworthy only after
        :meth:`unlock` (the manifest MAC covers it), for images from the pinned digest on."""
        ...

    def describe_size(self) -> str:
        """Its size, for the load stage's detail."""
        ...

    def unlock(self, secret: SecretBytes, *, resource: str | None = None) -> None:
        """Check that ``secret`` opens the model and complete the view.

        ``resource`` is the KBS resource the key was released for (named in the refusal).

        Raises:
            ModelDecryptionError: the key does not open it.
            ModelFormatError: a side file or layer fails a check.
        """
        ...


@dataclass(frozen=True, slots=True)
class NativeModel:
    """A directory written by ``enclave-serve pack``."""

    manifest: Manifest
    directory: Path

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def source(self) -> str:
        return str(self.directory)

    @property
    def side_files(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.manifest.plain_files)

    @property
    def default_key_id(self) -> str | None:
        return self.manifest.key_id

    @property
    def canary(self) -> CanaryReference | None:
        return self.manifest.canary

    def describe_size(self) -> str:
        return f"a {self.manifest.plaintext_bytes / 1e6:.3f} MB model"

    def unlock(self, secret: SecretBytes, *, resource: str | None = None) -> None:
        self.manifest.authenticate(secret, resource=resource)


@dataclass(slots=True)
class ImageModel:
    """An encrypted OCI image, pinned by its manifest digest."""

    reference: ImageReference
    image: OciImage
    store: BlobStore
    view: Path
    allow_http: bool = False
    root: str | None = field(default=None, init=False)

    @property
    def digest(self) -> str:
        return self.image.digest

    @property
    def source(self) -> str:
        return str(self.reference)

    @property
    def side_files(self) -> tuple[str, ...]:
        return self.image.side_files

    @property
    def default_key_id(self) -> str | None:
        return None

    @property
    def canary(self) -> CanaryReference | None:
        return self.image.canary

    def describe_size(self) -> str:
        return f"a {self.image.compressed_bytes / 1e6:.3f} MB image ({len(self.image.layers)} layers)"

    def unlock(self, secret: SecretBytes, *, resource: str | None = None) -> None:
        from loader.oci.layers import LayerKeys, read_side_files
        from loader.oci.ocicrypt import private_key_from_pem

        keys = LayerKeys(self.image, private_key_from_pem(secret.reveal()))
        # Labelled images (pack --oci) keep the side files in their own layers; others are scanned.
        layers = (
            [layer for layer in self.image.layers if layer.role == "files"] if self.image.labelled else None
        )
        root, files = read_side_files(self.store, self.image, keys, layers=layers)
        if "config.json" not in files:
            raise ModelFormatError(f"{self.reference} has no config.json in its model directory")
        for name, data in sorted(files.items()):
            write_view_file(self.view, name, data)
        marker = {
            "image": str(self.reference),
            "digest": self.digest,
            "root": root,
            "allow_http": self.allow_http,
        }
        write_view_file(self.view, VIEW_MARKER, json.dumps(marker, sort_keys=True).encode())
        self.root = root


def prepare_model(
    model: str, view: Path, *, allow_http: bool = False
) -> tuple[NativeModel | ImageModel, Path]:
    """Open the model named by ``model`` (a directory or an image reference) for the config stage.

    Native: the view is staged now. Image: the pinned manifest and config are fetched and
    checked, and the view is created empty (:meth:`ImageModel.unlock` fills it).

    Raises:
        ConfigError: a malformed reference, a tag without digest, an unreachable layout.
        ModelFormatError: the manifest, config or a side file fails a check.
    """
    from loader.oci.reference import is_image_reference

    if not is_image_reference(model):
        directory = Path(model)
        manifest = Manifest.load(directory)
        return NativeModel(manifest, directory), stage_model_view(directory, manifest, view)
    reference = ImageReference.parse(model)
    if allow_http and reference.transport != "docker":
        raise ConfigError("--allow-insecure-http-registry applies to docker:// references only")
    store = open_store(reference, allow_http=allow_http)
    image = load_image(store, reference.digest)
    unencrypted = [layer for layer in image.layers if not layer.encrypted]
    if unencrypted:
        raise ModelFormatError(
            f"{unencrypted[0].label} of {reference} is not encrypted ({unencrypted[0].media_type}): "
            "an encrypted image is required (skopeo copy --encryption-key jwe:…)"
        )
    view.mkdir(mode=0o700)
    return ImageModel(reference, image, store, view, allow_http), view
