"""Real-tool helpers for the OCI tests: recipient keys, skopeo encryption, a loopback registry,
and the host's (or a careless provider's) edits of an image layout.

skopeo and docker-registry are Debian's (``.ci/run`` installs them). The registry runs on
127.0.0.1 with a minimal configuration (no auth, one address), not Debian's default, which
enables htpasswd auth and listens on every interface.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SKOPEO = shutil.which("skopeo")
REGISTRY = shutil.which("docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Recipient:
    """A recipient key pair on disk (PEM): the public half for skopeo, the private for the KBS."""

    private: Path
    public: Path


def make_recipient(root: Path, kind: str) -> Recipient:
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    private, public = root / f"{kind}.key.pem", root / f"{kind}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Recipient(private, public)


def skopeo(*args: str) -> None:
    assert SKOPEO is not None, "skopeo is not installed (apt-get install skopeo)"
    out = subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def index_digest(layout: Path) -> str:
    """The digest of the (only) manifest an OCI layout's index lists."""
    digest: str = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return digest


def encrypt(plain: Path, out: Path, recipient: Recipient, *, compression: str = "none") -> str:
    """``skopeo copy --encryption-key jwe:PUB`` the layout ``plain`` to ``out``; return its digest.

    ``compression``: ``none`` keeps pack --oci's uncompressed layers, ``gzip`` is skopeo's
    default, ``zstd`` asks for zstd.
    """
    extra = {"none": ["--dest-oci-accept-uncompressed-layers"], "gzip": [],
             "zstd": ["--dest-compress-format", "zstd"]}[compression]  # fmt: skip
    skopeo(
        "copy",
        *extra,
        "--encryption-key",
        f"jwe:{recipient.public}",
        f"oci:{plain}:latest",
        f"oci:{out}:latest",
    )
    return index_digest(out)


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def manifest(layout: Path, digest: str) -> dict[str, object]:
    obj: dict[str, object] = json.loads(blob(layout, digest).read_bytes())
    return obj


def write_manifest(layout: Path, obj: dict[str, object]) -> str:
    """Store ``obj`` as a new manifest blob and list it in the index; return its digest."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(layout, digest).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def layer(layout: Path, digest: str, index: int) -> dict[str, object]:
    layers = manifest(layout, digest)["layers"]
    assert isinstance(layers, list)
    entry: dict[str, object] = layers[index]
    return entry


def flip_layer_byte(
    layout: Path, digest: str, index: int, *, offset: int = 600, redigest: bool = False
) -> str:
    """Flip one ciphertext byte of layer ``index``.

    ``redigest=False`` is the host editing a pinned blob (the blob digest catches it).
    ``redigest=True`` also recomputes the blob digest and writes a new manifest (whose digest is
    returned): a *consistent* image whose layer fails only its HMAC, as one built from a
    corrupted encryption would.
    """
    entry = layer(layout, digest, index)
    path = blob(layout, str(entry["digest"]))
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    if not redigest:
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        return digest
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(layout, new).write_bytes(bytes(data))
    obj = manifest(layout, digest)
    layers = obj["layers"]
    assert isinstance(layers, list)
    layers[index] = {**entry, "digest": new, "size": len(data)}
    return write_manifest(layout, obj)


def truncate_layer(layout: Path, digest: str, index: int, *, keep: int = 100) -> None:
    path = blob(layout, str(layer(layout, digest, index)["digest"]))
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:keep])


class Registry:
    """Debian's docker-registry on 127.0.0.1, storing under ``root``."""

    def __init__(self, root: Path) -> None:
        assert REGISTRY is not None, "docker-registry is not installed (apt-get install docker-registry)"
        self.port = free_port()
        config = root / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self._log = (root / "registry.log").open("w")
        self._proc = subprocess.Popen(
            [REGISTRY, "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("docker-registry did not start")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, layout: Path, repository: str) -> str:
        """Push the layout's image; return the ``docker://…@sha256:`` reference of what was pushed."""
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"oci:{layout}:latest",
            f"docker://{self.host}/{repository}:pushed",
        )
        return f"docker://{self.host}/{repository}@{index_digest(layout)}"

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
