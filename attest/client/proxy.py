"""A local OpenAI endpoint that forwards only over verified connections (``enclave-serve proxy``).

:func:`proxy_app` is an ASGI app for plain HTTP on loopback: every request (any method, any path
but the one below) is forwarded to ``upstream`` through an
:class:`~attest.client.transport.AsyncVerifyingTransport`, so it goes only over a TLS connection
whose replica the :class:`~attest.client.verifier.Verifier` verified; the answer, streamed
(server-sent events included) chunk by chunk as it arrives, carries the replica's TLS key in
``x-enclave-serve-replica``. curl, the JavaScript or Go SDKs and agent tools then need no
attestation code: they talk to ``http://127.0.0.1:PORT/v1``.

``GET /.well-known/enclave-serve/verified`` lists the verified replicas and their claims.

When no replica verifies, the request is answered 502 with an OpenAI-style error
(``type``: ``enclave_not_verified``, or ``enclave_unavailable`` when none could be asked) and
nothing is forwarded.

Warning:
    The proxy's own listener is plain HTTP with no authentication: anyone who can connect to it
    talks to the enclave through this verification. Keep it on loopback
    (``enclave-serve proxy`` refuses anything else without an explicit flag).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from attest.client.transport import replica_of, verified_async_client
from attest.client.verdict import ServerRefused
from attest.client.verifier import Verifier
from foundation.errors import AttestationError

__all__ = ["REPLICA_HEADER", "VERIFIED_PATH", "proxy_app"]

logger = logging.getLogger(__name__)

VERIFIED_PATH = "/.well-known/enclave-serve/verified"
#: Response header naming the SPKI sha256 of the replica that answered.
REPLICA_HEADER = "x-enclave-serve-replica"
#: Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_DROPPED = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "host",
    }
)  # fmt: skip


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def proxy_app(verifier: Verifier, upstream: str, *, timeout: float = 600.0) -> Starlette:
    """Return the proxy's ASGI app forwarding to ``upstream`` (``https://host:port``, no ``/v1``).

    Raises: nothing at construction; each request's failures are answered 502 (module docstring).
    """
    base = upstream.rstrip("/")
    client = verified_async_client(verifier, timeout=timeout)

    async def verified(request: Request) -> Response:
        return JSONResponse(
            {
                "upstream": base,
                "replicas": [server.to_json() for server in verifier.verified.values()],
                "refused": {spki: str(exc) for spki, exc in verifier.refused.items()},
            }
        )

    async def forward(request: Request) -> Response:
        # httpx sets the request's length from the body it sends.
        headers = [
            (k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED | {"content-length"}
        ]
        outgoing = client.build_request(
            request.method,
            base + request.url.path,
            params=request.url.query.encode() or None,
            headers=headers,
            content=await request.body(),
        )
        try:
            answer = await client.send(outgoing, stream=True)
        except ServerRefused as exc:
            logger.warning("no verified replica for %s %s: %s", request.method, request.url.path, exc)
            return _error(502, "enclave_not_verified", f"no replica of {base} verified: {exc}")
        except (AttestationError, httpx.HTTPError) as exc:
            logger.warning("cannot reach %s: %s", base, exc)
            return _error(502, "enclave_unavailable", f"cannot reach a verified replica of {base}: {exc}")
        replica = replica_of(answer)
        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _DROPPED}
        if replica is not None and replica.tls_spki_sha256 is not None:
            out_headers[REPLICA_HEADER] = replica.tls_spki_sha256
        # The bytes as sent (raw: a content-encoding and its content-length stay true).
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers=out_headers,
            background=BackgroundTask(answer.aclose),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    routes: list[Any] = [
        Route(VERIFIED_PATH, verified, methods=["GET"]),
        Route("/{path:path}", forward, methods=methods),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
