"""The API key guard: every route needs ``--api-key``'s bearer token but the public ones.

vLLM's own middleware guards only paths under ``/v1`` (and a few other prefixes): ``/tokenize``,
``/detokenize``, ``/metrics``, ``/load`` and anything a later vLLM adds would stay open. This
guard inverts that: a request passes without the token only when its path is one of the public
paths (the probes and the attestation documents, which users and Kubernetes need before they
hold any key). Tokens are compared as SHA-256 digests in constant time; the token is never
logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ApiKeyGuard", "is_public"]


def is_public(path: str, public: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``public``: an exact path, or below one that ends with ``/``."""
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in public)


class ApiKeyGuard:
    """Pure ASGI middleware: 401 for any HTTP or WebSocket request without a valid bearer token."""

    def __init__(self, app: ASGIApp, *, tokens: Sequence[str], public: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("the API key guard needs at least one token")
        self.app = app
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        self._public = tuple(public)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for expected in self._digests:
            ok |= hmac.compare_digest(digest, expected)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if (
            scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
            or is_public(path, self._public)
            or self._authorized(Headers(scope=scope))
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = JSONResponse(
            {"error": {"message": "a valid API key is required (Authorization: Bearer <key>)",
                       "type": "unauthorized", "code": 401}},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
        await response(scope, receive, send)
