"""Encrypted OCI images made by the standard tools: ``pack --oci`` → skopeo (EC and RSA
recipients, uncompressed, gzip and zstd layers) → decrypted into tensors, from a layout and from
Debian's docker-registry; and every refusal, each with its reason.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from foundation.errors import ConfigError, ModelDecryptionError, ModelFormatError
from loader.oci.blobs import LayoutStore, RegistryStore, open_store
from loader.oci.image import LABEL_LAYERS, OciImage, load_image
from loader.oci.layers import LayerKeys, image_tensors, read_side_files
from loader.oci.ocicrypt import private_key_from_pem
from loader.oci.packer import pack_oci_layout
from loader.oci.reference import ImageReference
from tests import oci_support as oci
from tests.loader.conftest import as_bytes

pytestmark = pytest.mark.skipif(oci.SKOPEO is None, reason="needs skopeo (apt-get install skopeo)")


def _copy(images: dict[str, tuple[Path, str]], name: str, tmp_path: Path) -> tuple[Path, str]:
    layout, digest = images[name]
    dst = tmp_path / name
    shutil.copytree(layout, dst)
    return dst, digest


def _open(layout: Path, digest: str) -> tuple[LayoutStore, OciImage]:
    store = LayoutStore(layout)
    return store, load_image(store, digest)


def _load(
    store: object, image: OciImage, pem: Path, **kw: object
) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    keys = LayerKeys(image, private_key_from_pem(pem.read_bytes()))
    root, files = read_side_files(store, image, keys)  # type: ignore[arg-type]
    tensors = dict(image_tensors(store, image, keys, root=root, **kw))  # type: ignore[arg-type]
    return files, tensors


# -- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("oci:/models/tiny", "by tag only"),
        ("oci:/models/tiny:latest", "by tag only"),
        ("docker://registry.example/tiny:v1", "by tag only"),
        ("docker://registry.example/tiny:v1@sha256:" + "a" * 64, "without a tag"),
        ("docker://registry.example/tiny@sha256:" + "A" * 64, "64 lower-case hex"),
        ("docker://registry.example/tiny@md5:abc", "64 lower-case hex"),
        ("docker://registry.example@sha256:" + "a" * 64, "docker://HOST"),
        ("https://registry.example/tiny@sha256:" + "a" * 64, "not an image reference"),
    ],
)
def test_references_must_pin_a_manifest_digest(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ImageReference.parse(text)


def test_reference_forms() -> None:
    digest = "sha256:" + "b" * 64
    layout = ImageReference.parse(f"oci:/models/tiny@{digest}")
    assert (layout.transport, layout.layout, layout.digest) == ("oci", Path("/models/tiny"), digest)
    remote = ImageReference.parse(f"docker://localhost:5000/team/tiny@{digest}")
    assert (remote.host, remote.repository, remote.is_loopback) == ("localhost:5000", "team/tiny", True)
    assert not ImageReference.parse(f"docker://registry.example:443/tiny@{digest}").is_loopback
    assert str(remote) == f"docker://localhost:5000/team/tiny@{digest}"
    with pytest.raises(ConfigError, match="localhost"):
        RegistryStore(ImageReference.parse(f"docker://registry.example/tiny@{digest}"), allow_http=True)


# -- pack --oci ----------------------------------------------------------------------------------


def test_pack_oci_writes_one_layer_per_shard_and_labels_them(plain_layout: Path, source_model: Path) -> None:
    digest = oci.index_digest(plain_layout)
    _store, image = _open(plain_layout, digest)
    assert [layer.role for layer in image.layers] == ["files", "weights", "weights", "weights"]
    assert not image.encrypted and image.labelled
    assert set(image.side_files) == {"config.json", "generation_config.json", "tokenizer.json"}
    with tarfile.open(oci.blob(plain_layout, image.layers[1].digest)) as tar:
        (member,) = tar.getmembers()
        assert member.name.endswith(".safetensors") and member.mtime == 0 and member.uid == 0
    again = plain_layout.parent / "again"
    assert pack_oci_layout(source_model, again).digest == digest  # deterministic
    with pytest.raises(ConfigError, match="exists"):
        pack_oci_layout(source_model, again)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [("ec", "ec"), ("rsa-gzip", "rsa"), ("ec-zstd", "ec")])
def test_skopeo_encrypted_images_decrypt_to_the_model(
    images: dict[str, tuple[Path, str]],
    keys: dict[str, oci.Recipient],
    reference: dict[str, torch.Tensor],
    source_model: Path,
    name: str,
    kind: str,
) -> None:
    layout, digest = images[name]
    store, image = _open(layout, digest)
    assert image.encrypted and image.labelled  # skopeo keeps the config, and so the labels
    assert {layer.compression for layer in image.layers} == {name.split("-")[-1] if "-" in name else "none"}
    files, tensors = _load(store, image, keys[kind].private)
    assert files == {n: (source_model / n).read_bytes() for n in image.side_files}
    assert sorted(tensors) == sorted(reference)
    for tensor_name, ref in reference.items():
        assert tensors[tensor_name].dtype == ref.dtype and tensors[tensor_name].shape == ref.shape
        assert as_bytes(tensors[tensor_name]) == as_bytes(ref), tensor_name


def test_an_unlabelled_image_is_scanned_for_its_side_files(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path, source_model: Path
) -> None:
    """An image not written by pack --oci: no labels, side files found by scanning every layer."""
    layout, digest = _copy(images, "ec", tmp_path)
    obj = oci.manifest(layout, digest)
    config_desc = obj["config"]
    assert isinstance(config_desc, dict)
    config = json.loads(oci.blob(layout, str(config_desc["digest"])).read_bytes())
    del config["config"]["Labels"][LABEL_LAYERS]
    data = json.dumps(config).encode()
    import hashlib

    c_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    oci.blob(layout, c_digest).write_bytes(data)
    obj["config"] = {**config_desc, "digest": c_digest, "size": len(data)}
    store, image = _open(layout, oci.write_manifest(layout, obj))
    assert not image.labelled and image.side_files == ()
    files, tensors = _load(store, image, keys["ec"].private)
    assert "config.json" in files and len(tensors) == 14


def test_layers_load_in_parallel_within_a_byte_budget(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], reference: dict[str, torch.Tensor]
) -> None:
    layout, digest = images["ec"]
    store, image = _open(layout, digest)
    _, tensors = _load(store, image, keys["ec"].private, threads=3, budget_bytes=1)
    assert len(tensors) == len(reference)


def test_a_registry_serves_the_same_image(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path, source_model: Path
) -> None:
    registry = oci.Registry(tmp_path)
    try:
        ref = ImageReference.parse(registry.push(images["rsa-gzip"][0], "models/tiny"))
        store = open_store(ref, allow_http=True)
        try:
            image = load_image(store, ref.digest)
            files, tensors = _load(store, image, keys["rsa"].private)
            assert files["config.json"] == (source_model / "config.json").read_bytes() and len(tensors) == 14
            with pytest.raises(ModelFormatError, match="did not serve the manifest"):
                load_image(store, "sha256:" + "0" * 64)
        finally:
            store.close()
    finally:
        registry.stop()


# -- refusals ---------------------------------------------------------------------------------


def test_the_wrong_private_key_unwraps_nothing(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient]
) -> None:
    layout, digest = images["ec"]
    _, image = _open(layout, digest)
    with pytest.raises(ModelDecryptionError, match="unwraps none of its recipients"):
        LayerKeys(image, private_key_from_pem(keys["rsa"].private.read_bytes()))
    with pytest.raises(ModelDecryptionError, match="not a PEM EC or RSA private key"):
        private_key_from_pem(b"0123456789abcdef0123456789abcdef")


def _assert_refused_and_zeroed(
    store: LayoutStore, image: OciImage, pem: Path, error: type[Exception], message: str
) -> None:
    keys = LayerKeys(image, private_key_from_pem(pem.read_bytes()))
    kept: list[torch.Tensor] = []
    with pytest.raises(error, match=message):
        for _name, tensor in image_tensors(store, image, keys, root="", threads=1):
            kept.append(tensor)  # a consumer that keeps references
    assert kept, "the failure must come after tensors of the layer were handed out"
    assert all(not t.reshape(-1).view(torch.uint8).any() for t in kept)  # wiped


@pytest.mark.parametrize("name", ["ec", "rsa-gzip"])
def test_a_layer_failing_its_hmac_is_refused_and_what_it_gave_is_wiped(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path, name: str
) -> None:
    """A consistent image (digests recomputed) whose weight layer's ciphertext was altered."""
    layout, digest = _copy(images, name, tmp_path)
    size = int(str(oci.layer(layout, digest, 3)["size"]))
    tampered = oci.flip_layer_byte(layout, digest, 3, offset=size - 40, redigest=True)
    store, image = _open(layout, tampered)
    _assert_refused_and_zeroed(store, image, keys[name.split("-")[0]].private, ModelDecryptionError, "HMAC")


def test_a_blob_changed_under_its_digest_is_refused(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path
) -> None:
    layout, digest = _copy(images, "ec", tmp_path)
    size = int(str(oci.layer(layout, digest, 3)["size"]))
    oci.flip_layer_byte(layout, digest, 3, offset=size - 40)
    store, image = _open(layout, digest)
    _assert_refused_and_zeroed(
        store, image, keys["ec"].private, ModelFormatError, "does not match its digest"
    )


def test_a_truncated_layer_is_refused(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path
) -> None:
    layout, digest = _copy(images, "ec", tmp_path)
    size = int(str(oci.layer(layout, digest, 3)["size"]))
    oci.truncate_layer(layout, digest, 3, keep=size - 1000)
    store, image = _open(layout, digest)
    with pytest.raises(ModelFormatError, match="truncated"):
        _load(store, image, keys["ec"].private, threads=1)


def test_a_side_file_layer_is_verified_before_its_files_are_used(
    images: dict[str, tuple[Path, str]], keys: dict[str, oci.Recipient], tmp_path: Path
) -> None:
    layout, digest = _copy(images, "ec", tmp_path)
    tampered = oci.flip_layer_byte(layout, digest, 0, offset=100, redigest=True)
    store, image = _open(layout, tampered)
    layer_keys = LayerKeys(image, private_key_from_pem(keys["ec"].private.read_bytes()))
    with pytest.raises(ModelDecryptionError, match="HMAC"):
        read_side_files(store, image, layer_keys)


def test_a_manifest_other_than_the_pin_is_refused(
    images: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    layout, digest = _copy(images, "ec", tmp_path)
    other = images["rsa-gzip"]
    path = oci.blob(layout, digest)
    path.chmod(0o644)
    path.write_bytes(oci.blob(*other).read_bytes())  # the host puts another manifest at the pinned name
    with pytest.raises(ModelFormatError, match="does not match its digest"):
        load_image(LayoutStore(layout), digest)


def test_an_unencrypted_layer_is_refused_where_encryption_is_required(plain_layout: Path) -> None:
    _store, image = _open(plain_layout, oci.index_digest(plain_layout))
    with pytest.raises(ModelFormatError, match="not encrypted"):
        LayerKeys(image, None)


def _rewrite(layout: Path, digest: str, edit: Callable[[dict[str, object]], None]) -> str:
    obj = oci.manifest(layout, digest)
    edit(obj)
    return oci.write_manifest(layout, obj)


def test_docker_media_types_are_refused_with_the_reason(
    images: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    layout, digest = _copy(images, "rsa-gzip", tmp_path)

    def docker_layer(obj: dict[str, object]) -> None:
        layers = obj["layers"]
        assert isinstance(layers, list)
        layers[1]["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted"

    with pytest.raises(ModelFormatError, match="Docker's media type"):
        load_image(LayoutStore(layout), _rewrite(layout, digest, docker_layer))

    def docker_manifest(obj: dict[str, object]) -> None:
        obj["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"

    with pytest.raises(ModelFormatError, match="not an OCI image manifest"):
        load_image(LayoutStore(layout), _rewrite(layout, digest, docker_manifest))

    def odd_layer(obj: dict[str, object]) -> None:
        layers = obj["layers"]
        assert isinstance(layers, list)
        layers[1]["mediaType"] = "application/vnd.cncf.model.weight.v1.raw"

    with pytest.raises(ModelFormatError, match="unsupported media type"):
        load_image(LayoutStore(layout), _rewrite(layout, digest, odd_layer))


def test_an_image_index_is_refused(images: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    layout, digest = _copy(images, "ec", tmp_path)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 1}
        ],
    }
    index_digest = oci.write_manifest(layout, index)
    with pytest.raises(ModelFormatError, match="image index"):
        load_image(LayoutStore(layout), index_digest)


def test_plaintext_weights_among_the_side_files_are_refused(plain_layout: Path, tmp_path: Path) -> None:
    """An image builder puts a pickle beside the model: refused, not served as a side file."""
    import hashlib
    import io

    layout = tmp_path / "plain"
    shutil.copytree(plain_layout, layout)
    digest = oci.index_digest(layout)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("config.json", b"{}"), ("pytorch_model.bin", b"\x80\x02pickle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    oci.blob(layout, new).write_bytes(data)

    def swap(obj: dict[str, object]) -> None:
        layers = obj["layers"]
        assert isinstance(layers, list)
        layers[0] = {**layers[0], "digest": new, "size": len(data)}

    store, image = _open(layout, _rewrite(layout, digest, swap))
    with pytest.raises(ModelFormatError, match=r"pytorch_model\.bin.*plaintext weights"):
        read_side_files(store, image, LayerKeys(image, None, require_encrypted=False))
