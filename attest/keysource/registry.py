"""Choose a key source by the scheme of its address: one factory for the boot and ``kbs fetch``.

Modelled on securesystemslib's ``SIGNER_FOR_URI_SCHEME``: a literal registry keyed by the typed
scheme (:data:`attest.keysource.base.KeySourceName`), and one function that parses the address
and builds the source. The scheme names the *source*; the part after ``+`` the transport::

    kbs+https://HOST[:PORT]      a Trustee KBS (RCAR), the enclave attests itself   KbsKeySource
    kbs+http://HOST[:PORT]       the same over plain HTTP (a development KBS)       KbsKeySource
    cdh+http://127.0.0.1:8006    the CoCo Confidential Data Hub (pod-local)        CdhKeySource
    file:///PATH                 a key file or directory: INSECURE, needs a flag   UnsafeFileKeySource

The transport is spelled out (``kbs+https``, not ``kbs``) because ``kbs:///repo/type/tag`` is
already the *resource* URI (:class:`foundation.resource.ResourceUri`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit

from attest.kbs.client import TokenTransport
from attest.kbs.teekey import TeeKeyKind
from attest.keysource.base import KeySource, KeySourceName
from attest.keysource.cdh import CdhKeySource
from attest.keysource.file import UnsafeFileKeySource
from attest.keysource.kbs import KbsKeySource
from attest.tee.attester import Attester, DeviceAttester
from foundation.errors import ConfigError

__all__ = [
    "KEY_SOURCE_FOR_URI_SCHEME",
    "KeySourceFactory",
    "KeySourceSpec",
    "key_source_for",
]

#: The address forms :func:`key_source_for` accepts, for error messages.
_FORMS = "kbs+https://HOST, kbs+http://HOST, cdh+http://127.0.0.1:8006 or file:///PATH"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySourceSpec:
    """Where the model key comes from, and how to ask: the address plus the source's options.

    Built by the boot from :class:`runtime.config.RunConfig` and by ``enclave-serve kbs fetch``
    from its flags; equal specs build the same source. Holds no secret (the init-data is public).
    """

    #: The key source's address; its scheme picks the source (module docstring).
    uri: str
    #: KBS: the PEM CA bundle its TLS certificate must chain to (None: the system's).
    cacert: Path | None = None
    #: KBS: the CoCo init-data sent with the evidence (None: none).
    init_data: bytes | None = None
    #: KBS: the ephemeral TEE key's type.
    tee_key: TeeKeyKind = "ec"
    #: KBS: how the attestation token is sent back.
    token_transport: TokenTransport = "cookie"
    #: KBS: the overall deadline of one fetch, in seconds.
    deadline_s: float = 60.0
    #: ``file://`` only: the explicit development opt-in (the source refuses without it).
    allow_insecure_file: bool = False

    @classmethod
    def kbs(
        cls,
        url: str,
        *,
        cacert: Path | None = None,
        init_data: bytes | None = None,
        tee_key: TeeKeyKind = "ec",
        token_transport: TokenTransport = "cookie",
        deadline_s: float = 60.0,
    ) -> KeySourceSpec:
        """The spec of a Trustee KBS at ``url`` (``http(s)://HOST[:PORT]``)."""
        return cls(
            uri=f"kbs+{url}",
            cacert=cacert,
            init_data=init_data,
            tee_key=tee_key,
            token_transport=token_transport,
            deadline_s=deadline_s,
        )

    @classmethod
    def cdh(cls, url: str) -> KeySourceSpec:
        """The spec of the CoCo CDH's REST endpoint at ``url``."""
        return cls(uri=f"cdh+{url}")

    @classmethod
    def file(cls, path: Path, *, allow_insecure: bool) -> KeySourceSpec:
        """The spec of a local key file or directory (insecure: see :class:`UnsafeFileKeySource`)."""
        return cls(uri=Path(path).absolute().as_uri(), allow_insecure_file=allow_insecure)

    @property
    def scheme(self) -> str:
        """The source's scheme (``kbs``, ``cdh``, ``file``; anything else is refused when built)."""
        head, _, _ = self.uri.partition("://")
        return head.partition("+")[0]


class KeySourceFactory(Protocol):
    """Build the key source for ``spec``; the KBS attests with ``attester`` and ``devices``."""

    def __call__(
        self, spec: KeySourceSpec, *, attester: Attester | None, devices: Sequence[DeviceAttester]
    ) -> KeySource: ...


class _Builder(Protocol):
    def __call__(
        self,
        spec: KeySourceSpec,
        location: str,
        *,
        attester: Attester | None,
        devices: Sequence[DeviceAttester],
    ) -> KeySource: ...


def _http_location(spec: KeySourceSpec, transport: str, rest: str) -> str:
    if transport not in ("http", "https"):
        raise ConfigError(
            f"key source {spec.uri!r}: say the transport, {spec.scheme}+https:// or {spec.scheme}+http://"
        )
    return f"{transport}://{rest}"


def _kbs(
    spec: KeySourceSpec, location: str, *, attester: Attester | None, devices: Sequence[DeviceAttester]
) -> KeySource:
    if attester is None:
        raise ConfigError(f"the KBS key source ({spec.uri}) attests this machine: it needs its attester")
    return KbsKeySource(
        url=location,
        attester=attester,
        devices=devices,
        cacert=spec.cacert,
        init_data=spec.init_data,
        tee_key=spec.tee_key,
        token_transport=spec.token_transport,
        deadline_s=spec.deadline_s,
    )


def _cdh(
    spec: KeySourceSpec, location: str, *, attester: Attester | None, devices: Sequence[DeviceAttester]
) -> KeySource:
    return CdhKeySource(url=location)


def _file(
    spec: KeySourceSpec, location: str, *, attester: Attester | None, devices: Sequence[DeviceAttester]
) -> KeySource:
    return UnsafeFileKeySource(path=Path(location), allow_insecure=spec.allow_insecure_file)


#: The key sources by scheme: the one switch on the kind of key source.
KEY_SOURCE_FOR_URI_SCHEME: Final[Mapping[KeySourceName, _Builder]] = MappingProxyType(
    {"kbs": _kbs, "cdh": _cdh, "file": _file}
)


def _location(spec: KeySourceSpec) -> tuple[KeySourceName, str]:
    """Split ``spec.uri`` into its source's name and the address that source takes."""
    head, sep, rest = spec.uri.partition("://")
    scheme, _, transport = head.partition("+")
    if not sep or scheme not in KEY_SOURCE_FOR_URI_SCHEME:
        raise ConfigError(f"unknown key source {spec.uri!r}: the address must be one of {_FORMS}")
    if scheme == "kbs":
        return "kbs", _http_location(spec, transport, rest)
    if scheme == "cdh":
        return "cdh", _http_location(spec, transport, rest)
    parts = urlsplit(spec.uri)
    if transport or parts.netloc not in ("", "localhost") or not parts.path:
        raise ConfigError(f"key source {spec.uri!r}: a file key source is file:///ABSOLUTE/PATH")
    return "file", unquote(parts.path)


def key_source_for(
    spec: KeySourceSpec, *, attester: Attester | None = None, devices: Sequence[DeviceAttester] = ()
) -> KeySource:
    """Build the key source ``spec.uri``'s scheme names, with ``spec``'s options.

    Does no I/O (the KBS attests at its first fetch). The file source still needs
    ``spec.allow_insecure_file`` and warns at every use.

    Raises:
        ConfigError: an unknown scheme or a malformed address (the message lists the forms), a
            KBS without an attester, a file source without the insecure flag, a CDH off loopback.
    """
    scheme, location = _location(spec)
    return KEY_SOURCE_FOR_URI_SCHEME[scheme](spec, location, attester=attester, devices=devices)
