"""Verify every TLS connection before any request goes over it (sync, async, streaming).

How: an httpx transport sends requests through an httpcore connection pool, and the pool opens
every connection through a *network backend* (``connect_tcp``, then ``start_tls`` on the stream
it returns). :class:`VerifyingTransport` and :class:`AsyncVerifyingTransport` are httpx's own
transports over a pool whose backend wraps the system one; in ``start_tls`` each new connection:

1. completes the TLS handshake (no CA check: trust comes from the attestation binding) and reads
   the SPKI sha256 of the certificate *this connection* presented;
2. if that key is in the :class:`~attest.client.verifier.Verifier`'s verified set, goes to the pool;
3. if that key was refused before, is closed without a request;
4. otherwise carries, over this same connection, ``GET`` :data:`~attest.client.remote.ATTESTATION_PATH`
   with a fresh nonce and ``GET`` :data:`~attest.client.remote.CONFIG_PATH`, which the verifier
   checks with this connection's SPKI (the document must bind exactly that key, answer that
   nonce and pass the policy); verified, the connection goes to the pool, idle;
5. a connection that did not verify is closed and a new one opened to the same address (a load
   balancer may send it to another replica), ``verifier.max_attempts`` connections in all; then
   :class:`~attest.client.verifier.NoVerifiedReplica` (a replica was refused) or
   :class:`~foundation.errors.VerificationUnavailable` (none could be asked) is raised, and the
   request is never sent.

Why there: the pool only ever holds connections that came out of step 2 or 4, so no request,
streamed or not, can go over a connection whose peer is unverified, with httpx's own request,
streaming and error handling around it. As a second guard the stream handed to the pool refuses
to write before its peer verified (a plain ``http://`` connection, which never calls
``start_tls``, fails at its first byte; the transports refuse ``http://`` up front). Only
HTTP/1.1 is offered (the verification exchange and the requests share the connection).

Not verified: which replica answers a given request is the pool's choice among verified ones
(:func:`replica_of` tells which one did). The verified set does not expire (see
:mod:`attest.client.verifier`).

Warning:
    An ``httpx.Client`` that mounts proxies (its default ``trust_env=True`` with ``HTTPS_PROXY``
    set) sends matching requests through the proxy's transport instead of this one: build
    clients with :func:`verified_client` / :func:`verified_async_client`, or ``trust_env=False``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import anyio.to_thread
import httpcore
import httpx

from attest.client.remote import (
    ATTESTATION_PATH,
    CONFIG_PATH,
    NotAnEnclave,
    VerificationBundle,
    VerifiedServer,
    peer_identity,
    unverified_tls_context,
)
from attest.client.verdict import ServerRefused
from attest.client.verifier import NoVerifiedReplica, Replica, Verifier
from foundation.errors import AttestationError, MalformedEvidence, PolicyViolation, VerificationUnavailable

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DOCUMENT_BYTES",
    "REPLICA_INFO",
    "AsyncVerifyingTransport",
    "VerifyingTransport",
    "probe",
    "replica_of",
    "verified_async_client",
    "verified_client",
    "verify_first",
]

logger = logging.getLogger(__name__)

#: The most a document (or configuration) answer may be; one with GPU evidence is tens of KiB.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: ``get_extra_info`` key of a verified connection's stream: its :class:`VerifiedServer`.
REPLICA_INFO = "enclave_serve_replica"

_UNVERIFIED = "refusing to send a request over a connection whose peer is not verified"
_NOT_HTTPS = "the verifying transport speaks HTTPS only: the attestation binds the replica's TLS key"
#: httpx's own default pool limits.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
_HTTPCORE_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError)


def replica_of(response: httpx.Response) -> VerifiedServer | None:
    """Return the verified replica whose connection carried ``response`` (None for another transport)."""
    stream = response.extensions.get("network_stream")
    server = None if stream is None else stream.get_extra_info(REPLICA_INFO)
    return server if isinstance(server, VerifiedServer) else None


class _Attempts:
    """The connections one new connection tried, and what each reached (shared by sync and async)."""

    def __init__(self, verifier: Verifier, address: str) -> None:
        self.verifier = verifier
        self.address = address
        self.replicas: list[Replica] = []

    def seen(self, identity: tuple[str, bytes] | None) -> VerifiedServer | None:
        """The verified replica with this key, or None when it must be checked.

        Raises:
            AttestationError: it cannot be used: no TLS, or refused before.
        """
        if identity is None:
            raise PolicyViolation("the connection has no TLS: nothing binds it to an attestation")
        known = self.verifier.known(identity[0])
        if isinstance(known, ServerRefused):
            raise known
        return known

    def bundle(
        self, identity: tuple[str, bytes], nonce: bytes, document: bytes, config: bytes
    ) -> VerificationBundle:
        try:
            parsed = json.loads(document)
        except ValueError as exc:
            raise MalformedEvidence("the attestation document is not JSON") from exc
        return VerificationBundle(
            url=f"https://{self.address}",
            nonce=nonce,
            tls_spki_sha256=identity[0],
            tls_certificate_pem=identity[1],
            document=parsed if isinstance(parsed, dict) else {"not": "an object"},
            config=config,
        )

    def record(self, identity: tuple[str, bytes] | None, outcome: VerifiedServer | AttestationError) -> None:
        spki = None if identity is None else identity[0]
        if isinstance(outcome, VerifiedServer):
            self.replicas.append(Replica(address=self.address, spki_sha256=spki, server=outcome))
        else:
            self.replicas.append(Replica(address=self.address, spki_sha256=spki, error=outcome))

    def error(self) -> AttestationError:
        """The error for a new connection none of whose attempts verified."""
        if any(isinstance(r.error, ServerRefused) for r in self.replicas):
            return NoVerifiedReplica(self.address, tuple(self.replicas))
        last = self.replicas[-1].error if self.replicas else None
        return VerificationUnavailable(
            f"no replica behind {self.address} could be verified in {len(self.replicas)} connection(s): "
            f"{last}"
        )


def _request_parts(host: str, port: int, path: str, timeout: float) -> tuple[httpcore.URL, dict[str, Any]]:
    authority = f"[{host}]" if ":" in host else host
    if port != 443:
        authority += f":{port}"
    url = httpcore.URL(scheme=b"https", host=host.encode(), port=port, target=path.encode())
    headers = [(b"Host", authority.encode()), (b"Accept", b"application/json")]
    limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    return url, {"headers": headers, "extensions": {"timeout": limits}}


def _collect(path: str, chunks: Iterable[bytes], body: bytearray) -> None:
    for chunk in chunks:
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            raise VerificationUnavailable(f"the answer to {path} is larger than {MAX_DOCUMENT_BYTES} bytes")


def _status_error(status: int, host: str, port: int, path: str, body: bytes) -> AttestationError:
    """The error for a non-200 answer: no attestation route is a refusal, anything else an outage."""
    if path.startswith(ATTESTATION_PATH) and status in (404, 405):
        authority = f"[{host}]" if ":" in host else host
        return NotAnEnclave(f"https://{authority}:{port}", status)
    return VerificationUnavailable(
        f"the replica answered {status} for {path}: {body[:300].decode(errors='replace')}"
    )


# -- sync ---------------------------------------------------------------------------------------


def _get(conn: httpcore.HTTP11Connection, host: str, port: int, path: str, timeout: float) -> bytes:
    url, kw = _request_parts(host, port, path, timeout)
    body = bytearray()
    try:
        with conn.stream("GET", url, **kw) as response:
            stream = response.stream
            assert isinstance(stream, Iterable)
            _collect(path, stream, body)
    except _HTTPCORE_ERRORS as exc:
        raise VerificationUnavailable(f"the replica broke off the answer to {path}: {exc!r}") from exc
    if response.status != 200:
        raise _status_error(response.status, host, port, path, bytes(body))
    return bytes(body)


def _fetch(
    tls: httpcore.NetworkStream, attempts: _Attempts, identity: tuple[str, bytes], host: str, port: int
) -> tuple[VerifiedServer, bool]:
    """Fetch and check a document over ``tls``; return the server and whether the connection is idle."""
    verifier = attempts.verifier
    nonce = verifier.nonce()
    conn = httpcore.HTTP11Connection(origin=httpcore.Origin(b"https", host.encode(), port), stream=tls)
    document = _get(conn, host, port, f"{ATTESTATION_PATH}?nonce={nonce.hex()}", verifier.timeout_s)
    config = _get(conn, host, port, CONFIG_PATH, verifier.timeout_s)
    server = verifier.check(attempts.bundle(identity, nonce, document, config))
    return server, conn.is_idle()


def _open_verified(
    first: httpcore.NetworkStream,
    reopen: Callable[[], httpcore.NetworkStream],
    start_tls: Callable[[httpcore.NetworkStream], httpcore.NetworkStream],
    attempts: _Attempts,
    host: str,
    port: int,
    tries: int,
) -> _Connection:
    stream = first
    for attempt in range(tries):
        if attempt:
            stream = reopen()
        tls = start_tls(stream)
        identity = peer_identity(tls.get_extra_info("ssl_object"))
        try:
            server = attempts.seen(identity)
            idle = True
            if server is None:
                assert identity is not None
                server, idle = _fetch(tls, attempts, identity, host, port)
            attempts.record(identity, server)
            if idle:
                return _Connection(tls, server)
            attempts.record(
                identity, VerificationUnavailable("the replica closed the connection it attested")
            )
        except AttestationError as exc:
            attempts.record(identity, exc)
        tls.close()
    raise attempts.error()


class _Connection(httpcore.NetworkStream):
    """A connection as the pool sees it: no byte is written before its peer verified."""

    def __init__(
        self,
        stream: httpcore.NetworkStream,
        server: VerifiedServer | None = None,
        open_verified: Callable[[httpcore.NetworkStream, Any, str | None, float | None], _Connection]
        | None = None,
    ) -> None:
        self._stream = stream
        self.server = server
        self._open_verified = open_verified

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.server is None:
            raise PolicyViolation(_UNVERIFIED)
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        if self._open_verified is None:
            raise PolicyViolation(
                "TLS inside TLS (a proxy tunnel) is not supported by the verifying transport"
            )
        return self._open_verified(self._stream, ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self.server if info == REPLICA_INFO else self._stream.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, verifier: Verifier, inner: httpcore.NetworkBackend) -> None:
        self._verifier = verifier
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        reopen = functools.partial(
            self._inner.connect_tcp, host, port, timeout, local_address, socket_options
        )

        def open_verified(
            first: httpcore.NetworkStream, ctx: Any, server_hostname: str | None, tls_timeout: float | None
        ) -> _Connection:
            attempts = _Attempts(self._verifier, f"{host}:{port}")
            return _open_verified(
                first,
                reopen,
                lambda s: s.start_tls(ctx, server_hostname, tls_timeout),
                attempts,
                host,
                port,
                self._verifier.max_attempts,
            )

        return _Connection(reopen(), open_verified=open_verified)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _pool_options(limits: httpx.Limits) -> dict[str, Any]:
    return {
        "ssl_context": unverified_tls_context(),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": True,
        "http2": False,
    }


class VerifyingTransport(httpx.HTTPTransport):
    """httpx's transport, whose every new connection is verified first (module docstring).

    Raises (from ``handle_request``, before anything is sent):
        NoVerifiedReplica: every connection tried reached a replica that did not verify.
        VerificationUnavailable: no replica could be asked.
        PolicyViolation: the URL is not ``https://``.
    """

    def __init__(self, verifier: Verifier, *, limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        super().__init__(verify=unverified_tls_context(), trust_env=False, limits=limits)
        self.verifier = verifier
        # httpx's transport does not take a network backend: give it a pool that has ours.
        self._pool = httpcore.ConnectionPool(
            network_backend=_Backend(verifier, httpcore.SyncBackend()), **_pool_options(limits)
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise PolicyViolation(_NOT_HTTPS)
        return super().handle_request(request)


def probe(verifier: Verifier, url: str) -> Replica:
    """Open one fresh connection to ``url``, verify the replica it reaches (unless known) and close it.

    Returns the :class:`Replica` reached, verified or not (``replica.error`` says why not).

    Raises:
        PolicyViolation: ``url`` is not ``https://``.
        httpx.TransportError: the address cannot be reached at all.
    """
    parsed = httpx.URL(url)
    if parsed.scheme != "https":
        raise PolicyViolation(_NOT_HTTPS)
    host, port = parsed.host, parsed.port or 443
    attempts = _Attempts(verifier, f"{host}:{port}")
    ctx = unverified_tls_context()
    ctx.set_alpn_protocols(["http/1.1"])
    backend = httpcore.SyncBackend()
    try:
        stream = backend.connect_tcp(host, port, timeout=verifier.timeout_s)
        conn = _open_verified(
            stream,
            lambda: backend.connect_tcp(host, port, timeout=verifier.timeout_s),
            lambda s: s.start_tls(ctx, host, verifier.timeout_s),
            attempts,
            host,
            port,
            1,
        )
        conn.close()
    except AttestationError:
        pass
    except _HTTPCORE_ERRORS as exc:
        raise httpx.ConnectError(f"cannot reach {host}:{port}: {exc!r}") from exc
    return attempts.replicas[0]


def verify_first(verifier: Verifier, url: str) -> VerifiedServer:
    """Probe ``url`` until a connection reaches a verified replica (``verifier.max_attempts`` at most).

    Raises:
        NoVerifiedReplica: every connection reached a replica that did not verify.
        VerificationUnavailable: no replica could be asked, or the address cannot be reached.
        PolicyViolation: ``url`` is not ``https://``.
    """
    replicas: list[Replica] = []
    for _ in range(verifier.max_attempts):
        try:
            replica = probe(verifier, url)
        except httpx.TransportError as exc:
            raise VerificationUnavailable(str(exc)) from exc
        if replica.server is not None:
            return replica.server
        replicas.append(replica)
    attempts = _Attempts(verifier, url)
    attempts.replicas = replicas
    raise attempts.error()


def verified_client(verifier: Verifier, base_url: str = "", *, timeout: float = 600.0) -> httpx.Client:
    """An ``httpx.Client`` over a :class:`VerifyingTransport` (no proxies from the environment)."""
    return httpx.Client(
        transport=VerifyingTransport(verifier), base_url=base_url, timeout=timeout, trust_env=False
    )


# -- async --------------------------------------------------------------------------------------


async def _aget(
    conn: httpcore.AsyncHTTP11Connection, host: str, port: int, path: str, timeout: float
) -> bytes:
    url, kw = _request_parts(host, port, path, timeout)
    body = bytearray()
    try:
        async with conn.stream("GET", url, **kw) as response:
            stream = response.stream
            assert hasattr(stream, "__aiter__")
            async for chunk in stream:
                _collect(path, (chunk,), body)
    except _HTTPCORE_ERRORS as exc:
        raise VerificationUnavailable(f"the replica broke off the answer to {path}: {exc!r}") from exc
    if response.status != 200:
        raise _status_error(response.status, host, port, path, bytes(body))
    return bytes(body)


async def _afetch(
    tls: httpcore.AsyncNetworkStream, attempts: _Attempts, identity: tuple[str, bytes], host: str, port: int
) -> tuple[VerifiedServer, bool]:
    verifier = attempts.verifier
    nonce = verifier.nonce()
    conn = httpcore.AsyncHTTP11Connection(origin=httpcore.Origin(b"https", host.encode(), port), stream=tls)
    document = await _aget(conn, host, port, f"{ATTESTATION_PATH}?nonce={nonce.hex()}", verifier.timeout_s)
    config = await _aget(conn, host, port, CONFIG_PATH, verifier.timeout_s)
    bundle = attempts.bundle(identity, nonce, document, config)
    # The checks are CPU work (signatures, certificate chains): off the event loop.
    server = await anyio.to_thread.run_sync(verifier.check, bundle)
    return server, conn.is_idle()


class _AsyncConnection(httpcore.AsyncNetworkStream):
    """The async :class:`_Connection`."""

    def __init__(
        self,
        stream: httpcore.AsyncNetworkStream,
        server: VerifiedServer | None = None,
        open_verified: Callable[..., Any] | None = None,
    ) -> None:
        self._stream = stream
        self.server = server
        self._open_verified = open_verified

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.server is None:
            raise PolicyViolation(_UNVERIFIED)
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        if self._open_verified is None:
            raise PolicyViolation(
                "TLS inside TLS (a proxy tunnel) is not supported by the verifying transport"
            )
        connection: _AsyncConnection = await self._open_verified(
            self._stream, ssl_context, server_hostname, timeout
        )
        return connection

    def get_extra_info(self, info: str) -> Any:
        return self.server if info == REPLICA_INFO else self._stream.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, verifier: Verifier, inner: httpcore.AsyncNetworkBackend) -> None:
        self._verifier = verifier
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        inner = self._inner
        verifier = self._verifier

        async def reopen() -> httpcore.AsyncNetworkStream:
            return await inner.connect_tcp(host, port, timeout, local_address, socket_options)

        async def open_verified(
            first: httpcore.AsyncNetworkStream,
            ctx: Any,
            server_hostname: str | None,
            tls_timeout: float | None,
        ) -> _AsyncConnection:
            attempts = _Attempts(verifier, f"{host}:{port}")
            stream = first
            for attempt in range(verifier.max_attempts):
                if attempt:
                    stream = await reopen()
                tls = await stream.start_tls(ctx, server_hostname, tls_timeout)
                identity = peer_identity(tls.get_extra_info("ssl_object"))
                try:
                    server = attempts.seen(identity)
                    idle = True
                    if server is None:
                        assert identity is not None
                        server, idle = await _afetch(tls, attempts, identity, host, port)
                    attempts.record(identity, server)
                    if idle:
                        return _AsyncConnection(tls, server)
                    attempts.record(
                        identity, VerificationUnavailable("the replica closed the connection it attested")
                    )
                except AttestationError as exc:
                    attempts.record(identity, exc)
                await tls.aclose()
            raise attempts.error()

        return _AsyncConnection(await reopen(), open_verified=open_verified)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class AsyncVerifyingTransport(httpx.AsyncHTTPTransport):
    """The async :class:`VerifyingTransport` (asyncio or trio, through AnyIO)."""

    def __init__(self, verifier: Verifier, *, limits: httpx.Limits = DEFAULT_LIMITS) -> None:
        super().__init__(verify=unverified_tls_context(), trust_env=False, limits=limits)
        self.verifier = verifier
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=_AsyncBackend(verifier, httpcore.AnyIOBackend()), **_pool_options(limits)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise PolicyViolation(_NOT_HTTPS)
        return await super().handle_async_request(request)


def verified_async_client(
    verifier: Verifier, base_url: str = "", *, timeout: float = 600.0
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` over an :class:`AsyncVerifyingTransport` (no proxies from the environment)."""
    return httpx.AsyncClient(
        transport=AsyncVerifyingTransport(verifier), base_url=base_url, timeout=timeout, trust_env=False
    )
