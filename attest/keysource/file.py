"""A key source that reads keys from local files. Development only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from attest.keysource.base import KeyRelease, KeySource, KeySourceName
from foundation.errors import ConfigError, ResourceNotFound
from foundation.resource import ResourceUri
from foundation.secret import SecretBytes

__all__ = ["UnsafeFileKeySource"]

logger = logging.getLogger(__name__)

_WARNING = (
    "INSECURE: the model key comes from a local file, not from an attested key release. Anyone "
    "with the file can decrypt the model; never use this outside development."
)


class UnsafeFileKeySource(KeySource):
    """Read the key from ``path``: a file (the key for every resource), or a directory holding
    ``<repository>/<type>/<tag>`` files.

    .. warning::
       **Fundamentally insecure**: no attestation gates the key. Construction requires
       ``allow_insecure=True``; every construction and every fetch logs a warning, and the
       release is marked insecure (:attr:`KeyRelease.insecure`).
    """

    name: ClassVar[KeySourceName] = "file"

    def __init__(self, *, path: Path, allow_insecure: bool = False) -> None:
        if not allow_insecure:
            raise ConfigError(
                "the file key source is insecure (no attestation gates the key); it needs an "
                "explicit insecure flag and is for development only"
            )
        self._path = Path(path)
        logger.warning(_WARNING)

    def fetch(self, resource: ResourceUri) -> KeyRelease:
        """Read the key for ``resource``.

        Raises:
            ResourceNotFound: no such file.
        """
        logger.warning(_WARNING)
        target = (
            self._path / resource.repository / resource.type / resource.tag
            if self._path.is_dir()
            else self._path
        )
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise ResourceNotFound(f"no key file for {resource} at {target}: {exc.strerror}") from exc
        return KeyRelease(secret=SecretBytes(data), resource=resource, source="file", receipt=None)
