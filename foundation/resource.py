"""CoCo resource URIs: ``kbs[+<plugin>]://[<host>:<port>]/<repository>/<type>/<tag>``.

The form is ``guest-components:attestation-agent/docs/RESOURCE_URI.md``: the host and port are
ignored (the KBS is configured separately, hence the usual ``kbs:///default/key/1``), and
``kbs+<plugin>`` names a KBS plugin other than ``resource``. Each path segment must match the
``ResourceDesc`` regex of ``trustee:kbs/src/plugins/implementations/resource/backend.rs``.
Queries and fragments are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["RESOURCE_PLUGIN", "ResourceUri", "validate_resource_path"]

#: The plugin a plain ``kbs://`` URI addresses.
RESOURCE_PLUGIN = "resource"

# ``ResourceDesc::try_from``: ``[a-zA-Z0-9_\-]+[a-zA-Z0-9_\-\.]*`` per segment.
_SEGMENT = re.compile(r"[A-Za-z0-9_\-]+[A-Za-z0-9_\-.]*")
_PLUGIN = re.compile(r"[a-z0-9][a-z0-9_\-]*")


def validate_resource_path(path: str) -> tuple[str, str, str]:
    """Split ``repository/type/tag`` and check each segment as Trustee does.

    Raises:
        ValueError: not exactly three segments, or a segment Trustee would refuse.
    """
    parts = path.split("/")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"resource path {path!r} must be <repository>/<type>/<tag>, each segment made of "
            "letters, digits, '_', '-' and '.' (not starting with '.')"
        )
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class ResourceUri:
    """A KBS resource address, e.g. ``kbs:///default/llama-3/key``.

    Use :meth:`parse`; :attr:`path` is ``repository/type/tag`` and ``str()`` gives the URI back
    in its canonical, host-less form.
    """

    repository: str
    type: str
    tag: str
    plugin: str = RESOURCE_PLUGIN

    def __post_init__(self) -> None:
        validate_resource_path(f"{self.repository}/{self.type}/{self.tag}")
        if not _PLUGIN.fullmatch(self.plugin):
            raise ValueError(f"invalid KBS plugin name {self.plugin!r}")

    @classmethod
    def parse(cls, uri: str) -> ResourceUri:
        """Parse ``kbs:///repo/type/tag`` (host and port, if any, are ignored).

        Raises:
            ValueError: not a ``kbs`` / ``kbs+<plugin>`` URI with a three-segment path.
        """
        parts = urlsplit(uri)
        scheme = parts.scheme
        if scheme == "kbs":
            plugin = RESOURCE_PLUGIN
        elif scheme.startswith("kbs+") and len(scheme) > 4:
            plugin = scheme[4:]
        else:
            raise ValueError(f"{uri!r} is not a KBS resource URI (expected kbs:///<repository>/<type>/<tag>)")
        if parts.query or parts.fragment or "?" in uri or "#" in uri:
            raise ValueError(f"{uri!r}: queries and fragments are not supported in resource URIs")
        repository, type_, tag = validate_resource_path(parts.path.removeprefix("/"))
        return cls(repository=repository, type=type_, tag=tag, plugin=plugin)

    @classmethod
    def from_path(cls, path: str) -> ResourceUri:
        """Build the URI of the ``resource`` plugin path ``repository/type/tag``.

        Raises:
            ValueError: the path is not three valid segments.
        """
        repository, type_, tag = validate_resource_path(path)
        return cls(repository=repository, type=type_, tag=tag)

    @property
    def path(self) -> str:
        """Return ``repository/type/tag``."""
        return f"{self.repository}/{self.type}/{self.tag}"

    @property
    def kbs_path(self) -> str:
        """Return the request path on a KBS, ``/kbs/v0/<plugin>/<repository>/<type>/<tag>``."""
        return f"/kbs/v0/{self.plugin}/{self.path}"

    def __str__(self) -> str:
        scheme = "kbs" if self.plugin == RESOURCE_PLUGIN else f"kbs+{self.plugin}"
        return f"{scheme}:///{self.path}"
