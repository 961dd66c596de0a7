"""Image references that pin a manifest: ``oci:LAYOUT_DIR@sha256:HEX`` and
``docker://HOST[:PORT]/REPO@sha256:HEX``.

A tag names whatever the host or registry says it names today; only the manifest digest is an
identity. So a reference without ``@sha256:`` is refused, and a tag next to the digest is
refused too (it would suggest a meaning the digest does not have).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import ConfigError

__all__ = ["ImageReference", "is_image_reference"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9a-fA-F:]+\](:[0-9]{1,5})?")
_REPO = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def is_image_reference(text: str) -> bool:
    """Whether ``text`` is meant as an image reference (``oci:`` or ``docker://``)."""
    return text.startswith(("oci:", "docker://"))


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A pinned image: where it is (a layout directory or a registry repository) and its digest."""

    transport: str  # "oci" | "docker"
    digest: str  # "sha256:<hex>" of the image manifest
    layout: Path | None = None
    host: str | None = None
    repository: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse a reference.

        Raises:
            ConfigError: not ``oci:`` / ``docker://``, no digest, a tag, or a malformed part.
        """
        if text.startswith("oci:"):
            rest = text[len("oci:") :]
            path, digest = cls._split_digest(text, rest)
            if not path:
                raise ConfigError(f"{text!r}: the OCI layout directory is missing")
            return cls(transport="oci", digest=digest, layout=Path(path))
        if text.startswith("docker://"):
            rest = text[len("docker://") :]
            name, digest = cls._split_digest(text, rest)
            host, _, repository = name.partition("/")
            if not _HOST.fullmatch(host) or not repository or not _REPO.fullmatch(repository):
                raise ConfigError(f"{text!r}: expected docker://HOST[:PORT]/REPOSITORY@sha256:DIGEST")
            return cls(transport="docker", digest=digest, host=host, repository=repository)
        raise ConfigError(
            f"{text!r} is not an image reference (oci:DIR@sha256:… or docker://HOST/REPO@sha256:…)"
        )

    @staticmethod
    def _split_digest(text: str, rest: str) -> tuple[str, str]:
        name, at, digest = rest.rpartition("@")
        if not at:
            raise ConfigError(
                f"{text!r} names the image by tag only; a tag is whatever the host says it is today. "
                "Pin the manifest: …@sha256:DIGEST (skopeo inspect --raw … | sha256sum)"
            )
        if not _DIGEST.fullmatch(digest):
            raise ConfigError(f"{text!r}: the digest must be sha256: and 64 lower-case hex digits")
        last = name.rsplit("/", 1)[-1]
        if ":" in last and (text.startswith("oci:") or "/" in name):  # NAME:TAG@DIGEST
            raise ConfigError(f"{text!r}: give the digest alone, without a tag")
        return name, digest

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is on this machine (plain HTTP is allowed only there)."""
        if self.host is None:
            return False
        hostname = self.host if self.host.startswith("[") else self.host.rsplit(":", 1)[0]
        return hostname.split("]")[0] + ("]" if hostname.startswith("[") else "") in _LOOPBACK

    def __str__(self) -> str:
        if self.transport == "oci":
            return f"oci:{self.layout}@{self.digest}"
        return f"docker://{self.host}/{self.repository}@{self.digest}"
