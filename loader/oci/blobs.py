"""Blobs by digest, from an OCI image layout or a registry, checked against their digest.

Both stores hand out :class:`VerifiedReader` streams: they hash what they return and fail at
the end of the stream when the bytes are not the descriptor's (size and SHA-256), so nothing
derived from a blob can be *trusted* before its last byte has been read. Small blobs (manifests,
configs) are read whole and checked before they are parsed.

Registry access is the distribution API v2 (``GET /v2/<repo>/manifests/<digest>``,
``GET /v2/<repo>/blobs/<digest>``), anonymous or with an anonymous bearer token, over HTTPS
verified against the system trust store; plain HTTP only for a loopback registry and only with
``allow_http=True``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx

from attest.errors import ConfigError, ModelFormatError
from loader.oci.reference import ImageReference

__all__ = [
    "MANIFEST_MEDIA_TYPES",
    "BlobStore",
    "LayoutStore",
    "RegistryStore",
    "VerifiedReader",
    "open_store",
]

#: What a manifest request accepts (Docker's are accepted only to refuse them with a reason).
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
#: Largest manifest or config read whole.
MAX_SMALL_BLOB = 4 << 20
_READ = 4 << 20
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def _hex(digest: str) -> str:
    match = _DIGEST.fullmatch(digest)
    if not match:
        raise ModelFormatError(f"unsupported digest {digest!r} (sha256 only)")
    return match.group(1)


class VerifiedReader:
    """A stream of exactly ``size`` bytes whose SHA-256 must be ``digest``, checked at the end.

    ``readinto`` fills as much of the buffer as the source gives; at the end of the source it
    raises :class:`ModelFormatError` if the length or the digest differs, naming ``label``.
    """

    def __init__(
        self, chunks: Iterator[bytes] | None, *, digest: str, size: int, label: str, file: Any = None
    ) -> None:
        """Read from ``chunks`` (an iterator of byte strings), or from ``file`` (an unbuffered file
        object: ``readinto`` then fills the caller's buffer directly, with no copy)."""
        self._chunks: Iterator[bytes] = chunks if chunks is not None else iter(())
        self._file = file
        self._want = _hex(digest)
        self._size = size
        self._label = label
        self._hash = hashlib.sha256()
        self._pending = memoryview(b"")
        self._seen = 0
        self._done = False

    @property
    def verified(self) -> bool:
        """Whether the whole blob has been read and matched its digest."""
        return self._done

    def _refill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._seen += len(chunk)
                if self._seen > self._size:
                    raise ModelFormatError(
                        f"{self._label} is longer than its descriptor's {self._size} bytes"
                    )
                self._hash.update(chunk)
                self._pending = memoryview(chunk)
                return True
        if self._seen != self._size:
            raise ModelFormatError(
                f"{self._label} is truncated: {self._seen} of {self._size} bytes (a short or broken stream)"
            )
        if not hmac.compare_digest(self._hash.hexdigest(), self._want):
            raise ModelFormatError(f"{self._label} does not match its digest sha256:{self._want[:12]}…")
        self._done = True
        return False

    def _readinto_file(self, view: memoryview) -> int:
        if self._done:
            return 0
        n = self._file.readinto(view[: max(0, min(len(view), self._size - self._seen + 1))])
        if n:
            self._seen += n
            if self._seen > self._size:
                raise ModelFormatError(f"{self._label} is longer than its descriptor's {self._size} bytes")
            self._hash.update(view[:n])
            return int(n)
        self._refill()  # the end: length and digest
        return 0

    def readinto(self, buf: Any) -> int:
        """Read up to ``len(buf)`` bytes into ``buf``; 0 at the (verified) end."""
        view = memoryview(buf).cast("B")
        if self._file is not None:
            return self._readinto_file(view)
        if not self._pending and (self._done or not self._refill()):
            return 0
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all that is left for ``n < 0``)."""
        if self._file is not None:
            out = bytearray()
            buf = bytearray(_READ if n < 0 else n)
            while n < 0 or len(out) < n:
                got = self._readinto_file(memoryview(buf)[: (_READ if n < 0 else n - len(out))])
                if not got:
                    break
                out += buf[:got]
            return bytes(out)
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self._pending and (self._done or not self._refill()):
                break
            take = len(self._pending) if n < 0 else min(n - len(out), len(self._pending))
            out += self._pending[:take]
            self._pending = self._pending[take:]
        return bytes(out)

    def drain(self) -> None:
        """Read to the end (verifying it)."""
        if self._file is not None:
            buf = memoryview(bytearray(_READ))
            while self._readinto_file(buf):
                pass
            return
        while self._pending or (not self._done and self._refill()):
            self._pending = memoryview(b"")

    def close(self) -> None:
        """Stop reading (the source is closed; nothing is verified)."""
        if self._file is not None:
            self._file.close()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class BlobStore(Protocol):
    """Where an image's blobs come from."""

    def manifest(self, digest: str) -> tuple[bytes, str]:
        """Return the manifest's bytes (checked against ``digest``) and its media type."""
        ...

    def small_blob(self, digest: str, size: int, label: str) -> bytes:
        """Return a small blob, read whole and checked."""
        ...

    def open_blob(self, digest: str, size: int, label: str) -> VerifiedReader:
        """Return a stream of a blob, checked at its end."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _read_small(reader: VerifiedReader, size: int) -> bytes:
    if size > MAX_SMALL_BLOB:
        raise ModelFormatError(f"blob of {size} bytes is too large for a manifest or config")
    data = reader.read(size)
    reader.drain()
    return data


class LayoutStore:
    """An OCI image layout directory: ``blobs/sha256/<hex>`` (the host's files; digests decide)."""

    def __init__(self, root: Path) -> None:
        if not (root / "oci-layout").is_file() or not (root / "blobs" / "sha256").is_dir():
            raise ConfigError(f"{root} is not an OCI image layout (no oci-layout file or blobs/sha256)")
        self.root = root

    def _file(self, digest: str) -> Any:
        path = self.root / "blobs" / "sha256" / _hex(digest)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise ModelFormatError(
                f"blob {digest[:19]}… is missing from the layout ({exc.strerror})"
            ) from None
        return os.fdopen(fd, "rb", buffering=0)

    def _reader(self, digest: str, size: int, label: str) -> VerifiedReader:
        return VerifiedReader(None, digest=digest, size=size, label=label, file=self._file(digest))

    def manifest(self, digest: str) -> tuple[bytes, str]:
        size = _size(self, digest)
        data = _read_small(self._reader(digest, size, f"manifest {digest[:19]}…"), size)
        try:
            import json

            media = json.loads(data).get("mediaType", "")
        except (ValueError, AttributeError):
            media = ""
        return data, str(media)

    def small_blob(self, digest: str, size: int, label: str) -> bytes:
        return _read_small(self._reader(digest, size, label), size)

    def open_blob(self, digest: str, size: int, label: str) -> VerifiedReader:
        return self._reader(digest, size, label)

    def close(self) -> None:
        return None


def _size(store: LayoutStore, digest: str) -> int:
    try:
        return (store.root / "blobs" / "sha256" / _hex(digest)).stat().st_size
    except OSError as exc:
        raise ConfigError(
            f"the manifest {digest} is not in the layout {store.root} ({exc.strerror})"
        ) from None


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryStore:
    """A repository of a registry (distribution API v2)."""

    def __init__(self, ref: ImageReference, *, allow_http: bool = False, timeout_s: float = 60.0) -> None:
        assert ref.host is not None and ref.repository is not None
        if allow_http and not ref.is_loopback:
            raise ConfigError("plain HTTP is allowed only for a registry on this machine (localhost)")
        scheme = "http" if allow_http else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._repository = ref.repository
        # The system trust store (not a bundle shipped in a Python package), no proxy variables.
        verify: ssl.SSLContext | bool = False if allow_http else ssl.create_default_context()
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=True, trust_env=False, verify=verify)
        self._token: str | None = None

    def _get(self, url: str, *, accept: str | None = None, stream: bool = False) -> httpx.Response:
        headers = {"Accept": accept} if accept else {}
        for attempt in range(2):
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            request = self._client.build_request("GET", url, headers=headers)
            try:
                response = self._client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise ModelFormatError(f"the registry did not answer {url}: {type(exc).__name__}") from None
            if response.status_code == 401 and attempt == 0 and self._authenticate(response):
                response.close()
                continue
            if response.status_code != 200:
                response.close()
                raise ModelFormatError(f"the registry answered {response.status_code} for {url}")
            return response
        raise ModelFormatError(f"the registry refused {url} (authentication)")

    def _authenticate(self, response: httpx.Response) -> bool:
        """Fetch an anonymous pull token for a ``Bearer`` challenge; False if there is none."""
        challenge = response.headers.get("WWW-Authenticate", "")
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", None)
        if not realm or not realm.startswith("https://"):
            return False
        params.setdefault("scope", f"repository:{self._repository}:pull")
        try:
            answer = self._client.get(realm, params=params)
            token = answer.json().get("token") or answer.json().get("access_token")
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        self._token = token if isinstance(token, str) else None
        return self._token is not None

    def manifest(self, digest: str) -> tuple[bytes, str]:
        response = self._get(f"{self.base}/manifests/{digest}", accept=", ".join(MANIFEST_MEDIA_TYPES))
        data = response.read()
        if len(data) > MAX_SMALL_BLOB:
            raise ModelFormatError("the manifest is too large")
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), _hex(digest)):
            raise ModelFormatError(f"the registry's manifest does not match the pinned {digest}")
        return data, response.headers.get("Content-Type", "").split(";")[0].strip()

    def _chunks(self, digest: str) -> Iterator[bytes]:
        response = self._get(f"{self.base}/blobs/{digest}", stream=True)
        try:
            yield from response.iter_raw(_READ)
        except httpx.HTTPError as exc:
            raise ModelFormatError(f"the blob stream broke off ({type(exc).__name__})") from None
        finally:
            response.close()

    def small_blob(self, digest: str, size: int, label: str) -> bytes:
        return _read_small(VerifiedReader(self._chunks(digest), digest=digest, size=size, label=label), size)

    def open_blob(self, digest: str, size: int, label: str) -> VerifiedReader:
        return VerifiedReader(self._chunks(digest), digest=digest, size=size, label=label)

    def close(self) -> None:
        self._client.close()


def open_store(ref: ImageReference, *, allow_http: bool = False) -> BlobStore:
    """Return the blob store of ``ref`` (a layout directory, or a registry repository)."""
    if ref.transport == "oci":
        assert ref.layout is not None
        return LayoutStore(ref.layout)
    return RegistryStore(ref, allow_http=allow_http)
