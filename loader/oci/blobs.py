"""Blobs by digest, from an OCI image layout or a registry, checked against their digest.

Both stores hand out :class:`VerifiedReader` streams: they hash what they return and fail at
the end of the stream when the bytes are not the descriptor's (size and SHA-256), so nothing
derived from a blob can be *trusted* before its last byte has been read. Small blobs (manifests,
configs) are read whole and checked before they are parsed.

Registry access is the distribution API v2 (``GET /v2/<repo>/manifests/<digest>``,
``GET /v2/<repo>/blobs/<digest>``), anonymous or with an anonymous bearer token, over HTTPS
verified against the system trust store; plain HTTP only for a loopback registry and only with
``allow_http=True``.

The registry is the host's, and so is the network: the client goes nowhere the image does not
live (:class:`RegistryStore` lists the rules). Redirects are followed by this module, not by
httpx; the bearer token never leaves the registry's origin; and what an error says (which
reaches the public readiness reason) names no URL, status or length: the log has those.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.cookiejar
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import httpcore
import httpx

from foundation.errors import ConfigError, ModelFormatError
from loader.oci.reference import ImageReference

__all__ = [
    "MANIFEST_MEDIA_TYPES",
    "MAX_REDIRECTS",
    "BlobDigest",
    "BlobStore",
    "LayoutStore",
    "Network",
    "RegistryStore",
    "SystemNetwork",
    "VerifiedReader",
    "is_public_address",
    "open_store",
]

logger = logging.getLogger(__name__)

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


class BlobDigest:
    """A blob's SHA-256, fed by whoever reads it (see :meth:`VerifiedReader.detach_hash`)."""

    def __init__(self, want: str, label: str) -> None:
        self._want = want
        self._label = label
        self._hash = hashlib.sha256()

    def update(self, data: Any) -> None:
        """Hash the next bytes of the blob (every byte, in order)."""
        self._hash.update(data)

    def verify(self) -> None:
        """Raise :class:`ModelFormatError` unless the bytes hashed are the blob's."""
        if not hmac.compare_digest(self._hash.hexdigest(), self._want):
            raise ModelFormatError(f"{self._label} does not match its digest sha256:{self._want[:12]}…")


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
        self._detached: BlobDigest | None = None

    def detach_hash(self) -> BlobDigest:
        """Stop hashing in ``readinto`` (the length is still checked at the end): the caller must
        feed every byte it reads, in order, to the returned :class:`BlobDigest` (on a thread of its
        own, say) and call its ``verify`` after the end. Only before the first read."""
        if self._seen or self._detached is not None:
            raise RuntimeError("detach_hash() must come before the first read")
        self._detached = BlobDigest(self._want, self._label)
        return self._detached

    @property
    def verified(self) -> bool:
        """Whether the whole blob has been read and matched its digest."""
        return self._done

    def _refill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._seen += len(chunk)
                if self._seen > self._size:
                    self._too_long()
                if self._detached is None:
                    self._hash.update(chunk)
                self._pending = memoryview(chunk)
                return True
        if self._seen != self._size:
            logger.warning("%s ended after %d of its %d bytes", self._label, self._seen, self._size)
            raise ModelFormatError(
                f"{self._label} is truncated (a short or broken stream; the log has the sizes)"
            )
        if self._detached is None and not hmac.compare_digest(self._hash.hexdigest(), self._want):
            raise ModelFormatError(f"{self._label} does not match its digest sha256:{self._want[:12]}…")
        self._done = True
        return False

    def _too_long(self) -> NoReturn:
        logger.warning("%s has more than its %d bytes", self._label, self._size)
        raise ModelFormatError(f"{self._label} is longer than its descriptor says")

    def _readinto_file(self, view: memoryview) -> int:
        if self._done:
            return 0
        n = self._file.readinto(view[: max(0, min(len(view), self._size - self._seen + 1))])
        if n:
            self._seen += n
            if self._seen > self._size:
                self._too_long()
            if self._detached is None:
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

    def read_range(self, digest: str, offset: int, out: memoryview, label: str) -> None:
        """Fill ``out`` with the blob's bytes at ``offset``, **unchecked** (the caller checks them:
        :mod:`loader.oci.index`). Thread-safe. Raises :class:`ModelFormatError` (short, refused)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _read_small(reader: VerifiedReader, size: int) -> bytes:
    if size > MAX_SMALL_BLOB:
        raise ModelFormatError("a manifest or config larger than 4 MiB is refused")
    data = reader.read(size)
    reader.drain()
    return data


class LayoutStore:
    """An OCI image layout directory: ``blobs/sha256/<hex>`` (the host's files; digests decide)."""

    def __init__(self, root: Path) -> None:
        if not (root / "oci-layout").is_file() or not (root / "blobs" / "sha256").is_dir():
            raise ConfigError(
                "the model is not an OCI image layout (no oci-layout file or blobs/sha256)",
                log_detail=str(root),
            )
        self.root = root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _file(self, digest: str) -> Any:
        path = self.root / "blobs" / "sha256" / _hex(digest)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise ModelFormatError(
                f"blob {digest[:19]}… cannot be read from the layout", log_detail=f"{path}: {exc.strerror}"
            ) from None
        return os.fdopen(fd, "rb", buffering=0)

    def _reader(self, digest: str, size: int, label: str) -> VerifiedReader:
        return VerifiedReader(None, digest=digest, size=size, label=label, file=self._file(digest))

    def manifest(self, digest: str) -> tuple[bytes, str]:
        size = _size(self, digest)
        data = _read_small(self._reader(digest, size, f"manifest {digest[:19]}…"), size)
        try:
            media = json.loads(data).get("mediaType", "")
        except (ValueError, AttributeError):
            media = ""
        return data, str(media)

    def small_blob(self, digest: str, size: int, label: str) -> bytes:
        return _read_small(self._reader(digest, size, label), size)

    def open_blob(self, digest: str, size: int, label: str) -> VerifiedReader:
        return self._reader(digest, size, label)

    def read_range(self, digest: str, offset: int, out: memoryview, label: str) -> None:
        with self._lock:
            fd = self._fds.get(digest)
            if fd is None:
                with self._file(digest) as f:
                    fd = self._fds[digest] = os.dup(f.fileno())
        got = 0
        while got < len(out):
            n = os.preadv(fd, [out[got:]], offset + got)
            if n <= 0:
                raise ModelFormatError(f"{label} is truncated (a short read)")
            got += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _size(store: LayoutStore, digest: str) -> int:
    try:
        return (store.root / "blobs" / "sha256" / _hex(digest)).stat().st_size
    except OSError as exc:
        raise ConfigError(
            f"the manifest {digest} cannot be read from the layout",
            log_detail=f"{store.root}: {exc.strerror}",
        ) from None


# -- the registry: where the client may go -----------------------------------------------------

#: Most redirects one request follows: a registry sends a blob to its storage or CDN with one,
#: and a CDN may add one more.
MAX_REDIRECTS = 5
#: The redirect statuses (RFC 9110, section 15.4); every request here is a GET, which all keep.
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: NAT64's well-known prefix (RFC 6052, section 2.1): its last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: This machine's names: plain HTTP, and the development registry's token realm, only here.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Largest token-service answer read (a token is a few KiB).
_MAX_TOKEN_RESPONSE = 64 << 10
#: A bearer token as it may go into a header: printable ASCII, no space (RFC 6750, section 2.1
#: is narrower), bounded.
_TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
#: What a refused destination says in public; the log says which and why.
_REFUSED = "the registry sent the client somewhere the image may not come from (refused; the log says where)"
_UNREACHABLE = "the registry could not be reached, or the connection broke off (the log has the detail)"

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public_address(address: str) -> bool:
    """Return whether ``address`` (an IP literal) is one the registry client may be sent to.

    Only globally routable unicast addresses are. Not: loopback, link-local (the cloud metadata
    service), private (RFC 1918; IPv6 unique-local and site-local), shared (100.64.0.0/10),
    unspecified, multicast, reserved and documentation addresses, nor an IPv6 address that
    carries an IPv4 address which is not (IPv4-mapped, 6to4, Teredo, NAT64's well-known prefix).
    What does not parse is not.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    carried: list[_Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if wrapped is not None:  # the IPv6 form only carries it: the IPv4 address is the destination
            return _globally_routable(wrapped)
        carried += [inner for inner in (ip.sixtofour, *(ip.teredo or ())) if inner is not None]
    return all(_globally_routable(each) for each in carried)


def _globally_routable(ip: _Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global and not (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
    )


class Network(Protocol):
    """Names to addresses, addresses to connections: the registry client's only way out.

    A seam (the network is a parameter): :class:`SystemNetwork` is this machine's resolver and
    TCP; tests pass a loopback network with names of their own.
    """

    def resolve(self, host: str, port: int) -> Sequence[str]:
        """Return every address ``host`` resolves to, as IP literals.

        Raises:
            OSError: the name does not resolve.
        """
        ...

    def connect(self, address: str, port: int, timeout: float | None) -> httpcore.NetworkStream:
        """Open a TCP connection to ``address`` (an IP literal).

        Raises:
            httpcore.ConnectError, httpcore.ConnectTimeout: the connection could not be opened.
        """
        ...


class SystemNetwork:
    """This machine's resolver (``getaddrinfo``: the host answers it) and TCP stack."""

    def __init__(self) -> None:
        self._tcp = httpcore.SyncBackend()

    def resolve(self, host: str, port: int) -> Sequence[str]:
        """Return every address ``getaddrinfo`` gives for ``host``, in its order."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def connect(self, address: str, port: int, timeout: float | None) -> httpcore.NetworkStream:
        """Open a TCP connection to ``address``."""
        return self._tcp.connect_tcp(address, port, timeout=timeout)


class _NotPublic(Exception):
    """A host the client may not go to; the message is for the log only."""


def _addresses(network: Network, host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]  # a literal is itself
    except ValueError:
        pass
    try:
        return list(network.resolve(host, port))
    except (OSError, UnicodeError) as exc:
        raise _NotPublic(f"{host} does not resolve ({type(exc).__name__})") from None


def _public_addresses(network: Network, host: str, port: int) -> list[str]:
    """Return the addresses of ``host``, each one public (every one is checked, not the first)."""
    addresses = _addresses(network, host, port)
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise _NotPublic(f"{host} resolves to {', '.join(addresses) or 'nothing'}, not only public addresses")
    return addresses


class _PinnedBackend(httpcore.NetworkBackend):
    """Open each connection to an address checked as it is opened (against DNS rebinding).

    A host in ``trusted`` (the registry named by the attested reference; localhost for the
    development registry) is connected wherever it resolves: TLS proves its name. Any other name
    is resolved once, here, every address it resolves to must be public, and the socket goes to
    one of those addresses: the name cannot say "public" to the check and "loopback" to the
    connection.
    """

    def __init__(self, network: Network, trusted: frozenset[str]) -> None:
        self._network = network
        self._trusted = trusted

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            if host in self._trusted:
                addresses = _addresses(self._network, host, port)
            else:
                addresses = _public_addresses(self._network, host, port)
        except _NotPublic as exc:
            if host in self._trusted:
                raise httpcore.ConnectError(str(exc)) from None
            logger.warning("refused to connect to %s:%d: %s", host, port, exc)
            raise ModelFormatError(_REFUSED) from None
        error: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return self._network.connect(address, port, timeout)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Turn httpcore's errors into httpx's (what callers of an httpx transport expect)."""
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise httpx.TimeoutException(type(exc).__name__) from exc
    except (
        httpcore.NetworkError,
        httpcore.ProtocolError,
        httpcore.UnsupportedProtocol,
        httpcore.ProxyError,
    ) as exc:
        raise httpx.TransportError(type(exc).__name__) from exc


class _Stream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _Transport(httpx.BaseTransport):
    """httpx over an httpcore pool whose connections open through :class:`_PinnedBackend`
    (httpx's own transport does not take a network backend)."""

    def __init__(self, pool: httpcore.ConnectionPool) -> None:
        self._pool = pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = self._pool.handle_request(core)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Stream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    """(scheme, host, port), the port filled in (RFC 6454, section 4)."""
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _loggable(url: httpx.URL) -> str:
    """The URL without its user name, query or fragment (a CDN's signed query stays out of logs)."""
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


def _read_at_most(response: httpx.Response, limit: int) -> bytes | None:
    """Read a streamed response whole, or return None once it passes ``limit`` bytes."""
    data = bytearray()
    try:
        for chunk in response.iter_raw():
            data += chunk
            if len(data) > limit:
                return None
    except httpx.HTTPError as exc:
        logger.warning("reading %s broke off: %s", _loggable(response.url), type(exc).__name__)
        raise ModelFormatError(_UNREACHABLE) from None
    return bytes(data)


class RegistryStore:
    """A repository of a registry (distribution API v2), reached only where the image lives.

    The registry and the network are the host's. What the client does with their answers:

    1. It follows redirects itself (not httpx), at most :data:`MAX_REDIRECTS` per request. One
       within the registry's origin (scheme, host, port) is followed, over plain HTTP too for the
       development registry on localhost. One to another origin (a registry sends blobs to its
       storage or CDN) must be ``https``, name no user, and lead to a host every address of which
       is public (:func:`is_public_address`; an IP literal is checked as it is).
    2. A connection to any host but the registry's goes to an address checked as the connection
       opens (:class:`_PinnedBackend`): a name resolved once, so DNS rebinding between the check
       and the connection does not reach loopback.
    3. The bearer token goes to the registry's origin only: a request to another origin carries
       no ``Authorization`` header. Cookies are refused; no proxy or ``.netrc`` is read.
    4. A ``Bearer`` challenge's realm must be ``https`` on the registry's host (for the
       development registry, also plain HTTP on localhost); the token request carries no
       credentials, and its answer is read up to 64 KiB.
    5. Errors name what failed in fixed words, never a URL, a status or a size: they reach the
       public readiness reason. The log has the detail (never the token, nor a signed query).

    Not checked: where the registry named in the reference resolves. It is the attested choice
    and may sit on a private network; HTTPS proves its name, and plain HTTP is only for loopback.
    A registry whose token service is on another host (Docker Hub's ``auth.docker.io``) cannot
    hand out a token here: pull from a registry (or a mirror) that serves its own.

    Warning:
        ``ssl_context`` and ``network`` are seams for tests. A context that does not verify
        certificates lets anyone answer for the registry.
    """

    def __init__(
        self,
        ref: ImageReference,
        *,
        allow_http: bool = False,
        timeout_s: float = 60.0,
        network: Network | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert ref.host is not None and ref.repository is not None
        if allow_http and not ref.is_loopback:
            raise ConfigError("plain HTTP is allowed only for a registry on this machine (localhost)")
        scheme = "http" if allow_http else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._repository = ref.repository
        self._allow_http = allow_http
        self._network: Network = network if network is not None else SystemNetwork()
        self._origin = _origin(httpx.URL(self.base))
        trusted = frozenset({self._origin[1]} | (_LOOPBACK_HOSTS if allow_http else set()))
        # The system trust store (not a bundle shipped in a Python package); every connection
        # through the pinned backend; no proxy variables, no cookies, no redirects by httpx; and
        # the bytes as sent (digests are of the blob, not of a decoded stream).
        pool = httpcore.ConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else ssl.create_default_context(),
            network_backend=_PinnedBackend(self._network, trusted),
        )
        self._client = httpx.Client(
            transport=_Transport(pool),
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
            headers={"Accept-Encoding": "identity"},
        )
        self._token: str | None = None

    def _url(self, kind: str, digest: str) -> httpx.URL:
        _hex(digest)  # nothing but sha256:<hex> goes into the path
        return httpx.URL(f"{self.base}/{kind}/{digest}")

    def _send(
        self,
        url: httpx.URL,
        *,
        accept: str | None = None,
        credentials: bool = True,
        byte_range: tuple[int, int] | None = None,
    ) -> httpx.Response:
        """GET ``url``, following redirects under the rules above; return the last answer, streamed.

        Raises:
            ModelFormatError: unreachable, a redirect refused, or too many (fixed words).
        """
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": accept} if accept else {}
            if byte_range is not None:
                headers["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
            if credentials and self._token is not None and _origin(url) == self._origin:
                headers["Authorization"] = f"Bearer {self._token}"
            try:
                response = self._client.send(
                    self._client.build_request("GET", url, headers=headers), stream=True
                )
            except httpx.HTTPError as exc:
                logger.warning("the request for %s failed: %s", _loggable(url), type(exc).__name__)
                raise ModelFormatError(_UNREACHABLE) from None
            if response.status_code not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.close()
            url = self._redirect(url, location)
        logger.warning("refused %s: more than %d redirects", _loggable(url), MAX_REDIRECTS)
        raise ModelFormatError("the registry redirected a request too many times (refused)")

    def _redirect(self, current: httpx.URL, location: str | None) -> httpx.URL:
        """Return where a redirect from ``current`` leads, if the client may go there.

        Raises:
            ModelFormatError: it may not (the log says where and why).
        """
        target: httpx.URL | None = None
        why = ""
        try:
            target = current.join(location) if location else None
        except (httpx.InvalidURL, ValueError, UnicodeError):
            target = None
        if target is None:
            why = "no or a malformed Location"
        elif target.userinfo:
            why = "a user name in the URL"
        elif _origin(target) == self._origin:
            return target.copy_with(fragment=None)  # the registry's own origin
        elif target.scheme != "https":
            why = "another origin, and not https"
        elif not target.host:
            why = "no host"
        else:
            try:
                _public_addresses(self._network, target.host, _origin(target)[2])
                logger.info("following the registry's redirect to %s", _loggable(target))
                return target.copy_with(fragment=None)
            except _NotPublic as exc:
                why = str(exc)
        where = _loggable(target) if target is not None else repr((location or "")[:200])
        logger.warning("refused the redirect from %s to %s: %s", _loggable(current), where, why)
        raise ModelFormatError(_REFUSED)

    def _get(
        self,
        url: httpx.URL,
        what: str,
        *,
        accept: str | None = None,
        byte_range: tuple[int, int] | None = None,
    ) -> httpx.Response:
        """GET ``url`` (a bearer challenge answered once); return the 200 answer, streamed.

        Raises:
            ModelFormatError: any other answer (the status is logged, not said).
        """
        response = self._send(url, accept=accept, byte_range=byte_range)
        if response.status_code == 401:
            try:
                retry = self._authenticate(response)
            finally:
                response.close()
            if retry:
                response = self._send(url, accept=accept, byte_range=byte_range)
        if response.status_code != (200 if byte_range is None else 206):
            logger.warning("the registry answered %d for %s", response.status_code, _loggable(response.url))
            response.close()
            raise ModelFormatError(f"the registry did not serve {what} (the log has the detail)")
        return response

    def _realm(self, text: str) -> httpx.URL | None:
        """Return the challenge's token service if the client may ask it, else None (logged)."""
        try:
            realm: httpx.URL | None = httpx.URL(text)
        except (httpx.InvalidURL, ValueError, UnicodeError):
            realm = None
        if (
            realm is not None
            and not realm.userinfo
            and (
                (realm.scheme == "https" and realm.host == self._origin[1])
                or (self._allow_http and realm.scheme in ("http", "https") and realm.host in _LOOPBACK_HOSTS)
            )
        ):
            return realm
        where = _loggable(realm) if realm is not None else repr(text[:200])
        logger.warning(
            "refused the token realm %s: not https on the registry's host %s", where, self._origin[1]
        )
        return None

    def _authenticate(self, response: httpx.Response) -> bool:
        """Fetch an anonymous pull token for a ``Bearer`` challenge; False if there is none.

        Raises:
            ModelFormatError: the token service is unreachable or redirects where it may not.
        """
        challenge = response.headers.get("WWW-Authenticate", "")
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(_CHALLENGE.findall(challenge))
        realm = self._realm(params.get("realm", ""))
        if realm is None:
            return False
        query = {k: params[k] for k in ("service", "scope") if k in params}
        query.setdefault("scope", f"repository:{self._repository}:pull")
        answer = self._send(realm.copy_merge_params(query), accept="application/json", credentials=False)
        try:
            body = _read_at_most(answer, _MAX_TOKEN_RESPONSE) if answer.status_code == 200 else None
        finally:
            answer.close()
        token: object = None
        try:
            obj = json.loads(body) if body is not None else None
            token = obj.get("token") or obj.get("access_token") if isinstance(obj, dict) else None
        except ValueError:
            pass
        self._token = token if isinstance(token, str) and _TOKEN.fullmatch(token) else None
        if self._token is None:
            logger.warning(
                "the token service %s answered %d without a usable token",
                _loggable(realm),
                answer.status_code,
            )
        return self._token is not None

    def manifest(self, digest: str) -> tuple[bytes, str]:
        what = f"the manifest {digest[:19]}…"
        response = self._get(self._url("manifests", digest), what, accept=", ".join(MANIFEST_MEDIA_TYPES))
        try:
            data = _read_at_most(response, MAX_SMALL_BLOB)
            served = response.headers.get("Content-Type", "").split(";")[0].strip()
        finally:
            response.close()
        if data is None:
            raise ModelFormatError(f"{what} from the registry is larger than 4 MiB")
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), _hex(digest)):
            raise ModelFormatError(f"the registry's manifest does not match the pinned {digest}")
        # The media type is the registry's word: only one we know is passed on (it may reach a reason).
        return data, served if served in MANIFEST_MEDIA_TYPES else ""

    def _chunks(self, digest: str, label: str) -> Iterator[bytes]:
        response = self._get(self._url("blobs", digest), label)
        try:
            yield from response.iter_raw(_READ)
        except httpx.HTTPError as exc:
            logger.warning(
                "the stream of %s from %s broke off: %s", label, _loggable(response.url), type(exc).__name__
            )
            raise ModelFormatError(
                f"the registry's stream of {label} broke off (the log has the detail)"
            ) from None
        finally:
            response.close()

    def small_blob(self, digest: str, size: int, label: str) -> bytes:
        reader = VerifiedReader(self._chunks(digest, label), digest=digest, size=size, label=label)
        return _read_small(reader, size)

    def open_blob(self, digest: str, size: int, label: str) -> VerifiedReader:
        return VerifiedReader(self._chunks(digest, label), digest=digest, size=size, label=label)

    def read_range(self, digest: str, offset: int, out: memoryview, label: str) -> None:
        """A ``Range`` request; a registry that ignores it (200) is refused, not read whole."""
        want = f"bytes {offset}-{offset + len(out) - 1}/"
        response = self._get(self._url("blobs", digest), label, byte_range=(offset, len(out)))
        try:
            if response.status_code != 206 or not response.headers.get("Content-Range", "").startswith(want):
                logger.warning(
                    "the registry answered %d (%r) to a range request for %s",
                    response.status_code, response.headers.get("Content-Range"), label,
                )  # fmt: skip
                raise ModelFormatError(
                    f"the registry does not serve byte ranges of {label} (the log has the detail)"
                )
            got = 0
            for chunk in response.iter_raw(_READ):
                if got + len(chunk) > len(out):
                    raise ModelFormatError(f"the registry sent more of {label} than asked")
                out[got : got + len(chunk)] = chunk
                got += len(chunk)
            if got != len(out):
                raise ModelFormatError(f"the registry's range of {label} is short")
        except httpx.HTTPError as exc:
            logger.warning("a range of %s broke off: %s", label, type(exc).__name__)
            raise ModelFormatError(
                f"the registry's stream of {label} broke off (the log has the detail)"
            ) from None
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()


def open_store(ref: ImageReference, *, allow_http: bool = False) -> BlobStore:
    """Return the blob store of ``ref`` (a layout directory, or a registry repository)."""
    if ref.transport == "oci":
        assert ref.layout is not None
        return LayoutStore(ref.layout)
    return RegistryStore(ref, allow_http=allow_http)
