"""The model a boot serves: the native encrypted format, or an encrypted OCI image.

Both give the ``config`` stage an identity (the manifest digest of either kind) and the side
files' names, and the ``key`` stage one operation, :meth:`unlock`, that proves the released key
opens this model and completes the guest-private model view vLLM reads:

* :class:`NativeModel` — the view (side files, manifest) was staged at the config stage; the key
  authenticates the manifest's MAC.
* :class:`ImageModel` — the manifest and config were fetched and checked against the pinned
  digest at the config stage; the key is the image's recipient private key, which must unwrap
  every layer's key, and the side files are read from their (verified) layers into the view.
  At the load stage, :meth:`ImageModel.handoff_secret` authenticates and indexes the weight
  layers in one pass (:mod:`loader.oci.index`) and bundles the index with the key for the
  workers.

Both say what the loader needs through :meth:`loader_source` (typed fields of
:class:`loader.vllm_plugin.EncryptedLoaderConfig`, no file in the view).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol

from foundation.errors import ConfigError, ModelFormatError
from foundation.secret import SecretBytes
from loader.canary import CanaryReference
from loader.manifest import Manifest
from loader.modelview import stage_model_view, write_view_file
from loader.oci.blobs import BlobStore, open_store
from loader.oci.image import OciImage, load_image
from loader.oci.reference import ImageReference

if TYPE_CHECKING:  # torch: imported only once the runtime has set up its private temporary directory
    from loader.oci.layers import LayerKeys

__all__ = [
    "MODEL_SOURCES",
    "ImageModel",
    "Model",
    "ModelOpener",
    "NativeModel",
    "model_scheme",
    "prepare_model",
]


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

    def loader_source(self) -> tuple[str | None, bool]:
        """The loader configuration's image reference and HTTP allowance (a directory: none)."""
        return None, False

    def handoff_secret(self, secret: SecretBytes, *, threads: int, ranks: int) -> SecretBytes:
        """What the key handoff gives the workers: the model key itself."""
        return secret


@dataclass(slots=True)
class ImageModel:
    """An encrypted OCI image, pinned by its manifest digest."""

    reference: ImageReference
    image: OciImage
    store: BlobStore
    view: Path
    allow_http: bool = False
    root: str | None = field(default=None, init=False)
    _keys: LayerKeys | None = field(default=None, init=False, repr=False)

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
        self.root = root
        self._keys = keys

    def loader_source(self) -> tuple[str | None, bool]:
        """The loader configuration's image reference (pinned) and HTTP allowance."""
        return str(self.reference), self.allow_http

    def handoff_secret(self, secret: SecretBytes, *, threads: int, ranks: int) -> SecretBytes:
        """Bundle the key with what the workers need to load the weight layers.

        With tensor parallelism (``ranks`` > 1) and uncompressed layers, the weight layers are
        authenticated and indexed here, in one pass, so that each rank reads only its units; a
        single rank streams each layer once itself (no pass here).

        Raises:
            ModelFormatError / ModelDecryptionError: a weight layer fails its digest or HMAC.
        """
        from loader.oci.index import ImageIndex, handoff_bundle, index_image, indexable, new_index_key

        assert self.root is not None and self._keys is not None, "unlock() first"
        index_key = new_index_key()
        try:
            if ranks > 1 and indexable(self.image):
                index = index_image(
                    self.store,
                    self.image,
                    self._keys.get,
                    root=self.root,
                    index_key=index_key,
                    threads=threads,
                )
            else:
                index = ImageIndex(digest=self.digest, unit_bytes=0, layers=(), root=self.root, streamed=True)
            return handoff_bundle(secret, index_key, index)
        finally:
            index_key.wipe()


#: What ``--model`` opens to: the model source it names.
Model = NativeModel | ImageModel


class ModelOpener(Protocol):
    """Opens one kind of model source for the config stage (see :data:`MODEL_SOURCES`)."""

    def __call__(self, model: str, view: Path, *, allow_http: bool) -> tuple[Model, Path]: ...


def _open_directory(model: str, view: Path, *, allow_http: bool) -> tuple[Model, Path]:
    """A directory written by ``enclave-serve pack``: its view is staged now."""
    if allow_http:
        raise ConfigError("--allow-insecure-http-registry applies to docker:// references only")
    directory = Path(model)
    manifest = Manifest.load(directory)
    return NativeModel(manifest, directory), stage_model_view(directory, manifest, view)


def _open_image(model: str, view: Path, *, allow_http: bool) -> tuple[Model, Path]:
    """An encrypted image (``oci:`` layout or ``docker://`` registry), pinned by digest: its manifest
    and config are fetched and checked now, and the view is created empty (:meth:`ImageModel.unlock`
    fills it)."""
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


#: The model sources by scheme: the one place that chooses how ``--model`` is opened. A new
#: source (another registry protocol, an object store) is one opener and one line here.
MODEL_SOURCES: Final[Mapping[str, ModelOpener]] = MappingProxyType(
    {
        "oci": _open_image,  # oci:/path/to/layout@sha256:…
        "docker": _open_image,  # docker://host/repository@sha256:…
        "directory": _open_directory,  # a directory written by enclave-serve pack
    }
)


def model_scheme(model: str) -> str:
    """The key of :data:`MODEL_SOURCES` that ``model`` names (``oci``, ``docker``, ``directory``)."""
    if model.startswith("oci:"):
        return "oci"
    if model.startswith("docker://"):
        return "docker"
    return "directory"


def prepare_model(model: str, view: Path, *, allow_http: bool = False) -> tuple[Model, Path]:
    """Open the model named by ``model`` for the config stage, by its scheme (:data:`MODEL_SOURCES`).

    Raises:
        ConfigError: a malformed reference, a tag without digest, an unreachable layout.
        ModelFormatError: the manifest, config or a side file fails a check.
    """
    return MODEL_SOURCES[model_scheme(model)](model, view, allow_http=allow_http)
